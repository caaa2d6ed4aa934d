"""shard: an ImageFolder tree or a list file -> a dataset dir (filterx.io.dataset).

Inputs are listed by ``filterx.stages.shard_inputs`` (the rules for list files are there). Then two
passes, both parallel over worker processes and both resumable:

1. scan: every input is opened and decoded (at 1/8 scale through libjpeg's DCT scaling, so
   this costs a fraction of a full decode) to find corrupt, truncated and non-image files.
   Results are kept per chunk of inputs under ``OUT/.work/scan`` (the worker writes them).
2. write: good inputs get dense sample ids in input order and are written into tars of
   ``shard_size`` samples with their original bytes. Only inputs that are not baseline RGB or
   grayscale JPEG (PNG, CMYK JPEG, ...) or all inputs when ``resize_short`` is set are
   re-encoded (JPEG, quality 90).

Finally ``index.zarr`` is written (atomically) and ``shard_report.json`` lists every skipped
input with its reason. A killed run, re-run with the same arguments, redoes only the chunks
and shards that were not finished.

Both passes are mapped by a runner (``filterx.runners``): a process pool here (``--workers``),
the ranks of a torchrun, or the actors of a Ray cluster; every unit (a chunk of inputs, a
tar) is written by the worker that does it, so the same units give the same files.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

import filterx
from filterx.io import atomic, dataset, tario
from filterx.core.faults import crash_point
from filterx.io.dataset import ClassInfo
from filterx.runners import Runner, Work, get_runner
from filterx.stages.shard_inputs import Inputs, list_file, list_image_folder
from filterx.stages.shard_scan import inspect_image, scan  # noqa: F401  (inspect_image: public here)

log = logging.getLogger(__name__)

WORK = ".work"
JPEG_QUALITY = 90
# A killed run's workers exit within about a second of it (filterx.io.atomic.worker_init); a
# re-run waits this long at most for them before it clears their temporaries.
ORPHAN_WAIT_S = 10.0
# Write failures that no retry fixes: the user has to make room (or choose another OUT).
NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "the file system is read-only"}


@dataclass(frozen=True)
class ShardConfig:
    src: Path
    out: Path
    shard_size: int = 1000
    resize_short: int | None = None
    workers: int = 0  # 0: one per core
    quiet: bool = False
    num_classes: int | None = None  # list files with integer labels: labels are < this
    runner: str | None = None  # filterx.runners name; None: local, or torchrun under torchrun
    address: str | None = None  # ray: the cluster


@dataclass(frozen=True)
class ShardSummary:
    out: Path
    num_samples: int
    num_shards: int
    num_classes: int
    skipped: int
    reencoded: int
    empty_classes: list[str]
    seconds: float

    def line(self) -> str:
        rate = self.num_samples / max(self.seconds, 1e-9)
        empty = f"; empty classes: {', '.join(self.empty_classes)}" if self.empty_classes else ""
        return (
            f"wrote {self.num_samples} samples in {self.num_shards} shards ({self.num_classes} "
            f"classes) to {self.out} in {self.seconds:.1f}s ({rate:.0f} img/s); skipped "
            f"{self.skipped} bad inputs, re-encoded {self.reencoded}{empty}; "
            f"report: {self.out / dataset.SHARD_REPORT}"
        )


# ---------------------------------------------------------------- write


def encode_jpeg(data: bytes, resize_short: int | None) -> bytes:
    """Decode any image, convert to RGB, optionally shrink its short side, encode as JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if resize_short and im.format == "JPEG":
            # DCT-domain downscale first (exact enough: the final resize is done below).
            im.draft("RGB", (resize_short, resize_short))
        im = to_rgb(im)
        if resize_short and min(im.size) > resize_short:
            w, h = im.size
            s = resize_short / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()


