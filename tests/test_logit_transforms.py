"""Per-model logit transforms (``*_logit_scale``, ``*_softcap``): z' = cap tanh(scale z / cap) with a
softcap, else scale z, before the temperature, on every backend and every path of the Triton kernel,
against a float64 reference written here (transform, log_softmax, the divergence by hand, autograd
for the gradients w.r.t. the raw logits)."""
import math

import pytest
import torch

import fastkd
from conftest import BACKENDS, force_triton_path
from reference import _with_ce_reduced
from fastkd._core.spec import KDSpec

INF = math.inf

# (rtol of the loss, rtol of the gradients): the kernels compute in fp32 from the rounded inputs (the
# reference reads the same rounded inputs); a gradient carries its dtype's rounding
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-5, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 1.6e-2, id="bf16"),
]
# (student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap): logits are drawn with
# a spread of 6, so a softcap of 5-12 bends them well into tanh's curve
TRANSFORMS = [
    pytest.param((0.5, 1.7, None, None), id="scales"),
    pytest.param((1.0, 1.0, 8.0, 12.0), id="softcaps"),
    pytest.param((1.5, 0.25, 5.0, None), id="student-both-teacher-scale"),
    pytest.param((1.0, 2.0, None, 6.0), id="teacher-both"),
]


def randn(shape, gen, dtype=torch.float32, scale=6.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def kwargs_of(transform):
    ss, ts, sc, tc = transform
    return dict(student_logit_scale=ss, teacher_logit_scale=ts, student_softcap=sc, teacher_softcap=tc)


# --- the reference ---------------------------------------------------------------------------------

def transform(x, scale=1.0, cap=None):
    """float64 z' = cap tanh(scale x / cap) (cap given), else scale x; -inf stays -inf."""
    x = x.double()
    if cap is None:
        return scale * x
    return torch.where(x == -INF, x, cap * torch.tanh(scale * x / cap))


def plogq(p, lp, lq):
    """sum p (log p - log q), 0 log 0 = 0, without NaN gradients from masked classes."""
    on = p > 0
    return (p * (torch.where(on, lp, 0.0) - torch.where(on, lq, 0.0))).sum(-1)


def reference(s, t, labels, *, temperature, alpha, divergence="kl", beta=0.5, reduction="batchmean",
              t_squared=True, ignore_index=-100, num_items=None, transforms=(1.0, 1.0, None, None)):
    """alpha T^2 D(p_t, p_s) + (1 - alpha) CE(z'_s, label) per row on the transformed logits, reduced."""
    ss, ts, sc, tc = transforms
    c = s.shape[-1]
    zs, zt = transform(s, ss, sc).reshape(-1, c), transform(t, ts, tc).reshape(-1, c)
    ls, lt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "kl":
        d = plogq(pt, lt, ls)
    elif divergence == "reverse_kl":
        d = plogq(ps, ls, lt)
    else:
        m = beta * pt + (1 - beta) * ps
        lm = torch.log(torch.where(m > 0, m, 1.0))
        d = beta * plogq(pt, lt, lm) + (1 - beta) * plogq(ps, ls, lm)
    row = alpha * d * (temperature**2 if t_squared else 1.0)
    # the CE on the transformed logits, ignored rows dropped, reduced (num_items: the sum divided by it)
    out = _with_ce_reduced(zs.reshape(s.shape), row, labels, alpha, ignore_index,
                           "sum" if num_items is not None else reduction)
    return out / float(num_items) if num_items is not None else out


def close(actual, expected, rtol, msg=""):
    """|a - e| <= rtol (|e| + max |e|)."""
    expected = expected.detach().double()
    atol = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol, msg=msg)


