"""The loss inside the training set-ups users already have: fp16 with a loss scaler, autocast,
torch.compile, bad labels unchecked, and the calibration edge rows. Both CPU backends (Triton under
the interpreter); the CUDA-only set-ups (CUDA graphs, another device) are in tests/test_gpu.py."""
import pytest
import torch

import fastkd
from conftest import BACKENDS
from reference import kd_objective
from test_loss import close, randn, random_labels

FP16_NORMAL = 2.0**-14  # the smallest normal fp16 number
FP16_TINY = 2.0**-24  # the smallest subnormal: below it, fp16 holds 0
FP16_MAX = 65504.0


def reference_grad(s, t, labels, upstream, **kw):
    """d(upstream * objective)/ds in float64."""
    s64 = s.detach().double().requires_grad_()
    (kd_objective(s64, t.double(), labels, **kw) * upstream).sum().backward()
    return s64.grad


def assert_fp16_gradient_close(got, want):
    """No entry flushed to 0 or inf where the reference is a normal fp16 number; the gradient
    within 2e-3 of the reference (relative, in norm) over the entries fp16 can hold, and at most
    the smallest subnormal where it cannot (a gradient 2^-10 / rows small is below fp16's range)."""
    normal = (want.abs() >= FP16_NORMAL) & (want.abs() <= FP16_MAX)
    lost = ((got == 0) | got.isinf()) & normal
    assert not lost.any(), f"{int(lost.sum())} of {int(normal.sum())} normal entries lost"
    held = want.abs() >= FP16_TINY
    if held.any():  # subnormal entries carry fp16's own error: count it in
        unavoidable = (want.half().double() - want)[held].norm() / want[held].norm()
        rel = (got.double() - want)[held].norm() / want[held].norm()
        assert rel <= 2e-3 + unavoidable, (rel, unavoidable)
    assert (got.double().abs() <= FP16_TINY)[~held].all()