# Transparent pixels are laid over white, as a viewer shows them. PIL's convert("RGB") keeps
# whatever colour the encoder left under alpha 0 (PNG optimisers bleed neighbouring colours
# there), which would put smeared backgrounds into the tars that no one meant to be seen.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(im):
    """A PIL image as mode RGB: wide samples scaled to 8 bits (``to_8bit``), transparency
    (an alpha band, or a palette / grey / RGB image's transparent colour) composited onto
    ``ALPHA_BACKGROUND``."""
    from PIL import Image

    im = to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def to_8bit(im):
    """A PIL image whose samples are wider than 8 bits (modes I;16*, I, F) as mode L, scaled;
    other images unchanged. PIL's own conversion clips such samples at 255 (a 16-bit gradient
    turns almost white), so:

    - I;16, I;16B, ... (16-bit): ``value >> 8``;
    - I (32-bit integers) and F (floats), by their range: floats within 0..1 are scaled by
      255, values within 0..255 kept, within 0..65535 taken as 16-bit (``>> 8``), anything
      else stretched from min..max to 0..255.
    """
    from PIL import Image

    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        return Image.fromarray((a.astype(np.uint16) >> 8).astype(np.uint8), "L")
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0 and hi <= 1:
        out = a * 255
    elif lo >= 0 and hi <= 255:
        out = a
    elif lo >= 0 and hi <= 65535:
        out = np.floor(a / 256)
    else:
        out = (a - lo) * (255 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


@dataclass(frozen=True)
class _ShardJob:
    path: Path
    root: Path
    first_id: int
    rels: list[str]
    labels: list[int]
    class_names: list[str]
    reencode: list[bool]
    resize_short: int | None


def _write_shard(job: _ShardJob, tick=None) -> int:
    def samples() -> Iterator[tario.TarSample]:
        for i, (rel, label, re) in enumerate(zip(job.rels, job.labels, job.reencode)):
            if tick is not None and i:
                tick(1)  # the sample before this one is in the tar
            data = (job.root / rel).read_bytes()
            if re or job.resize_short:
                data = encode_jpeg(data, job.resize_short)
            meta = {"path": rel, "label": label}
            if label >= 0:
                meta["class"] = job.class_names[label]
            yield tario.TarSample(tario.sample_key(job.first_id + i), tario.sample_members(data, label, meta))

    tario.write_tar(job.path, samples())
    if tick is not None:
        tick(1)
    return len(job.rels)


class _WriteWorker:
    """Writes units (``_ShardJob``: one tar and its index each); returns their sample counts."""

    def __call__(self, units: list, tick) -> list[int]:
        return [_write_shard(job, tick) for job in units]


def _shard_complete(path: Path, count: int) -> bool:
    idx = tario.index_path(path)
    if not (path.is_file() and idx.is_file()):
        return False
    try:
        return len({e.key for e in tario.read_index(idx)}) == count
    except (ValueError, IndexError):
        return False


# ---------------------------------------------------------------- main


def shard(cfg: ShardConfig, runner: Runner | None = None) -> ShardSummary:
    """Build the dataset dir ``cfg.out`` from ``cfg.src`` (ImageFolder tree or list file).

    runner: what maps the scan and write units (default: ``cfg.runner``, see filterx.runners).
    """
    t0 = time.perf_counter()
    src, out = Path(cfg.src).expanduser(), Path(cfg.out).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"source {str(src)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {str(out)!r} exists and is not a directory; OUT must be a new "
                                 "directory (or the dataset dir of a killed shard run, to resume it)")
    if cfg.shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {cfg.shard_size}")
    if cfg.resize_short is not None and cfg.resize_short < 8:
        raise ValueError(f"--resize-short must be >= 8 pixels, got {cfg.resize_short}")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {cfg.num_classes}")
    if src.is_dir():
        if cfg.num_classes is not None:
            raise ValueError(f"--num-classes is for list files with integer labels; {src} is an ImageFolder "
                             "tree, whose classes are its sub-folders")
        inputs = list_image_folder(src)
    else:
        inputs = list_file(src, cfg.num_classes)
    runner = runner or get_runner(cfg.runner, cfg.address, cfg.workers)
    runner.start("cpu")
    try:
        return _shard(cfg, src, out, inputs, t0, runner)
    except OSError as exc:
        if exc.errno not in NO_ROOM:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise OSError(exc.errno, f"cannot write to {out}: {NO_ROOM[exc.errno]}{where}; make room or choose "
                                 "another OUT, then re-run: finished shards are kept") from None


