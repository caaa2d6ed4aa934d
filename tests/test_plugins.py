"""The three registries take a newcomer from outside the package: a scorer, a manifest format
and a decode backend registered in this file alone, then used through the command line with
no filterx file edited."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clirun import run
from filterx.decode import backends
from filterx.decode.loader import Batch, LoaderConfig, rank_batch_sizes, rank_share, sample_refs
from filterx.io import manifest
from filterx.io.dataset import Dataset
from filterx.io.scores import read_scores
from filterx.manifest import read_manifest
import filterx.scorers as scorers


@pytest.fixture()
def registries(monkeypatch):
    """Private copies of the registries, so the newcomers leave with the test."""
    scorers._load_all()
    backends.list_backends()
    monkeypatch.setattr(scorers, "_REGISTRY", dict(scorers._REGISTRY))
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(manifest, "_FORMATS", dict(manifest._FORMATS))


def _register_id_modulus():
    @scorers.register_scorer("id-modulus", needs=())
    def id_modulus(inputs: scorers.ScoreInputs, *, seed: int, modulus: int = 2) -> np.ndarray:
        """The sample id modulo ``modulus``: a score anyone can check."""
        return (np.arange(inputs.num_source) % modulus).astype(np.float32)


def toy_image(sample_id: int, resolution: int) -> torch.Tensor:
    """What the toy backend 'decodes' for a sample: a flat image whose value comes from its id."""
    return torch.full((3, resolution, resolution), (sample_id % 7) / 7.0 - 0.5)


def _register_flat_backend():
    @backends.register_backend("flat", subsets=True, priority=-1)
    def flat_batches(tars, cfg: LoaderConfig, rank, world_size, ids=None, on_error=None):
        """Reads the ids from the index files, as every backend must, and draws flat images."""
        refs = sample_refs(tars)
        if ids is not None:
            wanted = set(np.asarray(ids).tolist())
            refs = [r for r in refs if r.sample_id in wanted]
        order = rank_share(len(refs), cfg, rank, world_size)
        start = 0
        for size in rank_batch_sizes(len(refs), cfg.batch_size, world_size):
            chunk = [refs[i] for i in order[start : start + size]]
            start += size
            sid = torch.tensor([r.sample_id for r in chunk], dtype=torch.int64)
            images = torch.stack([toy_image(r.sample_id, cfg.resolution) for r in chunk]).to(cfg.device)
            yield Batch(sid, images, torch.full((len(chunk),), -1, dtype=torch.int64))


def _register_csv_format():
    def write(path, ds, ranked, scores, header, **_):
        path.write_text("id,score\n" + "".join(f"{i},{s}\n" for i, s in zip(ranked.tolist(), scores.tolist())))

    def read(path):
        rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
        ranked = np.array([int(r[0]) for r in rows], dtype=np.int64)
        scores = np.array([float(r[1]) for r in rows], dtype=np.float32)
        return manifest.Manifest(np.sort(ranked), ranked, scores, {"format": "csv"}, path)

    manifest.register_format("csv", write=write, read=read, suffix=".csv")


def test_a_scorer_and_a_manifest_format_from_outside(registries, dataset_copy, tmp_path):
    _register_id_modulus()
    _register_csv_format()
    code, out, err = run("score", "--method", "id-modulus", "--source", dataset_copy, "-p", "modulus=3", "-q")
    assert code == 0, err
    n = Dataset.open(dataset_copy).num_samples
    scores, attrs = read_scores(Dataset.open(dataset_copy), "id-modulus")
    np.testing.assert_array_equal(scores, np.arange(n) % 3)
    assert attrs["params"]["modulus"] == 3
    # a parameter the scorer does not declare is refused in one line, the registry's check
    code, _, err = run("score", "--method", "id-modulus", "--source", dataset_copy, "-p", "modulo=3", "-q")
    assert code == 2 and "modulo" in err

    code, _, err = run("select", "--source", dataset_copy, "--method", "id-modulus", "--count", "4",
                       "-o", tmp_path / "top.csv", "-q")
    assert code == 0, err
    m = read_manifest(tmp_path / "top.csv")
    expected = np.sort(np.flatnonzero(np.arange(n) % 3 == 2))[:4]  # best first, ties by the lower id
    np.testing.assert_array_equal(m.ranked, expected)
    assert m.header == {"format": "csv"}
    code, _, _ = run("select", "--help")
    assert code == 0


def test_a_decode_backend_from_outside(registries, sample_dirs, encoder_file, tmp_path):
    import shutil

    from filterx.models.encoder import load_encoder
    from filterx.stages.embed import read_embeddings

    _register_flat_backend()
    assert "flat" in backends.list_backends() and backends.resolve_backend("auto") != "flat"
    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    shutil.rmtree(src / "embeddings", ignore_errors=True)
    code, help_text, _ = run("embed", "--help")
    assert "flat" in help_text
    code, _, err = run("embed", src, "--encoder", encoder_file, "--backend", "flat", "--device", "cpu",
                       "--batch-size", "16", "--workers", "0", "-q")
    assert code == 0, err
    enc = load_encoder(encoder_file, "cpu")
    ds = Dataset.open(src)
    got = read_embeddings(ds, enc.tag)
    ids = np.arange(ds.num_samples)
    with torch.inference_mode():
        want = enc.features(torch.stack([toy_image(i, enc.resolution) for i in ids.tolist()])).numpy()
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=0, atol=2e-2)
    # every flat image with the same id % 7 gets the same features: the backend's images were embedded
    assert np.allclose(got[ids % 7 == 1], got[1], atol=1e-3)
