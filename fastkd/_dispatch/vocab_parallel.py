"""Vocabulary-parallel distillation: logits (or an output layer) sharded over a tensor-parallel group.

Each rank of ``group`` holds the same rows and its own slice of the vocabulary: student and teacher
logits ``(N, V_r)`` (or the rows ``(V_r, H)`` of column-parallel output weights), ``sum_r V_r = V``,
slices in rank order (rank r owns classes ``[o_r, o_r + V_r)``; uneven widths are fine). The loss,
the gradient of every rank's slice, the hard-label cross-entropy and the calibration statistics equal
those of one process holding the whole ``(N, V)`` rows. No rank ever sees more than its slice.

The reduction scheme, per row (a = s / T, b = t / T on the local slice; every sum below is local):

1. Local statistics, one read of the slice: the local maxima m_s, m_t of s and t (and the first
   column reaching them), Z_a = sum exp(a - m_s/T), Z_b = sum exp(b - m_t/T), the divergence's
   weighted sum W = sum exp(b - m_t/T) (b - a) (KL; reverse KL swaps the roles), and for the
   cross-entropy and the meters the T = 1 sums Z_1 = sum exp(s - m_s), Q = sum exp(2 (s - m_s)).
2. ``all_reduce(MAX)`` of the stacked maxima: (N, 2) floats. Every rank rescales its sums to the
   global maxima M (factor exp((m - M) / T)); the label's owner adds s[label] (and t[label]); for the
   meters each rank adds whether it holds the global max first (torch.argmax's first-index rule
   across ranks: the owner says "my first maximum is the label", every rank wholly before the label
   says "I reach the maximum"; the prediction is right iff the first is 1 and the second 0).
3. ``all_reduce(SUM)`` of the stacked rescaled sums: (N, k) floats, k = 3 (``kl_loss``) up to 15
   (CE, both meters). Then log-sum-exps lse = M/T + log Z, the divergence
   KL = W / Z_b - (lse_b - lse_a), CE = lse_1 - s[label], confidence 1 / Z_1, NLL, Brier
   Q / Z_1^2 - 2 p[label] + 1: O(N) work, the same on every rank.
4. JSD only: its mixture log M = log(beta p_t + (1 - beta) p_s) needs both global log-sum-exps, so
   its two partial divergences come from a second read of the slice and a third ``all_reduce(SUM)``,
   (N, 2) floats.
5. The gradient of the local slice from the global statistics (one more read of the slice and a
   write of the gradient), in the forward pass as in the dense loss; the backward only scales it.

Communication per call: (2 + k) N floats (+ 2 N for JSD), never O(N V); plus one all-gather of
three integers per rank (N, V_r and a checksum of the labels) that gives every rank its vocabulary
offset and catches ranks that disagree on the rows or the labels (one host synchronisation, which
the labels' range check makes anyway). Traffic on a rank with the Triton kernels: read s and t
(statistics), read s and t and write the gradient(s) (gradient kernel): 5 bytes-units per element
(bf16: 10 bytes per element with a student gradient, 12 with the teacher's), the dense looping
path's; JSD reads the slice once more.

Every rank returns the same loss, and its meters receive the statistics of the whole rows (each
row once per rank): all-reduce meters over the data-parallel group only, not over ``group``.

Not supported with ``group=`` (each refused with a ValueError naming it): the CUDA C++ backend,
``torch.compile`` (the collectives and the host check are eager), logit transforms, the fused-linear
loss's ``return_entropy``; ``fused_linear_sparse_kd_loss`` has no ``group=``. ``sparse_kd_loss`` (a top-K
teacher) runs with ``group=``: :class:`SparseVocabParallel`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._core import checks
from .._core.enums import Divergence, Tail
from .._core.options import Options
from .._core.spec import GEMM_PEAK, SPARSE_TAIL_FLOOR, KDSpec, build_spec, row_scale, wide
from .. import backends
from ..backends.torch.math import finite, masked, rescale, row_weights, sparse_teacher
from ..calibration import check_meters
from . import gemm
from .functions import FusedKD, FusedLinearKD, SparseKD, autocast_off
from .rows import as_rows, counted_rows, label_rows, row_count

# columns of the local statistics (both backends): maxima, then the sums against them
M_S, M_T, Z_A, Z_B, W, Z1_S, Q_S, Z1_T, Q_T = range(9)
N_STATS = 9


# --- the group, the slices, and DTensors ---------------------------------------------------------

def vocab_sharded_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor sharded on its last dimension over a one-dimensional mesh."""
    if not isinstance(x, torch.Tensor) or not dist.is_available() or type(x).__name__ != "DTensor":
        return False
    placements = x.placements
    return len(placements) == 1 and placements[0].is_shard() and placements[0].dim in (-1, x.dim() - 1)


