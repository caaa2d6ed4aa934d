"""embed: encoder features for every sample of a dataset, into zarr aligned to sample ids.

    DATASET/embeddings/<encoder tag>.zarr/
      emb    (N, D) float16, one chunk of rows per shard (shard s = chunk s)
      done   (num_shards,) bool, one chunk per element: the per-shard done mask

    DATASET/embeddings/<encoder tag>.bad/NNNNNN.json
                         the samples of shard NNNNNN that could not be decoded (a tar damaged
                         after ``shard`` checked it): their rows are NaN, so they score NaN
                         and are never selected; written before the shard's done flag

Rows of a shard are written first and its ``done`` flag after them, so a run killed at any
point leaves every shard either done (all rows written) or not done; a re-run embeds only the
shards that are not done (the store is a ``filterx.io.rowstore``; one made for another version
of the dataset is refused with a ValueError, never overwritten). A runner maps the undone
shards over workers (``filterx.runners``): this process, the ranks of a torchrun (round-robin),
or Ray actors that each hold the model (one shard per task). A worker writes its own shards'
chunks and done flags, so no two processes ever write the same file and no pixels travel.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from filterx.io import atomic, rowstore
from filterx.io.dataset import Dataset
from filterx.models.encoder import Encoder, load_encoder
from filterx.core.faults import crash_point
from filterx.decode.loader import LoaderConfig, SkipBadSamples, load_batches
from filterx.runners import Runner, Work, get_runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    dataset: Path
    encoder: Path | str  # an encoder file, or a backbone spec (filterx.models.backbones)
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 128
    workers: int = 2
    quiet: bool = False
    runner: str | None = None  # filterx.runners name; None: local, or torchrun under torchrun
    address: str | None = None  # ray: the cluster
    actors: int = 0  # ray: embedding actors; 0: one per GPU (CPUs / workers without GPUs)


@dataclass(frozen=True)
class EmbedSummary:
    path: Path
    embedded_shards: int
    skipped_shards: int
    samples: int
    seconds: float
    rank: int = 0
    world_size: int = 1
    bad_samples: int = 0

    def line(self) -> str:
        rate = self.samples / max(self.seconds, 1e-9)
        who = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        bad = (f"; {self.bad_samples} images could not be decoded (NaN rows, listed in "
               f"{bad_samples_dir(self.path)})" if self.bad_samples else "")
        return (f"embedded {self.samples} images in {self.embedded_shards} shards{who} in "
                f"{self.seconds:.1f}s ({rate:.0f} img/s); {self.skipped_shards} shards were already "
                f"done; embeddings: {self.path}{bad}")


def bad_samples_dir(store: Path) -> Path:
    """Where the per-shard lists of undecodable samples of an embeddings store live."""
    return store.with_suffix(".bad")


def read_bad_samples(ds: Dataset, tag: str) -> list[dict]:
    """Every sample the embeddings for ``tag`` could not decode: dicts with id, tar, member, reason."""
    d = bad_samples_dir(ds.embeddings_path(tag))
    return [row for f in sorted(d.glob("*.json")) for row in json.loads(f.read_text())] if d.is_dir() else []


def embeddings_complete(ds: Dataset, tag: str) -> bool:
    """Whether every shard of ``ds`` has embeddings for encoder ``tag``."""
    return rowstore.complete(ds.embeddings_path(tag))


def read_embeddings(ds: Dataset, tag: str, ids: np.ndarray | None = None) -> np.ndarray:
    """(N, D) or (len(ids), D) float32 embeddings; ValueError if some are not computed yet."""
    import zarr

    path = ds.embeddings_path(tag)
    if not embeddings_complete(ds, tag):
        raise ValueError(f"embeddings {path} are missing or incomplete; run: filterx embed {ds.root} --encoder ...")
    emb = zarr.open_group(path, mode="r")["emb"]
    out = emb[:] if ids is None else emb.get_orthogonal_selection((np.asarray(ids), slice(None)))
    return np.asarray(out, dtype=np.float32)


def _layout(ds: Dataset, enc: Encoder) -> rowstore.RowLayout:
    dim = int(enc.info["feature_dim"])
    return rowstore.RowLayout("emb", (dim,), "float16", tuple(ds.shard_counts), ds.fingerprint,
                              {"encoder_tag": enc.tag, "arch": enc.info["arch"], "resolution": enc.resolution,
                               "feature_dim": dim})


def _open_store(ds: Dataset, enc: Encoder, runner: Runner) -> rowstore.RowStore:
    """Create the store once (rank 0, atomically), then open it for writing on every rank."""
    path = ds.embeddings_path(enc.tag)
    layout = _layout(ds, enc)
    if runner.is_main and not rowstore.exists(path):
        rowstore.create(path, layout)
    runner.barrier()
    return rowstore.open_rows(path, layout, on_mismatch="raise", hint="embed")


def embed(cfg: EmbedConfig, runner: Runner | None = None) -> EmbedSummary:
    """Embed every shard of ``cfg.dataset`` not yet done with ``cfg.encoder``.

    runner: what maps the shards (default: ``cfg.runner``, see filterx.runners).
    """
    t0 = time.perf_counter()
    runner = runner or get_runner(cfg.runner, cfg.address, cfg.actors)
    device = runner.start(cfg.device)
    ds = Dataset.open(cfg.dataset)
    # The workers of an in-process runner use this model; others load their own (the driver
    # needs only the tag and the feature size, so it keeps its copy on the CPU).
    enc = load_encoder(cfg.encoder, device if runner.in_process else "cpu")
    if runner.is_main:
        ds.ensure_indexes()
    runner.barrier()
    # locked before the store is opened: a second run reads the done mask only once it may write
    with atomic.run_lock(ds.embeddings_path(enc.tag).parent, f"embed-{enc.tag}-rank{runner.rank}"):
        store = _open_store(ds, enc, runner)
        done = store.done()
        undone = store.undone()
        lcfg = LoaderConfig(resolution=enc.resolution, backend=cfg.backend, device=device,
                            batch_size=cfg.batch_size, workers=cfg.workers,
                            mean=tuple(enc.info["mean"]), std=tuple(enc.info["std"]),
                            crop_fraction=enc.crop_fraction)
        job = EmbedJob(ds.root, cfg.encoder, enc.tag, device, lcfg)
        work = Work(f"embed {ds.name}", undone, EmbedFactory(job, enc), [ds.shard_counts[s] for s in undone],
                    whole_list=True, cpus=max(1, cfg.workers), gpus=1 if device.startswith("cuda") else 0,
                    quiet=cfg.quiet)
        results = [r for _, r in runner.map(work)]
    runner.barrier()
    return EmbedSummary(ds.embeddings_path(enc.tag), len(results), int(done.sum()), sum(r[0] for r in results),
                        time.perf_counter() - t0, runner.rank, runner.world_size, sum(r[1] for r in results))


@dataclass(frozen=True)
class EmbedJob:
    """What an embedding worker needs, wherever it runs (small and picklable)."""

    dataset: Path
    encoder: Path | str
    tag: str
    device: str
    loader: LoaderConfig


@dataclass(frozen=True)
class EmbedFactory:
    """Builds an ``EmbedWorker``; ``loaded``, the driver's model, is used where the worker runs
    in the driver's process and is never pickled (an actor loads its own copy onto its device)."""

    job: EmbedJob
    loaded: Encoder | None = field(default=None, compare=False, repr=False)

    def __call__(self) -> "EmbedWorker":
        return EmbedWorker(self.job, self.loaded)

    def __reduce__(self):
        return EmbedFactory, (self.job,)


