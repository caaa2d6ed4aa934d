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
of the dataset is refused with a ValueError, never overwritten). Under ``torchrun`` the undone shards are dealt to ranks
round-robin; each rank writes only its own shards' chunks, so no two processes ever write
the same file.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from filterx.io import atomic, rowstore
from filterx.io.dataset import Dataset
from filterx.models.encoder import Encoder, load_encoder
from filterx.core.faults import crash_point
from filterx.decode.loader import LoaderConfig, SkipBadSamples, load_batches
from filterx.core.progress import progress
from filterx.core.runtime import init_distributed, resolve_device

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


def _open_store(ds: Dataset, enc: Encoder, rank: int) -> rowstore.RowStore:
    """Create the store once (rank 0, atomically), then open it for writing on every rank."""
    path = ds.embeddings_path(enc.tag)
    layout = _layout(ds, enc)
    if rank == 0 and not rowstore.exists(path):
        rowstore.create(path, layout)
    _barrier()
    return rowstore.open_rows(path, layout, on_mismatch="raise", hint="embed")


def _barrier() -> None:
    from filterx.core import collectives

    collectives.barrier()


def embed(cfg: EmbedConfig) -> EmbedSummary:
    """Embed every shard of ``cfg.dataset`` not yet done with ``cfg.encoder``."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    ds = Dataset.open(cfg.dataset)
    if info.world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
    enc = load_encoder(cfg.encoder, device)
    if info.is_main:
        ds.ensure_indexes()
    _barrier()
    # locked before the store is opened: a second run reads the done mask only once it may write
    with atomic.run_lock(ds.embeddings_path(enc.tag).parent, f"embed-{enc.tag}-rank{info.rank}"):
        store = _open_store(ds, enc, info.rank)
        done = store.done()
        mine = store.undone()[info.rank :: info.world_size]
        samples, bad = _embed_shards(ds, enc, store, mine, cfg, device)
    _barrier()
    return EmbedSummary(ds.embeddings_path(enc.tag), len(mine), int(done.sum()), samples,
                        time.perf_counter() - t0, info.rank, info.world_size, bad)


def _embed_shards(ds: Dataset, enc: Encoder, store: rowstore.RowStore, shards: list[int], cfg: EmbedConfig,
                  device: str) -> int:
    if not shards:
        return 0, 0
    features = enc.features
    on_gpu = device.startswith("cuda")
    if on_gpu:
        features = features.to(memory_format=torch.channels_last)
    lcfg = LoaderConfig(resolution=enc.resolution, backend=cfg.backend, device=device,
                        batch_size=cfg.batch_size, workers=cfg.workers,
                        mean=tuple(enc.info["mean"]), std=tuple(enc.info["std"]),
                        crop_fraction=enc.crop_fraction)
    collector = store.collector(shards, after_shard=lambda s: crash_point("embed.shard"))
    bad_dir = bad_samples_dir(store.path)
    for s in shards:  # a list left by an earlier, killed run of an undone shard is redone
        atomic.remove(bad_dir / f"{s:06d}.json")
    skipped, bad_by_shard = SkipBadSamples(), {}
    nan_row = np.full((1, *store.layout.row_shape), np.nan, dtype=np.float16)
    bar = progress(total=int(sum(ds.shard_counts[s] for s in shards)), desc=f"embed {ds.name}", quiet=cfg.quiet)
    with torch.inference_mode():
        for batch in load_batches([ds.shard_path(s) for s in shards], lcfg, on_error=skipped):
            for bad in skipped.take():
                # listed first, then its NaN row, which may complete the shard and set its done flag
                shard = int(collector.shard_of[bad.sample_id])
                bad_by_shard.setdefault(shard, []).append(
                    {"id": bad.sample_id, "tar": bad.tar, "member": bad.member, "reason": bad.reason})
                bad_dir.mkdir(parents=True, exist_ok=True)
                atomic.write_text(bad_dir / f"{shard:06d}.json", json.dumps(bad_by_shard[shard], indent=1))
                collector.add(np.array([bad.sample_id]), nan_row)
                bar.update(1)
            if not len(batch.ids):
                continue
            x = batch.images.contiguous(memory_format=torch.channels_last) if on_gpu else batch.images
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                f = features(x)
            collector.add(batch.ids.numpy(), f.float().cpu().numpy().astype(np.float16))
            bar.update(len(batch.ids))
    bar.close()
    unfinished = collector.unfinished()
    if unfinished:
        raise RuntimeError(f"shards {unfinished} were not read completely; re-run embed")
    return int(sum(ds.shard_counts[s] for s in shards)) - len(skipped.bad), len(skipped.bad)


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
