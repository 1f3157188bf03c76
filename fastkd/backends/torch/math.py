"""The torch backend's shared math: logit transforms, the divergences' terms, row weights, the
sparse teacher; also what the vocabulary-parallel executor computes with plain tensor ops."""
from __future__ import annotations

import torch

from ..._core.enums import Divergence, Tail
from ..._core.spec import KDSpec, wide


def compute_dtype(*tensors):
    """fp32, or float64 when a tensor is float64."""
    return wide(*(x.dtype for x in tensors))


# fewer classes than this: a CPU's log_softmax kernel runs its scalar path (one AVX-512 vector is 16
# fp32), 3-6x slower than max, exp, sum and log as separate vectorised ops (measured, 1 thread: 16384 x 10
# fp32 3.2 ms against 0.8 ms; 16 and more classes: the kernel is as fast or faster)
FEW_CLASSES = 16


def log_softmax(x):
    """``x.log_softmax(-1)``; on a CPU, rows of fewer than FEW_CLASSES classes as x - max - log sum
    exp(x - max) in separate ops (the same formula: a row of -inf or with +inf is NaN, as there)."""
    if x.shape[-1] >= FEW_CLASSES or x.device.type != "cpu":
        return x.log_softmax(-1)
    z = x - x.amax(-1, keepdim=True)
    return z.sub_(z.exp().sum(-1, keepdim=True).log_())


def transform(x, scale, cap):
    """A model's logits as it outputs them: cap tanh(scale x / cap) with a softcap (cap > 0), else
    scale x; -inf stays -inf (a masked class keeps no mass)."""
    if cap > 0:
        return torch.where(x == -torch.inf, x, cap * torch.tanh(x * (scale / cap)))
    return x * scale if scale != 1.0 else x


def slope(z, scale, cap):
    """d z' / d x from the transformed logits z': scale (1 - tanh^2) = scale (1 - (z' / cap)^2) with a
    softcap (0 where z' = -inf: a masked class), else the scale (None when 1: nothing to multiply)."""
    if cap > 0:
        return scale * (1 - (z / cap) ** 2).clamp(min=0)
    return scale if scale != 1.0 else None


def chain(g, slope):
    return g if slope is None else g * slope


def masked(p, v):
    """p * v where p > 0, else 0: the convention 0 * log 0 = 0 (masked classes, -inf logits)."""
    return torch.where(p > 0, p * v, 0.0)


def divergence_terms(la, lb, spec: KDSpec, grad_t: bool):
    """Per-row divergence and its gradients w.r.t. the tempered logits a = s/T and b = t/T
    (the teacher's only when ``grad_t``); only the terms a divergence needs are computed."""
    ps, pt = la.exp(), lb.exp()
    if spec.divergence == Divergence.KL:  # KL(p_t || p_s)
        ref_t = lb - la
        d_t = masked(pt, ref_t).sum(-1, keepdim=True)
        return d_t, ps - pt, masked(pt, ref_t - d_t) if grad_t else None
    if spec.divergence == Divergence.REVERSE_KL:  # KL(p_s || p_t)
        ref_s = la - lb
        d_s = masked(ps, ref_s).sum(-1, keepdim=True)
        return d_s, masked(ps, ref_s - d_s), pt - ps
    b = spec.beta  # generalised JSD against M = beta p_t + (1 - beta) p_s
    lm = torch.log(b * pt + (1 - b) * ps)
    ref_s, ref_t = la - lm, lb - lm
    d_s = masked(ps, ref_s).sum(-1, keepdim=True)
    d_t = masked(pt, ref_t).sum(-1, keepdim=True)
    gb = b * masked(pt, ref_t - d_t) if grad_t else None
    return b * d_t + (1 - b) * d_s, (1 - b) * masked(ps, ref_s - d_s), gb


