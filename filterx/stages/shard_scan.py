"""The scan pass of shard: which inputs are images every decoder reads as they are ("copy"),
which need re-encoding ("reencode": PNG, CMYK JPEG, ...), and which are bad (with why).

Units are chunks of inputs; a worker writes each chunk's results to ``.work/scan/NNNNNN.json``
atomically, so a killed run re-run scans only the chunks with no file, under any runner.
"""

from __future__ import annotations

import io
import json
import re
from functools import partial
from pathlib import Path

from filterx.io import atomic
from filterx.runners import Runner, Work


def inspect_image(data: bytes) -> tuple[str, str]:
    """Classify image bytes as ("copy" | "reencode", "") or ("bad", reason).

    "copy": a baseline RGB or grayscale JPEG every decoder reads as it is.
    "reencode": a readable image in another format or colour mode (PNG, CMYK JPEG, ...).
    """
    from PIL import Image

    if not data:
        return "bad", "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            if fmt == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as exc:  # PIL raises many types for bad data; all mean "unreadable"
        return "bad", f"unreadable image ({_plain_reason(exc)})"
    if fmt == "JPEG" and mode in ("RGB", "L"):
        return "copy", ""
    return "reencode", f"{fmt} {mode}"


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


def _plain_reason(exc: BaseException) -> str:
    """``Type: message`` without the reprs of in-memory objects PIL puts in some messages
    ("cannot identify image file <_io.BytesIO object at 0x7f...>"): a report line must not
    change from one run to the next."""
    text = _OBJECT_REPR.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scan_chunk(args: tuple[Path, list[str]]) -> list[tuple[str, str]]:
    root, paths = args
    out = []
    for rel in paths:
        try:
            data = (root / rel).read_bytes()
        except OSError as exc:
            out.append(("bad", f"cannot read ({exc.strerror or exc})"))
            continue
        out.append(inspect_image(data))
    return out


class _ScanWorker:
    """Scans units (chunk number, root, paths) and writes each chunk's results to
    ``scan_dir/NNNNNN.json`` itself; returns the number of inputs of each."""

    def __init__(self, scan_dir: Path):
        self.scan_dir = scan_dir

    def __call__(self, units: list, tick) -> list[int]:
        for c, root, paths in units:
            atomic.write_text(self.scan_dir / f"{c:06d}.json", json.dumps(_scan_chunk((root, paths))))
        return [len(paths) for _, _, paths in units]


def scan(items, root: Path, scan_dir: Path, chunk: int, workers: int, quiet: bool, runner: Runner
         ) -> list[tuple[str, str]]:
    """Scan results for every input, reusing chunks a killed run finished (the workers write
    each chunk's results; every process then reads them all)."""
    if runner.is_main:
        scan_dir.mkdir(parents=True, exist_ok=True)
        atomic.clean_stale_tmp(scan_dir)
    runner.barrier()
    spans = [(i, min(i + chunk, len(items))) for i in range(0, len(items), chunk)]
    todo = [c for c in range(len(spans)) if not (scan_dir / f"{c:06d}.json").is_file()]
    units = [(c, root, [items[i][0] for i in range(*spans[c])]) for c in todo]
    scan = Work("shard: scan", units, partial(_ScanWorker, scan_dir), [spans[c][1] - spans[c][0] for c in todo],
                processes=workers, pool_init=atomic.worker_init, quiet=quiet)
    for _ in runner.map(scan):
        pass
    results = {c: [tuple(r) for r in json.loads((scan_dir / f"{c:06d}.json").read_text())]
               for c in range(len(spans))}
    return [r for c in range(len(spans)) for r in results[c]]
