"""Vocabulary-parallel losses (group=): 2 and 3 gloo processes on the CPU, each holding its slice of
the vocabulary (uneven widths), against the dense one-process result computed here in float64:
loss, every rank's gradient slice (random upstream gradient), the meters; then the errors.

One spawn per (world size, backend) runs every case, as process start-up dominates; the Triton
kernels run under the interpreter on small shapes."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import fastkd
from reference import kd_objective, sparse_kd_objective
from test_fused_linear import make_side, reference
from test_loss import close

V = 37
WIDTHS = {2: [20, 17], 3: [15, 9, 13]}  # uneven on purpose; the middle slice is narrowest
N = 11


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slice(rank, world):
    lo = sum(WIDTHS[world][:rank])
    return lo, lo + WIDTHS[world][rank]


def _inputs(seed, dtype, shape=(N, V), ties=False):
    """The dense inputs, the same on every rank (one generator per case)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, V, shape[:-1], generator=gen)
    labels.view(-1)[::4] = -100
    if ties:  # the global max twice, in different slices: torch.argmax takes the first
        s2, lab = s.view(-1, V), labels.view(-1)
        s2[1, 3], s2[1, 33] = 40.0, 40.0
        lab[1] = 33  # wrong: the prediction is 3
        s2[2, 5], s2[2, 30] = 40.0, 40.0
        lab[2] = 5  # right
        s2[3, 17], s2[3, 18] = 40.0, 40.0  # 17 and 18 lie in different slices of either split
        lab[3] = 18
        s2[1:4, 10] = 39.5  # keeps the confidence off a bin edge (0.5 exactly is one)
    upstream = torch.rand(shape[:-1], generator=gen, dtype=torch.float64) + 0.5
    return s.to(dtype), t.to(dtype), labels, upstream


# dtype, rtol of the loss, rtol of the gradients (of their largest reference magnitude)
CASES = [
    dict(dtype=torch.float32, divergence="kl", temperature=2.0, alpha=0.7, meters=True, ties=True),
    dict(dtype=torch.float32, divergence="reverse_kl", temperature=1.0, alpha=0.5, teacher_grad=True),
    dict(dtype=torch.float32, divergence="jsd", temperature=3.0, alpha=0.6, beta=0.3, teacher_grad=True),
    dict(dtype=torch.float32, divergence="kl", temperature=1.5, alpha=1.0, reduction="none", no_labels=True,
         teacher_grad=True),
    dict(dtype=torch.bfloat16, divergence="kl", temperature=2.0, alpha=0.9, reduction="sum", meters=True,
         shape=(2, 5, V)),
    dict(dtype=torch.float16, divergence="jsd", temperature=1.0, alpha=0.8, reduction="mean"),
]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1.6e-2),
       torch.float64: (1e-12, 1e-12)}  # float64 in, float64 arithmetic out (grad_output, the row scale)


