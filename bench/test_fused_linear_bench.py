"""Fused linear distillation (with and without the calibration meter) against the materialised recipe
(eager, compiled), Liger's fused linear JSD when it imports, and TRL's chunked divergence when TRL
imports: time and peak memory of forward+backward.

TRL's loss is the divergence alone (no cross-entropy, no T^2): "trl-chunked-kl" (TRL's
``_chunked_divergence_loss``, forward KL) is timed beside "fastkd-<backend>-trl-kl", the same objective
through fastkd (``fastkd.integrations.trl.chunked_divergence_loss``, what ``FastKDDistillationTrainer``
runs); the other rows compute KD + CE, so compare those two with each other."""
from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import DEVICE, ITERS, LINEAR_RESULTS, ON_GPU, measure

T, ALPHA = 2.0, 0.5
ROWS, HIDDEN, VOCAB = (8192, 4096, 128256) if ON_GPU else (256, 128, 8000)
DTYPE = torch.bfloat16
HERE = Path(__file__).parent


def materialised(hs, ws, ht, wt, labels):
    """What LM distillation code writes: both logits, the KD recipe on them, plus cross-entropy."""
    s, t = hs @ ws.t(), ht @ wt.t()
    kd = F.kl_div(F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1), reduction="batchmean")
    return ALPHA * kd * T * T + (1 - ALPHA) * F.cross_entropy(s.float(), labels)


def providers():
    out = {"fastkd-torch": "torch", "fastkd-torch+meter": "torch", "materialised-eager": materialised}
    if ON_GPU:
        out["fastkd-triton"] = out["fastkd-triton+meter"] = "triton"
        out["materialised-compiled"] = torch.compile(materialised)
        try:  # Liger's chunked loss for the JSD objective (the closest it has)
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            jsd = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA, beta=0.5,
                                          temperature=T)
            out["liger-fused-jsd"] = lambda hs, ws, ht, wt, labels: jsd(hs, ws, ht, wt, labels)
        except Exception:
            pass
    try:  # TRL's DistillationTrainer loss, and fastkd's in its place
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        from fastkd.integrations.trl import chunked_divergence_loss
    except ImportError:
        return out

    def as_trl(fn, **kwargs):  # every row counts (mask of ones); TRL's KL at T, no CE
        return lambda hs, ws, ht, wt, labels: fn(hs, ht, ws, wt, torch.ones_like(labels), 0.0, temperature=T,
                                                 **kwargs)[0]

    out["trl-chunked-kl"] = as_trl(_chunked_divergence_loss)
    for backend in ("torch", "triton") if ON_GPU else ("torch",):
        out[f"fastkd-{backend}-trl-kl"] = as_trl(chunked_divergence_loss, backend=backend)
    return out


PROVIDERS = providers()


def make_step(provider):
    """The provider's forward + backward on the bench case, inputs seeded as in every run."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hs = torch.randn(ROWS, HIDDEN, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
    ws = (torch.randn(VOCAB, HIDDEN, device=DEVICE, generator=g) / HIDDEN**0.5).to(DTYPE).requires_grad_()
    ht = torch.randn(ROWS, HIDDEN, device=DEVICE, generator=g).to(DTYPE)
    wt = (torch.randn(VOCAB, HIDDEN, device=DEVICE, generator=g) / HIDDEN**0.5).to(DTYPE)
    labels = torch.randint(0, VOCAB, (ROWS,), device=DEVICE, generator=g)
    fn = PROVIDERS[provider]

    meter = fastkd.CalibrationMeter() if provider.endswith("+meter") else None  # the student's, per token

    def step():
        hs.grad = ws.grad = None
        if isinstance(fn, str):
            loss = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=T, alpha=ALPHA,
                                               divergence="jsd" if "jsd" in provider else "kl", backend=fn,
                                               meter=meter)
        else:
            loss = fn(hs, ws, ht, wt, labels)
        loss.backward()
    return step


# Run in a fresh process: the steps' peak resident memory above what the process holds once the inputs
# exist and a tiny GEMM has loaded torch's kernels. The high-water mark is reset there (clear_refs 5)
# and read from VmHWM: ru_maxrss would not do, since Linux carries it over from the parent across
# fork and exec (a child of a large pytest process starts at the parent's size and hides its steps).
PEAK_CHILD = """
import sys, torch
sys.path[:0] = [{bench!r}, {root!r}]
{setup}
import test_fused_linear_bench as b
step = b.make_step({provider!r})
(torch.ones(8, 8, dtype=b.DTYPE) @ torch.ones(8, 8, dtype=b.DTYPE)).sum()
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status("VmRSS")
step(); step()
print(status("VmHWM") - base)
"""


def cpu_peak_bytes(provider, setup="") -> int:
    """Peak extra resident memory of two steps on a CPU (Linux), in a fresh process (torch's CPU
    allocations show in RSS; in this process earlier tests' freed pages would hide them). ``setup``:
    code run before the bench module is imported (e.g. a chunk size)."""
    code = PEAK_CHILD.format(bench=str(HERE), root=str(HERE.parent), setup=setup, provider=provider)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_fused_linear(benchmark, provider):
    step = make_step(provider)
    peak = measure(benchmark, step, rounds=3 if ON_GPU else 7)
    if peak is None:  # a CPU: peak RSS of the same steps in a subprocess; the median of three, as the
        peak = statistics.median(cpu_peak_bytes(provider) for _ in range(3))  # allocator's reuse moves it
    LINEAR_RESULTS.append(dict(provider=provider, shape=f"{ROWS}x{HIDDEN}x{VOCAB} bf16",
                               ms=benchmark.stats.stats.median / ITERS * 1e3,
                               extra_mib=None if peak is None else peak / 2**20))
