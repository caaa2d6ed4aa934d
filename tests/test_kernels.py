"""filterx.kernels: each Triton kernel against its torch twin and a float64 reference.

Backends: ``torch`` (the twin, on the CPU), ``triton_interp`` (the Triton kernel run by
Triton's interpreter on CPU tensors) and ``triton_cuda`` (compiled, marked gpu).

How the interpreter is run, and why: Triton reads ``TRITON_INTERPRET`` once, when ``triton``
is first imported, and the choice holds for the whole process. Setting the variable at the
top of this file would silently fail whenever anything imported triton earlier in the pytest
process, and would turn the gpu tests into interpreter runs. So the ``triton_interp`` cases
run in a child pytest process on this file started with ``TRITON_INTERPRET=1``
(``test_interpreter_cases_pass_in_child_process``), unless this process itself was started
with ``TRITON_INTERPRET=1``, in which case they run here and the child test is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from filterx import kernels  # installed, or a source tree's kernels/ (filterx/__init__.py)

INTERP_HERE = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")
CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Compiled kernels only: with TRITON_INTERPRET=1 set, cuda tensors would go through the
# interpreter too.
needs_cuda = pytest.mark.skipif(not (CUDA and HAVE_TRITON) or INTERP_HERE,
                                reason="needs CUDA and triton, and TRITON_INTERPRET unset")
BACKENDS = [pytest.param("torch", id="torch")]
if INTERP_HERE:
    BACKENDS.append(pytest.param("triton_interp", id="triton_interp"))
BACKENDS.append(pytest.param("triton_cuda", id="triton_cuda", marks=[pytest.mark.gpu, needs_cuda]))

# Inputs are rounded to their dtype first and the references use the rounded values, so what
# is left is float32 arithmetic; half inputs get 10x slack for tensor-core accumulation order.
TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-5}


def run(name, backend, *args, poison=float("nan"), **kwargs):
    """Call kernels.<name>_<torch|triton> with outputs pre-filled with ``poison``; CPU results."""
    device = "cuda" if backend == "triton_cuda" else "cpu"
    fn = getattr(kernels, f"{name}_{'torch' if backend == 'torch' else 'triton'}")
    args = [a.to(device) for a in args]
    n = args[0].shape[0]
    if name == "head_influence":
        out = torch.full((n,), poison, device=device)
    else:
        out = (torch.full((n,), poison, device=device), torch.full((n,), poison, device=device),
               torch.full((n,), -1 if name == "nearest_centroid" else poison,
                          dtype=torch.int64 if name == "nearest_centroid" else torch.float32,
                          device=device))
    res = fn(*args, out=out, **kwargs)
    if name == "head_influence":
        assert res is out
        return res.cpu()
    assert all(r is o for r, o in zip(res, out))
    return tuple(r.cpu() for r in res)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------- nearest_centroid

def nearest_reference(x, c):
    d = ((x.double()[:, None, :] - c.double()[None]) ** 2).sum(-1)
    top = d.topk(min(2, d.shape[1]), dim=1, largest=False).values
    gap = top[:, 1] - top[:, 0] if d.shape[1] > 1 else torch.full_like(top[:, 0], np.inf)
    scale = (x.double() ** 2).sum(1) + (c.double() ** 2).sum(1).max()
    return d.min(1).values, d.mean(1), d.argmin(1), gap, scale


NEAREST_CASES = [  # N, K, D, dtype, block_k: sizes straddle the 64-row / 64-wide D tiles
    (70, 37, 100, torch.float32, 16),
    (70, 1, 3, torch.float32, None),
    (20, 5, 513, torch.float16, None),
    (65, 40, 64, torch.bfloat16, 32),
    (1, 17, 7, torch.float16, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d,dtype,block_k", NEAREST_CASES)
def test_nearest_centroid_matches_float64_and_twin(backend, n, k, d, dtype, block_k):
    x, c = randn(n, d, dtype=dtype, seed=1), randn(k, d, dtype=dtype, seed=2)
    mn, mean, arg = run("nearest_centroid", backend, x, c, block_k=block_k)
    assert torch.isfinite(mn).all() and torch.isfinite(mean).all(), "an output was not written"
    assert ((arg >= 0) & (arg < k)).all(), "an argmin was not written"
    assert mn.dtype == mean.dtype == torch.float32 and arg.dtype == torch.int64
    ref_min, ref_mean, ref_arg, gap, scale = nearest_reference(x, c)
    tol = TOL[dtype]
    assert ((mn.double() - ref_min).abs() <= tol * scale).all()
    assert ((mean.double() - ref_mean).abs() <= tol * ref_mean).all()
    clear = gap > 10 * tol * scale  # not a near-tie at this precision
    assert clear.double().mean() >= 0.5  # the argmin check below must cover most rows
    assert torch.equal(arg[clear], ref_arg[clear])
    t_min, t_mean, t_arg = kernels.nearest_centroid(x, c, impl="torch")
    assert ((mn.double() - t_min.double()).abs() <= tol * scale).all()
    assert ((mean - t_mean).abs() <= tol * t_mean).all()
    assert torch.equal(arg[clear], t_arg[clear])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_centroid_ties_go_to_lowest_index(backend):
    # Small integers: every distance is exact in float32, so duplicated centroids tie exactly,
    # across tile boundaries too (block_k=16, K=40, each centroid repeated every 7 rows).
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-2, 3, (7, 24), generator=g).float()
    c = base[torch.arange(40) % 7]
    x = torch.randint(-2, 3, (50, 24), generator=g).float()
    x[:7] = base  # rows at distance exactly 0 from centroids 0..6 (and their repeats)
    mn, _, arg = run("nearest_centroid", backend, x, c, block_k=16)
    d = ((x[:, None] - base[None]) ** 2).sum(-1)
    assert torch.equal(arg, d.argmin(1))  # the first copy, in 0..6, always wins
    assert torch.equal(mn, d.min(1).values)
    assert torch.equal(arg[:7], torch.arange(7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_centroid_strided_input(backend):
    x = randn(100, 40, seed=4).T  # (40, 100), strides (1, 40)
    c = randn(30, 100, seed=5)[::2]  # every other centroid, row stride 200
    mn, mean, arg = run("nearest_centroid", backend, x, c, block_k=16)
    ref_min, ref_mean, ref_arg, gap, scale = nearest_reference(x, c)
    assert ((mn.double() - ref_min).abs() <= 1e-5 * scale).all()
    assert ((mean.double() - ref_mean).abs() <= 1e-5 * ref_mean).all()
    assert torch.equal(arg[gap > 1e-3 * scale], ref_arg[gap > 1e-3 * scale])


def test_nearest_centroid_torch_blocks_agree_and_numpy_input():
    x, c = randn(300, 33, seed=6), randn(70, 33, seed=7)
    whole = kernels.nearest_centroid(x, c, impl="torch")
    blocked = kernels.nearest_centroid(x.numpy(), c.numpy(), block_k=9)  # numpy in, auto -> torch
    assert torch.allclose(whole[0], blocked[0], rtol=1e-5, atol=1e-4)
    assert torch.allclose(whole[1], blocked[1], rtol=1e-6)
    assert torch.equal(whole[2], blocked[2])
    empty = kernels.nearest_centroid(x[:0], c)
    assert [t.shape for t in empty] == [(0,)] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_k", [16, 64, 128])
@pytest.mark.gpu
@needs_cuda
def test_nearest_centroid_gpu_many_programs_match_twin(dtype, block_k):
    x = randn(5003, 384, dtype=dtype, seed=20).cuda()
    c = randn(1000, 384, dtype=dtype, seed=21).cuda()
    mn, mean, arg = kernels.nearest_centroid(x, c, block_k=block_k)  # auto -> triton on cuda
    t_min, t_mean, t_arg = kernels.nearest_centroid(x, c, impl="torch")
    scale = (x.float() ** 2).sum(1) + (c.float() ** 2).sum(1).max()
    assert ((mn - t_min).abs() <= 1e-5 * scale).all()
    assert torch.allclose(mean, t_mean, rtol=1e-5)
    top2 = torch.cdist(x.double(), c.double()).square().topk(2, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * scale.double()
    assert torch.equal(arg[clear], t_arg[clear])


@pytest.mark.slow
@pytest.mark.gpu
@needs_cuda
def test_nearest_centroid_gpu_past_int32_offsets():
    # N * D > 2**31: row offsets overflow int32 unless the kernel widens them (4.3 GB fp16).
    d = 512
    n = 2**31 // d + 1000
    x = torch.empty(n, d, dtype=torch.float16, device="cuda")
    x[-2000:] = randn(2000, d, dtype=torch.float16, seed=22).cuda()
    x[:-2000] = 0
    c = randn(16, d, dtype=torch.float16, seed=23).cuda()
    mn, mean, arg = kernels.nearest_centroid(x, c)
    t_min, t_mean, t_arg = kernels.nearest_centroid(x[-2000:], c, impl="torch")
    assert torch.allclose(mn[-2000:], t_min, rtol=1e-4, atol=1e-2)
    assert torch.allclose(mean[-2000:], t_mean, rtol=1e-5)
    assert (arg[-2000:] == t_arg).double().mean() > 0.99


# ------------------------------------------------------------------------------ softmax_stats

def softmax_reference(logits):
    lg = logits.double()
    p = torch.softmax(lg, 1)
    entropy = -torch.special.xlogy(p, p).sum(1)
    top = p.topk(min(2, p.shape[1]), dim=1).values
    margin = top[:, 0] - (top[:, 1] if p.shape[1] > 1 else 0.0)
    return entropy, top[:, 0], margin


SOFTMAX_CASES = [  # N, C, dtype, logit scale: C > 1024 takes several chunks per row
    (70, 1, torch.float32, 1.0),
    (33, 2, torch.float32, 3.0),
    (40, 37, torch.float16, 5.0),
    (40, 100, torch.bfloat16, 5.0),
    (10, 5, torch.float64, 1.0),
    (6, 2500, torch.float32, 3.0),
    (6, 3000, torch.float32, 1e4),
    (50, 1000, torch.float32, 1e4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,dtype,scale", SOFTMAX_CASES)
def test_softmax_stats_matches_float64_and_twin(backend, n, c, dtype, scale):
    logits = randn(n, c, dtype=dtype, seed=8, scale=scale)
    got = run("softmax_stats", backend, logits)
    twin = kernels.softmax_stats(logits, impl="torch")
    tol = TOL[dtype]
    for name, g, r, t in zip(("entropy", "max_prob", "margin"), got, softmax_reference(logits), twin):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), f"{name} not written"
        # Entropy is at most log C; probabilities are at most 1.
        bound = tol * max(1.0, np.log(c))
        assert (g.double() - r).abs().max() <= bound, name
        assert (g - t).abs().max() <= bound, name
    if c == 1:
        assert torch.equal(got[0], torch.zeros(n))
        assert torch.equal(got[1], torch.ones(n)) and torch.equal(got[2], torch.ones(n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_stats_special_rows(backend):
    inf = float("inf")
    logits = torch.full((5, 2100), -inf)
    logits[0, [3, 1500]] = 2.0  # equal top-2 in different chunks: margin 0, two-way split
    logits[1, :] = 1.0  # uniform: entropy log C
    logits[2, [0, 2099]] = torch.tensor([1e4, 1e4 - 1.0])
    logits[3, 2000] = -5.0  # one finite logit: certain
    # row 4 stays all -inf: nan everywhere
    ent, maxp, margin = run("softmax_stats", backend, logits, poison=123.0)
    e1 = np.exp(-1.0)
    expect = torch.tensor([
        [np.log(2), 0.5, 0.0],
        [np.log(2100), 1 / 2100, 0.0],
        [np.log1p(e1) + e1 / (1 + e1), 1 / (1 + e1), (1 - e1) / (1 + e1)],
        [0.0, 1.0, 1.0],
    ], dtype=torch.float64)
    got = torch.stack([ent, maxp, margin], 1)
    assert torch.allclose(got[:4].double(), expect, rtol=1e-5, atol=1e-6)
    assert torch.isnan(got[4]).all()


# ----------------------------------------------------------------------------- head_influence

def influence_reference(x, r, s):
    """g_i . s_test with g_i formed explicitly, in float64, and the sum of |terms| as a scale."""
    x, r, s = x.double(), r.double(), s.double()
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    g = r[:, :, None] * xa[:, None, :]  # (N, C, D + 1)
    return (g * s).sum((1, 2)), (g.abs() * s.abs()).sum((1, 2))


INFLUENCE_CASES = [  # N, C, D, x dtype, r and s_test dtype: C > 64 takes several class tiles
    (70, 1, 3, torch.float32, torch.float32),
    (90, 10, 100, torch.float32, torch.float32),
    (65, 31, 513, torch.float16, torch.float32),
    (40, 2, 64, torch.bfloat16, torch.float32),
    (30, 100, 20, torch.float32, torch.float64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,d,dtype,factor_dtype", INFLUENCE_CASES)
def test_head_influence_matches_formed_gradients_and_twin(backend, n, c, d, dtype, factor_dtype):
    x = randn(n, d, dtype=dtype, seed=9)
    probs = torch.softmax(randn(n, c, seed=10), 1)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(11))
    r = (probs - torch.nn.functional.one_hot(y, c)).to(factor_dtype)
    s = randn(c, d + 1, dtype=factor_dtype, seed=12)
    got = run("head_influence", backend, x, r, s)
    assert got.dtype == torch.float32 and torch.isfinite(got).all(), "an output was not written"
    ref, scale = influence_reference(x, r, s)
    tol = TOL[dtype]
    assert ((got.double() - ref).abs() <= tol * scale).all()
    twin = kernels.head_influence(x, r, s, impl="torch")
    assert ((got - twin).double().abs() <= tol * scale).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_influence_strided_input(backend):
    x = randn(50, 70, seed=13).T  # (70, 50) column-major
    r = randn(70, 6, seed=14)
    s = randn(51, 6, seed=15).T  # (6, 51), strides (1, 6)
    got = run("head_influence", backend, x, r, s)
    ref, scale = influence_reference(x, r, s)
    assert ((got.double() - ref).abs() <= 1e-5 * scale).all()


# ---------------------------------------------------------------- dispatch, errors, child run

def test_invalid_arguments_name_the_bad_value():
    x, c = randn(4, 3), randn(2, 3)
    with pytest.raises(ValueError, match=r"impl='gpu'.*auto, triton, torch"):
        kernels.nearest_centroid(x, c, impl="gpu")
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        kernels.nearest_centroid(x, randn(2, 4))
    with pytest.raises(ValueError, match="int64"):
        kernels.nearest_centroid(x.long(), c.long())
    with pytest.raises(ValueError, match="K = 0"):
        kernels.nearest_centroid(x, c[:0])
    with pytest.raises(ValueError, match=r"C >= 1"):
        kernels.softmax_stats(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"\(C, D \+ 1\) = \(2, 4\)"):
        kernels.head_influence(x, randn(4, 2), randn(2, 3))
    with pytest.raises(ValueError, match="powers of two"):
        kernels.nearest_centroid_triton(x, c, block_k=24)


@pytest.mark.skipif(INTERP_HERE or not HAVE_TRITON, reason="needs triton in compiled mode")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    x = randn(4, 3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.softmax_stats(x, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: triton is already imported
    with pytest.raises(ValueError, match="after triton had been imported"):
        kernels.softmax_stats(x, impl="triton")


def _child_env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def test_package_import_and_cpu_auto_path_do_not_import_triton():
    code = """
