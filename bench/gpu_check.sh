#!/usr/bin/env bash
# The one prepared device call (see bench/RESULTS.md): correctness of the real kernels on the GPU
# against float64, then every provider and baseline timed by `pytest bench`. Writes to $OUT.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TRITON_INTERPRET=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/device.txt"
timeout 120 python -m pytest -q -m gpu tests/test_loss.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 420 python -m pytest bench -q -p no:cacheprovider 2>&1 | tee "$OUT/bench.txt" \
  | sed -n '/fastkd benchmark summary/,/^saved/p'
cp bench/results/*.json "$OUT/" 2>/dev/null || true
