"""The fused-linear bench case on a CPU against the materialised recipe, side by side, at several
chunk sizes: time as interleaved rounds in one process (each round runs every variant once, so a
busy machine slows all of them alike; the medians' ratios are reported), and peak extra memory as
bench/test_fused_linear_bench.cpu_peak_bytes measures it (the resident high-water mark of two
steps in a fresh process).

    python bench/tools/cpu_fused_linear.py                       # default chunk, 2^18, 2^19, 2^20
    OMP_NUM_THREADS=1 python bench/tools/cpu_fused_linear.py --rounds 12 --chunks 19 20

``--chunks`` are log2 of the logits per side of a chunk (fastkd._dispatch.gemm.CPU_CHUNK_LOGITS);
0 is the default. On a machine whose cores other jobs share, an op that runs in parallel waits for
every thread at its end: with more threads than idle cores that wait, not the work, decides each op's time,
so compare thread counts (OMP_NUM_THREADS=1 shows the work alone).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import fastkd._dispatch.gemm as gemm  # noqa: E402
import test_fused_linear_bench as bench  # noqa: E402

def peak_mib(provider, logits):
    setup = f"import fastkd._dispatch.gemm as gemm; gemm.CPU_CHUNK_LOGITS = {logits}" if logits else ""
    return bench.cpu_peak_bytes(provider, setup) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--chunks", type=int, nargs="*", default=[0, 18, 19, 20])
    ap.add_argument("--meter", action="store_true", help="also the student meter at the default chunk")
    ap.add_argument("--peaks", type=int, default=3, help="fresh processes per peak (median, range shown)")
    args = ap.parse_args()
    variants = [("materialised-eager", 0)] + [("fastkd-torch", c) for c in args.chunks]
    if args.meter:
        variants.append(("fastkd-torch+meter", 0))
    default = gemm.CPU_CHUNK_LOGITS
    steps = {v: bench.make_step(v[0]) for v in variants}
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            gemm.CPU_CHUNK_LOGITS = 1 << v[1] if v[1] else default
            steps[v]()  # one untimed step, then the mean of three
            t0 = time.perf_counter()
            for _ in range(3):
                steps[v]()
            times[v].append((time.perf_counter() - t0) / 3 * 1e3)
    gemm.CPU_CHUNK_LOGITS = default
    skip = min(2, args.rounds - 1)  # the first rounds warm the allocator and caches
    base_ms = statistics.median(times[variants[0]][skip:])
    base_mib = None
    print(f"{bench.ROWS} x {bench.HIDDEN} x {bench.VOCAB} bf16, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| variant | chunk logits | ms (median) | time vs materialised | peak extra MiB, median (range) | memory vs materialised |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        ms = statistics.median(times[v][skip:])
        peaks = sorted(peak_mib(v[0], 1 << v[1] if v[1] else 0) for _ in range(args.peaks))
        mib = statistics.median(peaks)  # the allocator's reuse of freed blocks varies from run to run
        base_mib = base_mib or mib
        chunk = "-" if v[0].startswith("materialised") else (f"2^{v[1]}" if v[1] else f"default (2^{default.bit_length() - 1})")
        print(f"| {v[0]} | {chunk} | {ms:.1f} | {ms / base_ms:.2f}x | {mib:.1f} ({peaks[0]:.0f}-{peaks[-1]:.0f}) | {mib / base_mib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