def check(backend, s, t, labels, transforms, rtol_loss=1e-5, rtol_grad=1e-5, teacher_grad=True, loss=None,
          meter=None, **kw):
    """The loss (kd_loss unless ``loss``) and the gradients of student and teacher under one random
    upstream gradient, against the reference."""
    gen = torch.Generator().manual_seed(1234)
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_(teacher_grad)
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(teacher_grad)
    if loss is None:
        out = fastkd.kd_loss(s, t, labels, backend=backend, meter=meter, **kwargs_of(transforms), **kw)
    else:
        out = loss(s, t)
    ref = reference(s64, t64, labels, transforms=transforms, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    close(out, ref, rtol_loss, "loss")
    upstream = (torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5).to(ref.device)
    inputs, inputs64 = ((s, t), (s64, t64)) if teacher_grad else ((s,), (s64,))
    got = torch.autograd.grad(out, inputs, upstream.float())
    want = torch.autograd.grad(ref, inputs64, upstream)
    for g, w, name in zip(got, want, ("student", "teacher")):
        assert g.dtype == s.dtype and g.shape == s.shape
        close(g, w, rtol_grad, f"{name} gradient")
    return out


def ignored_labels(shape, c, gen, every=4):
    labels = torch.randint(0, c, shape, generator=gen)
    labels.view(-1)[::every] = -100
    return labels


# --- dense losses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("transforms", TRANSFORMS)
def test_kd_loss_matches_reference(backend, divergence, transforms, gen):
    """(B, T, C) logits with ignored rows, CE (alpha < 1), teacher gradient, random upstream."""
    shape = (2, 5, 37)
    s, t = randn(shape, gen), randn(shape, gen)
    labels = ignored_labels(shape[:-1], shape[-1], gen)
    check(backend, s, t, labels, transforms, temperature=2.5, alpha=0.6, divergence=divergence, beta=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol_loss,rtol_grad", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param((9, 130), id="9x130"), pytest.param((7, 2), id="7x2")])
def test_dtypes(backend, dtype, rtol_loss, rtol_grad, shape, gen):
    s, t = randn(shape, gen, dtype), randn(shape, gen, dtype)
    labels = ignored_labels(shape[:-1], shape[-1], gen, every=3)
    check(backend, s, t, labels, (1.3, 0.6, 7.0, 9.0), rtol_loss, rtol_grad, temperature=2.0, alpha=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions_and_kl_loss(backend, reduction, gen):
    s, t = randn((11, 23), gen), randn((11, 23), gen)
    labels = ignored_labels((11,), 23, gen, every=5)
    transforms = (0.8, 1.0, None, 10.0)
    check(backend, s, t, labels, transforms, temperature=3.0, alpha=0.5, reduction=reduction)

    def kl(a, b):
        return fastkd.kl_loss(a, b, temperature=3.0, reduction=reduction, backend=backend, **kwargs_of(transforms))

    check(backend, s, t, None, transforms, loss=kl, temperature=3.0, alpha=1.0, reduction=reduction,
          t_squared=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_pass_the_transforms_on(backend, gen):
    s, t = randn((6, 19), gen), randn((6, 19), gen)
    labels = torch.randint(0, 19, (6,), generator=gen)
    transforms = (0.5, 1.5, 6.0, 4.0)
    kd = fastkd.KDLoss(temperature=2.0, alpha=0.4, divergence="jsd", backend=backend, **kwargs_of(transforms))
    kl = fastkd.KLLoss(temperature=2.0, backend=backend, **kwargs_of(transforms))
    check(backend, s, t, labels, transforms, loss=lambda a, b: kd(a, b, labels), temperature=2.0, alpha=0.4,
          divergence="jsd")
    check(backend, s, t, None, transforms, loss=kl, temperature=2.0, alpha=1.0, t_squared=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_defaults_change_nothing(backend, gen):
    """Scale 1 and no softcap given explicitly: the same numbers as without the arguments, bit for bit."""
    s, t = randn((5, 40), gen), randn((5, 40), gen)
    labels = torch.randint(0, 40, (5,), generator=gen)
    s.requires_grad_()
    plain = fastkd.kd_loss(s, t, labels, alpha=0.5, backend=backend)
    (g_plain,) = torch.autograd.grad(plain, s)
    given = fastkd.kd_loss(s, t, labels, alpha=0.5, backend=backend, student_logit_scale=1.0, teacher_logit_scale=1,
                           student_softcap=None, teacher_softcap=None)
    (g_given,) = torch.autograd.grad(given, s)
    assert torch.equal(plain, given) and torch.equal(g_plain, g_given)
    # and a transform does change them (the arguments reach the kernel)
    scaled = fastkd.kd_loss(s, t, labels, alpha=0.5, backend=backend, student_logit_scale=0.5)
    assert not torch.allclose(scaled, plain, rtol=1e-3)


# --- the Triton kernel's paths ----------------------------------------------------------------------

@pytest.fixture
def triton_path(request, monkeypatch):
    """Forces a path of the Triton kernel on small rows: one-pass as is; looping (tiles of 32 columns);
    split (parts of 32 columns, its two halves as two launches under the interpreter)."""
    K = pytest.importorskip("fastkd.backends.triton.plan")
    path = request.param
    force_triton_path(monkeypatch, K, path)
    return K, path


@pytest.mark.parametrize("triton_path,divergence", [
    pytest.param(path, div, id=f"{path}-{div}") for path in ("one-pass", "looping", "split")
    for div in ("kl", "reverse_kl", "jsd") if not (path == "split" and div == "jsd")  # JSD: no split path
], indirect=["triton_path"])
def test_triton_paths(triton_path, divergence, gen):
    """Every path of the dense kernel, with both models transformed, CE, an ignored row, a first chunk of
    -inf (masked vocabulary), a ragged last tile, the student's meter."""
    K, path = triton_path
    n, c = 4, 110
    s, t = randn((n, c), gen), randn((n, c), gen)
    s[1, :40] = -INF
    t[1, :40] = -INF
    labels = torch.randint(40, c, (n,), generator=gen)
    labels[2] = -100
    transforms = (1.5, 0.7, 6.0, 9.0)
    spec = KDSpec(0.5, 1.0, 0.4, ("kl", "reverse_kl", "jsd").index(divergence), 0.5, -100, 0.0,
                              *transforms[:2], *transforms[2:])
    plan = K._plan(n, c, s.dtype, t.dtype, spec, True, True, True, True, False, True,
                   split_ok=path == "split", sms=1)
    assert plan["path"] == {"one-pass": "one-pass", "looping": f"{3 if divergence == 'jsd' else 2}-sweep",
                            "split": "split-row"}[path]
    assert plan["consts"]["S_SCALE"] and plan["consts"]["S_CAP"] and plan["consts"]["T_CAP"]
    meter = fastkd.CalibrationMeter(8)
    check("triton", s, t, labels, transforms, temperature=2.0, alpha=0.6, divergence=divergence, meter=meter)
    want = fastkd.CalibrationMeter(8).update(transform(s, 1.5, 6.0).float(), labels)
    assert_meters_equal(meter, want)


def test_default_spec_compiles_no_transform(gen):
    """The constexprs that compile the transforms in are set by value: off for scale 1, no softcap."""
    K = pytest.importorskip("fastkd.backends.triton.plan")
    spec = KDSpec(0.5, 1.0, 0.0, 0, 0.5, -100)
    for split_ok, c in ((False, 100), (True, 100000)):
        consts = K._plan(8, c, torch.bfloat16, torch.bfloat16, spec, True, False, False, False, False, True,
                         split_ok=split_ok)["consts"]
        assert not any(consts[k] for k in ("S_SCALE", "T_SCALE", "S_CAP", "T_CAP"))


# --- -inf, NaN, large values ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_minus_inf_stays_masked_under_a_softcap(backend, divergence, gen):
    """A -inf logit (masked class, padded vocabulary) stays -inf under a softcap: no mass, gradient 0;
    the plain formula cap tanh(-inf) = -cap would give it mass (checked to differ, so this can fail)."""
    s, t = randn((6, 50), gen), randn((6, 50), gen)
    s[:, 40:] = -INF
    t[:, 40:] = -INF
    (s if divergence == "reverse_kl" else t)[2, :10] = -INF  # zero mass on the reference side only
    labels = torch.randint(10, 40, (6,), generator=gen)
    transforms = (1.0, 1.0, 4.0, 4.0)
    out = check(backend, s, t, labels, transforms, temperature=2.0, alpha=0.5, divergence=divergence)
    assert torch.isfinite(out)
    s_ = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(fastkd.kd_loss(s_, t, labels, temperature=2.0, alpha=0.5, divergence=divergence,
                                              backend=backend, **kwargs_of(transforms)), s_)
    assert torch.isfinite(g).all() and (g[:, 40:] == 0).all()
    # the masked classes with the mass the plain formula would give them: a different loss
    naive = reference(s.clamp(min=-1e30), t.clamp(min=-1e30), labels, temperature=2.0, alpha=0.5,
                      divergence=divergence, transforms=transforms)
    assert not torch.allclose(out.double(), naive, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits(backend, gen):
    """NaN in a row gives NaN for that row only; +inf under a softcap is the cap (tanh(+inf) = 1): its
    row is finite, as the reference's with a huge finite logit there, and its gradient there is 0."""
    s, t = randn((4, 20), gen), randn((4, 20), gen)
    s[1, 3] = float("nan")
    s[2, 5] = INF
    labels = torch.tensor([0, 0, 7, 0])
    s_ = s.clone().requires_grad_()
    out = fastkd.kd_loss(s_, t, labels, reduction="none", backend=backend, student_softcap=10.0,
                         teacher_softcap=10.0)
    (g,) = torch.autograd.grad(out, s_, torch.ones(4))
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3]]).all() and abs(g[2, 5]) < 1e-6
    s64 = s[2:3].nan_to_num(posinf=1e30).double().requires_grad_()
    want = reference(s64, t[2:3], labels[2:3], temperature=4.0, alpha=0.9, reduction="none",
                     transforms=(1.0, 1.0, 10.0, 10.0))
    close(out[2:3], want, 1e-5)
    close(g[2:3], torch.autograd.grad(want.sum(), s64)[0], 1e-5)


# --- meters -----------------------------------------------------------------------------------------

def assert_meters_equal(meter, want):
    """Bin counts and correct counts exact; the sums (confidence, NLL, Brier) to fp32 accuracy."""
    nb = meter.num_bins + 1
    got, ref = meter.state.double(), want.state.double()
    assert got[:nb].tolist() == ref[:nb].tolist() and got[2 * nb:3 * nb].tolist() == ref[2 * nb:3 * nb].tolist()
    torch.testing.assert_close(got[nb:2 * nb], ref[nb:2 * nb], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3 * nb:], ref[3 * nb:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meters_see_the_transformed_logits(backend, gen):
    """meter / teacher_meter equal CalibrationMeter.update on each model's transformed logits at T = 1
    (the model's real output distribution), and differ from update on the raw logits."""
    s, t = randn((40, 30), gen, scale=3.0), randn((40, 30), gen, scale=3.0)
    labels = ignored_labels((40,), 30, gen, every=7)
    meter, teacher_meter = fastkd.CalibrationMeter(10), fastkd.CalibrationMeter(10)
    fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, meter=meter, teacher_meter=teacher_meter,
                   backend=backend, student_logit_scale=0.3, teacher_softcap=2.0)
    assert_meters_equal(meter, fastkd.CalibrationMeter(10).update(transform(s, 0.3).float(), labels))
    assert_meters_equal(teacher_meter, fastkd.CalibrationMeter(10).update(transform(t, 1.0, 2.0).float(), labels))
    raw = fastkd.CalibrationMeter(10).update(s, labels)
    assert not torch.allclose(meter.state, raw.state, rtol=1e-3)


# --- gradients: float64 gradcheck, fp16 under a loss scaler ---------------------------------------

@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_gradcheck_float64_on_fallback(divergence, gen):
    s = randn((3, 6), gen, torch.float64, 2.0).requires_grad_()
    t = randn((3, 6), gen, torch.float64, 2.0).requires_grad_()
    labels = torch.tensor([1, -100, 5])

    def f(a, b):
        return fastkd.kd_loss(a, b, labels, temperature=2.0, alpha=0.6, divergence=divergence, reduction="none",
                              backend="torch", student_logit_scale=1.4, teacher_logit_scale=0.6,
                              student_softcap=3.0, teacher_softcap=2.5)

    assert torch.autograd.gradcheck(f, (s, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradient_with_a_large_scale_survives_a_loss_scaler(backend, gen):
    """fp16 gradients are saved in grad units (KDSpec.grad_unit) and scaled in the backward; with a
    logit scale of 8 the bound of the saved entries grows 8-fold, and the unit shrinks with it. Rows
    where student and teacher are sure of different classes make entries near that bound (they would
    overflow fp16 with the unit of scale 1); upstream 2^16 as a GradScaler's."""
    n, c = 64, 48  # the final entries, 16 / 64 x 2^16, stay in fp16's range
    s, t = randn((n, c), gen, scale=0.5), randn((n, c), gen, scale=0.5)
    s[:, 0] += 40.0
    t[:, 1] += 40.0
    s, t = s.half(), t.half()
    from fastkd._core.enums import Divergence
    from fastkd._core.spec import grad_unit

    unit = grad_unit(1.0 * 2.0, 0.0, Divergence.KL, (torch.float16,), 8.0)
    assert unit == 2.0**14 / 16.0  # kd_g = alpha T = 2, times the scale 8
    s_ = s.clone().requires_grad_()
    out = fastkd.kd_loss(s_, t, temperature=2.0, alpha=1.0, backend=backend, student_logit_scale=8.0)
    (g,) = torch.autograd.grad(out, s_, torch.tensor(2.0**16))
    s64 = s.double().requires_grad_()
    (want,) = torch.autograd.grad(reference(s64, t, None, temperature=2.0, alpha=1.0, transforms=(8.0, 1.0, None, None))
                                  * 2.0**16, s64)
    assert torch.isfinite(g).all()
    assert (g.double() - want).norm() / want.norm() < 2e-3


# --- sparse teachers --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,path", [pytest.param("torch", "", id="torch"),
                                          pytest.param("triton", "one-pass", id="triton-one-pass"),
                                          pytest.param("triton", "looping", id="triton-looping")])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("transforms", [pytest.param((0.6, None), id="scale"), pytest.param((1.5, 5.0), id="both")])
def test_sparse_student_transforms(backend, path, tail, transforms, gen, monkeypatch):
    """sparse_kd_loss with the student transformed equals the sparse reference on the transformed
    logits (value, gradient w.r.t. the raw ones) and its meter equals update on them."""
    from reference import sparse_kd_objective

    if path == "looping":
        S = pytest.importorskip("fastkd.backends.triton.sparse")
        monkeypatch.setattr(S, "ONE_PASS_MAX", {1: 16, 2: 16, 4: 16})
        monkeypatch.setattr(S, "LOOP_BLOCK_C", 32)
    scale, cap = transforms
    n, v, k = 6, 70, 5
    s = randn((n, v), gen, scale=4.0)
    s[4, 60:] = -INF  # masked classes, off the teacher's list
    teacher = torch.log_softmax(randn((n, v), gen, scale=2.0), -1)
    teacher[4, 60:] = -INF
    lp, ids = teacher.topk(k, -1)
    ids[2, -2:] = -1  # a row with fewer classes
    labels = torch.randint(0, 60, (n,), generator=gen)
    labels[1] = -100
    meter = fastkd.CalibrationMeter(6)
    s_ = s.clone().requires_grad_()
    out = fastkd.sparse_kd_loss(s_, ids, lp, labels, temperature=2.0, alpha=0.7, tail=tail, meter=meter,
                                backend=backend, student_logit_scale=scale, student_softcap=cap)
    s64 = s.double().requires_grad_()
    want = sparse_kd_objective(transform(s64, scale, cap), ids, lp, labels, 2.0, 0.7, tail)
    close(out, want, 1e-5, "loss")
    upstream = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, s_, upstream.float())
    (w,) = torch.autograd.grad(want, s64, upstream)
    close(g, w, 1e-5, "student gradient")
    assert (g[4, 60:] == 0).all()  # a masked class: no gradient
    assert_meters_equal(meter, fastkd.CalibrationMeter(6).update(transform(s, scale, cap).float(), labels))


# --- num_items as a floating tensor -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_num_items_floating_tensor_below_one(backend, dtype, gen):
    """TRL's num_items_in_batch / num_processes: a floating tensor, here 0.5, divides the sum as is
    (no clamp at 1), in the kernel (fp32) or in the backward (fp16 gradients in grad units)."""
    s, t = randn((5, 40), gen, dtype), randn((5, 40), gen, dtype)
    labels = ignored_labels((5,), 40, gen, every=3)
    num_items = torch.tensor(0.5)
    for transforms in ((1.0, 1.0, None, None), (0.5, 1.0, 6.0, None)):
        check(backend, s, t, labels, transforms, 1e-5, 1e-5 if dtype == torch.float32 else 2e-3,
              temperature=2.0, alpha=0.6, num_items=num_items)
    # the sparse loss reads the count too
    lp, ids = torch.log_softmax(t.float(), -1).topk(4, -1)
    s_ = s.clone().requires_grad_()
    out = fastkd.sparse_kd_loss(s_, ids, lp, labels, temperature=2.0, alpha=0.6, num_items=num_items,
                                backend=backend)
    total = fastkd.sparse_kd_loss(s, ids, lp, labels, temperature=2.0, alpha=0.6, reduction="sum", backend=backend)
    close(out, total * 2, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_carries_the_transforms_and_a_floating_count(backend, gen):
    """Under torch.compile(fullgraph=True) the custom op gets the transforms and a floating num_items
    (fp16: the row scale is applied in the op's backward): eager's numbers."""
    torch._dynamo.reset()
    s, t = randn((24, 50), gen, torch.float16), randn((24, 50), gen, torch.float16)
    labels = ignored_labels((24,), 50, gen, every=5)
    num_items = torch.tensor(7.5)

    def f(x):
        return fastkd.kd_loss(x, t, labels, temperature=2.0, alpha=0.5, num_items=num_items, backend=backend,
                              student_logit_scale=0.7, student_softcap=5.0, teacher_softcap=3.0)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x = s.clone().requires_grad_()
        out = fn(x)
        out.backward(torch.tensor(64.0))
        results.append((out.detach(), x.grad))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(g1, g0)
    s64 = s.double().requires_grad_()
    want = reference(s64, t, labels, temperature=2.0, alpha=0.5, num_items=7.5, transforms=(0.7, 1.0, 5.0, 3.0))
    close(l1, want, 1e-5)
    (w,) = torch.autograd.grad(want * 64, s64)
    assert (g1.double() - w).norm() / w.norm() < 2e-3


# --- bad input ----------------------------------------------------------------------------------------

BAD = [
    pytest.param(0.0, ValueError, id="zero"),
    pytest.param(-1.0, ValueError, id="negative"),
    pytest.param(float("nan"), TypeError, id="nan"),
    pytest.param(INF, TypeError, id="inf"),
    pytest.param("2", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
]


@pytest.mark.parametrize("name", ["student_logit_scale", "teacher_logit_scale", "student_softcap",
                                  "teacher_softcap"])
@pytest.mark.parametrize("value,error", BAD)
def test_bad_transforms_are_named(name, value, error, monkeypatch):
    import fastkd.backends.torch as _torch_kd

    def never(*a, **k):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(_torch_kd, "kd_forward", never)
    monkeypatch.setattr(_torch_kd, "sparse_kd_forward", never)
    s, labels = torch.zeros(2, 3), torch.tensor([0, 2])
    calls = [lambda **kw: fastkd.kd_loss(s, s, labels, backend="torch", **kw),
             lambda **kw: fastkd.kl_loss(s, s, backend="torch", **kw),
             lambda **kw: fastkd.KDLoss(backend="torch", **kw)(s, s, labels),
             lambda **kw: fastkd.KLLoss(backend="torch", **kw)(s, s)]
    if name.startswith("student"):
        ids, lp = torch.tensor([[0], [1]]), torch.full((2, 1), -0.5)
        calls += [lambda **kw: fastkd.sparse_kd_loss(s, ids, lp, labels, backend="torch", **kw),
                  lambda **kw: fastkd.SparseKDLoss(backend="torch", **kw)(s, ids, lp, labels)]
    for call in calls:
        with pytest.raises(error, match=name):
            call(**{name: value})


def test_sparse_has_no_teacher_transforms():
    s = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="teacher_softcap"):
        fastkd.sparse_kd_loss(s, torch.tensor([[0], [1]]), torch.full((2, 1), -0.5), teacher_softcap=3.0)


@pytest.mark.parametrize("name,value", [("student_logit_scale", 2.0), ("teacher_logit_scale", 0.5),
                                        ("student_softcap", 30.0), ("teacher_softcap", 30.0)])
def test_cuda_backend_refuses_transforms_before_launching(name, value, monkeypatch):
    """The cuda backend does not implement the transforms: refused naming the argument, before the
    extension is loaded (here a stand-in that fails), from the public loss and at its kd_forward
    (what fused_linear calls with a spec)."""
    from fastkd import backends
    import fastkd.backends.cuda as _cuda_kd
    from fastkd._core.spec import KDSpec

    def never(*a, **k):
        raise AssertionError("the cuda extension was loaded")

    monkeypatch.setattr(backends, "_cuda_unusable", lambda device, dtypes=(): "")
    monkeypatch.setattr(_cuda_kd, "load", never)
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=f"{name} needs backend='triton' or 'torch'"):
        fastkd.kd_loss(s, s, alpha=1.0, backend="cuda", **{name: value})
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match=name):
        fastkd.kl_loss(s, s, **{name: value})
    field = {"student_logit_scale": "s_scale", "teacher_logit_scale": "t_scale", "student_softcap": "s_cap",
             "teacher_softcap": "t_cap"}[name]
    spec = KDSpec(1.0, 1.0, 0.0, 0, 0.5, -100, **{field: value})
    with pytest.raises(ValueError, match=name):
        _cuda_kd.kd_forward(s, s, None, 2, spec, True, False, None, None)
    assert backends.resolve_name("auto", torch.device("cpu"), (s.dtype,)) != "cuda"
