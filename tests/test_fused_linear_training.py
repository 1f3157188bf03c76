"""fused_linear_kd_loss in a language-model training step: num_items (gradient accumulation),
calibration meters fed by the chunks, the student's entropy, only labelled rows projected, and
DTensor heads (FSDP2 / tensor parallel) — each against a float64 or materialised reference."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import fastkd
import fastkd._dispatch.gemm as fl
from conftest import BACKENDS
from test_fused_linear import make_side, reference
from test_loss import close


def sides(gen, n=29, v_s=70, v_t=70, dtype=torch.float32):
    student = make_side(n, 16, v_s, gen, dtype)
    teacher = make_side(n, 24, v_t, gen, dtype)
    labels = torch.randint(0, v_s, (n,), generator=gen)
    labels[::4] = -100
    return student, teacher, labels


def loss_of(backend, student, teacher, labels, **kw):
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    return fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, backend=backend,
                                       chunk_size=kw.pop("chunk_size", 6), **kw)


def materialised(student, teacher):
    """Both logits in float64, the teacher's matched to the student's classes (as the loss does)."""
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    s = hs.double() @ ws.double().t() + bs.double()
    t = ht.double() @ wt.double().t() + bt.double()
    v_s = ws.shape[0]
    t = t[:, :v_s] if t.shape[1] >= v_s else torch.cat([t, t.new_full((t.shape[0], v_s - t.shape[1]), -torch.inf)], 1)
    return s, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [7, 41.5, "int-tensor"])
def test_num_items_divides_the_sum(backend, num_items, gen):
    """Gradient accumulation: sum over the micro-batch / the global count, in value and gradient."""
    student, teacher, labels = sides(gen)
    leaves = [x.detach().requires_grad_() for x in student]
    given = torch.tensor([13]) if num_items == "int-tensor" else num_items
    count = 13 if num_items == "int-tensor" else num_items
    out = loss_of(backend, leaves, teacher, labels, num_items=given, temperature=2.0, alpha=0.6)
    ref_leaves = [x.detach().double().requires_grad_() for x in student]
    ref = reference(*ref_leaves, *(x.double() for x in teacher), labels, temperature=2.0, alpha=0.6,
                    reduction="sum") / count
    close(out, ref, 1e-5)
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    for a, b in zip(torch.autograd.grad(out, leaves, upstream.float()), torch.autograd.grad(ref, ref_leaves, upstream)):
        close(a, b, 1e-4)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3.0, ValueError), (torch.tensor([1, 2]), TypeError)])
def test_num_items_bad(bad, error, gen):
    student, teacher, labels = sides(gen, n=8)
    with pytest.raises(error, match="num_items"):
        loss_of("torch", student, teacher, labels, num_items=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [(70, 70), (70, 90), (70, 50)], ids=["same-V", "teacher-larger", "teacher-smaller"])
def test_meters_equal_update_on_materialised_logits(backend, vocab, gen):
    """Per labelled token: counts exact, sums to fp32 precision; the teacher's over the student's classes."""
    student, teacher, labels = sides(gen, v_s=vocab[0], v_t=vocab[1])
    meter, teacher_meter = fastkd.CalibrationMeter(10), fastkd.CalibrationMeter(10)
    with torch.no_grad():  # evaluation: the meters alone
        loss_of(backend, student, teacher, labels, meter=meter, teacher_meter=teacher_meter)
    s, t = materialised(student, teacher)
    for got, logits in ((meter, s), (teacher_meter, t)):
        want = fastkd.CalibrationMeter(10).update(logits, labels).compute()
        have = got.compute()
        assert have.count == want.count == int((labels != -100).sum())
        assert [b.count for b in have.bins] == [b.count for b in want.bins]
        for field in ("accuracy", "ece", "confidence", "brier"):
            assert getattr(have, field) == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-6), field
        if torch.isfinite(torch.tensor(want.nll)):
            assert have.nll == pytest.approx(want.nll, rel=1e-5)
        else:  # a label among the classes the smaller teacher lacks: probability 0
            assert have.nll == want.nll == float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_meter_equals_update(backend, gen):
    (hs, ws, bs), _, labels = sides(gen)
    k = 5
    ids = torch.stack([torch.randperm(70, generator=gen)[:k] for _ in range(hs.shape[0])])
    lp = torch.log_softmax(torch.randn(hs.shape[0], k, generator=gen), -1) - 0.2
    meter = fastkd.CalibrationMeter(8)
    fastkd.fused_linear_sparse_kd_loss(hs, ws, ids, lp, labels, student_bias=bs, backend=backend, chunk_size=5,
                                       meter=meter)
    want = fastkd.CalibrationMeter(8).update(hs.double() @ ws.double().t() + bs.double(), labels).compute()
    have = meter.compute()
    assert have.count == want.count and [b.count for b in have.bins] == [b.count for b in want.bins]
    assert (have.nll, have.brier, have.ece) == pytest.approx((want.nll, want.brier, want.ece), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_entropy_of_the_students_tempered_softmax(backend, temperature, gen):
    student, teacher, labels = sides(gen)
    loss, entropy_sum = loss_of(backend, student, teacher, labels, temperature=temperature, return_entropy=True)
    plain = loss_of(backend, student, teacher, labels, temperature=temperature)
    assert torch.equal(loss, plain)
    s, _ = materialised(student, teacher)
    p = torch.softmax(s / temperature, -1)
    per_row = -(p * p.log()).sum(-1)
    keep = labels != -100
    close(entropy_sum, per_row[keep].sum(), 1e-5)
    assert not entropy_sum.requires_grad and entropy_sum.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_labelled_rows_are_projected(backend, gen, monkeypatch):
    student, teacher, labels = sides(gen, n=23)
    projected = []
    real = fl.logits
    monkeypatch.setattr(fl, "logits", lambda h, w, b: projected.append(h.shape[0]) or real(h, w, b))
    leaves = [x.detach().requires_grad_() for x in student]
    out = loss_of(backend, leaves, teacher, labels, temperature=3.0, alpha=0.5)
    assert sum(projected) == 2 * int((labels != -100).sum())  # student and teacher, labelled rows only
    ref_leaves = [x.detach().double().requires_grad_() for x in student]
    ref = reference(*ref_leaves, *(x.double() for x in teacher), labels, temperature=3.0, alpha=0.5)
    close(out, ref, 1e-5)
    got = torch.autograd.grad(out, leaves)
    for a, b in zip(got, torch.autograd.grad(ref, ref_leaves)):
        close(a, b, 1e-4)
    assert got[0][labels == -100].abs().sum() == 0  # ignored rows: zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_labelled_row(backend, gen):
    student, teacher, labels = sides(gen, n=6)
    labels[:] = -100
    leaves = [x.detach().requires_grad_() for x in student]
    loss, entropy_sum = loss_of(backend, leaves, teacher, labels, return_entropy=True)
    assert loss.item() == 0 and entropy_sum.item() == 0
    assert all(g.abs().sum() == 0 for g in torch.autograd.grad(loss, leaves))


def test_meter_and_entropy_bad_input(gen):
    student, teacher, labels = sides(gen, n=8)
    with pytest.raises(TypeError, match="meter"):
        loss_of("torch", student, teacher, labels, meter="m")
    with pytest.raises(ValueError, match="teacher_meter needs labels"):
        loss_of("torch", student, teacher, None, alpha=1.0, teacher_meter=fastkd.CalibrationMeter())
    with pytest.raises(TypeError, match="return_entropy"):
        loss_of("torch", student, teacher, labels, return_entropy=1)
    with pytest.raises(ValueError, match="labels \\(meta\\) must be on the hidden states' device"):
        loss_of("torch", student, teacher, labels.to("meta"))
    hs, ws, _ = student
    with pytest.raises(ValueError, match="labels \\(meta\\) must be on the hidden states' device"):
        fastkd.fused_linear_sparse_kd_loss(hs, ws, torch.tensor([[0, 1]] * 8), torch.full((8, 2), -1.0),
                                           labels.to("meta"))


# --- DTensor heads: two gloo processes, each head sharded over the vocabulary rows (FSDP2's Shard(0)) ---

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dtensor_worker(rank, world, port, backend):
    import torch.distributed as dist
    try:
        from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    except ImportError:  # torch 2.4: public as torch.distributed._tensor
        from torch.distributed._tensor import DeviceMesh, Shard, distribute_tensor

    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = DeviceMesh("cpu", list(range(world)))
        gen = torch.Generator().manual_seed(5)  # the same heads on every rank
        (_, ws, bs), (_, wt, bt), _ = sides(gen, n=1, v_s=41, v_t=41)
        gen.manual_seed(100 + rank)  # each rank its own batch
        (hs, _, _), (ht, _, _), labels = sides(gen, n=19, v_s=41, v_t=41)
        heads = [distribute_tensor(x, mesh, [Shard(0)]).requires_grad_() for x in (ws, bs)]
        calls = []
        real = type(heads[0]).full_tensor
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(type(heads[0]), "full_tensor", lambda self, **kw: calls.append(1) or real(self, **kw))
            out = fastkd.fused_linear_kd_loss(hs, heads[0], ht, wt, labels, student_bias=heads[1], teacher_bias=bt,
                                              chunk_size=4, backend=backend, temperature=2.0, alpha=0.7)
        assert len(calls) == 2  # weight and bias, once each for five chunks
        out.backward()
        ref_leaves = [x.detach().double().requires_grad_() for x in (ws, bs)]
        ref = reference(hs.double(), ref_leaves[0], ref_leaves[1], ht.double(),
                        wt.double(), bt.double(), labels, temperature=2.0, alpha=0.7)
        close(out, ref, 1e-5)
        ref.backward()
        for head, want in zip(heads, ref_leaves):
            # each rank's shard holds this rank's gradient for its rows (DTensor's full_tensor backward)
            rows = head.grad.to_local().shape[0]
            lo = rank * -(-want.shape[0] // world)
            close(head.grad.to_local(), want.grad[lo:lo + rows], 1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_heads_gathered_once(backend):
    pytest.importorskip("torch.distributed.tensor")
    mp.spawn(_dtensor_worker, args=(2, _free_port(), backend), nprocs=2)


# --- logit transforms (Cohere / Granite logit_scale, Gemma softcap) on the fused-linear path ---

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol_loss,rtol_grad", [(torch.float32, 1e-5, 1e-4), (torch.float16, 1e-6, 1e-3)],
                         ids=["fp32", "fp16"])
@pytest.mark.parametrize("transforms", [(2.5, 0.5, None, None), (1.0, 1.0, 3.0, 5.0), (4.0, 1.0, 6.0, None)],
                         ids=["scales", "softcaps", "student-both"])
def test_logit_transforms_match_the_transformed_reference(backend, dtype, rtol_loss, rtol_grad, transforms, gen):
    """Against float64: both logits materialised, transformed as TRL does, then the objective;
    gradients w.r.t. the hidden states, weights and biases through tanh by autograd. fp16 with a
    logit scale > 1 checks the gradient unit keeps the saved gradient inside fp16's range."""
    from test_logit_transforms import reference as transformed_objective

    student, teacher, labels = sides(gen, dtype=dtype)
    student = [x * 3 for x in student]  # logits of a few units: softcaps of 3-6 bend them
    ss, ts, sc, tc = transforms
    kw = dict(student_logit_scale=ss, teacher_logit_scale=ts, student_softcap=sc, teacher_softcap=tc)
    leaves = [x.detach().requires_grad_() for x in student]
    out, entropy_sum = loss_of(backend, leaves, teacher, labels, temperature=2.0, alpha=0.6, return_entropy=True,
                               **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in student]
    s, t = materialised(ref_leaves, [x.double() for x in teacher])
    ref = transformed_objective(s, t, labels, temperature=2.0, alpha=0.6, transforms=transforms)
    close(out, ref, rtol_loss)
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    for a, b in zip(torch.autograd.grad(out, leaves, upstream.float()), torch.autograd.grad(ref, ref_leaves, upstream)):
        assert a.dtype == dtype and torch.isfinite(a).all()
        close(a, b, rtol_grad)
    from test_logit_transforms import transform
    p = torch.softmax(transform(s.detach(), ss, sc) / 2.0, -1)
    close(entropy_sum, (-(p * p.log()).sum(-1))[labels != -100].sum(), max(rtol_loss, 1e-4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_fused_linear_with_student_transforms(backend, gen):
    (hs, ws, bs), _, labels = sides(gen)
    hs = hs * 3
    k = 6
    ids = torch.stack([torch.randperm(70, generator=gen)[:k] for _ in range(hs.shape[0])])
    lp = torch.log_softmax(torch.randn(hs.shape[0], k, generator=gen), -1) - 0.3
    kw = dict(student_logit_scale=1.5, student_softcap=4.0, temperature=2.0, alpha=0.7)
    leaves = [x.detach().requires_grad_() for x in (hs, ws, bs)]
    out = fastkd.fused_linear_sparse_kd_loss(leaves[0], leaves[1], ids, lp, labels, student_bias=leaves[2],
                                             backend=backend, chunk_size=5, **kw)
    logits = [x.detach().requires_grad_() for x in (hs @ ws.t() + bs,)]
    want = fastkd.sparse_kd_loss(logits[0], ids, lp, labels, backend="torch", **kw)
    close(out, want.double(), 1e-5)
    (g_logits,) = torch.autograd.grad(want, logits)
    close(torch.autograd.grad(out, leaves[0])[0], (g_logits @ ws).double(), 1e-4)


def test_fused_linear_transforms_refused_where_unsupported(gen):
    student, teacher, labels = sides(gen, n=8)
    with pytest.raises(ValueError, match="student_softcap"):
        loss_of("torch", student, teacher, labels, student_softcap=-1.0)
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        loss_of("torch", student, teacher, labels, teacher_logit_scale="2")
    with pytest.raises(ValueError, match="group="):
        loss_of("torch", student, teacher, labels, student_softcap=30.0, group=object())
