"""KD loss: fastkd's backends against the PyTorch recipe (eager, compiled) and Liger-Kernel."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import DEVICE, ON_GPU, measure, record

T = 4.0
if ON_GPU:
    SHAPES = [(8192, 1000, torch.float32), (262144, 10, torch.float32), (65536, 100, torch.float32),
              (8192, 32000, torch.bfloat16), (4096, 128256, torch.bfloat16)]
else:  # small shapes: the fallback against eager, in seconds
    SHAPES = [(1024, 1000, torch.float32), (16384, 10, torch.float32), (4096, 100, torch.float32),
              (64, 32000, torch.bfloat16)]
# "+ce": alpha = 0.9 with the hard-label cross-entropy (the other modes: alpha = 1, the divergence
# alone); on a CPU only, where the per-row label work decides the small-class cases
MODES = ["fwd", "fwd+bwd", "fwd+bwd+meter"] + ([] if ON_GPU else ["fwd+bwd+ce"])
ALPHA_CE = 0.9


def recipe(s, t, labels=None):
    """What KD code writes today (Hinton et al.), in fp32 as users do for bf16 logits; with labels,
    alpha T^2 KL + (1 - alpha) CE."""
    kl = F.kl_div(F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1), reduction="batchmean") * T * T
    if labels is None:
        return kl
    return ALPHA_CE * kl + (1 - ALPHA_CE) * F.cross_entropy(s.float(), labels)


def _liger():
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception:
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda s, t: kl(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)) * T * T


def providers():
    out = {"fastkd-torch": None, "eager": recipe}
    if ON_GPU:
        out["fastkd-triton"] = None
        if not fastkd.backends._cuda_unusable(torch.device("cuda")):
            out["fastkd-cuda"] = None  # the CUDA C++ extension (JIT-built on first use)
    if ON_GPU or os.environ.get("FASTKD_BENCH_COMPILE") == "1":
        out["compiled"] = torch.compile(recipe, dynamic=False)
    liger = _liger() if ON_GPU else None
    if liger is not None:
        out["liger"] = liger
    return out


PROVIDERS = providers()


def make_step(provider, mode, s, t, labels):
    fused = provider.startswith("fastkd")
    if not fused and mode.endswith("meter") or mode.endswith("ce") and provider not in ("eager", "fastkd-torch"):
        return None
    backend = provider.split("-")[1] if fused else None
    meter = fastkd.CalibrationMeter() if mode.endswith("meter") else None
    ce = mode.endswith("ce")
    lab = labels if meter or ce else None

    def loss_of(s_):
        if fused:
            return fastkd.kd_loss(s_, t, lab, temperature=T, alpha=ALPHA_CE if ce else 1.0,
                                  meter=meter, backend=backend, validate_labels=False)
        return PROVIDERS[provider](s_, t, lab) if ce else PROVIDERS[provider](s_, t)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                loss_of(s)
    else:
        def step():
            s.grad = None
            loss_of(s).backward()
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda x: f"{x[0]}x{x[1]}-{str(x[2]).split('.')[-1]}")
def test_kd_loss(benchmark, shape, provider, mode):
    n, c, dtype = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = (torch.randn(n, c, device=DEVICE, generator=g) * 3).to(dtype).requires_grad_(mode != "fwd")
    t = (torch.randn(n, c, device=DEVICE, generator=g) * 3).to(dtype)
    labels = torch.randint(0, c, (n,), device=DEVICE, generator=g)
    step = make_step(provider, mode, s, t, labels)
    if step is None:
        pytest.skip("no calibration meter in this provider" if mode.endswith("meter") else "CE: eager and torch only")
    extra = measure(benchmark, step, rounds=10 if ON_GPU else 7)
    size = n * c * s.element_size()
    record(benchmark, provider=provider, shape=(n, c), dtype=dtype, mode=mode,
           floor_bytes=(2 if mode == "fwd" else 3) * size, extra_memory=extra)
