"""`pytest bench`: every provider on every shape, then one summary table (and a JSON file).

Time per call = pytest-benchmark's median over rounds of ``ITERS`` calls (one synchronisation per
round). The floor is the traffic the fused loss cannot avoid (read s, read t, and for a backward
write the gradient once) at the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

RESULTS: list[dict] = []
LOOP_RESULTS: list[dict] = []
LINEAR_RESULTS: list[dict] = []
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ITERS = 20 if ON_GPU else 3


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


_bandwidth = {}


def copy_bandwidth() -> float:
    """Bytes per second of a large device copy (read + write), measured once per run."""
    if "bw" not in _bandwidth:
        n = (1 << 28) if ON_GPU else (1 << 24)  # 1 GiB / 64 MiB of fp32
        x = torch.empty(n, device=DEVICE)
        y = torch.empty_like(x)
        y.copy_(x)
        sync()
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            y.copy_(x)
            sync()
            best = min(best, time.perf_counter() - t0)
        _bandwidth["bw"] = 2 * x.numel() * x.element_size() / best
        del x, y
    return _bandwidth["bw"]


def measure(benchmark, step, rounds: int) -> int | None:
    """Warms ``step`` up, measures its peak extra GPU memory (None on a CPU), then times rounds of
    ITERS calls with pytest-benchmark; returns the peak extra bytes."""
    for _ in range(3):  # compilation, autotuning, caches
        step()
    sync()
    extra = None
    if ON_GPU:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        extra = torch.cuda.max_memory_allocated() - base

    def run():
        for _ in range(ITERS):
            step()
        sync()

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    return extra


def record(benchmark, *, provider, shape, dtype, mode, floor_bytes, extra_memory=None):
    seconds = benchmark.stats.stats.median / ITERS
    RESULTS.append(dict(provider=provider, rows=shape[0], classes=shape[1], dtype=str(dtype).split(".")[-1],
                        mode=mode, ms=seconds * 1e3, gbps=floor_bytes / seconds / 1e9,
                        floor_ms=floor_bytes / copy_bandwidth() * 1e3,
                        extra_mib=None if extra_memory is None else extra_memory / 2**20))


def _table() -> list[str]:
    base = {}
    for r in RESULTS:
        base[(r["rows"], r["classes"], r["dtype"], r["mode"], r["provider"])] = r["ms"]
    lines = [f"copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s",
             f"{'shape':>16} {'dtype':>8} {'mode':>9} {'provider':>15} {'ms':>9} {'x eager':>8} "
             f"{'x compiled':>10} {'GB/s':>7} {'% floor':>8} {'extra MiB':>10}"]
    for r in RESULTS:
        key = (r["rows"], r["classes"], r["dtype"], r["mode"])
        eager, compiled = base.get((*key, "eager"), None), base.get((*key, "compiled"), None)
        # the meter mode is compared with the recipe without a meter (no baseline has one)
        if r["mode"] == "fwd+bwd+meter":
            eager = base.get((*key[:3], "fwd+bwd", "eager"))
            compiled = base.get((*key[:3], "fwd+bwd", "compiled"))
        lines.append(
            f"{r['rows']:>7}x{r['classes']:<8} {r['dtype']:>8} {r['mode']:>9} {r['provider']:>15} "
            f"{r['ms']:9.3f} {eager / r['ms'] if eager else float('nan'):8.2f} "
            f"{compiled / r['ms'] if compiled else float('nan'):10.2f} {r['gbps']:7.0f} "
            f"{100 * r['floor_ms'] / r['ms']:7.1f}% "
            f"{'' if r['extra_mib'] is None else format(r['extra_mib'], '.0f'):>10}")
    return lines


def _loop_table() -> list[str]:
    plain = {r["data"]: r["samples_per_s"] for r in LOOP_RESULTS if r["loop"] == "plain"}
    return [f"loop {r['loop']:>7} on {r['data']} ({r['teacher']} -> {r['student']}): "
            f"{r['samples_per_s']:,.0f} samples/s"
            + (f", {r['samples_per_s'] / plain[r['data']]:.2f}x plain" if r["data"] in plain else "")
            for r in LOOP_RESULTS]


def _linear_table() -> list[str]:
    eager = {r["shape"]: r for r in LINEAR_RESULTS if r["provider"] == "materialised-eager"}
    lines = []
    for r in LINEAR_RESULTS:
        base = eager.get(r["shape"])
        mem = "" if r["extra_mib"] is None else f", peak extra {r['extra_mib']:.0f} MiB"
        if base and r["extra_mib"] is not None and base["extra_mib"]:
            mem += f" ({100 * r['extra_mib'] / base['extra_mib']:.0f}% of materialised)"
        lines.append(f"fused linear {r['provider']:>22} {r['shape']}: {r['ms']:.2f} ms"
                     + (f", {base['ms'] / r['ms']:.2f}x eager" if base else "") + mem)
    return lines


def _side_by_side() -> list[str]:
    """The one table issue 29 asks for: each fastkd row's time over the recipe it replaces, in the
    same run (<= 1.00x: fastkd is no slower). A meter row is compared with the recipe without one
    (no recipe has a meter); fused linear also compares peak memory, the epoch its time."""
    rows = []
    eager = {(r["rows"], r["classes"], r["dtype"], r["mode"]): r["ms"] for r in RESULTS if r["provider"] == "eager"}
    for r in RESULTS:
        if not r["provider"].startswith("fastkd") or r["mode"] == "fwd":
            continue
        base = eager.get((r["rows"], r["classes"], r["dtype"], r["mode"].replace("+meter", "")))
        if base:
            rows.append((f"kd_loss {r['rows']} x {r['classes']} {r['dtype']}, {r['mode']}", "eager recipe", base,
                         r["provider"], r["ms"], ""))
    linear = {r["provider"]: r for r in LINEAR_RESULTS}
    base = linear.get("materialised-eager")
    for name, r in linear.items():
        if base and name.startswith("fastkd") and "trl" not in name:
            peak = (f", peak {r['extra_mib'] / base['extra_mib']:.2f} of it" if r["extra_mib"] and base["extra_mib"]
                    else "")
            rows.append((f"fused linear {r['shape']}", "materialised", base["ms"], name, r["ms"], peak))
    plain = {r["data"]: r for r in LOOP_RESULTS if r["loop"] == "plain"}
    for r in LOOP_RESULTS:
        if r["loop"] != "plain" and r["data"] in plain:
            rows.append((f"distillation epoch, {r['data']}", "plain loop", plain[r["data"]]["epoch_ms"], f"{r['loop']} loop",
                         r["epoch_ms"], ""))
    if not rows:
        return []
    width = max(len(r[0]) for r in rows)
    lines = ["side by side (time ratio = fastkd / the recipe it replaces; <= 1.00x: no slower)"]
    for case, base_name, base_ms, name, ms, extra in rows:
        lines.append(f"{case:<{width}}  {base_name:>12} {base_ms:9.3f} ms  {name:>18} {ms:9.3f} ms  "
                     f"{ms / base_ms:5.2f}x{extra}")
    return lines


def pytest_terminal_summary(terminalreporter):
    if not RESULTS and not LOOP_RESULTS and not LINEAR_RESULTS:
        return
    lines = [f"device: {torch.cuda.get_device_name() if ON_GPU else 'CPU'}, torch {torch.__version__}"]
    lines += (_table()[1:] if RESULTS else []) + _loop_table() + _linear_table() + _side_by_side()
    terminalreporter.write_sep("=", "fastkd benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"device": lines[0], "results": RESULTS, "loops": LOOP_RESULTS,
                                "fused_linear": LINEAR_RESULTS}, indent=1))
    terminalreporter.write_line(f"saved {path}")


@pytest.fixture
def device():
    return DEVICE
