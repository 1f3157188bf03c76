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

import os

import torch
import torch.distributed as dist

from . import backends
from ._core.spec import DIVERGENCES, KDSpec
from ._core.spec import SPARSE_TAIL_FLOOR
from ._torch_kd import _compute_dtype, _masked, _row_scale, _sparse_teacher
from .calibration import _check_labels
from .loss import (_FusedKD, _check_logits, _check_meters, _check_objective, _check_pair, _check_real, _grad_unit,
                   _row_count)

# columns of the local statistics (both backends): maxima, then the sums against them
M_S, M_T, Z_A, Z_B, W, Z1_S, Q_S, Z1_T, Q_T = range(9)
N_STATS = 9


# --- the group, the slices, and DTensors ---------------------------------------------------------

def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


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


def _check_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group= needs an initialised torch.distributed process group (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of group")


class Layout:
    """This rank's vocabulary slice [offset, offset + width) of ``vocab`` classes over ``group``."""

    def __init__(self, group, offset: int, width: int, vocab: int):
        self.group, self.offset, self.width, self.vocab = group, offset, width, vocab


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


def _check_backend(backend, device, dtypes) -> str:
    name = backend if backend is not None else os.environ.get("FASTKD_BACKEND", "auto") or "auto"
    if isinstance(name, str) and name.lower() == "cuda":
        source = "backend" if backend is not None else "FASTKD_BACKEND"
        raise ValueError(f"{source}='cuda' has no vocabulary-parallel kernel (group=); use backend='triton' "
                         "or 'torch'")
    return backends.resolve_name(backend, device, dtypes)


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

def _safe(m):
    return torch.where(m == -torch.inf, 0.0, m)


def _rescale(m_from, m_to, k):
    """exp((m_from - m_to) k), 0 from an empty (all -inf) local slice."""
    return torch.where(m_from == -torch.inf, 0.0, torch.exp((_safe(m_from) - _safe(m_to)) * k))


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
    f_s, f_t = _rescale(st[:, M_S], big_s, k), _rescale(st[:, M_T], big_t, k)
    cols = {"z_a": st[:, Z_A] * f_s, "z_b": st[:, Z_B] * f_t,
            "w": st[:, W] * (f_s if spec.divergence == 1 else f_t)}
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
        f1 = _rescale(m, big, 1.0)
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
    g.lse_a = _safe(big_s) * k + g.z_a.log()
    g.lse_b = _safe(big_t) * k + g.z_b.log()
    for side, big in (("s", big_s), ("t", big_t)):
        if f"z1_{side}" in cols:
            setattr(g, f"lse1_{side}", _safe(big) + getattr(g, f"z1_{side}").log())
    if spec.divergence == 0:  # KL(p_t || p_s) = sum p_t (b - a) - (lse_b - lse_a)
        g.d = g.w / g.z_b - (g.lse_b - g.lse_a)
    elif spec.divergence == 1:
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


class VocabParallel:
    """A backend for loss._FusedKD / fused_linear._FusedLinearKD (``kd_forward`` / ``scale_grad``)
    whose rows are this rank's vocabulary slice; the kernels are ``kernels``' (torch or triton)."""

    def __init__(self, layout_: Layout, kernels):
        self.layout, self.kernels = layout_, kernels
        self.INPLACE_BACKWARD = kernels.INPLACE_BACKWARD

    def scale_grad(self, grad, factor):
        return self.kernels.scale_grad(grad, factor)

    def kd_forward(self, s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
                   reduce: bool = False):
        lay, kern = self.layout, self.kernels
        n = s.shape[0]
        cd = _compute_dtype(s, t)
        need_s1 = spec.has_ce
        st, idx = kern.local_stats(s, t, spec, cd, need_s1 or meter is not None, teacher_meter is not None)
        g = _global_stats(st, idx, s, t, labels, lay, spec, meter, teacher_meter, need_s1)
        if labels is not None:
            keep = labels != spec.ignore_index
            bad = keep & ((labels < 0) | (labels >= lay.vocab))  # only with validate_labels=False
            local = labels - lay.offset
            label_local = torch.where(keep & ~bad & (local >= 0) & (local < lay.width), local, -1)
        else:
            keep, bad = torch.ones(n, dtype=torch.bool, device=s.device), None
            label_local = torch.full((n,), -1, dtype=torch.int64, device=s.device)
        if spec.divergence == 2:  # JSD: the mixture needs both global log-sum-exps: a second read
            parts = kern.jsd_partials(s, t, g, spec, cd)
            dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=lay.group)
            g.d_t, g.d_s = parts.unbind(1)
            g.d = spec.beta * g.d_t + (1 - spec.beta) * g.d_s
        row = spec.kd_scale * g.d
        if spec.has_ce:
            row = row + spec.ce_scale * (g.lse1_s - torch.where(keep, g.label_s, 0.0))
        scale = _row_scale(row_count, cd, s.device)
        w = torch.where(keep, scale, 0.0)
        w_grad = w if spec.row_scaled_grad else keep.to(cd) * spec.grad_unit
        if bad is not None:
            w, w_grad = torch.where(bad, torch.nan, w), torch.where(bad, torch.nan, w_grad)
        loss = torch.where(keep, row * w, 0.0)
        gs, gt = kern.grads(s, t, g, label_local, w_grad, spec, grad_s, grad_t, cd)
        for m, side in ((meter, "s"), (teacher_meter, "t")):
            if m is not None:
                _add_meter(m, g, side, keep, bad)
        return (loss.sum() if reduce else loss), gs, gt


