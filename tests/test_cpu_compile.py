"""FASTKD_CPU_COMPILE=1: the torch backend's chunks compiled by torch.compile on CPU tensors. One
Inductor compile for the whole file (tens of seconds), shared by the module-scoped fixture; the
other tests compile nothing."""
import os
import warnings

import pytest
import torch

import fastkd
from fastkd.backends.torch import cpu_compile
from fastkd.backends.torch import dense as eager
from reference import kd_objective
from test_loss import close, randn, random_labels

C, T, ALPHA = 13, 2.0, 0.7  # one shape family: 13 fp32 classes, kd_loss with CE, labels, a meter


def run_kd(s, t, labels, meter, reduction, gen):
    """kd_loss with a random upstream gradient: (loss, student gradient, upstream)."""
    s = s.detach().requires_grad_()
    out = fastkd.kd_loss(s, t, labels, temperature=T, alpha=ALPHA, meter=meter, backend="torch",
                         reduction=reduction)
    upstream = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad(out, s, upstream.float())
    return out, grad, upstream


@pytest.fixture(scope="module")
def compiled_counts():
    """FASTKD_CPU_COMPILE=1 while the module's compiled tests run; Dynamo's graph counter from zero."""
    from torch._dynamo.utils import counters

    before = os.environ.get(cpu_compile.ENV)
    os.environ[cpu_compile.ENV] = "1"
    counters.clear()
    try:
        yield counters
    finally:
        if before is None:
            del os.environ[cpu_compile.ENV]
        else:
            os.environ[cpu_compile.ENV] = before


@pytest.mark.parametrize("n,reduction", [pytest.param(37, "none", id="37-rows"),
                                         pytest.param(1, "batchmean", id="1-row")])
def test_compiled_kd_loss_equals_reference_without_recompiling(n, reduction, compiled_counts, gen, monkeypatch):
    monkeypatch.setattr(eager, "CHUNK_ELEMENTS", 16 * C)  # 37 rows: chunks of 16, 16 and 5, copied into the outputs
    s, t = randn((n, C), gen), randn((n, C), gen)
    labels = random_labels((n,), C, gen, ignore_every=5 if n > 1 else None)
    meter = fastkd.CalibrationMeter(num_bins=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn: it must not happen here
        out, grad, upstream = run_kd(s, t, labels, meter, reduction, gen)
    s64 = s.double().requires_grad_()
    ref = kd_objective(s64, t.double(), labels, temperature=T, alpha=ALPHA, reduction=reduction)
    close(out, ref, 1e-5, msg="loss")
    close(grad, torch.autograd.grad(ref, s64, upstream)[0], 1e-5, msg="student gradient")
    want = fastkd.CalibrationMeter(num_bins=7)
    want.update(s, labels)  # the meter's own statistics (ignored rows skipped)
    torch.testing.assert_close(meter.state, want.state, rtol=1e-6, atol=1e-6)
    # both row counts (1 included: no 0/1 specialisation) run the one graph compiled first
    assert "fn" in cpu_compile._STATE and "failed" not in cpu_compile._STATE
    assert compiled_counts["stats"]["unique_graphs"] == 1


def test_off_is_the_eager_backend(monkeypatch, gen):
    """Unset, empty or 0: the compiled module never runs; the torch backend's eager kd_forward does,
    and kd_loss's numbers are its numbers bit for bit (loss, gradient, meter)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled path ran with FASTKD_CPU_COMPILE off")

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return eager.kd_forward(*args, **kwargs)

    monkeypatch.setattr(cpu_compile, "kd_forward", refuse)
    monkeypatch.setattr(fastkd.backends.torch, "kd_forward", spy)  # what backends.load("torch") hands out
    s, t = randn((9, C), gen), randn((9, C), gen)
    labels = random_labels((9,), C, gen, ignore_every=4)
    for value in (None, "0", ""):
        if value is None:
            monkeypatch.delenv(cpu_compile.ENV, raising=False)
        else:
            monkeypatch.setenv(cpu_compile.ENV, value)
        calls.clear()
        meter = fastkd.CalibrationMeter()
        s_ = s.clone().requires_grad_()
        out = fastkd.kd_loss(s_, t, labels, temperature=T, alpha=ALPHA, meter=meter, backend="torch",
                             reduction="sum")
        out.backward()
        assert len(calls) == 1
        s2, t2, lab2, count, spec = calls[0][:5]
        direct = fastkd.CalibrationMeter()
        loss, grad, _ = eager.kd_forward(s2.detach(), t2, lab2, count, spec, True, False, direct, None, reduce=True)
        assert torch.equal(out.detach(), loss) and torch.equal(s_.grad, grad)
        assert torch.equal(meter.state, direct.state)


def test_switch_is_checked_and_scoped(monkeypatch):
    monkeypatch.setenv(cpu_compile.ENV, "yes")
    with pytest.raises(ValueError, match="FASTKD_CPU_COMPILE must be 0 or 1"):
        fastkd.kl_loss(torch.randn(2, 3), torch.randn(2, 3), backend="torch")
    monkeypatch.setenv(cpu_compile.ENV, "1")
    assert cpu_compile.requested(torch.device("cpu"))
    assert not cpu_compile.requested(torch.device("cuda"))  # CPU tensors only
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not cpu_compile.requested(torch.device("cpu"))  # an outer torch.compile keeps its custom op


def test_failed_compile_warns_once_and_runs_eager(monkeypatch, gen):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv(cpu_compile.ENV, "1")
    monkeypatch.setattr(cpu_compile, "_STATE", {"fn": broken})
    s, t = randn((6, C), gen), randn((6, C), gen)
    labels = random_labels((6,), C, gen, ignore_every=3)
    with pytest.warns(RuntimeWarning, match="FASTKD_CPU_COMPILE=1 but torch.compile of the loss failed"):
        out, grad, upstream = run_kd(s, t, labels, None, "batchmean", gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls take the eager backend silently
        assert not cpu_compile.requested(torch.device("cpu"))
        run_kd(s, t, labels, None, "batchmean", gen)
    s64 = s.double().requires_grad_()
    ref = kd_objective(s64, t.double(), labels, temperature=T, alpha=ALPHA)
    close(out, ref, 1e-5, msg="loss")
    close(grad, torch.autograd.grad(ref, s64, upstream)[0], 1e-5, msg="student gradient")
