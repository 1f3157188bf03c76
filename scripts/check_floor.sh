#!/usr/bin/env bash
# The floor: the lowest versions fastkd declares, installed from scratch into a new venv outside the
# checkout, and the core tests run there against this checkout: the losses, the meter and
# calibration_error, the sparse teacher and its cache, the fused linear loss,
# autocast / loss scaling / torch.compile set-ups, and the Triton kernels under the
# interpreter. The study and the integrations (their own extras) are not run.
#
#   scripts/check_floor.sh [--compile] [VENV]
#
# VENV: where the venv is made (a new folder; default: a temporary one, removed at the end).
# --compile: afterwards, install Triton 3.4.0 over torch 2.4's pin (3.0.0) and compile every kernel
# variant for sm_90, no GPU needed: 3.4 is the oldest Triton that compiles them
# (fastkd.backends.TRITON_COMPILES_FROM; with an older one the kernels do not run on a GPU).
# Downloads about 3 GB (torch's CUDA wheels). README, "Requirements", says what it took.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPILE=0
if [[ "${1:-}" == "--compile" ]]; then
    COMPILE=1
    shift
fi
VENV="${1:-}"
if [[ -z "$VENV" ]]; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    VENV="$TMP/venv"
elif [[ -e "$VENV" ]]; then
    echo "check_floor.sh: $VENV exists; name a new folder" >&2
    exit 2
fi

"${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
# torch 2.4 (2.4.1, its bugfix release) pins triton 3.0.0; numpy 1.x; the test extra's lowest
# pytest and torchmetrics
"$PY" -m pip install -q "torch==2.4.1" "numpy<2" "pytest>=7,<8" "torchmetrics==1.0.0"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp scripts/floor_triton_shim.py "$SITE/fastkd_floor_triton_shim.py"
echo "import fastkd_floor_triton_shim" > "$SITE/fastkd_floor_triton_shim.pth"
"$PY" - <<'PYEOF'
import sys, numpy, pytest, torch, torchmetrics, triton
print(f"floor: Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"numpy {numpy.__version__}, pytest {pytest.__version__}, torchmetrics {torchmetrics.__version__}")
PYEOF

# the AOT compile checks need Triton >= 3.4 (--compile); the teacher cache's CLI / study tests need
# the study extra
TRITON_INTERPRET=1 PYTHONPATH="$PWD" "$PY" -m pytest -q -p no:cacheprovider \
    -W "ignore::DeprecationWarning:triton.runtime.interpreter" \
    -k "not test_kernels_compile_for_hopper and not test_cli and not test_study" \
    tests/test_loss.py tests/test_calibration.py tests/test_sparse.py tests/test_teacher_cache.py \
    tests/test_fused_linear.py tests/test_fused_linear_training.py tests/test_logit_transforms.py \
    tests/test_triton_kernel.py tests/test_launch_plans.py tests/test_training_setups.py \
    tests/test_vocab_parallel.py

if [[ "$COMPILE" == 1 ]]; then
    "$PY" -m pip install -q --no-deps "triton==3.4.0"
    TRITON_CACHE_DIR="$VENV/triton-cache" env -u TRITON_INTERPRET "$PY" scripts/floor_compile.py
fi