class EmbedWorker:
    """Holds the encoder and the open store; embeds lists of shards (a Worker of filterx.runners)."""

    def __init__(self, job: EmbedJob, encoder: Encoder | None = None):
        self.job = job
        self.enc = encoder if encoder is not None else load_encoder(job.encoder, job.device)
        if self.enc.tag != job.tag:
            raise ValueError(f"encoder {job.encoder} has tag {self.enc.tag} here but {job.tag} where the run "
                             "started: every node must see the same encoder file")
        self.ds = Dataset.open(job.dataset)
        self.store = rowstore.open_rows(self.ds.embeddings_path(job.tag), _layout(self.ds, self.enc),
                                        on_mismatch="raise", hint="embed")
        self.features = self.enc.features
        if job.device.startswith("cuda"):
            self.features = self.features.to(memory_format=torch.channels_last)

    def __call__(self, shards: list[int], tick) -> list[tuple[int, int]]:
        """Embed ``shards`` (decoded as one stream); per shard (images embedded, images bad)."""
        bad = _embed_shards(self.ds, self.features, self.store, shards, self.job, tick)
        return [(self.ds.shard_counts[s] - bad.get(s, 0), bad.get(s, 0)) for s in shards]


def _embed_shards(ds: Dataset, features, store: rowstore.RowStore, shards: list[int], job: EmbedJob,
                  tick) -> dict[int, int]:
    """Rows and done flags of ``shards``; returns the number of undecodable images per shard."""
    on_gpu = job.device.startswith("cuda")
    collector = store.collector(shards, after_shard=lambda s: crash_point("embed.shard"))
    bad_dir = bad_samples_dir(store.path)
    for s in shards:  # a list left by an earlier, killed run of an undone shard is redone
        atomic.remove(bad_dir / f"{s:06d}.json")
    skipped, bad_by_shard = SkipBadSamples(), {}
    nan_row = np.full((1, *store.layout.row_shape), np.nan, dtype=np.float16)
    with torch.inference_mode():
        for batch in load_batches([ds.shard_path(s) for s in shards], job.loader, on_error=skipped):
            for bad in skipped.take():
                # listed first, then its NaN row, which may complete the shard and set its done flag
                shard = int(collector.shard_of[bad.sample_id])
                bad_by_shard.setdefault(shard, []).append(
                    {"id": bad.sample_id, "tar": bad.tar, "member": bad.member, "reason": bad.reason})
                bad_dir.mkdir(parents=True, exist_ok=True)
                atomic.write_text(bad_dir / f"{shard:06d}.json", json.dumps(bad_by_shard[shard], indent=1))
                collector.add(np.array([bad.sample_id]), nan_row)
                tick(1)
            if not len(batch.ids):
                continue
            x = batch.images.contiguous(memory_format=torch.channels_last) if on_gpu else batch.images
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                f = features(x)
            collector.add(batch.ids.numpy(), f.float().cpu().numpy().astype(np.float16))
            tick(len(batch.ids))
    unfinished = collector.unfinished()
    if unfinished:
        raise RuntimeError(f"shards {unfinished} were not read completely; re-run embed")
    return {s: len(rows) for s, rows in bad_by_shard.items()}


def ensure_embeddings(dataset: Path, encoder: Path | str, tag: str | None = None, **kwargs) -> str:
    """Embed ``dataset`` with ``encoder`` unless complete embeddings exist; returns the tag.

    ``tag``: the encoder's tag when the caller has already read the file.
    """
    ds = Dataset.open(dataset)
    tag = tag or load_encoder_tag(encoder)
    if not embeddings_complete(ds, tag):
        summary = embed(replace(EmbedConfig(Path(dataset), encoder), **kwargs))
        log.info(summary.line())
    return tag


def load_encoder_tag(path: Path | str) -> str:
    from filterx.models.encoder import read_encoder_file

    return str(read_encoder_file(path)["tag"])