def _from_dtensors(s, t, group):
    """(local student, local teacher, group) from DTensors sharded on the last dimension (the
    gradient returns to the shards through ``to_local``); plain tensors unchanged."""
    if type(s).__name__ != "DTensor" and type(t).__name__ != "DTensor":
        return s, t, group
    if not (vocab_sharded_dtensor(s) and vocab_sharded_dtensor(t)):
        raise ValueError("vocabulary-parallel logits as DTensors must both be sharded on the last dimension "
                         "(Shard(-1)) over a one-dimensional mesh")
    if s.shape != t.shape or s.device_mesh != t.device_mesh:
        raise ValueError(f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} must be DTensors of "
                         "the same global shape on the same mesh")
    mesh_group = s.device_mesh.get_group()
    if group is not None and group != mesh_group:
        raise ValueError("group must be the DTensors' mesh group (or None)")
    return s.to_local(), t.to_local(), mesh_group


class Layout:
    """This rank's vocabulary slice [offset, offset + width) of ``vocab`` classes over ``group``."""

    def __init__(self, group, offset: int, width: int, vocab: int):
        self.group, self.offset, self.width, self.vocab = group, offset, width, vocab

    def label_rows(self, labels, ignore_index, n, device):
        """(keep, bad, label_local) per row: whether it counts, whether its label is out of the global
        range (only with validate_labels=False; None without labels), and its label as a column of this
        slice (-1 where another rank owns it, or none)."""
        if labels is None:
            return (torch.ones(n, dtype=torch.bool, device=device), None,
                    torch.full((n,), -1, dtype=torch.int64, device=device))
        keep = labels != ignore_index
        bad = keep & ((labels < 0) | (labels >= self.vocab))
        local = labels - self.offset
        return keep, bad, torch.where(keep & ~bad & (local >= 0) & (local < self.width), local, -1)


def _labels_checksum(labels):
    if labels is None or not labels.numel():
        return 0
    weights = torch.arange(1, labels.numel() + 1, device=labels.device, dtype=torch.int64) % 1000003
    return int(((labels.reshape(-1).to(torch.int64) % 1000003) * weights).sum().item()) + 1


