"""FASTKD_CPU_COMPILE on a CPU: kd_loss on the torch backend eager (today's path) and compiled (each
chunk's math through torch.compile / Inductor's C++ backend), against the eager PyTorch recipe,
forward + backward, T = 4, alpha = 1, with and without a calibration meter. Interleaved rounds in
one process (each round runs every variant once, so a busy machine slows all of them alike); the
median per call is reported, after the compile. The compile time is the compiled variant's first
call of each case (a new shape family) minus an eager call: with ``--cold`` Inductor's cache starts
empty (a fresh TORCHINDUCTOR_CACHE_DIR), as on a new machine.

    OMP_NUM_THREADS=1 python bench/tools/cpu_compile_ab.py --cold
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastkd  # noqa: E402

T = 4.0
CASES = [(1024, 1000, torch.float32), (16384, 10, torch.float32), (4096, 100, torch.float32),
         (64, 32000, torch.bfloat16), (128, 10, torch.float32)]


def variants(n, c, dtype, meter):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, c, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(n, c, generator=g) * 3).to(dtype)
    lab = torch.randint(0, c, (n,), generator=g)
    m = fastkd.CalibrationMeter() if meter else None

    def fastkd_with(flag):
        def step():
            os.environ["FASTKD_CPU_COMPILE"] = flag  # read at each call
            s.grad = None
            fastkd.kd_loss(s, t, lab, temperature=T, alpha=1.0, meter=m, backend="torch",
                           validate_labels=False).backward()
        return step

    def recipe():
        s.grad = None
        loss = F.kl_div(F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1), reduction="batchmean") * T * T
        if m is not None:
            with torch.no_grad():
                m.update(s.detach(), lab)
        loss.backward()

    return {"eager": fastkd_with("0"), "compiled": fastkd_with("1"), "recipe": recipe}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--cold", action="store_true", help="start from an empty Inductor cache")
    args = p.parse_args()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastkd_inductor_")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per fwd+bwd (median of {args.rounds})")
    for n, c, dtype in CASES:
        for meter in (False, True):
            fns = variants(n, c, dtype, meter)
            t0 = time.perf_counter()
            fns["eager"]()
            t1 = time.perf_counter()
            fns["compiled"]()
            t2 = time.perf_counter()
            compile_s = (t2 - t1) - (t1 - t0)
            for f in list(fns.values()) * 2:  # warm-up
                f()
            k = max(1, int(2e6 // (n * c)))
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(k):
                        f()
                    times[name].append((time.perf_counter() - t0) / k)
            med = {name: sorted(v)[len(v) // 2] * 1e3 for name, v in times.items()}
            label = f"{n}x{c} {str(dtype)[6:]} {'kl+meter' if meter else 'kl':8s}"
            print(f"{label} eager {med['eager']:7.3f}  compiled {med['compiled']:7.3f}  recipe {med['recipe']:7.3f}"
                  f"  compiled/eager {med['compiled'] / med['eager']:4.2f}  compile {compile_s:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