import sys, torch
import filterx.kernels as k
x = torch.randn(5, 3)
k.nearest_centroid(x, x); k.softmax_stats(x); k.head_influence(x, x, torch.randn(3, 4))
assert "triton" not in sys.modules, "triton was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(INTERP_HERE, reason="interpreter cases run in this process")
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_interpreter_cases_pass_in_child_process():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-k", "triton_interp",
         "-p", "no:cacheprovider", "-o", "addopts="],
        env=_child_env(TRITON_INTERPRET="1"), cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    # Every backend-parametrized test above has exactly one interpreter case.
    expected = len(NEAREST_CASES) + len(SOFTMAX_CASES) + len(INFLUENCE_CASES) + 4
    assert passed and int(passed.group(1)) == expected, tail
    assert "failed" not in proc.stdout and "skipped" not in proc.stdout, tail


def test_a_source_tree_that_is_not_installed_serves_its_kernels():
    """Without the installed package's mapping (a source tree copied to a GPU machine),
    ``filterx.kernels`` is the tree's own kernels/, with its submodules."""
    code = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
import filterx.kernels as k
from filterx.kernels import nearest_centroid
print(k.__file__, sys.modules[nearest_centroid.__module__].__file__)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init, sub = proc.stdout.split()
    assert Path(init) == REPO / "filterx" / "kernels" / "__init__.py" and Path(sub).parent == REPO / "filterx" / "kernels"
