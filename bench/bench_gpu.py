"""The first-GPU check: one script, under 8 minutes on one H100/H200, five measurements.

    PYTHONPATH=. python -m bench --suite gpu            # on the GPU machine, from the repo root
    bench/gpu_check.sh                                  # the same, without the runner's table file
    bench/gpu_check.sh --cpu-dry-run                    # every part at tiny sizes on the CPU

Parts (each in its own child process, with its own time limit inside a global budget; a part
that fails or runs out of time is recorded with its error and the others still run):

- ``decode``: torchvision nvJPEG batched decode (``decode_jpeg(list, device="cuda")``) +
  resize/crop, img/s at 224 and 112.
- ``embed``: decode + resize + normalise + ResNet-18/-50 forward (bf16 autocast,
  channels_last), img/s and as a share of decode alone.
- ``kmeans``: ``filterx.math.kmeans.torch_kmeans`` on 1.28M x 512, K=200, 20 iterations, all rows.
- ``kernels``: the head-influence and nearest-centroid Triton kernels against their torch twins
  at 1.28M rows, with the largest difference between their outputs.
- ``pretrain``: ResNet-50 SGD steps at 224 (bf16, channels_last) on synthetic in-memory
  images, then ``filterx.core.collectives`` under a real NCCL group of world size 1.

The GPU machine has torch, torchvision, Triton and CuPy, but not DALI, FAISS, zarr or
webdataset: every child blocks those imports (``BLOCKED``) before anything else, so a dry run
here fails exactly where the GPU run would. Results: ``bench/results/gpu-<machine>-<date>.md``
and ``.json``; a dry run writes ``gpu-dry-run-<machine>-<date>.*`` under the bench data cache
(``$FILTERX_BENCH_DATA`` or ``~/.cache/filterx-bench``) instead, never into bench/results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("nvidia.dali", "faiss", "zarr", "webdataset")
_MARK = "@@GPU_CHECK@@ "
BUDGET_S = 450.0  # all parts together; the 8-minute promise leaves ~30 s for start and files

# (part, limit in seconds on the GPU). Limits sum to the budget; a part gets the smaller of its
# limit and what the budget has left.
PARTS = (("decode", 70), ("embed", 120), ("kmeans", 60), ("kernels", 60), ("pretrain", 140))

FULL = {"resolutions": (224, 112), "images": 512, "batch": 128, "min_time": 4.0, "warmup": 2,
        "kmeans_n": 1_280_000, "kmeans_d": 512, "kmeans_k": 200, "kmeans_iter": 20,
        "kernel_n": 1_280_000, "kernel_d": 512, "kernel_k": 200, "kernel_c": 100,
        "train_batch": 256, "train_steps": 40, "train_warmup": 5}
DRY = {"resolutions": (64, 32), "images": 24, "batch": 8, "min_time": 0.0, "warmup": 1,
       "kmeans_n": 4_000, "kmeans_d": 32, "kmeans_k": 8, "kmeans_iter": 3,
       "kernel_n": 64, "kernel_d": 16, "kernel_k": 8, "kernel_c": 4,
       "train_batch": 4, "train_steps": 2, "train_warmup": 1, "train_res": 32}


def block_missing_modules(names: tuple[str, ...] = BLOCKED) -> None:
    """Make ``import faiss`` (and the rest of ``names``) fail as on the GPU machine.

    A ``None`` in ``sys.modules`` is what Python itself treats as "not importable": ``import``
    raises ModuleNotFoundError and ``importlib.util.find_spec`` answers None, as for a module
    that is not installed (torch probes some modules that way at import time).
    """
    for name in names:
        sys.modules[name] = None


# ---------------------------------------------------------------- shared helpers (in children)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_loop(step, device: str, n_per_step: int, warmup: int, min_time: float,
                min_steps: int = 2, max_steps: int = 10_000) -> dict:
    """Warm up, then run ``step`` until ``min_time`` s and ``min_steps`` steps have passed;
    synchronised before and after. Returns items/s, steps and seconds."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0, steps = time.perf_counter(), 0
    while steps < min_steps or (time.perf_counter() - t0 < min_time and steps < max_steps):
        step()
        steps += 1
        if steps % 4 == 0:
            _sync(device)
    _sync(device)
    dt_s = time.perf_counter() - t0
    return {"img_s": n_per_step * steps / dt_s, "steps": steps, "seconds": round(dt_s, 3)}


