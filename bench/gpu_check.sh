#!/usr/bin/env bash
# The prepared device call (see bench/RESULTS.md): the real kernels against float64 on the GPU,
# then the Triton launch configurations tuned, then every provider and baseline timed.
#   bash bench/gpu_check.sh [tests] [tune] [bench]     (default: all three, about 9 minutes)
# Everything it prints is also written to $OUT.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_INTERPRET=0
parts=${*:-tests tune bench}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/device.txt"
if [[ $parts == *tests* ]]; then
  timeout 150 python -m pytest -q -x -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
if [[ $parts == *tune* ]]; then
  timeout 150 python bench/tools/tune_triton.py --write 2>&1 | tee "$OUT/tune.txt" | grep -v '^ '
  cp fastkd/backends/triton/triton_configs.json "$OUT/"
fi
if [[ $parts == *bench* ]]; then
  timeout 240 python -m pytest bench -q -p no:cacheprovider 2>&1 | tee "$OUT/bench.txt" \
    | sed -n '/fastkd benchmark summary/,/^saved/p'
  newest=$(ls -t bench/results/*.json 2>/dev/null | head -1)
  [[ -n $newest ]] && cp "$newest" "$OUT/"
fi