def layout(group, n_rows: int, width: int, labels, device, what="rows") -> Layout:
    """Every rank's (rows, width, labels checksum) by one all-gather; a clear error, on every rank,
    when ranks disagree on the rows or the labels. Offsets follow rank order in ``group``."""
    mine = torch.tensor([n_rows, width, _labels_checksum(labels)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).cpu().tolist()
    rows = [e[0] for e in every]
    if len(set(rows)) > 1:
        raise ValueError(f"the ranks of group disagree on the number of {what}: {rows}; each rank must hold "
                         "the same rows and its own slice of the vocabulary")
    if len({e[2] for e in every}) > 1:
        raise ValueError("the ranks of group disagree on the labels (or some pass labels and others not); "
                         "every rank must pass the same labels")
    widths = [e[1] for e in every]
    rank = dist.get_rank(group)
    return Layout(group, sum(widths[:rank]), width, sum(widths))


def refuse_unsupported(**options):
    """Raises for any option given with group= that the vocabulary-parallel loss does not support
    (logit transforms, ...): ``options`` maps a name to its value, None or False meaning unused."""
    for name, value in options.items():
        if value is not None and value is not False:
            raise ValueError(f"{name} is not supported with group= (vocabulary-parallel loss)")
    if torch.compiler.is_compiling():
        raise ValueError("group= (vocabulary-parallel loss) does not run under torch.compile: its collectives "
                         "and checks are eager; call it outside the compiled region")


# --- the reductions -------------------------------------------------------------------------------

class _Global:
    """The global per-row statistics of a call (after the reductions)."""


def _global_stats(st, idx, s, t, labels, layout_, spec, meter, teacher_meter, need_s1):
    """Steps 2 and 3 of the scheme: local statistics ``st`` (N, 9) and first local argmaxes ``idx``
    (N, 2) -> global statistics, with two all-reduces."""
    group, cd = layout_.group, st.dtype
    maxima = st[:, [M_S, M_T]].contiguous()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    big_s, big_t = maxima.unbind(1)
    k = spec.inv_temperature
    f_s, f_t = rescale(st[:, M_S], big_s, k), rescale(st[:, M_T], big_t, k)
    cols = {"z_a": st[:, Z_A] * f_s, "z_b": st[:, Z_B] * f_t,
            "w": st[:, W] * (f_s if spec.divergence == Divergence.REVERSE_KL else f_t)}
    n = st.shape[0]
    if labels is not None:
        local = labels - layout_.offset
        owner = (labels != spec.ignore_index) & (local >= 0) & (local < layout_.width)
        local = torch.where(owner, local, 0)
        before = (layout_.offset + layout_.width <= labels)  # this slice lies wholly before the label
    for side, x, m, big, i, z1, q, on in (
            ("s", s, st[:, M_S], big_s, idx[:, 0], Z1_S, Q_S, need_s1 or meter is not None),
            ("t", t, st[:, M_T], big_t, idx[:, 1], Z1_T, Q_T, teacher_meter is not None)):
        if not on:
            continue
        f1 = rescale(m, big, 1.0)
        cols[f"z1_{side}"] = st[:, z1] * f1
        if labels is not None:
            at_label = x.gather(1, local[:, None]).squeeze(1).to(cd)
            cols[f"label_{side}"] = torch.where(owner, at_label, 0.0)
        if (meter if side == "s" else teacher_meter) is not None:
            cols[f"q_{side}"] = st[:, q] * f1 * f1
            has_max = (m == big) & (m != -torch.inf)
            cols[f"first_{side}"] = (owner & has_max & (i == local)).to(cd)
            cols[f"before_{side}"] = (before & has_max).to(cd)
    names = list(cols)
    sums = torch.stack([cols[c] for c in names], 1) if n else st.new_zeros((0, len(names)))
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    g = _Global()
    g.__dict__.update({c: sums[:, j] for j, c in enumerate(names)})
    g.max_s, g.max_t = big_s, big_t
    g.lse_a = finite(big_s) * k + g.z_a.log()
    g.lse_b = finite(big_t) * k + g.z_b.log()
    for side, big in (("s", big_s), ("t", big_t)):
        if f"z1_{side}" in cols:
            setattr(g, f"lse1_{side}", finite(big) + getattr(g, f"z1_{side}").log())
    if spec.divergence == Divergence.KL:  # KL(p_t || p_s) = sum p_t (b - a) - (lse_b - lse_a)
        g.d = g.w / g.z_b - (g.lse_b - g.lse_a)
    elif spec.divergence == Divergence.REVERSE_KL:
        g.d = g.w / g.z_a - (g.lse_a - g.lse_b)
    return g


def _add_meter(meter, g, side, keep, bad):
    """The meter's statistics of whole rows (calibration._add_rows' quantities) from the globals."""
    z1, lse1, at_label, q = (getattr(g, f"{c}_{side}") for c in ("z1", "lse1", "label", "q"))
    conf = 1.0 / z1
    correct = (getattr(g, f"first_{side}") > 0.5) & (getattr(g, f"before_{side}") < 0.5)
    nll = lse1 - at_label
    brier = q / (z1 * z1) - 2 * torch.exp(at_label - lse1) + 1
    meter._add_statistics(conf, correct, nll, brier, keep, bad)


class _Executor:
    """What the autograd Functions call as a backend (``scale_grad``, ``INPLACE_BACKWARD``): this rank's
    vocabulary slice ``layout_`` with the kernels of a backend that implements "vocab" (torch or triton)."""

    def __init__(self, layout_: Layout, kernels):
        self.layout, self.kernels = layout_, kernels
        self.INPLACE_BACKWARD = kernels.INPLACE_BACKWARD

    def scale_grad(self, grad, factor):
        return self.kernels.scale_grad(grad, factor)


class VocabParallel(_Executor):
    """A backend for functions.FusedKD / FusedLinearKD (``kd_forward``) whose rows are this rank's
    vocabulary slice."""

    def kd_forward(self, s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
                   reduce: bool = False):
        lay, kern = self.layout, self.kernels
        n = s.shape[0]
        cd = wide(s.dtype, t.dtype)
        need_s1 = spec.has_ce
        st, idx = kern.local_stats(s, t, spec, cd, need_s1 or meter is not None, teacher_meter is not None)
        g = _global_stats(st, idx, s, t, labels, lay, spec, meter, teacher_meter, need_s1)
        keep, bad, label_local = lay.label_rows(labels, spec.ignore_index, n, s.device)
        if spec.divergence == Divergence.JSD:  # JSD: the mixture needs both global log-sum-exps: a second read
            parts = kern.jsd_partials(s, t, g, spec, cd)
            dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=lay.group)
            g.d_t, g.d_s = parts.unbind(1)
            g.d = spec.beta * g.d_t + (1 - spec.beta) * g.d_s
        row = spec.kd_scale * g.d
        if spec.has_ce:
            row = row + spec.ce_scale * (g.lse1_s - torch.where(keep, g.label_s, 0.0))
        w, w_grad = row_weights(keep, bad, row_scale(row_count, cd, s.device), spec, cd)
        loss = torch.where(keep, row * w, 0.0)
        gs, gt = kern.grads(s, t, g, label_local, w_grad, spec, grad_s, grad_t, cd)
        for m, side in ((meter, "s"), (teacher_meter, "t")):
            if m is not None:
                _add_meter(m, g, side, keep, bad)
        return (loss.sum() if reduce else loss), gs, gt