def _jpeg_bytes(n: int, data_dir: str) -> tuple[list[bytes], str]:
    """``n`` JPEGs as bytes: realistic ones from scikit-image's photos (bench/images.py) when
    scikit-image is importable, else procedural photo-like ones; and which was used."""
    import numpy as np

    try:
        import skimage.data  # noqa: F401

        from bench.images import make_realistic_jpegs

        paths = make_realistic_jpegs(Path(data_dir) / "gpu-check-jpegs", n, seed=0)
        return [p.read_bytes() for p in paths], "scikit-image photos (bench/images.py)"
    except ImportError:
        why = "scikit-image not installed"
    except Exception as exc:  # e.g. a photo skimage would have to download: no network there
        why = f"bench/images.py failed: {type(exc).__name__}: {exc}"[:200]
    import io

    from PIL import Image, ImageFilter

    out = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        w = int(rng.integers(400, 501))
        h = int(w * rng.uniform(0.7, 0.9))
        # smooth colour field + a few hard-edged shapes + grain: a photo's spectrum, roughly
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([128 + 90 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy
                                                       + rng.uniform())) for _ in range(3)], -1)
        for _ in range(int(rng.integers(5, 15))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, w / 4)
            mask = (xx * max(h, w) - cx) ** 2 + (yy * max(h, w) - cy) ** 2 < r * r
            base[mask] = rng.uniform(0, 255, 3)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
        arr = np.asarray(img, np.float32) + rng.normal(0, 5, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=94)
        out.append(buf.getvalue())
    return out, f"procedural numpy+PIL images ({why})"


def _decode_batches(blobs, batch: int, res: int, device: str, normalise: bool):
    """A function that decodes + eval-transforms batch ``i`` -> (B, 3, res, res) on ``device``."""
    import torch
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    groups = [datas[i:i + batch] for i in range(0, len(datas) - batch + 1, batch)] or [datas]
    short = round(res / 0.875)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    state = {"i": 0}

    def one() -> torch.Tensor:
        group = groups[state["i"] % len(groups)]
        state["i"] += 1
        imgs = decode_jpeg(group, mode=ImageReadMode.RGB, device=device)
        out = torch.stack([TF.center_crop(TF.resize(im, short, antialias=True), res) for im in imgs])
        if normalise:
            out = (out.float() - mean) / std
        return out

    return one, len(groups[0])


# ---------------------------------------------------------------- parts (each in a child)


def part_decode(device: str, sizes: dict, data_dir: str) -> dict:
    blobs, source = _jpeg_bytes(sizes["images"], data_dir)
    rows = []
    for res in sizes["resolutions"]:
        step, b = _decode_batches(blobs, sizes["batch"], res, device, normalise=False)
        r = _timed_loop(step, device, b, sizes["warmup"], sizes["min_time"])
        rows.append({"measure": f"decode+resize {res}", "res": res, **r})
    mean_kb = sum(map(len, blobs)) / len(blobs) / 1024
    return {"rows": rows, "notes": [f"inputs: {len(blobs)} JPEGs, {mean_kb:.0f} KB mean, {source}"]}


def part_embed(device: str, sizes: dict, data_dir: str) -> dict:
    import contextlib

    import torch
    import torchvision

    blobs, source = _jpeg_bytes(sizes["images"], data_dir)
    cuda = device.startswith("cuda")
    rows = []
    for arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)(weights=None)
        model.fc = torch.nn.Identity()
        model = model.eval().to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        for res in sizes["resolutions"]:
            step, b = _decode_batches(blobs, sizes["batch"], res, device, normalise=True)
            decode = _timed_loop(step, device, b, sizes["warmup"], sizes["min_time"] / 2)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

            def embed_step():
                x = step()
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), amp:
                    feats = model(x)
                return feats

            feats = embed_step()
            embed = _timed_loop(embed_step, device, b, sizes["warmup"], sizes["min_time"])
            rows.append({"measure": f"embed {arch} {res}", "res": res, "img_s": embed["img_s"],
                         "decode_img_s": decode["img_s"],
                         "embed_x_of_decode": embed["img_s"] / decode["img_s"],
                         "steps": embed["steps"], "feature_dim": int(feats.shape[1]),
                         "finite": bool(torch.isfinite(feats.float()).all())})
        del model
    return {"rows": rows, "notes": [f"inputs: {source}; bf16 autocast + channels_last on CUDA, "
                                    "float32 on the CPU"]}