def _check_case(rank, world, group, backend, seed, case):
    case = dict(case)
    dtype, shape = case.pop("dtype"), case.pop("shape", (N, V))
    teacher_grad, meters = case.pop("teacher_grad", False), case.pop("meters", False)
    no_labels, ties = case.pop("no_labels", False), case.pop("ties", False)
    s, t, labels, upstream = _inputs(seed, dtype, shape, ties)
    lo, hi = _slice(rank, world)
    s_loc = s[..., lo:hi].detach().requires_grad_()
    t_loc = t[..., lo:hi].detach().requires_grad_(teacher_grad)
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_(teacher_grad)
    lab = None if no_labels else labels
    meter, teacher_meter = (fastkd.CalibrationMeter(10), fastkd.CalibrationMeter(10)) if meters else (None, None)
    if no_labels:
        out = fastkd.kl_loss(s_loc, t_loc, case["temperature"], case.get("reduction", "batchmean"),
                             backend=backend, group=group)
        ref = kd_objective(s64, t64, None, case["temperature"], 1.0, reduction=case.get("reduction", "batchmean"),
                           t_squared=False)
    else:
        out = fastkd.kd_loss(s_loc, t_loc, lab, backend=backend, group=group, meter=meter,
                             teacher_meter=teacher_meter, **case)
        div = case.pop("divergence")
        ref = kd_objective(s64, t64, lab, kind=div, **case)
    rtol_loss, rtol_grad = TOL[dtype]
    assert out.shape == ref.shape and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(out, ref, rtol_loss, msg=f"loss {case}")
    inputs, ref_inputs = ((s_loc, t_loc), (s64, t64)) if teacher_grad else ((s_loc,), (s64,))
    upstream = upstream if ref.dim() else upstream.reshape(-1)[0]
    got = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
    want = torch.autograd.grad(ref, ref_inputs, upstream)
    for g, w, name in zip(got, want, ("student", "teacher")):
        assert g.dtype == dtype and g.shape == s_loc.shape
        close(g, w[..., lo:hi], rtol_grad, msg=f"{name} gradient slice {case}")
    if meters:
        for m, logits in ((meter, s), (teacher_meter, t)):
            want_r = fastkd.CalibrationMeter(10).update(logits.double(), labels).compute()
            have = m.compute()
            assert have.count == want_r.count and [b.count for b in have.bins] == [b.count for b in want_r.bins]
            assert have.accuracy == want_r.accuracy  # the global argmax, ties included
            for field in ("ece", "confidence", "nll", "brier"):
                assert getattr(have, field) == pytest.approx(getattr(want_r, field), rel=1e-5, abs=1e-6), field


def _check_fused_linear(rank, world, group, backend, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hs, ws, bs = make_side(N, 16, V, gen, dtype)
    ht, wt, bt = make_side(N, 24, V, gen, dtype)
    rtol_loss, rtol_grad = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-4)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::3] = -100
    lo, hi = _slice(rank, world)
    leaves = [hs, ws[lo:hi], bs[lo:hi], ht, wt[lo:hi], bt[lo:hi]]
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    meter = fastkd.CalibrationMeter(8)
    kw = dict(temperature=2.0, alpha=0.6, divergence="kl")
    out = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], leaves[3], leaves[4], labels, student_bias=leaves[2],
                                      teacher_bias=leaves[5], group=group, backend=backend, chunk_size=4,
                                      meter=meter, **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in (hs, ws, bs, ht, wt, bt)]
    ref = reference(*ref_leaves, labels, **kw)
    close(out, ref, rtol_loss)
    got = torch.autograd.grad(out, leaves, torch.tensor(1.3, dtype=out.dtype))
    want = torch.autograd.grad(ref, ref_leaves, torch.tensor(1.3, dtype=torch.float64))
    for i, (g, w) in enumerate(zip(got, want)):
        close(g, w if i in (0, 3) else w[lo:hi], rtol_grad, msg=f"fused-linear gradient {i}")
    logits = hs.double() @ ws.double().t() + bs.double()
    want_m = fastkd.CalibrationMeter(8).update(logits, labels).compute()
    have = meter.compute()
    assert have.count == want_m.count and have.accuracy == want_m.accuracy
    assert (have.nll, have.brier, have.ece) == pytest.approx((want_m.nll, want_m.brier, want_m.ece), rel=1e-5)