class SparseVocabParallel(_Executor):
    """The sparse backends' interface (``sparse_kd_forward`` / ``scale_grad``) for a top-K teacher with the
    student's vocabulary split over the group: every rank holds the teacher's K global ids and
    log-probabilities; a listed class is its owner's. The student's statistics come from the
    backend's ``local_stats`` and the dense reductions (steps 1-3), then one more all-reduce SUM of
    (N, 2) floats: the owners' sum of exp(a_k - M/T) over their listed classes (the student's listed
    mass) and of p_k a_k (the divergence's cross term). ``tail="conditional"`` (the student
    conditioned on the list, normalised by its listed mass) takes the listed mass against the
    listed classes' own maximum instead of M/T, so that it cannot underflow: one all-reduce MAX of
    N floats more. The gradient of the slice is written by tensor ops on either backend (one read of
    the slice and a write)."""

    def sparse_kd_forward(self, s, ids, lp, labels, row_count, spec: KDSpec, tail: int, grad_s: bool, meter,
                          reduce: bool = False):
        lay = self.layout
        n, cd, k = s.shape[0], wide(s.dtype, lp.dtype), spec.inv_temperature
        st, idx = self.kernels.local_stats(s, s, spec, cd, True, False)  # the teacher's columns are unused
        g = _global_stats(st, idx, s, s, labels, lay, spec, meter, None, spec.has_ce)
        valid = (ids >= 0) & (ids < lay.vocab)
        local = ids - lay.offset
        own = valid & (local >= 0) & (local < lay.width)
        at = torch.where(own, local, 0)
        lp_k, lp_tail = sparse_teacher(lp.to(cd), valid, lay.vocab, spec, tail)
        p_k, p_tail = lp_k.exp(), lp_tail.exp()
        a_k = s.gather(1, at).to(cd) * k
        conditional = tail == Tail.CONDITIONAL
        if conditional:  # the listed mass against the listed classes' own maximum: it must not underflow
            ref = torch.where(own, a_k, -torch.inf).amax(1) if a_k.shape[1] else a_k.new_full((n,), -torch.inf)
            dist.all_reduce(ref, op=dist.ReduceOp.MAX, group=lay.group)
            ref = finite(ref)
        else:
            ref = finite(g.max_s) * k
        mass = torch.where(own, torch.exp(a_k - ref[:, None]), 0.0).sum(1)
        cross = torch.where(own & (p_k > 0), p_k * a_k, 0.0).sum(1)
        parts = torch.stack([mass, cross], 1) if n else st.new_zeros((0, 2))
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=lay.group)
        # the log-normaliser of the student's listed log-probabilities: lse_a, or for the conditioned
        # student the listed classes' own log-sum-exp (p_s,k / sum_listed p_s = exp(a_k - lse_listed))
        lse = finite(ref + parts[:, 0].log()) if conditional else g.lse_a  # (finite: as conditioned())
        # D = sum_k p_k (log p_k - (a_k - lse)) + p_tail (log p_tail - log ps_tail)
        d = masked(p_k, lp_k).sum(1) - parts[:, 1] + lse * torch.where(valid, p_k, 0.0).sum(1)
        if not conditional:  # (conditional: no tail on either side)
            ps_tail = (1 - parts[:, 0] / g.z_a).clamp(min=SPARSE_TAIL_FLOOR)
            d = d + masked(p_tail, lp_tail - ps_tail.log())
        listed = valid.any(1)  # a row with no listed teacher class has no divergence term
        keep, bad, label_local = lay.label_rows(labels, spec.ignore_index, n, s.device)
        bad_ids = keep & ((ids < -1) | (ids >= lay.vocab)).any(1)  # only with validate_labels=False
        bad = bad_ids if bad is None else bad | bad_ids
        row = spec.kd_scale * torch.where(listed, d, 0.0)
        if spec.has_ce:
            row = row + spec.ce_scale * (g.lse1_s - torch.where(keep, g.label_s, 0.0))
        w, w_grad = row_weights(keep, bad, row_scale(row_count, cd, s.device), spec, cd)
        loss = torch.where(keep, row * w, 0.0)
        gs = None
        if grad_s:
            la = s.to(cd) * k - g.lse_a[:, None]
            kd_row = (listed.to(cd) * (spec.kd_scale * k))[:, None]
            if conditional:  # the conditioned student: an unlisted class has no divergence gradient
                out = torch.zeros_like(la)
            else:
                out = kd_row * la.exp() * torch.where(listed, 1 - p_tail / ps_tail, 0.0)[:, None]
            fix = torch.where(own, kd_row * ((a_k - lse[:, None]).exp() - p_k) - out.gather(1, at), 0.0)
            out = out.scatter_add(1, at, fix)
            if spec.has_ce:
                out = out + spec.ce_scale * torch.exp(s.to(cd) - g.lse1_s[:, None])
                out = out.scatter_add(1, label_local.clamp(min=0)[:, None],
                                      ((label_local >= 0).to(cd) * -spec.ce_scale)[:, None])
            gs = torch.where(w_grad[:, None] != 0, out * w_grad[:, None], 0.0).to(s.dtype)
        if meter is not None:
            _add_meter(meter, g, "s", keep, bad)
        return (loss.sum() if reduce else loss), gs


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce(SUM) of the gradient over ``group`` backward: the input of a
    column-parallel layer (Megatron's "f"); each rank's gradient is its slice's part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None




# --- the losses ------------------------------------------------------------------------------------

def _executor_parts(options: Options, group, x, n_local, labels, device, dtypes, what="rows"):
    """What every vocabulary-parallel loss does before its Function: the group checked, the labels'
    shape and device checked, the kernels' backend resolved, the layout gathered (one all-gather),
    then the labels' global range checked. Returns (layout, kernels, int64 label rows)."""
    checks.group(group)
    if labels is not None:
        checks.labels(labels, x.shape[:-1], n_local, options.ignore_index, check_range=False, device=device)
    checks.on_device(options.num_items, "num_items", device)
    kernels = backends.load(backends.resolve_name(options.backend, device, dtypes, "vocab"))
    labels2 = label_rows(labels)
    lay = layout(group, x.numel() // x.shape[-1], n_local, labels2 if options.validate_labels else None, device,
                 what)
    if labels is not None and options.validate_labels:
        checks.labels(labels, x.shape[:-1], lay.vocab, options.ignore_index)  # the global range
    return lay, kernels, labels2


def _refuse(options: Options):
    refuse_unsupported(**{name: True for name in options.transforms_set()}, return_entropy=options.return_entropy)


def dense(s, t, labels, options: Options, meter, teacher_meter):
    """dense.run with the vocabulary split over ``options.group`` (or DTensors sharded on the last dim)."""
    _refuse(options)
    s, t, group = _from_dtensors(s, t, options.group)
    checks.group(group)
    checks.pair(s, t)
    check_meters(meter, teacher_meter, labels is not None, s.device)
    lay, kernels, labels2 = _executor_parts(options, group, s, s.shape[-1], labels, s.device, (s.dtype, t.dtype))
    s2, t2 = as_rows(s), as_rows(t)
    spec = build_spec(options, lay.vocab, (s.dtype, t.dtype))
    reduce = options.reduction != "none"
    with autocast_off(s.device.type):
        loss = FusedKD.apply(s2, t2, labels2, row_count(labels2, options, s2.shape[0]), spec, reduce,
                             VocabParallel(lay, kernels), meter, teacher_meter)
    return loss if reduce else loss.reshape(s.shape[:-1])


def sparse(s, teacher_ids, teacher_logprobs, labels, options: Options, meter):
    """sparse.run with the student's vocabulary split over ``options.group`` (or a DTensor sharded on
    the last dimension); teacher ids are global class ids, the same on every rank."""
    _refuse(options)
    s, _, group = _from_dtensors(s, s, options.group)
    checks.group(group)
    checks.logits(s, "student_logits")
    check_meters(meter, None, labels is not None, s.device)
    lay, kernels, labels2 = _executor_parts(options, group, s, s.shape[-1], labels, s.device, (s.dtype,))
    # against the global vocabulary
    checks.teacher(teacher_ids, teacher_logprobs, s.shape[:-1], lay.vocab, s.device, options.validate_labels)
    k = teacher_ids.shape[-1]
    s2 = as_rows(s)
    spec = build_spec(options, lay.vocab, (s.dtype,))
    reduce = options.reduction != "none"
    with autocast_off(s.device.type):
        loss = SparseKD.apply(s2, teacher_ids.reshape(-1, k).to(torch.int64).contiguous(),
                              teacher_logprobs.reshape(-1, k).contiguous(), labels2,
                              row_count(labels2, options, s2.shape[0]), spec, int(options.tail), reduce,
                              SparseVocabParallel(lay, kernels), meter)
    return loss if reduce else loss.reshape(s.shape[:-1])


def fused_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                 options: Options, meter, teacher_meter):
    """fused_linear.run with column-parallel output weights: each rank holds the rows (V_r, H) of
    W_s and W_t (and b_s, b_t) of its vocabulary slice; the hidden states are the same on every rank.
    The hidden states' gradient is all-reduced over the group in the backward (N H floats, the
    column-parallel layer's own cost); everything else as :func:`dense`, per chunk of rows."""
    _refuse(options)
    group = options.group
    if any(type(x).__name__ == "DTensor" for x in (student_weight, teacher_weight, student_bias, teacher_bias)):
        raise TypeError("with group=, the weights and biases must be this rank's plain tensors (its vocabulary "
                        "rows), not DTensors")
    checks.group(group)
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    hs, ws, bs, ht, wt, bt = gemm.follow_autocast(device_type, student_hidden, student_weight, student_bias,
                                                  teacher_hidden, teacher_weight, teacher_bias)
    with autocast_off(device_type):
        checks.linear(hs, ws, bs, "student")
        checks.linear(ht, wt, bt, "teacher")
        checks.same_rows(hs, ht)
        if ws.shape[0] != wt.shape[0]:
            raise ValueError(f"with group=, student_weight ({ws.shape[0]} rows) and teacher_weight ({wt.shape[0]} "
                             "rows) must hold the same vocabulary slice")
        meters = (meter, teacher_meter)
        check_meters(*meters, labels is not None, hs.device)
        dtypes = (hs.dtype, ht.dtype)
        lay, kernels, _ = _executor_parts(options, group, hs, ws.shape[0], labels, hs.device, dtypes,
                                          "hidden-state rows")
        hs, ht = (_CopyToGroup.apply(h, group) if h.requires_grad else h for h in (hs, ht))
        lab, (hs, ht), count = counted_rows(labels, options, hs, ht)
        chunk = options.chunk_size or max(1, gemm.CHUNK_LOGITS // ws.shape[0])
        spec = build_spec(options, lay.vocab, dtypes, GEMM_PEAK)
        return FusedLinearKD.apply(hs, ws, bs, ht, wt, bt, None, None, lab, count, spec, VocabParallel(lay, kernels),
                                   chunk, None, meters, False)
