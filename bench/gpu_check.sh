#!/usr/bin/env bash
# The first-GPU check in one command (see bench/README.md, "gpu"): under 8 minutes on one
# H100/H200 with torch, torchvision, Triton and CuPy (no DALI, FAISS, zarr or webdataset).
#   bench/gpu_check.sh                 # on the GPU machine: bench/results/gpu-<machine>-<date>.{md,json}
#   bench/gpu_check.sh --cpu-dry-run   # every part at tiny sizes on the CPU, results named dry-run
# Extra arguments go to `python -m bench.bench_gpu` (--out DIR, --parts decode,kmeans, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a hard stop in case a part hangs past its own limit (the check budgets 450 s itself)
exec timeout --kill-after=15 470 "${PYTHON:-python}" -m bench.bench_gpu "$@"