def _check_errors(rank, world, group):
    s, t, labels, _ = _inputs(7, torch.float32)
    lo, hi = _slice(rank, world)
    s_loc, t_loc = s[:, lo:hi], t[:, lo:hi]
    rows = N - 1 if rank == 0 else N  # rank 0 holds other rows
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        fastkd.kd_loss(s_loc[:rows], t_loc[:rows], labels[:rows], group=group, backend="torch")
    other = labels.clone()
    if rank == world - 1:
        other[0] = (other[0] + 1) % V if other[0] >= 0 else 0
    with pytest.raises(ValueError, match="disagree on the labels"):
        fastkd.kd_loss(s_loc, t_loc, other, group=group, backend="torch")
    bad = labels.clone()
    bad[1] = V  # inside no slice: beyond the summed widths
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        fastkd.kd_loss(s_loc, t_loc, bad, group=group, backend="torch")
    with pytest.raises(ValueError, match="group"):
        fastkd.kd_loss(s_loc, t_loc, labels, group=group, backend="cuda")
    with pytest.raises(TypeError, match="group must be"):
        fastkd.kd_loss(s_loc, t_loc, labels, group="tp", backend="torch")
    with pytest.raises(ValueError, match="return_entropy is not supported with group="):
        hs, ws, _ = make_side(N, 8, hi - lo, torch.Generator().manual_seed(1), torch.float32)
        fastkd.fused_linear_kd_loss(hs, ws, hs, ws, labels, group=group, return_entropy=True)
    s_grad = s_loc.clone().requires_grad_()  # a double backward is refused on every rank (no collective in it)
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(fastkd.kd_loss(s_grad, t_loc, labels, group=group, backend="torch"), s_grad,
                            create_graph=True)
    # after the errors, the group still works (no rank left waiting in a collective)
    out = fastkd.kd_loss(s_loc, t_loc, labels, group=group, backend="torch", temperature=2.0, alpha=0.5)
    close(out, kd_objective(s.double(), t.double(), labels, 2.0, 0.5), 1e-5)


def _check_dtensor(rank, world, backend, seed):
    try:
        from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    except ImportError:  # torch 2.4: public as torch.distributed._tensor
        from torch.distributed._tensor import DeviceMesh, Shard, distribute_tensor

    mesh = DeviceMesh("cpu", list(range(world)))
    s, t, labels, upstream = _inputs(seed, torch.float32)
    d_s = distribute_tensor(s, mesh, [Shard(1)]).requires_grad_()
    d_t = distribute_tensor(t, mesh, [Shard(-1)])
    out = fastkd.kd_loss(d_s, d_t, labels, temperature=2.0, alpha=0.8, backend=backend)  # no group=: the mesh's
    s64 = s.double().requires_grad_()
    ref = kd_objective(s64, t.double(), labels, 2.0, 0.8)
    close(out, ref, 1e-5)
    out.backward(torch.tensor(0.7))
    ref.backward(torch.tensor(0.7, dtype=torch.float64))
    # the whole gradient: torch 2.4 gives uneven shards' leaf gradient back replicated, later torch sharded
    close(d_s.grad.full_tensor(), s64.grad, 1e-5)


def _check_sparse(rank, world, group, backend, seed, tail, dtype=torch.float32, teacher_temperature=1.0):
    """A top-K teacher (global ids, some rows padded with -1, one row listing nothing) against the
    float64 dense objective: loss, this rank's gradient slice, the student's meter."""
    s, _, labels, upstream = _inputs(seed, dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    gen = torch.Generator().manual_seed(seed + 1)
    k = 6
    ids = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(N)])
    ids[2, 4:] = -1
    ids[5] = -1
    lp = (torch.log_softmax(torch.randn(N, k, generator=gen, dtype=torch.float64), -1) - 0.4).to(dtype)  # 0.67 listed
    lo, hi = _slice(rank, world)
    local = s[:, lo:hi].clone().requires_grad_()
    meter = fastkd.CalibrationMeter(7)
    out = fastkd.sparse_kd_loss(local, ids, lp, labels, temperature=2.0, alpha=0.7, tail=tail, meter=meter,
                                group=group, backend=backend, reduction="none", teacher_temperature=teacher_temperature)
    s64 = s.double().requires_grad_()
    ref = sparse_kd_objective(s64, ids, lp, labels, 2.0, 0.7, tail=tail, reduction="none",
                              teacher_temperature=teacher_temperature)
    close(out, ref, rtol)
    out.backward(upstream.to(out.dtype))
    ref.backward(upstream)
    close(local.grad, s64.grad[:, lo:hi], rtol, atol_scale=rtol * s64.grad.abs().max().item()
          / max(s64.grad[:, lo:hi].abs().max().item(), 1e-30))
    want = fastkd.CalibrationMeter(7).update(s.double(), labels).compute()
    have = meter.compute()
    assert have.count == want.count and [b.count for b in have.bins] == [b.count for b in want.bins]
    assert (have.nll, have.brier, have.ece) == pytest.approx((want.nll, want.brier, want.ece), rel=1e-5, abs=1e-6)


