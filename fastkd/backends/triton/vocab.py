"""Triton kernels of the vocabulary-parallel loss (fastkd.vocab_parallel): one rank's slice (N, V_r).

Two small kernels, one program per row looping over the slice in blocks of BLOCK_C columns:

- ``_vocab_stats_kernel``: the row's local statistics (maxima and first argmaxes of s and t, and the
  sums of exponentials against them, online): reads s and t once, 2 b bytes per element (b bytes
  per logit), writes 11 numbers per row.
- ``_vocab_grad_kernel``: given the global statistics (after the all-reduces), the gradient of the
  slice: reads s and t again and writes grad_s (and grad_t): 3 b (4 b) bytes per element. For JSD the
  same kernel first runs without gradients to give the two partial divergences of the mixture
  (one more read, 2 b).

So 5 b bytes per element with a student gradient (bf16: 10), the dense looping path's traffic; the
dense one-pass kernel's 3 b would need the row on chip across the all-reduces. Simple rather than
tuned: one row per program, a 0-d running max per row (one rescale per block, one exp2 per element
and statistic). Imported lazily; runs on CPU tensors under TRITON_INTERPRET=1.
"""
# No `from __future__ import annotations`: Triton 3.0's interpreter spots constexpr parameters
# only by the annotation object, not by the string "tl.constexpr".

import torch
import triton
import triton.language as tl

from ..._core.spec import KDSpec
from .helpers import LOG2E, NEG_INF, _rescale, _safe
from .launch import _launch, _on

MAX_BLOCK = 4096
N_STATS = 9  # columns of the statistics, as vocab_parallel's M_S .. Q_T