# --- the torch kernels (the Triton ones are in backends/triton/vocab.py) -------------------------------------

class TorchKernels:
    """Local statistics, JSD partials and gradients of a slice in plain tensor ops."""

    INPLACE_BACKWARD = False

    @staticmethod
    def scale_grad(grad, factor):
        from ._torch_kd import scale_grad

        return scale_grad(grad, factor)

    @staticmethod
    def local_stats(s, t, spec: KDSpec, cd, need_s1=True, need_t1=True):
        x, y = s.to(cd), t.to(cd)
        k = spec.inv_temperature
        m_s, i_s = x.max(1) if x.shape[0] else (x.new_empty(0), x.new_empty(0, dtype=torch.int64))
        m_t, i_t = y.max(1) if y.shape[0] else (y.new_empty(0), y.new_empty(0, dtype=torch.int64))
        e_a = torch.exp((x - _safe(m_s)[:, None]) * k)
        e_b = torch.exp((y - _safe(m_t)[:, None]) * k)
        if spec.divergence == 1:
            w = _masked(e_a, x * k - y * k).sum(1)
        elif spec.divergence == 0:
            w = _masked(e_b, y * k - x * k).sum(1)
        else:
            w = torch.zeros_like(m_s)
        e1_s = torch.exp(x - _safe(m_s)[:, None])
        e1_t = torch.exp(y - _safe(m_t)[:, None])
        st = torch.stack([m_s, m_t, e_a.sum(1), e_b.sum(1), w, e1_s.sum(1), (e1_s * e1_s).sum(1),
                          e1_t.sum(1), (e1_t * e1_t).sum(1)], 1)
        return st, torch.stack([i_s, i_t], 1)

    @staticmethod
    def _logp(s, t, g, spec, cd):
        k = spec.inv_temperature
        return s.to(cd) * k - g.lse_a[:, None], t.to(cd) * k - g.lse_b[:, None]

    @staticmethod
    def jsd_partials(s, t, g, spec, cd):
        la, lb = TorchKernels._logp(s, t, g, spec, cd)
        ps, pt = la.exp(), lb.exp()
        lm = torch.log(spec.beta * pt + (1 - spec.beta) * ps)
        return torch.stack([_masked(pt, lb - lm).sum(1), _masked(ps, la - lm).sum(1)], 1)

    @staticmethod
    def grads(s, t, g, label_local, w_grad, spec, grad_s, grad_t, cd):
        if not (grad_s or grad_t):
            return None, None
        la, lb = TorchKernels._logp(s, t, g, spec, cd)
        ps, pt = la.exp(), lb.exp()
        d = g.d[:, None]
        if spec.divergence == 0:
            ga, gb = ps - pt, _masked(pt, lb - la - d)
        elif spec.divergence == 1:
            ga, gb = _masked(ps, la - lb - d), pt - ps
        else:
            b = spec.beta
            lm = torch.log(b * pt + (1 - b) * ps)
            ga = (1 - b) * _masked(ps, la - lm - g.d_s[:, None])
            gb = b * _masked(pt, lb - lm - g.d_t[:, None])
        kd_g = spec.kd_scale * spec.inv_temperature
        w = w_grad[:, None]
        gs = gt = None
        if grad_s:
            out = kd_g * ga
            if spec.has_ce:
                p1 = torch.exp(s.to(cd) - g.lse1_s[:, None])
                owner = label_local >= 0
                out = out + spec.ce_scale * p1
                out = out.scatter_add(1, label_local.clamp(min=0)[:, None],
                                      (owner.to(cd) * -spec.ce_scale)[:, None])
            gs = torch.where(w != 0, out * w, 0.0).to(s.dtype)
        if grad_t:
            gt = torch.where(w != 0, kd_g * gb * w, 0.0).to(t.dtype)
        return gs, gt