def _worker(rank, world, port):
    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        for backend in ("torch", "triton"):
            for i, case in enumerate(CASES):
                _check_case(rank, world, group, backend, 1000 * world + i, case)
            _check_fused_linear(rank, world, group, backend, 77 + world)
            for tail, teacher_temperature in (("bucket", 1.0), ("renormalize", 1.0), ("lumped", 1.0),
                                              ("bucket", 0.5), ("lumped", 2.0)):
                _check_sparse(rank, world, group, backend, 300 + world, tail, teacher_temperature=teacher_temperature)
        _check_dtensor(rank, world, "torch", 5 + world)
        if world == 3:
            _check_case(rank, world, group, "torch", 3, dict(dtype=torch.float64, divergence="jsd", temperature=2.0,
                                                             alpha=0.5, teacher_grad=True, meters=True))
            _check_case(rank, world, group, "torch", 4, dict(dtype=torch.float64, divergence="kl", temperature=2.0,
                                                             alpha=0.3, reduction="none"))
            _check_fused_linear(rank, world, group, "torch", 80, torch.float64)
            _check_sparse(rank, world, group, "torch", 303, "bucket", torch.float64)
            _check_sparse(rank, world, group, "torch", 304, "lumped", torch.float64, teacher_temperature=3.0)
        else:
            _check_errors(rank, world, group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_dense(world):
    """Both backends in one spawn (the processes' start-up is most of the time)."""
    pytest.importorskip("torch.distributed.tensor")
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world)


def test_group_needs_an_initialised_process_group():
    s = torch.randn(3, 5)
    with pytest.raises(ValueError, match="init_process_group"):
        fastkd.kd_loss(s, s, torch.tensor([0, 1, 2]), group=object())


def test_unsupported_options_are_refused():
    from fastkd._dispatch.vocab_parallel import refuse_unsupported

    with pytest.raises(ValueError, match="student_logit_scale is not supported with group="):
        refuse_unsupported(student_logit_scale=2.0, student_softcap=None)
    refuse_unsupported(student_logit_scale=None, return_entropy=False)


COMPILE = """
import sys
sys.path.insert(0, sys.argv[1])
import aot_compile as A
from fastkd.backends.triton import vocab as TV
P = {"s_ptr": "*bf16", "t_ptr": "*bf16", "stats_ptr": "*fp32", "idx_ptr": "*i32", "gs_ptr": "*bf16",
     "gt_ptr": "*bf16", "rows_ptr": "*fp32", "label_ptr": "*i64", "part_ptr": "*fp32"}
A.SCALARS.update({"stride_t": "i64", "stride_gt": "i64", "kd_g": "fp32"})
for div, s1, t1 in ((0, True, True), (1, False, False), (2, True, False)):
    k = A.compile_kernel(TV._vocab_stats_kernel, P, dict(DIVERGENCE=div, NEED_S1=s1, NEED_T1=t1, BLOCK_C=4096), 8)
    print("ok stats", div, s1, t1, "spills", A.spills(k.asm["cubin"]))
for div, ce, gs, gt, part in ((0, True, True, True, False), (1, True, True, False, False),
                              (2, False, True, True, False), (2, False, False, False, True)):
    k = A.compile_kernel(TV._vocab_grad_kernel, P, dict(DIVERGENCE=div, HAS_CE=ce, GRAD_S=gs, GRAD_T=gt,
                                                        JSD_PARTIALS=part, BLOCK_C=4096), 8)
    print("ok grad", div, ce, gs, gt, part, "spills", A.spills(k.asm["cubin"]))
"""


def test_kernels_compile_for_hopper():
    """The interpreter accepts what the compiler may reject: compile the kernels for sm_90 (no GPU)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, str(Path(__file__).parent)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("ok ") == 7 and "spills 0" in done.stdout and done.stdout.count("spills 0") == 7