def row_weights(keep, bad, scale, spec: KDSpec, cd):
    """(w, w_grad) per row: its weight in the loss (``scale``, 1 / rows that count, where it counts;
    else 0) and in the saved gradient (the same, or spec.grad_unit when the backward applies the row
    scale); NaN on rows flagged ``bad`` (a label or id out of range, unchecked)."""
    w = torch.where(keep, scale, 0.0)
    # a python number times a mask in cd (torch.where(keep, number, 0.0) would be fp32)
    w_grad = w if spec.row_scaled_grad else keep.to(cd) * spec.grad_unit
    if bad is not None:
        w, w_grad = torch.where(bad, torch.nan, w), torch.where(bad, torch.nan, w_grad)
    return w, w_grad


def finite(m):
    """A row maximum with -inf (an empty or all-masked row) as 0, to subtract safely."""
    return torch.where(m == -torch.inf, 0.0, m)


def rescale(m_from, m_to, k):
    """exp((m_from - m_to) k), 0 from an empty (all -inf) row."""
    return torch.where(m_from == -torch.inf, 0.0, torch.exp((finite(m_from) - finite(m_to)) * k))


def sparse_teacher(lp, valid, n_cols, spec: KDSpec, tail: int):
    """The target over a sparse teacher's K listed classes and its tail: (log p_k, log p_tail).

    The listed log-probabilities are tempered with the power r = spec.teacher_power
    (teacher_temperature / T), p_k ~ q_k^r, as the full teacher would be. The missing mass
    m = 1 - sum q_k (``tail``, a Tail code): BUCKET, spread evenly over the V - K' unlisted classes
    and tempered with them, (V - K') (m / (V - K'))^r; LUMPED, one class tempered as a whole, m^r;
    RENORMALIZE and CONDITIONAL, dropped. With no unlisted class (K' = V) there is no tail (m is
    rounding)."""
    r = spec.teacher_power
    u = torch.where(valid, lp * r, -torch.inf)
    u_tail = torch.full_like(u[:, 0], -torch.inf)
    if tail in (Tail.BUCKET, Tail.LUMPED):
        missing = (1 - torch.where(valid, lp.exp(), 0.0).sum(-1)).clamp(min=0)
        free = (n_cols - valid.sum(-1)).to(u.dtype)
        if tail == Tail.BUCKET:
            mass = free.log() + (missing.log() - free.log()) * r
        else:
            mass = missing.log() * r
        u_tail = torch.where((missing > 0) & (free > 0), mass, u_tail)
    norm = torch.logsumexp(torch.cat([u, u_tail[:, None]], -1), -1, keepdim=True)
    return u - norm, u_tail - norm[:, 0]


def conditioned(lps_k, valid):
    """The student's listed log-probabilities ``lps_k`` (N, K) conditioned on the listed classes,
    log p~_k = log p_s,k - log sum_listed p_s (Tail.CONDITIONAL), in log space: no 1 - sum to cancel.
    A row whose listed classes the student masks (-inf) all keeps -inf there, as the other tails
    (the divergence is inf, the gradient finite), not -inf - -inf."""
    return lps_k - finite(torch.logsumexp(torch.where(valid, lps_k, -torch.inf), -1, keepdim=True))


def meter_statistics(l1, p1, labels):
    """Per-row (confidence, correct, NLL, Brier) at T = 1 from the log-probabilities ``l1`` and the
    probabilities ``p1`` the loss already has (calibration.row_statistics' values, without a second
    softmax): confidence = exp(max log p), Brier = sum p^2 - 2 p_y + 1. ``labels`` in range."""
    top, pred = l1.max(dim=-1)
    # nll_loss(x, y)[i] = -x[i, y_i]: one op where gather needs unsqueeze, squeeze and a negation
    nll = torch.nn.functional.nll_loss(l1, labels, reduction="none")
    brier = torch.linalg.vecdot(p1, p1).add_(torch.nn.functional.nll_loss(p1, labels, reduction="none"),
                                            alpha=2).add_(1)
    return top.exp(), pred == labels, nll, brier