@triton.jit
def _vocab_stats_kernel(
    s_ptr, t_ptr, stats_ptr, idx_ptr,  # slices (N, V_r); out: (N, 9) fp32, (N, 2) int32
    n_cols, stride_s, stride_t,  # shape, row strides
    inv_temp,
    DIVERGENCE: tl.constexpr, NEED_S1: tl.constexpr, NEED_T1: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k = inv_temp * LOG2E
    m_s = tl.full([], NEG_INF, tl.float32)
    m_t = tl.full([], NEG_INF, tl.float32)
    i_s = tl.full([], 0, tl.int32)
    i_t = tl.full([], 0, tl.int32)
    z_a = tl.full([], 0.0, tl.float32)
    z_b = tl.full([], 0.0, tl.float32)
    w = tl.full([], 0.0, tl.float32)
    z1_s = tl.full([], 0.0, tl.float32)
    q_s = tl.full([], 0.0, tl.float32)
    z1_t = tl.full([], 0.0, tl.float32)
    q_t = tl.full([], 0.0, tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < n_cols
        x = tl.load(s_ptr + row * stride_s + cols, mask=ok, other=NEG_INF).to(tl.float32)
        y = tl.load(t_ptr + row * stride_t + cols, mask=ok, other=NEG_INF).to(tl.float32)
        bm_s = tl.max(x, axis=0)
        bm_t = tl.max(y, axis=0)
        # first column reaching the block's max; a block ahead of the running max replaces it
        i_s = tl.where(bm_s > m_s, tl.min(tl.where(x == bm_s, cols, 2147483647), axis=0).to(tl.int32), i_s)
        i_t = tl.where(bm_t > m_t, tl.min(tl.where(y == bm_t, cols, 2147483647), axis=0).to(tl.int32), i_t)
        mn_s = tl.maximum(m_s, bm_s)
        mn_t = tl.maximum(m_t, bm_t)
        r_s = _rescale(m_s, mn_s, k, True)
        r_t = _rescale(m_t, mn_t, k, True)
        e_a = tl.math.exp2((x - _safe(mn_s)) * k)
        e_b = tl.math.exp2((y - _safe(mn_t)) * k)
        z_a = z_a * r_s + tl.sum(e_a, axis=0)
        z_b = z_b * r_t + tl.sum(e_b, axis=0)
        if DIVERGENCE == 0:  # sum exp(b - m_t/T) (b - a); 0 where the weight is 0 (masked classes)
            w = w * r_t + tl.sum(tl.where(e_b > 0, e_b * (y * inv_temp - x * inv_temp), 0.0), axis=0)
        elif DIVERGENCE == 1:
            w = w * r_s + tl.sum(tl.where(e_a > 0, e_a * (x * inv_temp - y * inv_temp), 0.0), axis=0)
        if NEED_S1:
            r1 = _rescale(m_s, mn_s, LOG2E, True)
            e1 = tl.math.exp2((x - _safe(mn_s)) * LOG2E)
            z1_s = z1_s * r1 + tl.sum(e1, axis=0)
            q_s = q_s * r1 * r1 + tl.sum(e1 * e1, axis=0)
        if NEED_T1:
            r1t = _rescale(m_t, mn_t, LOG2E, True)
            e1t = tl.math.exp2((y - _safe(mn_t)) * LOG2E)
            z1_t = z1_t * r1t + tl.sum(e1t, axis=0)
            q_t = q_t * r1t * r1t + tl.sum(e1t * e1t, axis=0)
        m_s = mn_s
        m_t = mn_t
    out = stats_ptr + row * 9
    tl.store(out + 0, m_s)
    tl.store(out + 1, m_t)
    tl.store(out + 2, z_a)
    tl.store(out + 3, z_b)
    tl.store(out + 4, w)
    tl.store(out + 5, z1_s)
    tl.store(out + 6, q_s)
    tl.store(out + 7, z1_t)
    tl.store(out + 8, q_t)
    tl.store(idx_ptr + row * 2, i_s)
    tl.store(idx_ptr + row * 2 + 1, i_t)


@triton.jit
def _vocab_grad_kernel(
    s_ptr, t_ptr, gs_ptr, gt_ptr,  # slices (N, V_r) and their gradients
    rows_ptr, label_ptr, part_ptr,  # per row: (N, 6) fp32 globals, (N,) int64 local label or -1, (N, 2) fp32
    n_cols, stride_s, stride_t, stride_gs, stride_gt,  # shape, row strides
    inv_temp, kd_g, ce_scale, beta,
    DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    JSD_PARTIALS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The slice's gradients from the global statistics (rows_ptr: lse_a, lse_b, lse_1, d or JSD's
    d_s, JSD's d_t, the row weight); or, with JSD_PARTIALS, the mixture's two partial divergences."""
    row = tl.program_id(0).to(tl.int64)
    stat = rows_ptr + row * 6
    lse_a = tl.load(stat + 0)
    lse_b = tl.load(stat + 1)
    lse_1 = tl.load(stat + 2)
    d = tl.load(stat + 3)
    d_t = tl.load(stat + 4)
    w = tl.load(stat + 5)
    label = tl.load(label_ptr + row)
    acc_t = tl.full([], 0.0, tl.float32)
    acc_s = tl.full([], 0.0, tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < n_cols
        x = tl.load(s_ptr + row * stride_s + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(t_ptr + row * stride_t + cols, mask=ok, other=0.0).to(tl.float32)
        la = x * inv_temp - lse_a
        lb = y * inv_temp - lse_b
        ps = tl.exp(la)
        pt = tl.exp(lb)
        if DIVERGENCE == 2:
            lm = tl.log(beta * pt + (1.0 - beta) * ps)
        if JSD_PARTIALS:
            acc_t += tl.sum(tl.where(ok & (pt > 0), pt * (lb - lm), 0.0), axis=0)
            acc_s += tl.sum(tl.where(ok & (ps > 0), ps * (la - lm), 0.0), axis=0)
        else:
            if GRAD_S:
                if DIVERGENCE == 0:
                    ga = ps - pt
                elif DIVERGENCE == 1:
                    ga = tl.where(ps > 0, ps * (la - lb - d), 0.0)
                else:
                    ga = (1.0 - beta) * tl.where(ps > 0, ps * (la - lm - d), 0.0)
                g = kd_g * ga
                if HAS_CE:
                    g += ce_scale * (tl.exp(x - lse_1) - tl.where(cols == label, 1.0, 0.0))
                g = tl.where(w != 0, g * w, 0.0)
                tl.store(gs_ptr + row * stride_gs + cols, g.to(gs_ptr.dtype.element_ty), mask=ok)
            if GRAD_T:
                if DIVERGENCE == 0:
                    gb = tl.where(pt > 0, pt * (lb - la - d), 0.0)
                elif DIVERGENCE == 1:
                    gb = pt - ps
                else:
                    gb = beta * tl.where(pt > 0, pt * (lb - lm - d_t), 0.0)
                gt = tl.where(w != 0, kd_g * gb * w, 0.0)
                tl.store(gt_ptr + row * stride_gt + cols, gt.to(gt_ptr.dtype.element_ty), mask=ok)
    if JSD_PARTIALS:
        tl.store(part_ptr + row * 2, acc_t)
        tl.store(part_ptr + row * 2 + 1, acc_s)


def _block(n_cols):
    return min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)


def _warps(block):
    return 8 if block >= 2048 else 4


def local_stats(s, t, spec: KDSpec, cd, need_s1: bool = True, need_t1: bool = True):
    """(N, 9) fp32 statistics and (N, 2) first local argmaxes of the slices (vocab_parallel's columns)."""
    n, c = s.shape
    stats = torch.empty((n, N_STATS), dtype=torch.float32, device=s.device)
    idx = torch.empty((n, 2), dtype=torch.int32, device=s.device)
    if n:
        block = _block(c)
        with _on(s.device):
            _launch(_vocab_stats_kernel, (n,), s, t, stats, idx, c, s.stride(0), t.stride(0), spec.inv_temperature,
                    DIVERGENCE=int(spec.divergence), NEED_S1=need_s1, NEED_T1=need_t1, BLOCK_C=block,
                    num_warps=_warps(block))
    return stats, idx.to(torch.int64)


def _row_globals(g, w_grad, spec: KDSpec):
    n = g.lse_a.shape[0]
    zero = g.lse_a.new_zeros(n)
    lse_1 = getattr(g, "lse1_s", zero)
    d = g.d_s if spec.divergence == 2 and hasattr(g, "d_s") else getattr(g, "d", zero)
    d_t = getattr(g, "d_t", zero)
    return torch.stack([g.lse_a, g.lse_b, lse_1, d, d_t, w_grad.to(g.lse_a.dtype)], 1).float().contiguous()


def _grad_launch(s, t, gs, gt, rows, label_local, part, spec: KDSpec, jsd_partials):
    n, c = s.shape
    if not n:
        return
    block = _block(c)
    kd_g = spec.kd_scale * spec.inv_temperature
    with _on(s.device):
        _launch(_vocab_grad_kernel, (n,), s, t, gs if gs is not None else s, gt if gt is not None else t, rows,
                label_local, part, c, s.stride(0), t.stride(0),
                gs.stride(0) if gs is not None else 0, gt.stride(0) if gt is not None else 0,
                spec.inv_temperature, kd_g, spec.ce_scale, spec.beta,
                DIVERGENCE=int(spec.divergence), HAS_CE=spec.has_ce, GRAD_S=gs is not None,
                GRAD_T=gt is not None, JSD_PARTIALS=jsd_partials, BLOCK_C=block, num_warps=_warps(block))


def jsd_partials(s, t, g, spec: KDSpec, cd):
    """(N, 2): sum p_t (log p_t - log M), sum p_s (log p_s - log M) over the slice."""
    n = s.shape[0]
    part = torch.empty((n, 2), dtype=torch.float32, device=s.device)
    rows = _row_globals(g, g.lse_a.new_zeros(n), spec)
    label = torch.full((n,), -1, dtype=torch.int64, device=s.device)
    _grad_launch(s, t, None, None, rows, label, part, spec, True)
    return part


def grads(s, t, g, label_local, w_grad, spec: KDSpec, grad_s, grad_t, cd):
    if not (grad_s or grad_t):
        return None, None
    gs = torch.empty_like(s) if grad_s else None
    gt = torch.empty_like(t) if grad_t else None
    rows = _row_globals(g, w_grad, spec)
    _grad_launch(s, t, gs, gt, rows, label_local.contiguous(), rows, spec, False)
    return gs, gt