# the shapes on the fallback; under the (slow) Triton interpreter fewer rows, which only
# makes the loss scale per row harsher, and a row long enough for the looping path
FP16_CASES = {"torch": [((2048, 4000), "kl_loss"), ((6, 128256), "kd_loss")],
              "triton": [((64, 4000), "kl_loss"), ((3, 20000), "kd_loss")]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upstream", [65536.0, 1024.0, 2.0**-10], ids=["2^16", "2^10", "2^-10"])
@pytest.mark.parametrize("case", [0, 1], ids=["kl_loss", "kd_loss-long-rows"])
def test_fp16_gradient_survives_a_loss_scale(backend, upstream, case, gen):
    shape, objective = FP16_CASES[backend][case]
    s, t = randn(shape, gen, torch.float16).requires_grad_(), randn(shape, gen, torch.float16)
    if objective == "kl_loss":
        out = fastkd.kl_loss(s, t, temperature=2.0, backend=backend)
        want = reference_grad(s, t, None, upstream, temperature=2.0, alpha=1.0, t_squared=False)
    else:
        labels = random_labels(shape[:1], shape[1], gen, ignore_every=4)
        kw = dict(temperature=2.0, alpha=0.5, reduction="mean")  # mean: the divergence also / C
        out = fastkd.kd_loss(s, t, labels, backend=backend, **kw)
        want = reference_grad(s, t, labels, upstream, **kw)
    out.backward(torch.tensor(upstream))
    assert s.grad.dtype == torch.float16
    assert_fp16_gradient_close(s.grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_step_equals_float64(backend, gen):
    """AMP fp16 as users write it: fp32 weights, fp16 logits, GradScaler(2^16), one SGD step."""
    x, t = randn((128, 32), gen, scale=1.0), randn((128, 3000), gen, torch.float16)
    labels = random_labels((128,), 3000, gen, ignore_every=5)
    weight = torch.nn.Parameter(randn((3000, 32), gen, scale=0.5))
    w0 = weight.detach().clone()
    opt = torch.optim.SGD([weight], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    logits = (x @ weight.t()).half()
    loss = fastkd.kd_loss(logits, t, labels, temperature=2.0, alpha=0.7, backend=backend)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad = weight.grad.clone()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**16, "the step was skipped: inf/NaN found in the gradient"
    g_logits = reference_grad(logits, t, labels, 1.0, temperature=2.0, alpha=0.7)
    want = g_logits.t() @ x.double()
    assert (grad.double() - want).norm() / want.norm() <= 2e-3
    torch.testing.assert_close(weight.detach(), w0 - 0.5 * grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_linear_follows_autocast(backend, dtype, gen):
    """fp32 weights, low-precision hidden states (a Hugging Face model under autocast): cast as
    F.linear would be, and equal to the loss on the cast tensors; fp32 weights get fp32 grads."""
    h_s, h_t = randn((3, 5, 16), gen, dtype, 1.0), randn((3, 5, 24), gen, dtype, 1.0)
    w_s = randn((50, 16), gen, scale=0.5).requires_grad_()
    w_t = randn((50, 24), gen, scale=0.5)
    labels = random_labels((3, 5), 50, gen, ignore_every=4)
    kw = dict(temperature=2.0, alpha=0.5, backend=backend)
    with torch.autocast("cpu", dtype=dtype):
        out = fastkd.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, **kw)
    out.backward()
    cast_w = w_s.detach().to(dtype).requires_grad_()
    want = fastkd.fused_linear_kd_loss(h_s, cast_w, h_t, w_t.to(dtype), labels, **kw)
    want.backward()
    assert w_s.grad.dtype == torch.float32
    close(out, want, 1e-6, msg="loss")
    close(w_s.grad, cast_w.grad.float(), 1e-6, msg="weight gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kd_loss_under_autocast(backend, dtype, gen):
    s = randn((37, 300), gen, dtype).requires_grad_()
    t = randn((37, 300), gen, dtype)
    labels = random_labels((37,), 300, gen, ignore_every=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastkd.kd_loss(s, t, labels, temperature=3.0, alpha=0.6, backend=backend)
    out.backward()
    close(out, kd_objective(s.double(), t.double(), labels, 3.0, 0.6), 1e-5, msg="loss")
    assert s.grad.dtype == dtype
    close(s.grad, reference_grad(s, t, labels, 1.0, temperature=3.0, alpha=0.6),
          1e-5 if dtype == torch.float32 else 1.6e-2, msg="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_unchecked_give_nan_rows_and_stay_in_bounds(backend, gen):
    s, t = randn((6, 40), gen).requires_grad_(), randn((6, 40), gen)
    labels = torch.tensor([3, 40, -7, -100, 10**12, 39])  # 40, -7 and 10^12 are out of range
    meter = fastkd.CalibrationMeter()
    rows = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, reduction="none", meter=meter,
                          backend=backend, validate_labels=False)
    rows.backward(torch.ones_like(rows))
    bad = torch.tensor([False, True, True, False, True, False])
    assert rows[bad].isnan().all() and s.grad[bad].isnan().all()
    good = labels.clone()
    good[bad] = -100
    close(rows[~bad], kd_objective(s.double(), t.double(), good, 2.0, 0.5, reduction="none")[~bad], 1e-5)
    close(s.grad[~bad], reference_grad(s, t, good, 1.0, temperature=2.0, alpha=0.5, reduction="none")[~bad], 1e-5)
    report = meter.compute()
    assert report.count == 5 and sum(b.count for b in report.bins) == 5  # every labelled row counts
    assert report.nll != report.nll  # NaN: the bad rows make it so, visibly
    for reduction in ("batchmean", "sum"):
        assert fastkd.kd_loss(s, t, labels, reduction=reduction, backend=backend, validate_labels=False).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_calibration_edge_rows_are_counted_where_update_counts_them(backend, gen):
    """A row of -inf logits or with a NaN logit has no confidence: every backend and update() put
    it in the last bin, so the meter counts every labelled row."""
    s, t = randn((9, 12), gen), randn((9, 12), gen)
    s[1] = float("-inf")
    t[2] = float("-inf")
    s[4, 5] = float("nan")
    t[6, 0] = float("nan")
    labels = random_labels((9,), 12, gen)
    labels[7] = -100
    inside, teacher_inside = fastkd.CalibrationMeter(), fastkd.CalibrationMeter()
    fastkd.kd_loss(s, t, labels, meter=inside, teacher_meter=teacher_inside, backend=backend)
    for meter, logits in ((inside, s), (teacher_inside, t)):
        outside = fastkd.CalibrationMeter().update(logits, labels)
        got, want = meter.compute(), outside.compute()
        assert got.count == want.count == 8
        assert [b.count for b in got.bins] == [b.count for b in want.bins]
        assert got.bins[-1].count >= 2  # the two rows without a confidence


def training_step(model, teacher_logits, labels, meter, backend):
    s = model(torch.ones(teacher_logits.shape[0], 8))
    loss = fastkd.kd_loss(s, teacher_logits, labels, temperature=2.0, alpha=0.7, meter=meter, backend=backend,
                          student_logit_scale=0.5, teacher_softcap=4.0)  # the transforms travel through the op
    return loss + fastkd.kl_loss(s, teacher_logits, temperature=3.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_equals_eager(compiler, backend, gen):
    """A training step's forward (model + kd_loss with a meter, label validation and logit transforms +
    kl_loss) compiles without a graph break; the backward and an optimizer step give eager's numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = torch.nn.Linear(8, 30)
    compiled_model = torch.nn.Linear(8, 30)
    compiled_model.load_state_dict(eager_model.state_dict())
    t = randn((17, 30), gen)
    labels = random_labels((17,), 30, gen, ignore_every=5)
    step = torch.compile(training_step, fullgraph=True, backend=compiler)
    results = []
    for model, fn in ((eager_model, training_step), (compiled_model, step)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        meter = fastkd.CalibrationMeter()
        for _ in range(2):
            opt.zero_grad()
            loss = fn(model, t, labels, meter, backend)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
        results.append((loss.detach(), grads, [p.detach().clone() for p in model.parameters()], meter.state))
    (l0, g0, p0, m0), (l1, g1, p1, m1) = results
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1 + p1, g0 + p0):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m1, m0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_fp16_and_reduction_none(backend, gen):
    """The op's backward under compile applies the deferred fp16 row scale and per-row upstream."""
    torch._dynamo.reset()
    s = randn((64, 500), gen, torch.float16)
    t = randn((64, 500), gen, torch.float16)
    labels = random_labels((64,), 500, gen, ignore_every=3)
    upstream = torch.rand(64, generator=gen) * 1000

    def f(s):
        return fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, reduction="none", backend=backend), \
            fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = s.clone().requires_grad_()
    rows, mean = compiled(x)
    (rows * upstream).sum().add(mean * 2048).backward()
    ref = kd_objective(s.double(), t.double(), labels, 2.0, 0.5, reduction="none")
    close(rows, ref, 1e-5)
    want = reference_grad(s, t, labels, upstream.double(), temperature=2.0, alpha=0.5, reduction="none")
    want += reference_grad(s, t, labels, 2048.0, temperature=2.0, alpha=0.5)
    assert_fp16_gradient_close(x.grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_takes_the_backend_from_the_environment(backend, gen, monkeypatch):
    """Without backend=, FASTKD_BACKEND is read inside the compiled region without a graph break (torch
    2.4's Dynamo cannot trace os.environ), and the backend it names is the one that runs."""
    torch._dynamo.reset()
    monkeypatch.setenv("FASTKD_BACKEND", backend)
    ran = []
    module = fastkd.backends.load
    monkeypatch.setattr(fastkd.backends, "load", lambda name: ran.append(name) or module(name))
    s, t = randn((5, 37), gen), randn((5, 37), gen)
    labels = random_labels((5,), 37, gen, ignore_every=2)
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    f = torch.compile(lambda x: fastkd.kd_loss(x, t, labels, temperature=2.0, alpha=0.5), fullgraph=True,
                      backend="aot_eager")
    x = s.clone().requires_grad_()
    loss = f(x)
    (loss * upstream.float()).backward()
    assert set(ran) == {backend}
    close(loss, kd_objective(s.double(), t.double(), labels, 2.0, 0.5), 1e-5)
    close(x.grad, reference_grad(s, t, labels, upstream, temperature=2.0, alpha=0.5), 1e-5)

@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_fp16_autocast_with_grad_scaler(backend, gen):
    """A language-model head under fp16 autocast with GradScaler: fp32 weights, one scaled step;
    the unscaled weight gradient equals float64's on the same fp16-cast operands."""
    h_s, h_t = randn((300, 16), gen, torch.float16, 1.0), randn((300, 24), gen, torch.float16, 1.0)
    w_s = torch.nn.Parameter(randn((2000, 16), gen, scale=0.5))
    w_t = randn((2000, 24), gen, scale=0.5)
    labels = random_labels((300,), 2000, gen, ignore_every=4)
    opt = torch.optim.SGD([w_s], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fastkd.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0, alpha=0.5,
                                           backend=backend)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    assert torch.isfinite(w_s.grad).all()
    w64 = w_s.detach().half().double().requires_grad_()
    s64, t64 = h_s.double() @ w64.t(), h_t.double() @ w_t.half().double().t()
    ref = kd_objective(s64, t64, labels, 2.0, 0.5)
    ref.backward()
    # the chunk's logits are written in fp32 by the GEMM (not rounded to fp16 before the softmax):
    # the loss to fp32 rounding (3e-8 measured; 1.4e-6 with fp16 logits); the weight gradient goes
    # through fp16 GEMMs (3.5e-4 measured)
    assert abs(loss.item() - ref.item()) <= 2e-7 * abs(ref.item())
    assert (w_s.grad.double() - w64.grad).norm() / w64.grad.norm() <= 7e-4