def part_kmeans(device: str, sizes: dict, data_dir: str) -> dict:
    import torch

    from filterx.math.kmeans import torch_kmeans

    n, d, k, it = sizes["kmeans_n"], sizes["kmeans_d"], sizes["kmeans_k"], sizes["kmeans_iter"]
    # made on the device: 1.28M x 512 normals on one CPU thread would take longer than k-means
    g = torch.Generator(device=device).manual_seed(0)
    # clustered data (k blobs), so the objective has somewhere to go
    centers = torch.randn(k, d, generator=g, device=device) * 3
    x = centers[torch.randint(0, k, (n,), generator=g, device=device)]
    x += torch.randn(n, d, generator=g, device=device)
    # every row takes part (max_points_per_centroid above n/k) and tol < 0: all iterations run
    kw = dict(niter=it, seed=0, device=device, max_points_per_centroid=n // k + 1, tol=-1.0)
    torch_kmeans(x[: max(k * 4, 1000)], k, **{**kw, "niter": 2})  # warm-up: kernels, allocator

    def timed(niter):
        _sync(device)
        t0 = time.perf_counter()
        res = torch_kmeans(x, k, **{**kw, "niter": niter})
        _sync(device)
        return res, time.perf_counter() - t0

    # niter=0: k-means++ seeding over all rows plus one objective pass, to subtract
    seeded, seed_s = timed(0)
    res, total_s = timed(it)
    return {"rows": [{"measure": f"torch_kmeans N={n} D={d} K={k}", "seconds": round(total_s, 3),
                      "seeding_s": round(seed_s, 3), "iterations": res.iterations,
                      "s_per_iter": (total_s - seed_s) / max(res.iterations, 1),
                      "objective_seeded": seeded.objective, "objective": res.objective}],
            "notes": ["seconds: one torch_kmeans call (k-means++ seeding + iterations); "
                      "s_per_iter subtracts a niter=0 call; every row takes part"]}


def part_kernels(device: str, sizes: dict, data_dir: str) -> dict:
    import torch

    from filterx import kernels

    n, d, k, c = sizes["kernel_n"], sizes["kernel_d"], sizes["kernel_k"], sizes["kernel_c"]
    reps = 5 if device.startswith("cuda") else 1
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=device)
    cent = torch.randn(k, d, generator=g, device=device)
    r = torch.softmax(torch.randn(n, c, generator=g, device=device), 1)
    r[torch.arange(n, device=device), torch.randint(0, c, (n,), generator=g, device=device)] -= 1.0
    s_test = torch.randn(c, d + 1, generator=g, device=device)

    def best(fn):
        out = fn()
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return out, min(times)

    rows = []
    cases = {"nearest_centroid": (lambda impl: kernels.nearest_centroid(x, cent, impl=impl),
                                  f"N={n} D={d} K={k}"),
             "head_influence": (lambda impl: kernels.head_influence(x, r, s_test, impl=impl),
                                f"N={n} C={c} D={d}")}
    for name, (fn, shape) in cases.items():
        ref, s_torch = best(lambda: fn("torch"))
        out, s_triton = best(lambda: fn("triton"))
        ref = ref if isinstance(ref, tuple) else (ref,)
        out = out if isinstance(out, tuple) else (out,)
        diffs = []
        for a, b in zip(ref, out):
            if a.dtype.is_floating_point:
                scale = float(a.abs().max().clamp_min(1e-6))
                diffs.append(float((a - b).abs().max()) / scale)
            else:  # argmin: share of rows that disagree (exact ties may differ)
                diffs.append(float((a != b).float().mean()))
        agree = all(v < 1e-3 for v in diffs)
        rows.append({"measure": f"{name} {shape}", "torch_s": s_torch, "triton_s": s_triton,
                     "triton_x_torch": s_torch / s_triton, "rows_per_s": n / s_triton,
                     "max_rel_diff": max(diffs), "agree": agree})
        if not agree:
            raise AssertionError(f"{name}: Triton and torch outputs differ: {diffs} (rows: {rows})")
    return {"rows": rows}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_pretrain(device: str, sizes: dict, data_dir: str) -> dict:
    import torch
    import torch.distributed as dist

    from filterx.core import collectives
    from filterx.models.archs import build_model

    notes = []
    cuda = device.startswith("cuda")
    try:
        from filterx.train.common import Runtime, prepare_model, supervised_step, to_input

        rt = Runtime(device)
        model = prepare_model(build_model("resnet50", 1000), rt, sync_bn=False)
        step_fn = lambda x, y: supervised_step(model, opt, to_input(x, rt), y, rt)  # noqa: E731
        notes.append("step: filterx.train.common.supervised_step / prepare_model / to_input")
    except ImportError as exc:  # train_common pulls in the loader; say what stopped it
        notes.append(f"step: local copy of supervised_step (filterx.train.common: {exc})")
        model = build_model("resnet50", 1000).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)

        def step_fn(x, y):
            x = x.to(device).contiguous(memory_format=torch.channels_last) if cuda else x
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach(), logits.detach()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    b, res = sizes["train_batch"], sizes.get("train_res", 224)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, 3, res, res, generator=g, device=device)  # synthetic images, in GPU memory
    y = torch.randint(0, 1000, (b,), generator=g, device=device)
    losses = []
    r = _timed_loop(lambda: losses.append(step_fn(x, y)[0]), device, b, sizes["train_warmup"],
                    0.0, min_steps=sizes["train_steps"])
    final = float(losses[-1])
    rows = [{"measure": f"pretrain resnet50 {res} batch {b}", "img_s": r["img_s"], "steps": r["steps"],
             "seconds": r["seconds"], "final_loss": final, "finite": final == final}]
    if final != final:
        raise AssertionError(f"pretrain loss is NaN: {rows}")

    backend = "nccl" if cuda else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    if cuda:
        torch.cuda.set_device(torch.device(device).index or 0)
    t0 = time.perf_counter()
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        value = torch.arange(4, dtype=torch.float32, device=device) + 1
        plain = collectives.all_reduce_sum(value)  # world 1: filterx returns a copy, no collective
        collectives.barrier()
        # filterx skips collectives below two ranks; force its multi-rank path once so that
        # the transfer to the group's device and the NCCL call itself are exercised
        real = collectives.is_distributed
        collectives.is_distributed = lambda: True
        try:
            forced = collectives.all_reduce_sum(value)
            collectives.barrier()
        finally:
            collectives.is_distributed = real
        expect = [1.0, 2.0, 3.0, 4.0]
        ok = plain.tolist() == expect and forced.tolist() == expect and forced.device == value.device
        rows.append({"measure": f"collectives under {backend} world 1", "backend": dist.get_backend(),
                     "group_device": str(collectives.group_device()), "reduced": forced.tolist(),
                     "agree": ok, "seconds": round(time.perf_counter() - t0, 3)})
        if not ok:
            raise AssertionError(f"all_reduce_sum gave {plain.tolist()} / {forced.tolist()}, "
                                 f"expected {expect}")
    finally:
        dist.destroy_process_group()
    return {"rows": rows, "notes": notes}


