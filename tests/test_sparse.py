"""sparse_kd_loss (a top-K teacher) on both backends against the float64 reference written densely
from its definition in tests/reference.py, and against kd_loss where they must agree (K = V)."""
import pytest
import torch

import fastkd
from conftest import BACKENDS
from reference import sparse_kd_objective
from test_loss import DTYPES, close, randn, random_labels


def top_k_teacher(shape, k, gen, dtype=torch.float32, pad_every=None):
    """(ids, log-probs) of a random teacher's top-k, listed in a shuffled order, with -1 padding."""
    t = randn(shape, gen)
    lp = t.double().log_softmax(-1)
    values, ids = lp.topk(k, dim=-1)
    order = torch.rand(ids.shape, generator=gen).argsort(-1)
    ids, values = ids.gather(-1, order), values.gather(-1, order)
    if pad_every:
        ids.view(-1, k)[::pad_every, : k // 2] = -1  # rows with fewer listed classes
    return ids, values.to(dtype), t


def check(backend, s, ids, lp, labels, rtol_grad, **kw):
    s = s.detach().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    ref = sparse_kd_objective(s64, ids, lp, labels, **kw)
    out = fastkd.sparse_kd_loss(s, ids, lp, labels, backend=backend, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    close(out, ref, 1e-5, msg="loss")
    upstream = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(out, s, upstream.float())
    (want,) = torch.autograd.grad(ref, s64, upstream)
    assert g.dtype == s.dtype
    close(g, want, rtol_grad, msg="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol_grad", DTYPES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("shape,k", [((13, 257), 7), ((2, 3, 41), 1), ((5, 9000), 33)],
                         ids=["13x257-K7", "BxT-K1", "5x9000-K33"])
def test_matches_reference(backend, dtype, rtol_grad, tail, shape, k, gen):
    ids, lp, _ = top_k_teacher(shape, k, gen, dtype, pad_every=3)
    s = randn(shape, gen, dtype)
    labels = random_labels(shape[:-1], shape[-1], gen, ignore_every=4)
    check(backend, s, ids, lp, labels, rtol_grad, temperature=2.5, alpha=0.6, tail=tail)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_reductions_and_temperatures(backend, reduction, temperature, gen):
    ids, lp, _ = top_k_teacher((17, 300), 16, gen)
    check(backend, randn((17, 300), gen), ids, lp, random_labels((17,), 300, gen, ignore_every=5), 1e-5,
          temperature=temperature, alpha=0.8, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_full_list_equals_the_dense_loss(backend, tail, gen):
    """K = V: nothing is missing, and both modes are kd_loss on the dense teacher."""
    ids, lp, t = top_k_teacher((21, 97), 97, gen)
    s = randn((21, 97), gen)
    labels = random_labels((21,), 97, gen, ignore_every=6)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    sparse = fastkd.sparse_kd_loss(a, ids, lp, labels, temperature=2.0, alpha=0.7, tail=tail, backend=backend)
    dense = fastkd.kd_loss(b, t, labels, temperature=2.0, alpha=0.7, backend=backend)
    sparse.backward()
    dense.backward()
    close(sparse, dense, 1e-5)
    close(a.grad, b.grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meter_all_ignored_and_zero_rows(backend, gen):
    ids, lp, _ = top_k_teacher((40, 120), 10, gen)
    s = randn((40, 120), gen)
    labels = random_labels((40,), 120, gen, ignore_every=7)
    meter = fastkd.CalibrationMeter()
    fastkd.sparse_kd_loss(s, ids, lp, labels, meter=meter, backend=backend)
    want = fastkd.CalibrationMeter().update(s, labels).compute()
    got = meter.compute()
    assert [b.count for b in got.bins] == [b.count for b in want.bins]
    assert got.nll == pytest.approx(want.nll, rel=1e-5) and got.ece == pytest.approx(want.ece, rel=1e-5, abs=1e-7)
    x = s.clone().requires_grad_()
    out = fastkd.sparse_kd_loss(x, ids, lp, torch.full((40,), -100), backend=backend)
    out.backward()
    assert out.item() == 0.0 and (x.grad == 0).all()
    empty = torch.zeros(0, 120, requires_grad=True)
    assert fastkd.sparse_kd_loss(empty, ids[:0], lp[:0], alpha=1.0, backend=backend).item() == 0.0
    assert fastkd.sparse_kd_loss(empty, ids[:0], lp[:0], alpha=1.0, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradient_survives_a_loss_scale(backend, gen):
    ids, lp, _ = top_k_teacher((256, 4000), 64, gen, torch.float16)
    s = randn((256, 4000), gen, torch.float16).requires_grad_()
    fastkd.sparse_kd_loss(s, ids, lp, temperature=2.0, alpha=1.0, backend=backend).backward(torch.tensor(65536.0))
    s64 = s.detach().double().requires_grad_()
    (sparse_kd_objective(s64, ids, lp, None, 2.0, 1.0) * 65536.0).backward()
    from test_training_setups import assert_fp16_gradient_close
    assert_fp16_gradient_close(s.grad, s64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_ids_out_of_range_give_nan_rows(backend, gen):
    ids, lp, _ = top_k_teacher((6, 50), 4, gen)
    ids[2, 1] = 50
    ids[4, 0] = -9
    s = randn((6, 50), gen).requires_grad_()
    rows = fastkd.sparse_kd_loss(s, ids, lp, reduction="none", alpha=1.0, backend=backend, validate_labels=False)
    rows.sum().backward()
    bad = torch.tensor([False, False, True, False, True, False])
    assert rows[bad].isnan().all() and torch.isfinite(rows[~bad]).all()
    assert s.grad[bad].isnan().all() and torch.isfinite(s.grad[~bad]).all()


def test_bad_teacher_input_is_refused_naming_the_argument(gen):
    ids, lp, _ = top_k_teacher((4, 30), 5, gen)
    s = randn((4, 30), gen)
    dup = ids.clone()
    dup[1, 2] = dup[1, 3]
    far = ids.clone()
    far[3, 0] = 30
    cases = [
        (dict(teacher_ids=ids.float()), TypeError, "teacher_ids"),
        (dict(teacher_logprobs=lp.long()), TypeError, "teacher_logprobs"),
        (dict(teacher_ids=ids[:3]), ValueError, "teacher_ids"),
        (dict(teacher_logprobs=lp[:, :4]), ValueError, "teacher_logprobs"),
        (dict(teacher_ids=dup), ValueError, "row 1: a class listed twice"),
        (dict(teacher_ids=far), ValueError, r"row 3: ids outside \[-1, 30\)"),
        (dict(teacher_logprobs=lp + 2.0), ValueError, "log-probabilities"),
        (dict(tail="uniform"), ValueError, "tail"),
        (dict(divergence="reverse_kl"), ValueError, "divergence"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(alpha=0.5), ValueError, "labels are required"),
    ]
    for override, error, match in cases:
        kw = dict(teacher_ids=ids, teacher_logprobs=lp, alpha=1.0, backend="torch") | override
        with pytest.raises(error, match=match):
            fastkd.sparse_kd_loss(s, **kw)


def test_module_wraps_the_function(gen):
    ids, lp, _ = top_k_teacher((8, 64), 6, gen)
    s, labels = randn((8, 64), gen), random_labels((8,), 64, gen)
    module = fastkd.SparseKDLoss(temperature=3.0, alpha=0.5, tail="renormalize", backend="torch")
    assert module(s, ids, lp, labels) == fastkd.sparse_kd_loss(s, ids, lp, labels, temperature=3.0, alpha=0.5,
                                                               tail="renormalize", backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_fused_linear_sparse_equals_the_loss_on_materialised_logits(backend, tail, gen):
    """Hidden states and the output layer in, top-K teacher in: the same loss and gradients as
    sparse_kd_loss on h W^T + b, over several chunks."""
    h = randn((3, 7, 24), gen, scale=1.0)
    w, b = randn((301, 24), gen, scale=0.5), randn((301,), gen, scale=0.5)
    ids, lp, _ = top_k_teacher((3, 7, 301), 9, gen, pad_every=4)
    labels = random_labels((3, 7), 301, gen, ignore_every=5)
    kw = dict(temperature=2.0, alpha=0.6, tail=tail, backend=backend)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    out = fastkd.fused_linear_sparse_kd_loss(leaves[0], leaves[1], ids, lp, labels, student_bias=leaves[2],
                                             chunk_size=5, **kw)
    out.backward()
    refs = [x.clone().requires_grad_() for x in (h, w, b)]
    want = fastkd.sparse_kd_loss(refs[0] @ refs[1].t() + refs[2], ids, lp, labels, **kw)
    want.backward()
    close(out, want, 1e-5)
    for got, ref, name in zip(leaves, refs, ("hidden", "weight", "bias")):
        close(got.grad, ref.grad, 1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_a_row_listing_nothing_has_finite_gradients(backend, tail, gen):
    """A row whose ids are all padding has no divergence term: with "renormalize" its teacher is
    empty (0/0), which must not reach the gradient as NaN; the CE term still trains the row."""
    s = torch.randn(3, 9, generator=gen).requires_grad_()
    ids = torch.tensor([[1, 2], [-1, -1], [3, 4]])
    lp = torch.log(torch.tensor([[0.3, 0.2], [0.1, 0.1], [0.5, 0.1]]))
    labels = torch.tensor([0, 5, 7])
    out = fastkd.sparse_kd_loss(s, ids, lp, labels, alpha=0.6, temperature=2.0, tail=tail, backend=backend,
                                reduction="none")
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(grad).all() and torch.isfinite(out).all()
    ce_grad = 0.4 * (torch.softmax(s[1].double(), -1) - torch.nn.functional.one_hot(labels[1], 9))
    close(grad[1], ce_grad, 1e-5)
    close(out[1], 0.4 * torch.nn.functional.cross_entropy(s[1:2].double(), labels[1:2]), 1e-5)
