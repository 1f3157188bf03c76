#!/usr/bin/env bash
# The TRL matrix: the TRL integration tests (tests/test_integration_trl*.py) run against each
# supported TRL release, each in a new venv made for it, against this checkout.
#
#   scripts/check_trl_matrix.sh [VERSION ...]
#
# VERSION: TRL releases (default: each of TRL_TESTED in fastkd/integrations/trl.py). Each venv is
# made under ${TMPDIR:-/tmp} and removed at the end. It holds TRL alone, installed from the package
# index without its dependencies, and reads every other package (torch, triton, transformers,
# accelerate, datasets, pytest) from the interpreter named by PYTHON (default: python3) through a .pth
# file placed after its own site-packages: TRL is the variable here, and torch's CUDA wheels are 3 GB.
# TRL's own requirements are then checked against what that interpreter has (a release that needs
# other versions fails here, naming them). The tests run under the Triton interpreter
# (TRITON_INTERPRET=1): TRL 1.15 runs its own Triton kernel on CPU tensors too.
# Exit status: 0 when every release passes; the summary lists each release's result.
set -uo pipefail
cd "$(dirname "$0")/.."

BASE="${PYTHON:-python3}"
if [[ $# -gt 0 ]]; then
    VERSIONS=("$@")
else
    read -r -a VERSIONS <<<"$(sed -n 's/^TRL_TESTED = (\(.*\))$/\1/p' fastkd/integrations/trl.py | tr -d '",')"
fi
if [[ ${#VERSIONS[@]} -eq 0 ]]; then
    echo "check_trl_matrix.sh: no TRL_TESTED in fastkd/integrations/trl.py; name the versions" >&2
    exit 2
fi
BASE_SITE="$("$BASE" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/trl-matrix.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

declare -A RESULT
STATUS=0
for VERSION in "${VERSIONS[@]}"; do
    echo "=== TRL $VERSION"
    VENV="$TMP/trl-$VERSION"
    "$BASE" -m venv --without-pip "$VENV"
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$BASE_SITE" > "$SITE/zz-base-packages.pth"  # after the venv's own packages: its TRL wins
    if ! "$VENV/bin/python" -m pip install -q --no-deps --target "$SITE" "trl==$VERSION"; then
        RESULT[$VERSION]="not installed"
        STATUS=1
        continue
    fi
    if ! "$VENV/bin/python" - <<'PYEOF'
import sys
from importlib.metadata import distribution, version, PackageNotFoundError
from packaging.requirements import Requirement

import trl

missing = []
for line in distribution("trl").requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement
    try:
        found = version(req.name)
    except PackageNotFoundError:
        found = None
    if found is None or not req.specifier.contains(found, prereleases=True):
        missing.append(f"{req} (found {found})")
print(f"trl {trl.__version__} from {trl.__file__}")
if missing:
    sys.exit("TRL's requirements not met: " + "; ".join(missing))
PYEOF
    then
        RESULT[$VERSION]="requirements not met"
        STATUS=1
        continue
    fi
    if TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TRL_EXPERIMENTAL_SILENCE=1 PYTHONPATH="$PWD" \
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_integration_trl*.py; then
        RESULT[$VERSION]="passed"
    else
        RESULT[$VERSION]="FAILED"
        STATUS=1
    fi
done
echo "=== summary"
for VERSION in "${VERSIONS[@]}"; do
    echo "TRL $VERSION: ${RESULT[$VERSION]}"
done
exit $STATUS