# ---------------------------------------------------------------- child process and driver


def _child_main(part: str) -> None:
    block_missing_modules()
    kwargs = json.loads(sys.stdin.read())
    result = globals()[f"part_{part}"](**kwargs)
    sys.stdout.write(_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def _run_part(part: str, kwargs: dict, timeout: float, dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if dry_run and part == "kernels":
        env["TRITON_INTERPRET"] = "1"  # Triton kernels on CPU tensors, through numpy
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.bench_gpu", "--child", part],
                              input=json.dumps(kwargs), capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"ran past its {timeout:.0f} s limit",
                "seconds": round(time.perf_counter() - t0, 1), "rows": []}
    out = [ln[len(_MARK):] for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0 or not out:
        tail = proc.stderr.strip().splitlines()[-12:]
        err = next((ln for ln in reversed(tail) if ln.strip()), f"exit code {proc.returncode}")
        return {"status": "failed", "error": err[:400], "stderr_tail": tail, "seconds": seconds,
                "rows": []}
    return {"status": "ok", "seconds": seconds, **json.loads(out[-1])}


def _machine(device: str) -> dict:
    from bench.suite import machine_description

    m = machine_description()
    if device.startswith("cuda"):
        import torch

        m["gpu"] = torch.cuda.get_device_name(0)
        m["triton"] = _try_version("triton")
        m["cupy"] = _try_version("cupy")
    m["skimage"] = _try_version("skimage")
    return m


def _try_version(name: str) -> str | None:
    try:
        mod = __import__(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|@.*$|\bcpu\b|\bprocessor\b", " ", text or "unknown", flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_check(cpu_dry_run: bool = False, out: str | Path | None = None,
              budget_s: float = BUDGET_S, data: str | None = None,
              parts: tuple[str, ...] | None = None) -> tuple[dict, Path]:
    """Run every part (or ``parts``) and write ``<stem>.json`` / ``<stem>.md``; returns the
    document and the JSON path. Never raises for a part's failure: it is in the document."""
    import torch

    from bench.images import default_data_dir

    if not cpu_dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run on the GPU machine, or pass --cpu-dry-run")
    device = "cpu" if cpu_dry_run else "cuda:0"
    sizes = DRY if cpu_dry_run else FULL
    data_dir = Path(data) if data else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    machine = _machine(device)
    when = dt.datetime.now()
    name = f"{_slug(machine.get('gpu') or 'no-gpu')}_{_slug(machine['cpu'])}"
    stem = f"gpu-{'dry-run-' if cpu_dry_run else ''}{name}-{when.strftime('%Y%m%d-%H%M')}"
    out_dir = Path(out) if out else (data_dir / "gpu-dry-run" if cpu_dry_run
                                     else REPO_ROOT / "bench" / "results")
    t_start = time.perf_counter()
    results = {}
    for part, limit in PARTS:
        if parts and part not in parts:
            continue
        left = budget_s - (time.perf_counter() - t_start)
        # the dry run is bounded by the test's own timeout; its limits only guard a hang
        timeout = max(limit, 120) if cpu_dry_run else min(limit, left)
        if timeout < 10:
            results[part] = {"status": "skipped", "error": "global time budget spent", "rows": []}
        else:
            results[part] = _run_part(part, {"device": device, "sizes": sizes,
                                             "data_dir": str(data_dir)}, timeout, cpu_dry_run)
        r = results[part]
        print(f"[gpu-check] {part}: {r['status']} ({r.get('seconds', 0)} s)"
              + (f" {r['error']}" if r.get("error") else ""), flush=True)
    doc = {"check": "gpu", "dry_run": cpu_dry_run, "device": device, "sizes": sizes,
           "budget_s": budget_s, "seconds": round(time.perf_counter() - t_start, 1),
           "machine": machine, "parts": results}
    path = _write(out_dir, stem, doc)
    return doc, path


def _write(out_dir: Path, stem: str, doc: dict) -> Path:
    from bench.suite import _jsonable, format_markdown_table
    from filterx.io import atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    k, base = 1, stem
    while (out_dir / f"{stem}.json").exists():
        k += 1
        stem = f"{base}-{k}"
    m = doc["machine"]
    md = [f"# GPU check{' (CPU DRY RUN: tiny sizes, not GPU figures)' if doc['dry_run'] else ''}", "",
          f"- date {m['date']}, commit {m.get('git_commit')}, {doc['seconds']:.0f} s of a "
          f"{doc['budget_s']:.0f} s budget, device {doc['device']}",
          f"- GPU: {m.get('gpu')} (CUDA {m.get('cuda')}); CPU: {m['cpu']}, {m['cores']} cores, "
          f"{m['ram_gib']} GiB",
          f"- torch {m['torch']}, torchvision {m['torchvision']}, triton {m.get('triton')}, "
          f"cupy {m.get('cupy')}, scikit-image {m.get('skimage')}", ""]
    for part, r in doc["parts"].items():
        md += [f"## {part}: {r['status']} ({r.get('seconds', 0)} s)", ""]
        md += [f"- {n}" for n in r.get("notes", [])]
        if r.get("error"):
            md.append(f"- error: `{r['error']}`")
        md += ["", format_markdown_table(r.get("rows", [])), ""]
    atomic.write_text(out_dir / f"{stem}.json", json.dumps(_jsonable(doc), indent=1) + "\n")
    atomic.write_text(out_dir / f"{stem}.md", "\n".join(md))
    return out_dir / f"{stem}.json"


def run(quick: bool = False, cpu_dry_run: bool = False, budget_s: float = BUDGET_S) -> list[dict]:
    """The bench suite entry point: one table row per measurement, ``part`` and ``status`` first.
    ``quick`` changes nothing (the check is already sized to 8 minutes)."""
    doc, path = run_check(cpu_dry_run=bool(cpu_dry_run), budget_s=float(budget_s))
    print(f"[gpu-check] results: {path} and {path.with_suffix('.md')}")
    rows = []
    for part, r in doc["parts"].items():
        base = {"part": part, "status": r["status"]}
        rows += [{**base, **row} for row in r.get("rows", [])] or [{**base, "error": r.get("error", "")}]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="every part at tiny sizes on the CPU (gloo, Triton interpreter)")
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--data", type=Path, default=None, help="cache for generated JPEGs")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--parts", default="", help="comma-separated subset of: "
                    + ", ".join(p for p, _ in PARTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child_main(args.child)
        return 0
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip()) or None
    try:
        doc, path = run_check(args.cpu_dry_run, args.out, args.budget_s, args.data, parts)
    except RuntimeError as exc:
        print(f"gpu check: {exc}", file=sys.stderr)
        return 2
    print(f"[gpu-check] results: {path} and {path.with_suffix('.md')} ({doc['seconds']:.0f} s)")
    return 0 if all(r["status"] == "ok" for r in doc["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