def _kernels(name):
    if name == "triton":
        from .backends import triton as triton_backend

        return triton_backend
    return TorchKernels


# --- the losses ------------------------------------------------------------------------------------

def _rows_of_labels(labels, s, ignore_index):
    """Labels as int64 rows, checked against this rank's rows (their global range needs the layout)."""
    if labels is None:
        return None
    _check_labels(labels, s.shape[:-1], s.shape[-1], ignore_index, check_range=False)
    if labels.device != s.device:
        raise ValueError(f"labels ({labels.device}) must be on the logits' device ({s.device})")
    return labels.reshape(-1).to(torch.int64).contiguous()


def fused(s, t, labels, *, group, temperature, kd_weight, ce_weight, divergence, beta, ignore_index, reduction,
          meter, teacher_meter, backend, validate_labels, t_squared, num_items=None):
    """loss._fused with the vocabulary split over ``group`` (or DTensors sharded on the last dim)."""
    refuse_unsupported()
    s, t, group = _from_dtensors(s, t, group)
    _check_group(group)
    _check_pair(s, t)
    temperature, beta = _check_objective(temperature, divergence, beta, ignore_index, reduction, labels, ce_weight)
    width = s.shape[-1]
    labels2 = _rows_of_labels(labels, s, ignore_index)
    _check_meters(meter, teacher_meter, labels, s.device)
    name = _check_backend(backend, s.device, (s.dtype, t.dtype))
    n = s.numel() // width
    lay = layout(group, n, width, labels2 if validate_labels else None, s.device)
    if labels is not None and validate_labels:
        _check_labels(labels, s.shape[:-1], lay.vocab, ignore_index)  # the global range
    s2, t2 = s.reshape(-1, width), t.reshape(-1, width)
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    row_count = _row_count(labels2, ignore_index, reduction, n, s.device, num_items)
    v = lay.vocab
    kd_scale = kd_weight * (temperature**2 if t_squared else 1.0) / (v if reduction == "mean" else 1)
    spec = KDSpec(1.0 / temperature, kd_scale, ce_weight, DIVERGENCES.index(divergence), beta, ignore_index,
                  _grad_unit(kd_scale / temperature, ce_weight, divergence, (s.dtype, t.dtype)))
    impl = VocabParallel(lay, _kernels(name))
    with torch.autocast(s.device.type, enabled=False):
        loss = _FusedKD.apply(s2, t2, labels2, row_count, spec, reduction, impl, meter, teacher_meter)
    return loss.reshape(s.shape[:-1]) if reduction == "none" else loss


