"""The PyTorch backend: the fused loss's math in plain tensor ops, any device, chunks of rows.

It mirrors the Triton kernel (loss and gradients in one forward, fp32 arithmetic, float64 for
float64 inputs), so the two backends give the same numbers. Rows are processed in chunks so the
temporaries stay a bounded multiple of one chunk, not of N x C.
"""
from __future__ import annotations

import torch

from ..._core.spec import SPARSE_TAIL_FLOOR, KDSpec, count_on_device, inv_count_on_host

CHUNK_ELEMENTS = 1 << 22  # temporaries: about ten fp32 tensors of this many elements


def _compute_dtype(*tensors):
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _transform(x, scale, cap):
    """A model's logits as it outputs them: cap tanh(scale x / cap) with a softcap (cap > 0), else
    scale x; -inf stays -inf (a masked class keeps no mass)."""
    if cap > 0:
        return torch.where(x == -torch.inf, x, cap * torch.tanh(x * (scale / cap)))
    return x * scale if scale != 1.0 else x


def _slope(z, scale, cap):
    """d z' / d x from the transformed logits z': scale (1 - tanh^2) = scale (1 - (z' / cap)^2) with a
    softcap (0 where z' = -inf: a masked class), else the scale (None when 1: nothing to multiply)."""
    if cap > 0:
        return scale * (1 - (z / cap) ** 2).clamp(min=0)
    return scale if scale != 1.0 else None


def _chain(g, slope):
    return g if slope is None else g * slope


def _masked(p, v):
    """p * v where p > 0, else 0: the convention 0 * log 0 = 0 (masked classes, -inf logits)."""
    return torch.where(p > 0, p * v, 0.0)


def _divergence(la, lb, spec: KDSpec, grad_t: bool):
    """Per-row divergence and its gradients w.r.t. the tempered logits a = s/T and b = t/T
    (the teacher's only when ``grad_t``); only the terms a divergence needs are computed."""
    ps, pt = la.exp(), lb.exp()
    if spec.divergence == 0:  # KL(p_t || p_s)
        ref_t = lb - la
        d_t = _masked(pt, ref_t).sum(-1, keepdim=True)
        return d_t, ps - pt, _masked(pt, ref_t - d_t) if grad_t else None
    if spec.divergence == 1:  # KL(p_s || p_t)
        ref_s = la - lb
        d_s = _masked(ps, ref_s).sum(-1, keepdim=True)
        return d_s, _masked(ps, ref_s - d_s), pt - ps
    b = spec.beta  # generalised JSD against M = beta p_t + (1 - beta) p_s
    lm = torch.log(b * pt + (1 - b) * ps)
    ref_s, ref_t = la - lm, lb - lm
    d_s = _masked(ps, ref_s).sum(-1, keepdim=True)
    d_t = _masked(pt, ref_t).sum(-1, keepdim=True)
    gb = b * _masked(pt, ref_t - d_t) if grad_t else None
    return b * d_t + (1 - b) * d_s, (1 - b) * _masked(ps, ref_s - d_s), gb


def _row_scale(row_count, dtype, device):
    """1 / rows that count as a 0-d tensor: from the device's count, or the host's."""
    if torch.is_tensor(row_count):
        return 1.0 / count_on_device(row_count, dtype)
    return torch.full((), inv_count_on_host(row_count), dtype=dtype, device=device)


INPLACE_BACKWARD = False  # scale_grad allocates; backward may run again


