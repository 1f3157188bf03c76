"""Compiles every Triton kernel variant for sm_90 (no GPU needed) with the installed Triton, as the
suite's AOT checks do (tests/aot_compile.py, tests/test_vocab_parallel.py's COMPILE), register
spills aside (a performance limit, set on the tested Triton): scripts/check_floor.sh runs it with the
oldest Triton the kernels compile on (fastkd.backends.TRITON_COMPILES_FROM)."""
import ast
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import aot_compile as A  # noqa: E402
import triton  # noqa: E402

# the stack budgets are set on the tested Triton (a performance limit): here, only whether it compiles
A.spills = lambda cubin: 0
A.Case.spill_limit = property(lambda self: 1 << 30)


def main() -> int:
    failures = A.main()
    # the vocabulary-parallel kernels: the COMPILE snippet of tests/test_vocab_parallel.py, read without
    # importing that module (its conftest would switch the interpreter on)
    tree = ast.parse((TESTS / "test_vocab_parallel.py").read_text())
    snippet = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                   and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["COMPILE"])
    sys.argv = [sys.argv[0], str(TESTS)]
    try:
        exec(snippet, {"__name__": "vocab_compile"})
    except Exception as e:
        failures = 1
        print("FAIL vocab kernels", type(e).__name__, str(e)[-800:])
    print(f"triton {triton.__version__}: {'every kernel compiles' if not failures else 'a kernel does not compile'}")
    return 1 if failures else 0


# the compile pool's processes are spawned: they import this file, and must not run main() again
if __name__ == "__main__":
    sys.exit(main())