class SparseVocabParallel:
    """sparse.py's kernel interface (``sparse_kd_forward`` / ``scale_grad``) for a top-K teacher with the
    student's vocabulary split over the group: every rank holds the teacher's K global ids and
    log-probabilities; a listed class is its owner's. The student's statistics come from the
    backend's ``local_stats`` and the dense reductions (steps 1-3), then one more all-reduce SUM of
    (N, 2) floats: the owners' sum of exp(a_k - M/T) over their listed classes (the student's listed
    mass) and of p_k a_k (the divergence's cross term). The gradient of the slice is written by
    tensor ops on either backend (one read of the slice and a write)."""

    def __init__(self, layout_: Layout, kernels):
        self.layout, self.kernels = layout_, kernels
        self.INPLACE_BACKWARD = kernels.INPLACE_BACKWARD

    def scale_grad(self, grad, factor):
        return self.kernels.scale_grad(grad, factor)

    def sparse_kd_forward(self, s, ids, lp, labels, row_count, spec: KDSpec, bucket: bool, grad_s: bool, meter,
                          reduce: bool = False):
        lay = self.layout
        n, cd, k = s.shape[0], _compute_dtype(s, lp), spec.inv_temperature
        st, idx = self.kernels.local_stats(s, s, spec, cd, True, False)  # the teacher's columns are unused
        g = _global_stats(st, idx, s, s, labels, lay, spec, meter, None, spec.has_ce)
        valid = (ids >= 0) & (ids < lay.vocab)
        local = ids - lay.offset
        own = valid & (local >= 0) & (local < lay.width)
        at = torch.where(own, local, 0)
        lp_k, lp_tail = _sparse_teacher(lp.to(cd), valid, lay.vocab, spec, bucket)
        p_k, p_tail = lp_k.exp(), lp_tail.exp()
        a_k = s.gather(1, at).to(cd) * k
        mass = torch.where(own, torch.exp(a_k - _safe(g.max_s)[:, None] * k), 0.0).sum(1)
        cross = torch.where(own & (p_k > 0), p_k * a_k, 0.0).sum(1)
        parts = torch.stack([mass, cross], 1) if n else st.new_zeros((0, 2))
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=lay.group)
        ps_tail = (1 - parts[:, 0] / g.z_a).clamp(min=SPARSE_TAIL_FLOOR)
        # D = sum_k p_k (log p_k - (a_k - lse_a)) + p_tail (log p_tail - log ps_tail)
        d = (_masked(p_k, lp_k).sum(1) - parts[:, 1] + g.lse_a * torch.where(valid, p_k, 0.0).sum(1)
             + _masked(p_tail, lp_tail - ps_tail.log()))
        listed = valid.any(1)  # a row with no listed teacher class has no divergence term
        if labels is not None:
            keep = labels != spec.ignore_index
            bad = keep & ((labels < 0) | (labels >= lay.vocab))
            lab_local = labels - lay.offset
            label_local = torch.where(keep & ~bad & (lab_local >= 0) & (lab_local < lay.width), lab_local, -1)
        else:
            keep = torch.ones(n, dtype=torch.bool, device=s.device)
            bad = torch.zeros(n, dtype=torch.bool, device=s.device)
            label_local = torch.full((n,), -1, dtype=torch.int64, device=s.device)
        bad = bad | (keep & ((ids < -1) | (ids >= lay.vocab)).any(1))  # only with validate_labels=False
        row = spec.kd_scale * torch.where(listed, d, 0.0)
        if spec.has_ce:
            row = row + spec.ce_scale * (g.lse1_s - torch.where(keep, g.label_s, 0.0))
        w = torch.where(keep, _row_scale(row_count, cd, s.device), 0.0)
        w_grad = w if spec.row_scaled_grad else keep.to(cd) * spec.grad_unit
        w, w_grad = torch.where(bad, torch.nan, w), torch.where(bad, torch.nan, w_grad)
        loss = torch.where(keep, row * w, 0.0)
        gs = None
        if grad_s:
            la = s.to(cd) * k - g.lse_a[:, None]
            kd_row = (listed.to(cd) * (spec.kd_scale * k))[:, None]
            out = kd_row * la.exp() * torch.where(listed, 1 - p_tail / ps_tail, 0.0)[:, None]
            fix = torch.where(own, kd_row * ((a_k - g.lse_a[:, None]).exp() - p_k) - out.gather(1, at), 0.0)
            out = out.scatter_add(1, at, fix)
            if spec.has_ce:
                out = out + spec.ce_scale * torch.exp(s.to(cd) - g.lse1_s[:, None])
                out = out.scatter_add(1, label_local.clamp(min=0)[:, None],
                                      ((label_local >= 0).to(cd) * -spec.ce_scale)[:, None])
            gs = torch.where(w_grad[:, None] != 0, out * w_grad[:, None], 0.0).to(s.dtype)
        if meter is not None:
            _add_meter(meter, g, "s", keep, bad)
        return (loss.sum() if reduce else loss), gs