def kd_forward(s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
               reduce: bool = False):
    """Rows (N, C) of student/teacher logits -> (loss, grad_s | None, grad_t | None); the loss is
    fp32 per row (N,), or with ``reduce`` the sum of the rows.

    Each row's loss and gradient are divided by ``row_count`` (the rows that count: an int, or a
    1-element tensor summed on the device); ignored rows get loss 0 and gradient 0. The logits are
    transformed first (spec.s_scale, s_cap, t_scale, t_cap); the gradients are w.r.t. the raw logits.
    """
    n, c = s.shape
    cd = _compute_dtype(s, t)
    loss = torch.empty(n, dtype=cd, device=s.device)
    gs = torch.empty_like(s) if grad_s else None
    gt = torch.empty_like(t) if grad_t else None
    scale = _row_scale(row_count, cd, s.device)
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x = _transform(s[lo:hi].to(cd), spec.s_scale, spec.s_cap)
        y = _transform(t[lo:hi].to(cd), spec.t_scale, spec.t_cap)
        if labels is not None:
            lab = labels[lo:hi]
            keep = lab != spec.ignore_index
            bad = keep & ((lab < 0) | (lab >= c))  # only with validate_labels=False: NaN rows
            lab = torch.where(keep & ~bad, lab, 0)
        else:
            lab, keep, bad = None, torch.ones(hi - lo, dtype=torch.bool, device=s.device), None
        la = (x * spec.inv_temperature).log_softmax(-1)
        lb = (y * spec.inv_temperature).log_softmax(-1)
        div, ga, gb = _divergence(la, lb, spec, grad_t)
        row = spec.kd_scale * div.squeeze(-1)
        if spec.has_ce:
            l1 = la if spec.inv_temperature == 1.0 else x.log_softmax(-1)
            row = row + spec.ce_scale * -l1.gather(-1, lab[:, None]).squeeze(-1)
        w = torch.where(keep, scale, 0.0)  # the row scale of the loss
        # of the gradient; a python number times a mask in cd (torch.where(keep, number, 0.0) would be fp32)
        w_grad = w if spec.row_scaled_grad else keep.to(cd) * spec.grad_unit
        if bad is not None:
            w, w_grad = torch.where(bad, torch.nan, w), torch.where(bad, torch.nan, w_grad)
        loss[lo:hi] = torch.where(keep, row * w, 0.0)
        w = w_grad[:, None]
        kd_g = spec.kd_scale * spec.inv_temperature
        if grad_s:
            g = kd_g * ga
            if spec.has_ce:  # + ce_scale (softmax(s) - onehot(label))
                g = (g + spec.ce_scale * l1.exp()).scatter_add_(
                    -1, lab[:, None], torch.full((hi - lo, 1), -spec.ce_scale, dtype=cd, device=s.device))
            gs[lo:hi] = torch.where(w != 0, _chain(g, _slope(x, spec.s_scale, spec.s_cap)) * w, 0.0)
        if grad_t:
            gt[lo:hi] = torch.where(w != 0, _chain(kd_g * gb, _slope(y, spec.t_scale, spec.t_cap)) * w, 0.0)
        for m, logits in ((meter, x), (teacher_meter, y)):
            if m is not None:
                m._add_rows(logits, lab, keep, bad)
    return loss.sum() if reduce else loss, gs, gt


def scale_grad(grad, factor):
    """The backward: the gradient from the forward times ``factor`` (0-d, or one per row), out of
    place. The product is taken in fp32 (float64 for float64): a loss scaler's 2^16 is inf in fp16."""
    if factor.dim():
        factor = factor.reshape(-1, 1)
    cd = _compute_dtype(grad)
    return (grad.to(cd) * factor.to(cd)).to(grad.dtype)


def _sparse_teacher(lp, valid, n_cols, spec: KDSpec, bucket: bool):
    """Tempered teacher over its K listed classes (+ the tail bucket): (log p_k, log p_tail).

    The teacher's log-probabilities at T = 1 are tempered as the full teacher would be,
    p ~ q^(1/T); its missing mass m = 1 - sum q_k is taken as spread evenly over the V - K
    unlisted classes, so the tail bucket holds (V - K) (m / (V - K))^(1/T) before normalisation.
    "renormalize" drops the tail."""
    u = torch.where(valid, lp * spec.inv_temperature, -torch.inf)
    u_tail = torch.full_like(u[:, 0], -torch.inf)
    if bucket:
        missing = (1 - torch.where(valid, lp.exp(), 0.0).sum(-1)).clamp(min=0)
        free = (n_cols - valid.sum(-1)).to(u.dtype)
        spread = free.log() + (missing.log() - free.log()) * spec.inv_temperature
        u_tail = torch.where((missing > 0) & (free > 0), spread, u_tail)
    norm = torch.logsumexp(torch.cat([u, u_tail[:, None]], -1), -1, keepdim=True)
    return u - norm, u_tail - norm[:, 0]


