"""The Triton kernels compile for sm_90 (no GPU needed), and the launcher's default configurations
compile without register spills: see tests/aot_compile.py."""
import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py"))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "FAIL" not in done.stdout
    # default configs x (variants + 2 with the logit transforms), variants, variants with the
    # transforms, scale, sparse (+ 2 with the transforms)
    assert done.stdout.count("ok ") == 6 * 8 + 27 + 9 + 4 + 10
