import numpy as np
import pytest
import torch

from filterx.dataset import Dataset
from filterx.loader import LoaderConfig, center_offset, load_batches, rank_share

BACKENDS = ("dali", "torchvision", "pil")


def _epoch(tars, **kw):
    batches = list(load_batches(tars, LoaderConfig(**kw)))
    ids = torch.cat([b.ids for b in batches])
    return ids, torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]), batches


@pytest.fixture(scope="module")
def decoded(dataset_dir):
    ds = Dataset.open(dataset_dir)
    out = {}
    for backend in BACKENDS:
        for res in (32, 48):
            ids, images, labels, batches = _epoch(ds.tar_paths(), resolution=res, backend=backend, batch_size=8, workers=1)
            order = ids.argsort()
            out[backend, res] = (ids[order], images[order], labels[order], batches)
    return ds, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_once_with_its_label(decoded, backend):
    ds, out = decoded
    for res in (32, 48):
        ids, images, labels, batches = out[backend, res]
        assert ids.tolist() == list(range(ds.num_samples))
        assert labels.tolist() == ds.labels.tolist()
        assert images.shape == (ds.num_samples, 3, res, res) and images.dtype == torch.float32
        assert [len(b.ids) for b in batches] == [8, 8, 8, ds.num_samples - 24]
        assert torch.isfinite(images).all() and images.std() > 0.3  # normalised photos, not blank


@pytest.mark.parametrize("res", (32, 48))
def test_backends_give_the_same_images(decoded, res):
    _, out = decoded
    dali, tv, pil = (out[b, res][1] for b in BACKENDS)
    # same decoder (libjpeg-turbo), same antialiased resize, same crop rounding: rounding noise only
    d = (dali - tv).abs()
    assert d.mean() < 0.01 and d.max() < 0.1
    # PIL decodes through DCT-domain scaling (Image.draft): a different but close filter
    assert (pil - tv).abs().mean() < 0.06


def test_center_offset_rounds_half_up():
    assert [center_offset(s, 64) for s in (64, 65, 73, 74)] == [0, 1, 5, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_training_epochs_are_seeded(dataset_dir, backend):
    tars = Dataset.open(dataset_dir).tar_paths()
    kw = dict(resolution=32, backend=backend, batch_size=8, workers=1, train=True, shuffle=True, seed=3)
    a, ia, _, _ = _epoch(tars, **kw)
    b, ib, _, _ = _epoch(tars, **kw)
    assert sorted(a.tolist()) == list(range(len(a)))
    assert a.tolist() != sorted(a.tolist())
    assert torch.equal(a, b) and torch.equal(ia, ib)
    c, _, _, _ = _epoch(tars, **{**kw, "epoch": 1})
    assert c.tolist() != a.tolist()


def test_rank_shares_cover_every_sample_evenly():
    cfg = LoaderConfig(shuffle=True, seed=1)
    shares = [rank_share(27, cfg, r, 4) for r in range(4)]
    assert {len(s) for s in shares} == {7}
    assert set(np.concatenate(shares).tolist()) == set(range(27))


def test_ddp_split_and_id_subset(dataset_dir):
    tars = Dataset.open(dataset_dir).tar_paths()
    seen = []
    for rank in range(2):
        batches = list(load_batches(tars, LoaderConfig(resolution=32, backend="pil", batch_size=4, workers=0),
                                    rank=rank, world_size=2))
        seen.append(torch.cat([b.ids for b in batches]).tolist())
    assert len(seen[0]) == len(seen[1]) == 14
    assert set(seen[0]) | set(seen[1]) == set(range(27))
    subset = np.array([3, 7, 20])
    ids, _, _, _ = _epoch(tars, resolution=32, backend="torchvision", batch_size=4, workers=0)
    got = torch.cat([b.ids for b in load_batches(tars, LoaderConfig(resolution=32, backend="pil", workers=0), ids=subset)])
    assert sorted(got.tolist()) == [3, 7, 20]
    with pytest.raises(ValueError, match="materialise"):
        next(load_batches(tars, LoaderConfig(backend="dali"), ids=subset))
    # "auto" reads a subset through torchvision even where DALI is installed
    got = torch.cat([b.ids for b in load_batches(tars, LoaderConfig(resolution=32, workers=0), ids=subset)])
    assert sorted(got.tolist()) == [3, 7, 20]


def test_missing_index_is_rebuilt_and_bad_input_named(dataset_copy):
    ds = Dataset.open(dataset_copy)
    ds.index_path(0).unlink()
    ids, _, _, _ = _epoch(ds.tar_paths()[:1], resolution=32, backend="dali", batch_size=8, workers=1)
    assert ids.tolist() == [0, 1, 2, 3, 4] and ds.index_path(0).is_file()
    with pytest.raises(ValueError, match="unknown backend 'opencv'"):
        LoaderConfig(backend="opencv")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        next(load_batches([dataset_copy / "missing.tar"], LoaderConfig()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tar_fails_with_one_clear_line(dataset_copy, backend):
    ds = Dataset.open(dataset_copy)
    tar = ds.shard_path(2)
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"shard .*000002.tar is truncated"):
        next(load_batches(ds.tar_paths(), LoaderConfig(resolution=32, backend=backend, workers=0)))
