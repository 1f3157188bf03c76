"""float64 in, float64 arithmetic out: every loss on the torch backend (the only one that takes
float64) with a random upstream gradient — a scalar, and one per row for reduction="none" — against
float64 autograd through the formulas of tests/reference.py (log_softmax, the divergences by hand),
at rtol 1e-12. A factor taken in fp32 anywhere on the way (grad_output, the row scale, a weight
written as a python number into an fp32 mask) shows as ~1e-8 relative; float64's own rounding over
these small rows is ~1e-15. Then gradcheck with its default tolerances."""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.sparse import TAILS
from reference import kd_objective, sparse_kd_objective
from test_fused_linear import make_side, reference as linear_reference
from test_loss import close, randn, random_labels
from test_sparse import top_k_teacher

F64 = torch.float64
RTOL = 1e-12  # |a - e| <= 1e-12 |e| + 1e-12 max |e|


def upstream_like(ref, gen):
    """A random upstream gradient in [0.5, 1.5): not 1, and not representable in fp32."""
    return torch.rand(ref.shape, generator=gen, dtype=F64) + 0.5


def check_grads(out, ref, got_inputs, want_inputs, gen):
    assert out.dtype == F64 and out.shape == ref.shape
    close(out, ref, RTOL, msg="loss")
    upstream = upstream_like(ref, gen)
    got = torch.autograd.grad(out, got_inputs, upstream)
    want = torch.autograd.grad(ref, want_inputs, upstream)
    for i, (g, w, x) in enumerate(zip(got, want, got_inputs)):
        assert g.dtype == x.dtype and g.shape == x.shape
        close(g, w, RTOL, msg=f"gradient of input {i}")


DENSE = [  # loss, kwargs
    pytest.param("kl_loss", dict(temperature=2.5), id="kl_loss"),
    pytest.param("kd_loss", dict(temperature=2.0, alpha=0.3), id="kd-kl"),
    pytest.param("kd_loss", dict(temperature=1.5, alpha=0.7, divergence="reverse_kl"), id="kd-reverse_kl"),
    pytest.param("kd_loss", dict(temperature=3.0, alpha=0.6, divergence="jsd", beta=0.9), id="kd-jsd"),
]


@pytest.mark.parametrize("loss,kw", DENSE)
@pytest.mark.parametrize("reduction", ["batchmean", "none", "mean"])
@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 29)], ids=["one-row", "BxTxV"])
def test_dense_losses_keep_float64(loss, kw, reduction, shape, gen):
    s = randn(shape, gen, F64).requires_grad_()
    t = randn(shape, gen, F64).requires_grad_()  # the teacher learns too (online distillation)
    labels = random_labels(shape[:-1], shape[-1], gen, ignore_every=4 if len(shape) == 3 else None)
    if loss == "kl_loss":
        out = fastkd.kl_loss(s, t, kw["temperature"], reduction, labels=labels, backend="torch")
        ref = kd_objective(s, t, labels, kw["temperature"], 1.0, reduction=reduction, t_squared=False)
    else:
        kind = kw.get("divergence", "kl")
        out = fastkd.kd_loss(s, t, labels, reduction=reduction, backend="torch", **kw)
        ref = kd_objective(s, t, labels, kw["temperature"], kw["alpha"], kind=kind, beta=kw.get("beta", 0.5),
                           reduction=reduction)
    check_grads(out, ref, (s, t), (s, t), gen)


def test_device_count_and_float_num_items_keep_float64(gen):
    """The row count as a device tensor (labels decide it) and a caller's float64 num_items."""
    s, t = randn((9, 31), gen, F64).requires_grad_(), randn((9, 31), gen, F64)
    labels = random_labels((9,), 31, gen, ignore_every=3)
    num_items = torch.tensor(4.3, dtype=F64)
    out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, num_items=num_items, backend="torch")
    ref = kd_objective(s, t, labels, 2.0, 0.3, reduction="sum") / num_items
    check_grads(out, ref, (s,), (s,), gen)


def test_fp16_student_float64_teacher(gen):
    """fp16 in the pair saves gradients without the row scale (KDSpec.grad_unit): the backward's
    factor 1 / (rows * grad_unit) times grad_output must then be taken in float64 for the teacher."""
    s = randn((6, 40), gen, torch.float16).requires_grad_()
    t = randn((6, 40), gen, F64).requires_grad_()
    labels = random_labels((6,), 40, gen, ignore_every=4)
    out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, backend="torch")
    s64 = s.detach().double().requires_grad_()
    ref = kd_objective(s64, t, labels, 2.0, 0.3)
    upstream = upstream_like(ref, gen)
    (g_t,) = torch.autograd.grad(out, t, upstream)
    (w_t,) = torch.autograd.grad(ref, t, upstream)
    assert out.dtype == F64 and g_t.dtype == F64
    close(out, ref, RTOL)
    close(g_t, w_t, RTOL, msg="teacher gradient")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_keeps_float64(reduction, gen):
    """The custom op's backward (what torch.compile traces) and its fake's loss dtype."""
    s, t = randn((5, 23), gen, F64).requires_grad_(), randn((5, 23), gen, F64).requires_grad_()
    labels = random_labels((5,), 23, gen, ignore_every=3)
    f = torch.compile(lambda a, b: fastkd.kd_loss(a, b, labels, temperature=2.0, alpha=0.3, reduction=reduction,
                                                  backend="torch"), backend="aot_eager", fullgraph=True)
    check_grads(f(s, t), kd_objective(s, t, labels, 2.0, 0.3, reduction=reduction), (s, t), (s, t), gen)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("teacher_temperature", [1.0, 2.0, 5.0])
