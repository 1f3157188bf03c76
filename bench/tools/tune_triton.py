"""Measures launch configurations of the fused Triton kernel on this GPU and stores the fastest per
shape class in fastkd/backends/triton/triton_configs.json (keyed by card name, element size and C rounded up to a
power of two), which the launcher then prefers over its defaults. Each candidate is checked
against the PyTorch backend before it is timed. A candidate runs as a stored configuration would: a
one-entry table handed to the launcher through its hook (``plan_override(TUNED_CONFIGS=...)``).

    python bench/tools/tune_triton.py [--write]      (on a GPU; bench/gpu_check.sh runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import fastkd  # noqa: E402
from fastkd.backends.triton import plan, plan_override  # noqa: E402

SHAPES = [(8192, 1000, torch.float32), (262144, 10, torch.float32), (65536, 100, torch.float32),
          (8192, 32000, torch.bfloat16), (4096, 128256, torch.bfloat16)]


def candidates(n_cols: int) -> list[dict]:
    p2 = triton.next_power_of_2(n_cols)
    out = []
    if p2 <= 16384:
        for tile in (2048, 4096, 8192, 16384):
            block_n = max(1, tile // p2)
            for warps in (4, 8, 16):
                out.append(dict(block_n=block_n, block_c=p2, one_pass=True, num_warps=warps))
    for block_c in (2048, 4096, 8192):
        if block_c < p2:
            for warps in (8, 16):
                out.append(dict(block_n=1, block_c=block_c, one_pass=False, num_warps=warps))
    unique = {json.dumps(c, sort_keys=True): c for c in out}
    return list(unique.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update fastkd/backends/triton/triton_configs.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_triton: needs a CUDA device")
        return 1
    name = torch.cuda.get_device_name()
    best_all = {}
    table_dir = tempfile.TemporaryDirectory()
    one_entry = Path(table_dir.name, "candidate.json")
    for n, c, dtype in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        s = (torch.randn(n, c, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
        t = (torch.randn(n, c, device="cuda", generator=g) * 3).to(dtype)
        labels = torch.randint(0, c, (n,), device="cuda", generator=g)
        want = fastkd.kd_loss(s, t, labels, backend="torch").item()

        def step():
            s.grad = None
            fastkd.kd_loss(s, t, labels, backend="triton", validate_labels=False).backward()

        timings = []
        for cfg in candidates(c):
            # this candidate for this card and shape class, both variants, as the launcher reads a stored one
            size_class = f"{s.element_size()}:{triton.next_power_of_2(c)}"
            one_entry.write_text(json.dumps({name: {f"{size_class}:{v}": cfg for v in ("light", "heavy")}}))
            try:
                with plan_override(TUNED_CONFIGS=one_entry):
                    got = fastkd.kd_loss(s, t, labels, backend="triton").item()
                    if abs(got - want) > 1e-4 * abs(want) + 1e-6:
                        print(f"  wrong result {got} != {want} with {cfg}; skipped")
                        continue
                    timings.append((triton.testing.do_bench(step, warmup=10, rep=40), cfg))
            except Exception as e:  # out of resources and the like: not a candidate
                print(f"  {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
        base = triton.testing.do_bench(step, warmup=10, rep=40)
        ms, cfg = min(timings, key=lambda x: x[0])
        print(f"{n}x{c} {str(dtype)[6:]}: default {base:.4f} ms, best {ms:.4f} ms with {cfg}")
        # the bench's variant (KL, student gradient, no meter) is the "light" one
        best_all[f"{s.element_size()}:{triton.next_power_of_2(c)}:light"] = {**cfg, "ms": round(ms, 5)}
    out = {name: best_all}
    print(json.dumps(out, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "triton_configs.json").write_text(json.dumps(out, indent=1))
    if args.write:
        table = json.loads(plan.TUNED_CONFIGS.read_text()) if plan.TUNED_CONFIGS.exists() else {}
        table[name] = best_all
        plan.TUNED_CONFIGS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
