"""The compile matrix (tests/aot_compile.py): every Triton kernel a user can reach compiles for sm_90 as
the real launches specialise it (no GPU needed), every constexpr branch is compiled, and nothing spills
beyond its stated limit. Each failure names the kernel, the calls that launched it and the arguments."""
import os
import re
import subprocess
import sys
from pathlib import Path

KERNELS = {"_kd_fwd_kernel", "_kd_split_kernel", "_scale_grad_kernel", "_sparse_kd_fwd_kernel", "_vocab_stats_kernel",
           "_vocab_grad_kernel"}


def test_every_reachable_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py"))], env=env,
                          capture_output=True, text=True, timeout=900)
    failures = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("ok "))
    assert done.returncode == 0, failures[-6000:] + done.stderr[-2000:]
    assert "FAIL" not in done.stdout
    summary = re.search(r"summary: (\d+) calls, (\d+) launches, (\d+) distinct compile jobs \(([^)]*)\)",
                        done.stdout)
    calls, launches, jobs = (int(summary.group(i)) for i in (1, 2, 3))
    # 6 default configurations x 8 heaviest variants, 3 of them again on the looping path, 18 calls for the
    # remaining constexpr branches, 37 for the specialisation classes; 17 sparse; 16 + 1 vocabulary-parallel
    assert calls == 48 + 3 + 18 + 37 + 17 + 17
    # one line per distinct compile job, each compiled once however many calls launched it
    assert done.stdout.count("ok ") == jobs and jobs < launches
    assert {part.split()[0] for part in summary.group(4).split(", ")} == KERNELS
