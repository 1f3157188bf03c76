"""The PyTorch backend's dense loss: the fused loss's math in plain tensor ops, any device, chunks of rows.

It mirrors the Triton kernel (loss and gradients in one forward, fp32 arithmetic, float64 for
float64 inputs), so the two backends give the same numbers. Rows are processed in chunks so the
temporaries stay a bounded multiple of one chunk, not of N x C.

On a CPU each tensor op is one sweep over the chunk, so the op count is the cost: one log-softmax
per side per temperature, the gradient built in place in a temporary and written once into the
output (cast to the logits' dtype on that write), the meter fed from the log-probabilities the loss
already has. Ops, not bytes, are what a chunk pays for (see CHUNK_ELEMENTS).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._core.enums import Divergence
from ..._core.spec import KDSpec, row_scale
from .math import (chain, compute_dtype, divergence_terms, log_softmax, meter_statistics, row_weights, slope,
                   transform)

# elements of one chunk's row block (about five fp32 temporaries of it live at once). Measured on the
# shared 2-core CPU (issue 29, interleaved with the eager recipe): chunks sized for L2 (1 << 16, a few
# rows of a 32k vocabulary) were slower, up to 5x with a meter, since every op is a parallel region
# whose fixed cost (and, on a busy machine, its barrier) is paid per chunk; 1 << 20 was no better
# than 1 << 22 on the 1000- and 10-class cases and worse on 64 x 32000. Kept at 1 << 22.
CHUNK_ELEMENTS = 1 << 22

INPLACE_BACKWARD = False  # scale_grad allocates; backward may run again


def _tempered(x, inv_t, fresh):
    """x / T (in place when ``fresh``: x is this chunk's own copy, needed no more)."""
    if inv_t == 1.0:
        return x
    return x.mul_(inv_t) if fresh else x * inv_t


def _kl(la, lb, on_host, lb_again):
    """KL(p_t || p_s) per row and p_t, from the tempered log-probabilities; masked (0 log 0 = 0) as
    math.masked, which only changes a row whose unmasked sum is not finite: checked on the host where
    that is free (a CPU), else always masked. The terms are built in lb's buffer unless ``lb_again``."""
    pt = lb.exp()
    prod = (lb - la if lb_again else lb.sub_(la)).mul_(pt)
    d = prod.sum(-1)
    if not on_host or not math.isfinite(d.sum()):  # a sum is finite only if every term is
        d = torch.where(pt > 0, prod, 0.0).sum(-1)
    return d, pt


def _every_row_counts(labels, c, ignore_index) -> bool:
    """Every label in [0, c) and none equal to ``ignore_index``: no row ignored, none out of range."""
    if not labels.numel():
        return True
    low, high = (int(v) for v in torch.aminmax(labels))
    if low < 0 or high >= c:
        return False
    return not 0 <= ignore_index < c or not bool((labels == ignore_index).any())


def kd_forward(s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
               reduce: bool = False):
    """Rows (N, C) of student/teacher logits -> (loss, grad_s | None, grad_t | None); the loss is
    fp32 per row (N,), or with ``reduce`` the sum of the rows.

    Each row's loss and gradient are divided by ``row_count`` (the rows that count: an int, or a
    1-element tensor summed on the device); ignored rows get loss 0 and gradient 0. The logits are
    transformed first (spec.s_scale, s_cap, t_scale, t_cap); the gradients are w.r.t. the raw logits.
    """
    return drive(s, t, labels, row_count, spec, grad_s, grad_t, meter, teacher_meter, reduce, None)


def drive(s, t, labels, row_count, spec: KDSpec, grad_s, grad_t, meter, teacher_meter, reduce, compiled_chunk):
    """kd_forward's loop over chunks of rows: each chunk's math is ``chunk`` (eager, writing into the
    outputs), or ``compiled_chunk`` (torch.compile'd ``chunk``: no host decision inside, returns new
    tensors that are copied in unless there is one chunk); the meters are fed here from its statistics."""
    n, c = s.shape
    cd = compute_dtype(s, t)
    dev = s.device
    eager = compiled_chunk is None
    on_host = eager and dev.type == "cpu" and not torch.compiler.is_compiling()
    loss = torch.empty(n, dtype=cd, device=dev)
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    # one chunk of cd logits: the gradient is returned in the temporary it is built in (no second
    # buffer of the chunk's size: the fused-linear losses' chunks are held to a few of those)
    one_chunk = 0 < n <= step
    gs_built = grad_s and one_chunk and (s.dtype == cd or not eager)
    gs = torch.empty_like(s) if grad_s and not gs_built else None
    gt = torch.empty_like(t) if grad_t and not (one_chunk and not eager) else None
    scale = row_scale(row_count, cd, dev)
    # every row counts (no label ignored or out of range): no per-row masks at all, only the row
    # scale. Known without labels, or read on a CPU (one op on the labels, no device to sync)
    every_row = labels is None or on_host and _every_row_counts(labels, c, spec.ignore_index)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        lab = labels[lo:hi] if labels is not None else None
        if eager:
            outs = (loss[lo:hi], None if gs_built else gs[lo:hi] if grad_s else None, gt[lo:hi] if grad_t else None)
            rows, g_s, g_t, stats, t_stats, keep, bad = chunk(
                s[lo:hi], t[lo:hi], lab, scale, spec, grad_s, grad_t, meter is not None, teacher_meter is not None,
                every_row, on_host, *outs)
        else:
            rows, g_s, g_t, stats, t_stats, keep, bad = compiled_chunk(
                s[lo:hi], t[lo:hi], lab, scale, spec, grad_s, grad_t, meter is not None, teacher_meter is not None,
                every_row)
            if one_chunk:
                loss = rows
                gt = g_t
            else:
                loss[lo:hi] = rows
                if grad_s:
                    gs[lo:hi] = g_s
                if grad_t:
                    gt[lo:hi] = g_t
        if gs_built:
            gs = g_s
        if meter is not None:
            meter._add_statistics(*stats, keep, bad)
        if teacher_meter is not None:
            teacher_meter._add_statistics(*t_stats, keep, bad)
    return loss.sum() if reduce else loss, gs, gt


def chunk(s, t, lab, scale, spec: KDSpec, grad_s: bool, grad_t: bool, meter_on: bool, teacher_meter_on: bool,
          every_row: bool = False, on_host: bool = False, loss_out=None, gs_out=None, gt_out=None):
    """One chunk's math: rows of logits -> (row losses, grad_s | None, grad_t | None, the student's
    and the teacher's meter statistics | None, keep, bad). Written into ``*_out`` where given (the
    eager loop: the gradient cast on that write), else returned in the logits' dtypes. Decisions the
    host makes for free on a CPU are ``every_row`` (no label ignored or out of range) and
    ``on_host`` (read a sum's finiteness); both False is the always-masked path (torch.compile)."""
    c = s.shape[-1]
    cd = compute_dtype(s, t)
    dev = s.device
    inv_t = spec.inv_temperature
    kd_g = spec.kd_scale * inv_t
    fast_kl = spec.divergence == Divergence.KL and not grad_t
    s_slope_free = spec.s_cap == 0  # the student's d z'/d z is a number (its scale), not a tensor
    x = transform(s.to(cd), spec.s_scale, spec.s_cap)
    y = transform(t.to(cd), spec.t_scale, spec.t_cap)
    statistics = t_statistics = None
    if every_row:
        keep = bad = None
    else:
        keep = lab != spec.ignore_index
        bad = keep & ((lab < 0) | (lab >= c))  # only with validate_labels=False: NaN rows
        lab = torch.where(keep & ~bad, lab, 0)
    # x is needed again at T = 1 (CE, meter) or for the softcap's slope; else a = x / T in place
    x_again = (spec.has_ce or meter_on) and inv_t != 1.0 or not s_slope_free
    x_own = s.dtype != cd or spec.s_scale != 1.0 or spec.s_cap > 0  # x is a copy, not s's rows
    y_own = t.dtype != cd or spec.t_scale != 1.0 or spec.t_cap > 0
    la = log_softmax(_tempered(x, inv_t, x_own and not x_again))
    lb = log_softmax(_tempered(y, inv_t, y_own and not teacher_meter_on and spec.t_cap == 0))
    if fast_kl:
        lb_again = teacher_meter_on and inv_t == 1.0
        div, pt = _kl(la, lb, on_host, lb_again)
        lb = lb if lb_again else None  # its buffer held the KL's terms: freed now
    else:
        div, ga, gb = divergence_terms(la, lb, spec, grad_t)
    row = spec.kd_scale * div.reshape(-1)
    l1 = p1 = None
    if spec.has_ce or meter_on:
        l1 = la if inv_t == 1.0 else log_softmax(x)
    if meter_on:
        p1 = l1.exp()
        statistics = meter_statistics(l1, p1, lab)
    if spec.has_ce:  # -log p_label: the meter's NLL when there is one
        nll = statistics[2] if meter_on else F.nll_loss(l1, lab, reduction="none")
        row = row.add_(nll, alpha=spec.ce_scale)
    if teacher_meter_on:
        lt = lb if inv_t == 1.0 else log_softmax(y)
        t_statistics = meter_statistics(lt, lt.exp(), lab)
    if every_row:  # w_grad: a number unless the forward applies the row scale
        w = scale
        w_grad = scale if spec.row_scaled_grad else spec.grad_unit
        rows = torch.mul(row, w, out=loss_out) if loss_out is not None else row * w
    else:
        w, w_grad = row_weights(keep, bad, scale, spec, cd)
        rows = torch.where(keep, row * w, 0.0)
        if loss_out is not None:
            loss_out[:] = rows
            rows = loss_out
    out = g_t = None
    if grad_s:
        if fast_kl and spec.has_ce and inv_t == 1.0:  # (kd_g + ce) p_s - kd_g p_t - ce onehot
            p1 = p1 if p1 is not None else la.exp_()  # la: read for the last time above
            g = (p1 * (kd_g + spec.ce_scale)).sub_(pt, alpha=kd_g)
        elif fast_kl:  # kd_g (p_s - p_t) (+ ce p1 below), in the buffer of p_s
            g = (p1 if p1 is not None and inv_t == 1.0 else la.exp_()).sub_(pt)
            if spec.has_ce:
                g = g.mul_(kd_g).add_(p1 if p1 is not None else l1.exp_(), alpha=spec.ce_scale)
        else:
            g = ga.mul_(kd_g) if spec.has_ce else ga
            if spec.has_ce:
                g = g.add_(p1 if p1 is not None else l1.exp_(), alpha=spec.ce_scale)  # l1: last read
        factor = w_grad if spec.has_ce else w_grad * kd_g
        if spec.has_ce:  # the onehot of ce_scale (softmax(s) - onehot(label))
            g = g.scatter_add_(-1, lab[:, None], torch.full((lab.shape[0], 1), -spec.ce_scale, dtype=cd, device=dev))
        if s_slope_free:
            if spec.s_scale != 1.0:
                factor = factor * spec.s_scale
        else:
            g = g.mul_(slope(x, spec.s_scale, spec.s_cap))
        factor = factor if every_row else factor.reshape(-1, 1)
        if gs_out is None:  # the gradient returned in the temporary it is built in
            out = g.mul_(factor)
        else:
            out = gs_out
            torch.mul(g, factor, out=out)  # written once, cast on this write
        # ignored rows: 0 even where their terms are not finite (skipped when a CPU sees none: one sweep less)
        if not every_row and (not on_host or bool((w_grad == 0).any())):
            out.masked_fill_((w_grad == 0)[:, None], 0)
        out = out.to(s.dtype)
    if grad_t:
        g_t = chain(kd_g * gb, slope(y, spec.t_scale, spec.t_cap))
        if every_row:
            g_t = torch.mul(g_t, w_grad, out=gt_out) if gt_out is not None else (g_t * w_grad).to(t.dtype)
        else:
            g_t = torch.where(w_grad[:, None] != 0, g_t * w_grad[:, None], 0.0)
            if gt_out is not None:
                gt_out[:] = g_t
                g_t = gt_out
            else:
                g_t = g_t.to(t.dtype)
    return rows, out, g_t, statistics, t_statistics, keep, bad


def scale_grad(grad, factor):
    """The backward: the gradient from the forward times ``factor`` (0-d, or one per row), out of
    place. The product is taken in fp32 (float64 for float64): a loss scaler's 2^16 is inf in fp16.
    A factor of 1 on a CPU (read there without a device sync; not under a trace) is a copy: a bf16 gradient is not
    widened and narrowed again for nothing."""
    if factor.dim():
        factor = factor.reshape(-1, 1)
    elif grad.device.type == "cpu" and type(factor) is torch.Tensor and not torch.compiler.is_compiling() \
            and bool(factor == 1):  # a fake or functional tensor (a trace: torch 2.4 says not compiling) has no value
        return grad.clone()
    cd = compute_dtype(grad)
    return (grad.to(cd) * factor.to(cd)).to(grad.dtype)