def sparse(s, ids, lp, labels, *, group, temperature, alpha, divergence, tail, ignore_index, reduction, meter,
           backend, validate_labels, num_items=None):
    """sparse.sparse_kd_loss with the student's vocabulary split over ``group`` (or a DTensor
    sharded on the last dimension); teacher ids are global class ids, the same on every rank."""
    from .sparse import TAILS, _SparseKD, sparse_checks

    refuse_unsupported()
    s, _, group = _from_dtensors(s, s, group)
    _check_group(group)
    _check_logits(s, "student_logits")
    alpha = _check_real(alpha, "alpha", 0.0, 1.0, False, False)
    if divergence != "kl":
        raise ValueError(f"divergence must be 'kl' for a sparse teacher, got {divergence!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    temperature, _ = _check_objective(temperature, "kl", 0.5, ignore_index, reduction, labels, 1.0 - alpha)
    width = s.shape[-1]
    labels2 = _rows_of_labels(labels, s, ignore_index)
    _check_meters(meter, None, labels, s.device)
    name = _check_backend(backend, s.device, (s.dtype,))
    n = s.numel() // width
    lay = layout(group, n, width, labels2 if validate_labels else None, s.device)
    sparse_checks(ids, lp, s.shape[:-1], lay.vocab, s.device, validate_labels)  # against the global vocabulary
    if labels is not None and validate_labels:
        _check_labels(labels, s.shape[:-1], lay.vocab, ignore_index)
    kk = ids.shape[-1]
    s2 = s.reshape(-1, width)
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    row_count = _row_count(labels2, ignore_index, reduction, n, s.device, num_items)
    kd_scale = alpha * temperature**2 / (lay.vocab if reduction == "mean" else 1)
    spec = KDSpec(1.0 / temperature, kd_scale, 1.0 - alpha, 0, 0.5, ignore_index,
                  _grad_unit(kd_scale / temperature, 1.0 - alpha, "kl", (s.dtype,)))
    impl = SparseVocabParallel(lay, _kernels(name))
    with torch.autocast(s.device.type, enabled=False):
        loss = _SparseKD.apply(s2, ids.reshape(-1, kk).to(torch.int64).contiguous(), lp.reshape(-1, kk).contiguous(),
                               labels2, row_count, spec, tail == "bucket", reduction, impl, meter, impl)
    return loss.reshape(s.shape[:-1]) if reduction == "none" else loss


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


def fused_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, group, student_bias,
                 teacher_bias, temperature, alpha, divergence, beta, ignore_index, reduction, chunk_size, backend,
                 num_items, meter, teacher_meter, return_entropy):
    """fused_linear_kd_loss with column-parallel output weights: each rank holds the rows (V_r, H) of
    W_s and W_t (and b_s, b_t) of its vocabulary slice; the hidden states are the same on every rank.
    The hidden states' gradient is all-reduced over ``group`` in the backward (N H floats, the
    column-parallel layer's own cost); everything else as :func:`fused`, per chunk of rows."""
    from . import fused_linear as fl

    refuse_unsupported(return_entropy=return_entropy)
    if any(type(x).__name__ == "DTensor" for x in (student_weight, teacher_weight, student_bias, teacher_bias)):
        raise TypeError("with group=, the weights and biases must be this rank's plain tensors (its vocabulary "
                        "rows), not DTensors")
    _check_group(group)
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    hs, ws, bs, ht, wt, bt = fl._follow_autocast(device_type, student_hidden, student_weight, student_bias,
                                                 teacher_hidden, teacher_weight, teacher_bias)
    with torch.autocast(device_type, enabled=False):
        fl._check_linear(hs, ws, bs, "student")
        fl._check_linear(ht, wt, bt, "teacher")
        if hs.shape[:-1] != ht.shape[:-1]:
            raise ValueError(f"student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} must have the "
                             "same leading (row) shape")
        if ws.shape[0] != wt.shape[0]:
            raise ValueError(f"with group=, student_weight ({ws.shape[0]} rows) and teacher_weight ({wt.shape[0]} "
                             "rows) must hold the same vocabulary slice")
        alpha = fl._check_real(alpha, "alpha", 0.0, 1.0, False, False)
        temperature, beta = _check_objective(temperature, divergence, beta, ignore_index, reduction, labels,
                                             1.0 - alpha, reductions=("batchmean", "sum", "mean"))
        if labels is not None:
            _check_labels(labels, hs.shape[:-1], ws.shape[0], ignore_index, check_range=False)
        fl._check_chunk(chunk_size)
        meters = (meter, teacher_meter)
        _check_meters(*meters, labels, hs.device)
        name = _check_backend(backend, hs.device, (hs.dtype, ht.dtype))
        lab = labels.reshape(-1).to(torch.int64) if labels is not None else None
        lay = layout(group, hs.numel() // hs.shape[-1], ws.shape[0], lab, hs.device, "hidden-state rows")
        if labels is not None:
            _check_labels(labels, hs.shape[:-1], lay.vocab, ignore_index)
        hs, ht = (_CopyToGroup.apply(h, group) if h.requires_grad else h for h in (hs, ht))
        lab, (hs, ht), row_count = fl._counted_rows(labels, ignore_index, reduction, num_items, hs, ht)
        chunk = chunk_size or max(1, fl.CHUNK_LOGITS // ws.shape[0])
        spec = fl._linear_spec(temperature, alpha, divergence, beta, ignore_index, reduction, lay.vocab,
                               (hs.dtype, ht.dtype))
        impl = VocabParallel(lay, _kernels(name))
        loss, _ = fl._FusedLinearKD.apply(hs, ws, bs, ht, wt, bt, lab, row_count, spec, impl, chunk, None, meters,
                                          False)
    return loss
