"""The PyTorch backend's dense loss: the fused loss's math in plain tensor ops, any device, chunks of rows.

It mirrors the Triton kernel (loss and gradients in one forward, fp32 arithmetic, float64 for
float64 inputs), so the two backends give the same numbers. Rows are processed in chunks so the
temporaries stay a bounded multiple of one chunk, not of N x C.
"""
from __future__ import annotations

import torch

from ..._core.spec import KDSpec, row_scale
from .math import chain, compute_dtype, divergence_terms, row_weights, slope, transform

CHUNK_ELEMENTS = 1 << 22  # temporaries: about ten fp32 tensors of this many elements

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
    cd = compute_dtype(s, t)
    loss = torch.empty(n, dtype=cd, device=s.device)
    gs = torch.empty_like(s) if grad_s else None
    gt = torch.empty_like(t) if grad_t else None
    scale = row_scale(row_count, cd, s.device)
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x = transform(s[lo:hi].to(cd), spec.s_scale, spec.s_cap)
        y = transform(t[lo:hi].to(cd), spec.t_scale, spec.t_cap)
        if labels is not None:
            lab = labels[lo:hi]
            keep = lab != spec.ignore_index
            bad = keep & ((lab < 0) | (lab >= c))  # only with validate_labels=False: NaN rows
            lab = torch.where(keep & ~bad, lab, 0)
        else:
            lab, keep, bad = None, torch.ones(hi - lo, dtype=torch.bool, device=s.device), None
        la = (x * spec.inv_temperature).log_softmax(-1)
        lb = (y * spec.inv_temperature).log_softmax(-1)
        div, ga, gb = divergence_terms(la, lb, spec, grad_t)
        row = spec.kd_scale * div.squeeze(-1)
        if spec.has_ce:
            l1 = la if spec.inv_temperature == 1.0 else x.log_softmax(-1)
            row = row + spec.ce_scale * -l1.gather(-1, lab[:, None]).squeeze(-1)
        w, w_grad = row_weights(keep, bad, scale, spec, cd)
        loss[lo:hi] = torch.where(keep, row * w, 0.0)
        w = w_grad[:, None]
        kd_g = spec.kd_scale * spec.inv_temperature
        if grad_s:
            g = kd_g * ga
            if spec.has_ce:  # + ce_scale (softmax(s) - onehot(label))
                g = (g + spec.ce_scale * l1.exp()).scatter_add_(
                    -1, lab[:, None], torch.full((hi - lo, 1), -spec.ce_scale, dtype=cd, device=s.device))
            gs[lo:hi] = torch.where(w != 0, chain(g, slope(x, spec.s_scale, spec.s_cap)) * w, 0.0)
        if grad_t:
            gt[lo:hi] = torch.where(w != 0, chain(kd_g * gb, slope(y, spec.t_scale, spec.t_cap)) * w, 0.0)
        for m, logits in ((meter, x), (teacher_meter, y)):
            if m is not None:
                m._add_rows(logits, lab, keep, bad)
    return loss.sum() if reduce else loss, gs, gt


def scale_grad(grad, factor):
    """The backward: the gradient from the forward times ``factor`` (0-d, or one per row), out of
    place. The product is taken in fp32 (float64 for float64): a loss scaler's 2^16 is inf in fp16."""
    if factor.dim():
        factor = factor.reshape(-1, 1)
    cd = compute_dtype(grad)
    return (grad.to(cd) * factor.to(cd)).to(grad.dtype)