def _shard(cfg: ShardConfig, src: Path, out: Path, inputs: Inputs, t0: float, runner: Runner) -> ShardSummary:
    items, class_names, root = inputs.items, inputs.class_names, inputs.root
    workers = cfg.workers or os.cpu_count() or 1
    with atomic.run_lock(out, runner.lock_name("shard")):
        work = out / WORK
        settings = {"src": str(src.resolve()), "n": len(items), "shard_size": cfg.shard_size,
                    "resize_short": cfg.resize_short}
        if cfg.num_classes is not None:
            settings["num_classes"] = cfg.num_classes
        _check_settings(out, work, settings, runner.is_main)
        runner.barrier()

        statuses = scan(items, root, work / "scan", cfg.shard_size, workers, cfg.quiet, runner)
        good = [i for i, (st, _) in enumerate(statuses) if st != "bad"]
        bad = inputs.skipped + [{"path": items[i][0], "reason": r}
                                for i, (st, r) in enumerate(statuses) if st == "bad"]
        if not good:
            raise ValueError(f"no readable images under {src} ({len(items)} inputs, all bad)")
        chunks = [good[i : i + cfg.shard_size] for i in range(0, len(good), cfg.shard_size)]

        shards_dir = out / dataset.SHARDS
        if runner.is_main:
            shards_dir.mkdir(parents=True, exist_ok=True)
            atomic.clean_stale_tmp(shards_dir)
        runner.barrier()
        jobs, first = [], 0
        for s, chunk in enumerate(chunks):
            path = shards_dir / f"{dataset.shard_name(s)}.tar"
            if not _shard_complete(path, len(chunk)):
                jobs.append(_ShardJob(path, root, first, [items[i][0] for i in chunk],
                                      [items[i][1] for i in chunk], class_names,
                                      [statuses[i][0] == "reencode" for i in chunk], cfg.resize_short))
            first += len(chunk)
        write = Work("shard: write", jobs, _WriteWorker, [len(j.rels) for j in jobs], processes=workers,
                     pool_init=atomic.worker_init, quiet=cfg.quiet)
        for _ in runner.map(write):
            crash_point("shard.tar")
        # Again, now that every tar is written: the workers of a killed run outlive it by up to
        # a second, so at the first clean some were still writing, and they left temporaries of
        # tars that no write of this run replaces.
        _clean_orphans(shards_dir)

        classes = _class_infos(class_names)
        labels = np.array([items[i][1] for i in good], dtype=np.int64)
        counts = [len(c) for c in chunks]
        _write_index(out, classes, labels, [items[i][0] for i in good], counts, src, cfg)
        per_class = np.bincount(labels[labels >= 0], minlength=len(classes))
        empty = [classes[c].name for c in np.flatnonzero(per_class == 0)]
        reencoded = sum(statuses[i][0] == "reencode" for i in good) if not cfg.resize_short else len(good)
        summary = ShardSummary(out, len(good), len(chunks), len(classes), len(bad), reencoded, empty,
                               time.perf_counter() - t0)
        if not runner.is_main:  # the other ranks wrote their tars; rank 0 finishes
            return summary
        report = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(summary).items()},
                  "skipped_inputs": bad}
        atomic.write_text(out / dataset.SHARD_REPORT, json.dumps(report, indent=1, ensure_ascii=False))
        atomic.remove(work)
        _clean_orphans(out)
    return summary


def _clean_orphans(directory: Path) -> None:
    """Remove the temporaries a killed run left in ``directory``, waiting (a bounded time) for
    its workers to exit first: under the run lock, no live writer of this output remains."""
    atomic.clean_stale_tmp(directory, wait=ORPHAN_WAIT_S)
    left = sorted(p.name for p in directory.iterdir() if atomic.TMP_MARK in p.name)
    if left:
        log.warning("%s: temporaries of processes that are still running after %.0fs, left in place: %s",
                    directory, ORPHAN_WAIT_S, ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))


def _check_settings(out: Path, work: Path, settings: dict, write: bool = True) -> None:
    """Refuse to mix a resumed run with different settings, and a dataset dir with a new one.

    write: record the settings of a new run (rank 0 only: every rank checks).
    """
    saved = work / "settings.json"
    if saved.is_file():
        if json.loads(saved.read_text()) != settings:
            raise ValueError(
                f"{out} holds an unfinished shard run with other settings "
                f"({saved.read_text().strip()}); remove {work} to start over"
            )
        return
    if dataset.is_dataset(out):
        raise ValueError(f"{out} already holds a dataset; choose another output dir or remove it")
    if write:
        work.mkdir(parents=True, exist_ok=True)
        atomic.write_text(saved, json.dumps(settings))


def _class_infos(class_names: list[str]) -> tuple[ClassInfo, ...]:
    """Class metadata; folders named by ImageNet wnids get their human-readable names."""
    from filterx.io.classes import class_info_for_folders

    return tuple(class_info_for_folders(class_names))


def _write_index(out: Path, classes, labels, rels, counts, src: Path, cfg: ShardConfig) -> None:
    import zarr

    n = len(labels)
    keys = np.array([tario.sample_key(i) for i in range(n)])
    shards = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    chunk = max(1, min(n, 1 << 16))
    with atomic.atomic_path(out / dataset.INDEX) as tmp:
        g = zarr.open_group(tmp, mode="w")
        g.create_array("label", data=labels, chunks=(chunk,))
        g.create_array("shard", data=shards, chunks=(chunk,))
        k = g.create_array("key", shape=(n,), dtype=str, chunks=(chunk,))
        k[:] = keys
        p = g.create_array("path", shape=(n,), dtype=str, chunks=(chunk,))
        p[:] = np.array(rels)
        g.attrs.update({
            "filterx_index": dataset.INDEX_FORMAT,
            "filterx_version": filterx.__version__,
            "classes": [{"index": c.index, "name": c.name, "wnid": c.wnid} for c in classes],
            "source_root": str(src.resolve()),
            "shard_size": cfg.shard_size,
            "shard_counts": counts,
            "resize_short": cfg.resize_short,
            "fingerprint": dataset.fingerprint(keys, labels, counts),
        })
