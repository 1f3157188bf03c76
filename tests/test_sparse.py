"""sparse_kd_loss (a top-K teacher) on both backends against the float64 reference written densely
from its definition in tests/reference.py, and against kd_loss where they must agree (K = V);
every tail and teacher_temperature; a sampled teacher's gradient, exactly and in expectation."""
import math

import pytest
import torch

import fastkd
from conftest import BACKENDS
from fastkd._core.options import Options
from fastkd._core.spec import build_spec
from fastkd.sparse import TAILS
from reference import sparse_kd_objective
from test_loss import DTYPES, close, randn, random_labels


def top_k_teacher(shape, k, gen, dtype=torch.float32, pad_every=None, teacher_temperature=1.0):
    """(ids, log-probs at ``teacher_temperature``, logits) of a random teacher's top-k, listed in a
    shuffled order, with -1 padding."""
    t = randn(shape, gen)
    lp = (t.double() / teacher_temperature).log_softmax(-1)
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
    wide = torch.float64 if torch.float64 in (s.dtype, lp.dtype) else torch.float32
    assert out.dtype == wide and out.shape == ref.shape
    close(out, ref, 1e-12 if wide == torch.float64 else 1e-5, msg="loss")
    upstream = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(out, s, upstream.to(wide))
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


# every tail with a teacher at T = 1 (r = 1/T = 0.4), already at T (r = 1) and sharper than T (r = 2.4);
# the dtypes in a Latin square over (tail, teacher_temperature): each pair once, each dtype with each
TEACHER_TEMPERATURES = (1.0, 2.5, 6.0)
COMBOS = [pytest.param(tail, tt, DTYPES[(i + j) % 3].values[0], DTYPES[(i + j) % 3].values[1],
                       id=f"{tail}-tT{tt}-{DTYPES[(i + j) % 3].id}")
          for i, tail in enumerate(TAILS) for j, tt in enumerate(TEACHER_TEMPERATURES)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,teacher_temperature,dtype,rtol_grad", COMBOS)
@pytest.mark.parametrize("shape,k", [((13, 257), 7), ((1, 40), 5)], ids=["13x257-K7", "one-row-K5"])
def test_every_tail_and_teacher_temperature(backend, tail, teacher_temperature, dtype, rtol_grad, shape, k, gen):
    """Against the float64 reference: padded rows, ignored rows, -inf student logits off the list."""
    ids, lp, _ = top_k_teacher(shape, k, gen, dtype, pad_every=3, teacher_temperature=teacher_temperature)
    s = randn(shape, gen, dtype)
    labels = random_labels(shape[:-1], shape[-1], gen, ignore_every=4 if shape[0] > 1 else None)
    for row in range(shape[0]):  # a masked class per row, neither listed nor the label
        free = [c for c in range(shape[-1]) if c not in ids[row].tolist() and c != labels[row].item()]
        s[row, free[row % len(free)]] = -torch.inf
    check(backend, s, ids, lp, labels, rtol_grad, temperature=2.5, alpha=0.6, tail=tail,
          teacher_temperature=teacher_temperature)


def test_teacher_power_is_exact_at_the_two_defaults():
    """teacher_temperature = 1 gives r = 1/T, the same double as the spec's inverse temperature (so
    the kernels compute what they did before the keyword existed, bit for bit); teacher_temperature
    = T gives exactly r = 1 (a sampled teacher's rows used as given)."""
    for temperature in (1.0, 2.0, 3.0, 4.0, 0.7, 49.0, 1 / 3, 10.1, torch.tensor(3.3, dtype=torch.float64)):
        t = float(temperature)
        at_one = build_spec(Options.build(temperature=temperature, sparse=True), 10, (torch.float32,))
        assert at_one.teacher_power == at_one.inv_temperature == 1.0 / t
        at_t = build_spec(Options.build(temperature=temperature, teacher_temperature=temperature, sparse=True), 10,
                          (torch.float32,))
        assert at_t.teacher_power == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_temperature_one_is_the_default_bit_for_bit(backend, gen):
    ids, lp, _ = top_k_teacher((9, 300), 12, gen, pad_every=4)
    s, labels = randn((9, 300), gen), random_labels((9,), 300, gen, ignore_every=3)
    outs = []
    for kw in ({}, dict(teacher_temperature=1.0), dict(teacher_temperature=torch.tensor(1.0))):
        x = s.clone().requires_grad_()
        out = fastkd.sparse_kd_loss(x, ids, lp, labels, temperature=3.0, alpha=0.5, backend=backend, **kw)
        out.backward()
        outs.append((out.detach(), x.grad))
    for out, grad in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(grad, outs[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("teacher_temperature", [1.0, 3.0])
def test_full_list_equals_the_dense_loss(backend, tail, teacher_temperature, gen):
    """K = V: nothing is missing, and every mode is kd_loss on the dense teacher, whatever temperature
    the listed log-probabilities were computed at."""
    ids, lp, t = top_k_teacher((21, 97), 97, gen, teacher_temperature=teacher_temperature)
    s = randn((21, 97), gen)
    labels = random_labels((21,), 97, gen, ignore_every=6)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    sparse = fastkd.sparse_kd_loss(a, ids, lp, labels, temperature=2.0, alpha=0.7, tail=tail, backend=backend,
                                   teacher_temperature=teacher_temperature)
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
        (dict(tail="uniform"), ValueError, "tail must be one of .'bucket', 'renormalize', 'lumped'.*'uniform'"),
        (dict(tail=None), ValueError, "tail must be one of"),
        (dict(teacher_temperature=0.0), ValueError, r"teacher_temperature must lie in \(0.0, inf\)"),
        (dict(teacher_temperature=-2.0), ValueError, "teacher_temperature must lie in"),
        (dict(teacher_temperature=float("nan")), TypeError, "teacher_temperature must be a finite real number"),
        (dict(teacher_temperature=math.inf), TypeError, "teacher_temperature must be a finite real number"),
        (dict(teacher_temperature="4"), TypeError, "teacher_temperature must be a finite real number"),
        (dict(teacher_temperature=True), TypeError, "teacher_temperature must be a finite real number"),
        (dict(teacher_temperature=torch.ones(2)), TypeError, "teacher_temperature must be a finite real number"),
        (dict(divergence="reverse_kl"), ValueError, "divergence"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(alpha=0.5), ValueError, "labels are required"),
    ]
    for override, error, match in cases:
        kw = dict(teacher_ids=ids, teacher_logprobs=lp, alpha=1.0, backend="torch") | override
        with pytest.raises(error, match=match):
            fastkd.sparse_kd_loss(s, **kw)
    # the scalar checks at the other doors: the fused-linear loss and the module (at construction and
    # on assignment, which leaves the module unchanged)
    h, w = randn((4, 6), gen), randn((30, 6), gen)
    for override, error, match in cases[7:]:
        if "teacher_ids" in override or "teacher_logprobs" in override or "divergence" in override:
            continue
        kw = dict(alpha=1.0, backend="torch") | override
        with pytest.raises(error, match=match):
            fastkd.fused_linear_sparse_kd_loss(h, w, ids, lp, **kw)
        if "alpha" not in override:
            with pytest.raises(error, match=match):
                fastkd.SparseKDLoss(**kw)
    module = fastkd.SparseKDLoss(alpha=1.0, teacher_temperature=4.0)
    with pytest.raises(ValueError, match="teacher_temperature"):
        module.teacher_temperature = 0.0
    assert module.teacher_temperature == 4.0 and module.options.teacher_temperature == 4.0


def test_the_cuda_backend_refuses_sparse_teachers(monkeypatch, gen):
    """No sparse kernel in the CUDA C++ extension: asked for it (argument or FASTKD_BACKEND), every sparse
    entry says so before touching the device, naming the backends that have one."""
    ids, lp, _ = top_k_teacher((4, 30), 5, gen)
    s, h, w = randn((4, 30), gen), randn((4, 6), gen), randn((30, 6), gen)
    want = "backend='cuda' has no sparse-teacher kernel; use backend='triton' or 'torch'"
    with pytest.raises(ValueError, match=want):
        fastkd.sparse_kd_loss(s, ids, lp, alpha=1.0, backend="cuda", teacher_temperature=4.0)
    with pytest.raises(ValueError, match=want):
        fastkd.fused_linear_sparse_kd_loss(h, w, ids, lp, alpha=1.0, backend="cuda", tail="lumped")
    with pytest.raises(ValueError, match=want):
        fastkd.SparseKDLoss(alpha=1.0, backend="cuda")(s, ids, lp)
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTKD_BACKEND='cuda' has no sparse-teacher kernel"):
        fastkd.sparse_kd_loss(s, ids, lp, alpha=1.0)


def test_module_wraps_the_function(gen):
    ids, lp, _ = top_k_teacher((8, 64), 6, gen)
    s, labels = randn((8, 64), gen), random_labels((8,), 64, gen)
    for kw in (dict(tail="renormalize"), dict(tail="lumped", teacher_temperature=3.0)):
        module = fastkd.SparseKDLoss(temperature=3.0, alpha=0.5, backend="torch", **kw)
        assert module(s, ids, lp, labels) == fastkd.sparse_kd_loss(s, ids, lp, labels, temperature=3.0, alpha=0.5,
                                                                   backend="torch", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,teacher_temperature", [("bucket", 1.0), ("renormalize", 1.0), ("lumped", 1.0),
                                                      ("bucket", 0.5), ("lumped", 2.0)])
def test_fused_linear_sparse_equals_the_loss_on_materialised_logits(backend, tail, teacher_temperature, gen):
    """Hidden states and the output layer in, top-K teacher in: the same loss and gradients as
    sparse_kd_loss on h W^T + b, over several chunks."""
    h = randn((3, 7, 24), gen, scale=1.0)
    w, b = randn((301, 24), gen, scale=0.5), randn((301,), gen, scale=0.5)
    ids, lp, _ = top_k_teacher((3, 7, 301), 9, gen, pad_every=4)
    labels = random_labels((3, 7), 301, gen, ignore_every=5)
    kw = dict(temperature=2.0, alpha=0.6, tail=tail, teacher_temperature=teacher_temperature, backend=backend)
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
@pytest.mark.parametrize("tail", TAILS)
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


# --- a sampled teacher: S draws per row from softmax(t / T), kept as unique ids and log(count / S) --------

def sampled_teacher(p, samples, gen):
    """Per row of ``p`` (N, V), ``samples`` draws (torch.multinomial) as the cache's sampled rows:
    ids by count, highest first, padded with -1, and log(count / S) (0 on padding)."""
    draws = torch.multinomial(p, samples, replacement=True, generator=gen)
    counts = torch.zeros(p.shape, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    order = counts.sort(dim=-1, descending=True, stable=True).indices[:, :samples]
    c = counts.gather(1, order)
    return torch.where(c > 0, order, -1), torch.where(c > 0, (c.double() / samples).log(), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_draws_in_exact_proportion_reproduce_kd_loss(backend, tail, gen):
    """A teacher whose tempered probabilities are multiples of 1/S (row 0 over every class, row 1 over
    four, the rest -inf): S draws with counts in exact proportion give q_hat = p_T, and the sampled
    rows at teacher_temperature = T reproduce kd_loss's value and gradient (every tail: nothing is
    missing)."""
    temperature, samples, v = 2.0, 32, 10
    counts = torch.tensor([[7, 5, 4, 4, 3, 3, 2, 2, 1, 1], [0, 16, 0, 0, 9, 0, 0, 6, 1, 0]])
    t = torch.where(counts > 0, temperature * (counts.double() / samples).log(), -torch.inf).float()
    order = counts.sort(dim=-1, descending=True, stable=True).indices
    c = counts.gather(1, order)
    ids = torch.where(c > 0, order, -1)
    lp = torch.where(c > 0, (c.double() / samples).log(), 0.0).float()
    s = randn((2, v), gen)
    labels = torch.tensor([3, 4])
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    kw = dict(temperature=temperature, alpha=0.7, backend=backend)
    sparse = fastkd.sparse_kd_loss(a, ids, lp, labels, tail=tail, teacher_temperature=temperature, **kw)
    dense = fastkd.kd_loss(b, t, labels, **kw)
    upstream = torch.rand((), generator=gen) + 0.5
    sparse.backward(upstream)
    dense.backward(upstream)
    close(sparse, dense, 1e-5)
    close(a.grad, b.grad, 1e-5)


def bonferroni_z(elements, false_alarm=1e-6):
    """The two-sided z bound each of ``elements`` normal statistics stays within, all together, but
    with probability ``false_alarm``."""
    from statistics import NormalDist
    return NormalDist().inv_cdf(1 - false_alarm / (2 * elements))


def test_sampled_teacher_gradient_is_unbiased_and_its_value_is_not(gen):
    """The sampled estimator: q_hat = count / S has E[q_hat] = p_T, and the student's gradient,
    T (p_s - q_hat) per row here (alpha = 1, reduction "sum"), is linear in it; so the mean gradient
    over M independent samplings converges to kd_loss's, each element within z sigma,
    sigma^2 = T^2 p (1 - p) / (S M) (multinomial counts), z Bonferroni-corrected over the N V
    elements for a false alarm of 1e-6 (the inputs are seeded: the test cannot flake; the bound says
    that it passes for all but 1e-6 of seeds). The value is biased upward: E[sum q_hat log q_hat]
    exceeds sum p log p (convexity), the rest of the KL is linear. The same bound catches the biased
    targets: a renormalised top-4 of the same teacher, and draws at T = 1 labelled as at T."""
    temperature, samples, m, n, v = 2.0, 8, 4000, 3, 12
    s = randn((n, v), gen, torch.float64, scale=1.0)
    t = randn((n, v), gen, torch.float64, scale=2.0)
    p = torch.softmax(t / temperature, -1)
    x = s.clone().requires_grad_()
    dense = fastkd.kd_loss(x, t, temperature=temperature, alpha=1.0, reduction="sum", backend="torch")
    (want,) = torch.autograd.grad(dense, x)
    sigma = temperature * (p * (1 - p) / (samples * m)).sqrt()
    z_max = bonferroni_z(n * v)

    def mean_gradient(ids, lp, **kw):
        rows = s.repeat(ids.shape[0] // n, 1).requires_grad_()
        kw = dict(temperature=temperature, alpha=1.0, teacher_temperature=temperature, backend="torch") | kw
        value = fastkd.sparse_kd_loss(rows, ids, lp, reduction="none", **kw)
        (g,) = torch.autograd.grad(value.sum(), rows)
        return g.reshape(-1, n, v).mean(0), value.reshape(-1, n)

    ids, lp = sampled_teacher(p.repeat(m, 1), samples, gen)
    for tail in TAILS:  # a sampled row misses no mass: every tail is the same estimator
        got, values = mean_gradient(ids, lp, tail=tail)
        z = ((got - want) / sigma).abs().max().item()
        assert z < z_max, f"{tail}: the mean sampled gradient is {z:.1f} sigma from kd_loss's (bound {z_max:.1f})"
    # the value: biased upward by the entropy gap, by far more than its standard error
    per_sampling = values.sum(1)
    gap = per_sampling.mean() - dense.detach()
    assert gap > 5 * per_sampling.std() / math.sqrt(m) and gap > 0.1 * dense.detach()

    # the bound is not vacuous: biased targets fail it
    top_lp, top_ids = p.log().topk(4, -1)
    got, _ = mean_gradient(top_ids.repeat(m, 1), top_lp.repeat(m, 1), tail="renormalize")
    assert ((got - want) / sigma).abs().max().item() > 3 * z_max
    ids1, lp1 = sampled_teacher(torch.softmax(t, -1).repeat(m, 1), samples, gen)  # drawn at T = 1, not T
    got, _ = mean_gradient(ids1, lp1)
    assert ((got - want) / sigma).abs().max().item() > 2 * z_max