def test_sparse_keeps_float64(reduction, tail, teacher_temperature, gen):
    ids, lp, _ = top_k_teacher((7, 45), 6, gen, F64, pad_every=3, teacher_temperature=teacher_temperature)
    s = randn((7, 45), gen, F64).requires_grad_()
    labels = random_labels((7,), 45, gen, ignore_every=4)
    kw = dict(tail=tail, reduction=reduction, teacher_temperature=teacher_temperature)
    out = fastkd.sparse_kd_loss(s, ids, lp, labels, temperature=2.0, alpha=0.3, backend="torch", **kw)
    ref = sparse_kd_objective(s, ids, lp, labels, 2.0, 0.3, **kw)
    check_grads(out, ref, (s,), (s,), gen)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_fused_linear_keeps_float64(divergence, gen):
    """Loss and every gradient (hidden states, weights, biases; teacher too), chunks of 4 rows over 11,
    vocabularies of different sizes."""
    student, teacher = make_side(11, 8, 30, gen, F64), make_side(11, 12, 34, gen, F64)
    leaves = [x.requires_grad_() for x in (*student, *teacher)]
    labels = random_labels((11,), 30, gen, ignore_every=5)
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.9)
    out = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], leaves[3], leaves[4], labels, student_bias=leaves[2],
                                      teacher_bias=leaves[5], chunk_size=4, backend="torch", **kw)
    ref = linear_reference(*leaves, labels, **kw)
    check_grads(out, ref, leaves, leaves, gen)


@pytest.mark.parametrize("tail,teacher_temperature", [("bucket", 1.0), ("lumped", 0.5), ("renormalize", 2.0)])
def test_fused_linear_sparse_keeps_float64(tail, teacher_temperature, gen):
    hs, ws, bs = (x.requires_grad_() for x in make_side(11, 8, 30, gen, F64))
    ids, lp, _ = top_k_teacher((11, 30), 5, gen, F64, pad_every=4, teacher_temperature=teacher_temperature)
    labels = random_labels((11,), 30, gen, ignore_every=5)
    kw = dict(tail=tail, teacher_temperature=teacher_temperature)
    out = fastkd.fused_linear_sparse_kd_loss(hs, ws, ids, lp, labels, student_bias=bs, temperature=2.0, alpha=0.3,
                                             chunk_size=4, backend="torch", **kw)
    ref = sparse_kd_objective(hs @ ws.t() + bs, ids, lp, labels, 2.0, 0.3, **kw)
    check_grads(out, ref, (hs, ws, bs), (hs, ws, bs), gen)


def test_gradcheck_every_loss_with_an_upstream_factor(gen):
    """gradcheck at its default tolerances, each loss behind a factor so that its backward sees a
    grad_output other than 1 (per row for reduction="none")."""
    s, t = randn((3, 6), gen, F64, 1.0).requires_grad_(), randn((3, 6), gen, F64, 1.0).requires_grad_()
    labels = torch.tensor([2, -100, 5])
    w = torch.rand(3, generator=gen, dtype=F64) + 0.5
    ids, lp, _ = top_k_teacher((3, 6), 3, gen, F64)
    hs, ws, bs = (x.requires_grad_() for x in make_side(3, 4, 6, gen, F64))
    ht, wt, _ = make_side(3, 5, 6, gen, F64, bias=False)
    cases = {
        "kl_loss": (lambda a, b: 1.37 * fastkd.kl_loss(a, b, 2.0, backend="torch"), (s, t)),
        "kd_loss none": (lambda a, b: w @ fastkd.kd_loss(a, b, labels, temperature=2.0, alpha=0.3, divergence="jsd",
                                                         reduction="none", backend="torch"), (s, t)),
        "sparse_kd_loss": (lambda a: 1.37 * fastkd.sparse_kd_loss(a, ids, lp, labels, temperature=2.0, alpha=0.3,
                                                                  backend="torch"), (s,)),
        "fused_linear_kd_loss": (lambda h, w_s, b: 1.37 * fastkd.fused_linear_kd_loss(
            h, w_s, ht, wt, labels, student_bias=b, temperature=2.0, alpha=0.3, chunk_size=2, backend="torch"),
            (hs, ws, bs)),
    }
    for name, (f, inputs) in cases.items():
        assert torch.autograd.gradcheck(f, inputs), name


def test_torchdistill_parity_in_float64(gen):
    """FastKDLoss equals torchdistill's KDLoss at alpha = 0.3 (CE weight), beta = 0.9 (KL weight) in
    float64, gradients included: the case where the fp32 factor showed."""
    pytest.importorskip("torchdistill")
    from torchdistill.losses.mid_level import KDLoss

    from fastkd.integrations.torchdistill import FastKDLoss

    paths = dict(student_module_path=".", student_module_io="output", teacher_module_path=".",
                 teacher_module_io="output")

    def io(x):
        return {".": {"output": x}}

    s, t = randn((13, 41), gen, F64).requires_grad_(), randn((13, 41), gen, F64).requires_grad_()
    y = random_labels((13,), 41, gen)
    kw = dict(paths, temperature=2.0, alpha=0.3, beta=0.9, reduction="batchmean")
    ref = KDLoss(**kw)(io(s), io(t), y)
    out = FastKDLoss(**kw, backend="torch")(io(s), io(t), y)
    check_grads(out, ref, (s, t), (s, t), gen)


def test_plain_recipe_reference_agrees(gen):
    """The reference itself against F.kl_div / F.cross_entropy, so a shared mistake cannot hide."""
    s, t = randn((4, 11), gen, F64), randn((4, 11), gen, F64)
    labels = random_labels((4,), 11, gen)
    recipe = 0.3 * 4.0 * F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") \
        + 0.7 * F.cross_entropy(s, labels)
    close(kd_objective(s, t, labels, 2.0, 0.3), recipe, 1e-14)