def sparse_kd_forward(s, ids, lp, labels, row_count, spec: KDSpec, bucket: bool, grad_s: bool, meter,
                      reduce: bool = False):
    """Student rows (N, V), teacher top-K ``ids`` (N, K) (-1 = padding) and log-probabilities ``lp``
    (N, K) -> (loss, grad_s | None). Per row, a = s/T, p_s = softmax(a), teacher p (above):

        D = sum_k p_k (log p_k - log p_s,k) + p_tail (log p_tail - log p_s,tail)
        dD/da_j = p_s,j - p_j (listed j);   p_s,j (1 - p_tail / p_s,tail) (unlisted j)

    with p_s,tail = max(1 - sum_k p_s,k, SPARSE_TAIL_FLOOR) (the student's mass off the list, to
    fp32's resolution). A row whose ids leave [-1, V) (unchecked input) is NaN. The student's logits
    are transformed first (spec.s_scale, s_cap); the gradient is w.r.t. the raw logits."""
    n, c = s.shape
    cd = _compute_dtype(s, lp)
    loss = torch.empty(n, dtype=cd, device=s.device)
    gs = torch.empty_like(s) if grad_s else None
    scale = _row_scale(row_count, cd, s.device)
    kd_g = spec.kd_scale * spec.inv_temperature
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x, k_ids, k_lp = _transform(s[lo:hi].to(cd), spec.s_scale, spec.s_cap), ids[lo:hi], lp[lo:hi].to(cd)
        keep = labels[lo:hi] != spec.ignore_index if labels is not None else \
            torch.ones(hi - lo, dtype=torch.bool, device=s.device)
        bad = keep & ((k_ids < -1) | (k_ids >= c)).any(-1)
        lab = labels[lo:hi] if labels is not None else None
        if lab is not None:
            bad |= keep & ((lab < 0) | (lab >= c))
            lab = torch.where(keep & ~bad, lab, 0)
        valid = (k_ids >= 0) & (k_ids < c)
        idx = torch.where(valid, k_ids, 0)
        la = (x * spec.inv_temperature).log_softmax(-1)
        lps_k = la.gather(-1, idx)
        ps_k = torch.where(valid, lps_k.exp(), 0.0)
        lp_k, lp_tail = _sparse_teacher(k_lp, valid, c, spec, bucket)
        p_k, p_tail = lp_k.exp(), lp_tail.exp()
        ps_tail = (1 - ps_k.sum(-1)).clamp(min=SPARSE_TAIL_FLOOR)
        div = _masked(p_k, lp_k - lps_k).sum(-1) + _masked(p_tail, lp_tail - ps_tail.log())
        listed = valid.any(-1)  # a row with no listed teacher class has no divergence term
        row = spec.kd_scale * torch.where(listed, div, 0.0)
        if spec.has_ce:
            l1 = la if spec.inv_temperature == 1.0 else x.log_softmax(-1)
            row = row + spec.ce_scale * -l1.gather(-1, lab[:, None]).squeeze(-1)
        w = torch.where(keep, scale, 0.0)
        w_grad = w if spec.row_scaled_grad else keep.to(cd) * spec.grad_unit
        w, w_grad = torch.where(bad, torch.nan, w), torch.where(bad, torch.nan, w_grad)
        loss[lo:hi] = torch.where(keep, row * w, 0.0)
        if grad_s:
            kd_row = (listed.to(cd) * kd_g)[:, None]
            g = kd_row * la.exp() * torch.where(listed, 1 - p_tail / ps_tail, 0.0)[:, None]  # NaN if none listed
            listed_fix = torch.where(valid, kd_row * (ps_k - p_k) - g.gather(-1, idx), 0.0)
            g = g.scatter_add(-1, idx, listed_fix)  # padding adds 0 (its index 0 is a stand-in)
            if spec.has_ce:
                g = (g + spec.ce_scale * l1.exp()).scatter_add_(
                    -1, lab[:, None], torch.full((hi - lo, 1), -spec.ce_scale, dtype=cd, device=s.device))
            g = _chain(g, _slope(x, spec.s_scale, spec.s_cap))
            gs[lo:hi] = torch.where(w_grad[:, None] != 0, g * w_grad[:, None], 0.0)
        if meter is not None:
            meter._add_rows(x, lab, keep, bad)
    return loss.sum() if reduce else loss, gs
