"""The PyTorch backend's sparse-teacher loss (a top-K teacher): plain tensor ops, chunks of rows."""
from __future__ import annotations

import torch

from ..._core.spec import SPARSE_TAIL_FLOOR, KDSpec, row_scale
from .dense import CHUNK_ELEMENTS
from .math import chain, compute_dtype, masked, row_weights, slope, sparse_teacher, transform


def sparse_kd_forward(s, ids, lp, labels, row_count, spec: KDSpec, tail: int, grad_s: bool, meter,
                      reduce: bool = False):
    """Student rows (N, V), teacher top-K ``ids`` (N, K) (-1 = padding) and log-probabilities ``lp``
    (N, K) -> (loss, grad_s | None); ``tail`` a Tail code. Per row, a = s/T, p_s = softmax(a), the
    target p over the listed classes and the tail (math.sparse_teacher):

        D = sum_k p_k (log p_k - log p_s,k) + p_tail (log p_tail - log p_s,tail)
        dD/da_j = p_s,j - p_j (listed j);   p_s,j (1 - p_tail / p_s,tail) (unlisted j)

    with p_s,tail = max(1 - sum_k p_s,k, SPARSE_TAIL_FLOOR) (the student's mass off the list, to
    fp32's resolution). A row whose ids leave [-1, V) (unchecked input) is NaN. The student's logits
    are transformed first (spec.s_scale, s_cap); the gradient is w.r.t. the raw logits."""
    n, c = s.shape
    cd = compute_dtype(s, lp)
    loss = torch.empty(n, dtype=cd, device=s.device)
    gs = torch.empty_like(s) if grad_s else None
    scale = row_scale(row_count, cd, s.device)
    kd_g = spec.kd_scale * spec.inv_temperature
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x, k_ids, k_lp = transform(s[lo:hi].to(cd), spec.s_scale, spec.s_cap), ids[lo:hi], lp[lo:hi].to(cd)
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
        lp_k, lp_tail = sparse_teacher(k_lp, valid, c, spec, tail)
        p_k, p_tail = lp_k.exp(), lp_tail.exp()
        ps_tail = (1 - ps_k.sum(-1)).clamp(min=SPARSE_TAIL_FLOOR)
        div = masked(p_k, lp_k - lps_k).sum(-1) + masked(p_tail, lp_tail - ps_tail.log())
        listed = valid.any(-1)  # a row with no listed teacher class has no divergence term
        row = spec.kd_scale * torch.where(listed, div, 0.0)
        if spec.has_ce:
            l1 = la if spec.inv_temperature == 1.0 else x.log_softmax(-1)
            row = row + spec.ce_scale * -l1.gather(-1, lab[:, None]).squeeze(-1)
        w, w_grad = row_weights(keep, bad, scale, spec, cd)
        loss[lo:hi] = torch.where(keep, row * w, 0.0)
        if grad_s:
            kd_row = (listed.to(cd) * kd_g)[:, None]
            g = kd_row * la.exp() * torch.where(listed, 1 - p_tail / ps_tail, 0.0)[:, None]  # NaN if none listed
            listed_fix = torch.where(valid, kd_row * (ps_k - p_k) - g.gather(-1, idx), 0.0)
            g = g.scatter_add(-1, idx, listed_fix)  # padding adds 0 (its index 0 is a stand-in)
            if spec.has_ce:
                g = (g + spec.ce_scale * l1.exp()).scatter_add_(
                    -1, lab[:, None], torch.full((hi - lo, 1), -spec.ce_scale, dtype=cd, device=s.device))
            g = chain(g, slope(x, spec.s_scale, spec.s_cap))
            gs[lo:hi] = torch.where(w_grad[:, None] != 0, g * w_grad[:, None], 0.0)
        if meter is not None:
            meter._add_rows(x, lab, keep, bad)
    return loss.sum() if reduce else loss, gs
