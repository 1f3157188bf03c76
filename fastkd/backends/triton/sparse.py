"""The Triton kernel of the sparse-teacher loss (``fastkd.sparse_kd_loss``); see fastkd/sparse.py
for the objective and the torch backend's sparse_kd_forward for the same math in tensor ops.

One program per row. The student's row is read once when it fits in registers (``ONE_PASS``),
twice otherwise (statistics, then the gradient); the teacher is K ids and K log-probabilities.
The gradient is written densely as p_s,j (1 - p_tail / p_s,tail) — the value of every class off
the teacher's list — then, after a barrier, the K listed classes are overwritten with
p_s,k - p_k: no membership test per element, K scattered stores per row. Traffic per row:
read s + write grad (+ one more read of s on the looping path) + 12 K bytes of teacher.
The student's logit transforms (KDSpec.s_scale, s_cap) are the dense kernels', gated the same way.
"""
# No `from __future__ import annotations`: Triton 3.0's interpreter spots constexpr parameters
# only by the annotation object, not by the string "tl.constexpr".

import torch
import triton
import triton.language as tl

from ..._core.spec import SPARSE_TAIL_FLOOR, KDSpec, inv_count_on_host, meter_args
from .helpers import (NEG_INF, _cap_constants, _cap_slope, _inv_count, _meter_flush, _meter_rows, _meter_zeros,
                      _transform)
from .launch import _interpreted, _launch, _on

ONE_PASS_MAX = {1: 16384, 2: 16384, 4: 8192}  # longest row kept in registers, by element size
LOOP_BLOCK_C = 4096


@triton.jit
def _online_stats(m, z_t, z_1, z_2, arg, x, cols, inv_temp, NEED_T1: tl.constexpr):
    """Merges a tile [1, BLOCK_C] into the running (max, sum exp((x - max)/T), sum exp(x - max),
    sum exp(2 (x - max)), first argmax). Masked columns hold -inf."""
    tile_max = tl.max(x, axis=1)
    m_new = tl.maximum(m, tile_max)
    safe = tl.where(m_new == NEG_INF, 0.0, m_new)  # all -inf so far: keep exp() finite
    xs = x - safe[:, None]
    z_t = z_t * tl.exp((m - safe) * inv_temp) + tl.sum(tl.exp(xs * inv_temp), axis=1)
    if NEED_T1:
        r = tl.exp(m - safe)
        e = tl.exp(xs)
        z_1 = z_1 * r + tl.sum(e, axis=1)
        z_2 = z_2 * r * r + tl.sum(e * e, axis=1)
        tile_arg = tl.min(tl.where(x == tile_max[:, None], cols[None, :], 2147483647), axis=1)
        arg = tl.where(tile_max > m, tile_arg, arg)  # the first maximum wins, as torch.argmax
    return m_new, z_t, z_1, z_2, arg


@triton.jit
def _load_row(s_ptr, row_off, cols, n_cols):
    mask = cols[None, :] < n_cols
    return tl.load(s_ptr + row_off + cols[None, :], mask=mask, other=NEG_INF).to(tl.float32), mask


@triton.jit
def _dense_grad(x, cols, lse_a, lse_1, label, inv_temp, kd_g, ce_scale, c_off, gw, s_nic2, HAS_CE: tl.constexpr,
                S_CAP: tl.constexpr):
    """Every class as if off the teacher's list: kd_g p_s c_off + ce (p - onehot), times gw (which
    carries the logit scale) and, with a softcap, its slope."""
    g = kd_g * tl.exp(x * inv_temp - lse_a[:, None]) * c_off[:, None]
    if HAS_CE:
        g += ce_scale * (tl.exp(x - lse_1[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
    if S_CAP:
        g = g * _cap_slope(x, s_nic2)
    return tl.where(gw[:, None] != 0, g * gw[:, None], 0.0)


@triton.jit
def _sparse_kd_fwd_kernel(
    s_ptr, ids_ptr, lp_ptr, labels_ptr, loss_ptr, gs_ptr, row_count_ptr, edges_ptr, meter_ptr,
    n_cols, n_k, stride_s, stride_k, stride_gs,
    inv_temp, kd_scale, ce_scale, ignore_index, inv_count, grad_unit, tail_floor,
    t_power,  # the teacher's power r = teacher_temperature / T (KDSpec.teacher_power)
    s_scale, s_cap,  # the student's logit transform (read where S_SCALE, S_CAP)
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr, GRAD_S: tl.constexpr,
    METER: tl.constexpr, NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr, STUDENT_T1: tl.constexpr,
    S_SCALE: tl.constexpr, S_CAP: tl.constexpr,
    FAST_MATH: tl.constexpr,  # the softcap's reciprocal by rcp.approx (a GPU, not the interpreter)
):
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)  # one row, kept as a [1] vector
    s_kc, s_nic2, _, _ = _cap_constants(s_scale, s_cap, s_scale, s_cap, S_CAP, False)
    row_off = rows[:, None] * stride_s
    ks = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + rows[:, None] * stride_k + ks[None, :], mask=ks[None, :] < n_k, other=-1)
    bad = tl.max(((ids < -1) | (ids >= n_cols)).to(tl.int32), axis=1) > 0  # unchecked input: a NaN row
    listed = (ids >= 0) & (ids < n_cols)
    at = tl.where(listed, ids, 0)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows)
        keep = label != ignore_index
        label = tl.where(keep, label, 0)
        bad = bad | (label < 0) | (label >= n_cols)
        x_label = tl.load(s_ptr + rows * stride_s + tl.where(bad, 0, label), mask=keep & ~bad,
                          other=0.0).to(tl.float32)
        x_label = _transform(tl.where(bad, float("nan"), x_label), s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
    else:
        label = tl.zeros([1], dtype=tl.int64)
        keep = rows >= 0
        x_label = tl.zeros([1], dtype=tl.float32)
    if COUNT_ON_DEVICE:
        inv_count = _inv_count(row_count_ptr)
    w = tl.where(keep, inv_count, 0.0)
    gw = tl.where(grad_unit > 0, tl.where(keep, grad_unit, 0.0), w)
    w = tl.where(bad & keep, float("nan"), w)
    gw = tl.where(bad & keep, float("nan"), gw)
    if S_SCALE:  # d z' / d x = scale (times the softcap's slope, per element)
        gw = gw * s_scale

    # the student's softmax statistics over the whole row
    zero = tl.zeros([1], dtype=tl.float32)
    m, z_t, z_1, z_2, arg = zero + NEG_INF, zero, zero, zero, tl.zeros([1], dtype=tl.int64)
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_C)
        x, mask = _load_row(s_ptr, row_off, cols, n_cols)
        x = _transform(x, s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
        m, z_t, z_1, z_2, arg = _online_stats(m, z_t, z_1, z_2, arg, x, cols, inv_temp, STUDENT_T1)
    else:
        for c0 in range(0, n_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x, mask = _load_row(s_ptr, row_off, cols, n_cols)
            x = _transform(x, s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
            m, z_t, z_1, z_2, arg = _online_stats(m, z_t, z_1, z_2, arg, x, cols, inv_temp, STUDENT_T1)
    lse_a = m * inv_temp + tl.log(z_t)
    lse_1 = m + tl.log(z_1)

    # the K listed classes: student (gathered) and teacher (tempered, + its tail: TAIL is a Tail code)
    x_k = tl.load(s_ptr + row_off + at, mask=listed, other=0.0).to(tl.float32)
    x_k = _transform(x_k, s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
    lps_k = x_k * inv_temp - lse_a[:, None]
    ps_k = tl.where(listed, tl.exp(lps_k), 0.0)
    lq = tl.load(lp_ptr + rows[:, None] * stride_k + ks[None, :], mask=listed, other=0.0).to(tl.float32)
    u = tl.where(listed, lq * t_power, NEG_INF)
    n_listed = tl.sum(listed.to(tl.float32), axis=1)
    u_tail = zero + NEG_INF
    if TAIL != 1:  # the missing mass (RENORMALIZE = 1 drops it)
        missing = tl.maximum(1.0 - tl.sum(tl.where(listed, tl.exp(lq), 0.0), axis=1), 0.0)
        free = n_cols - n_listed
        if TAIL == 0:  # BUCKET: spread evenly over the unlisted classes, tempered like them
            mass = tl.log(free) + (tl.log(missing) - tl.log(free)) * t_power
        else:  # LUMPED: one class, tempered as a whole
            mass = tl.log(missing) * t_power
        u_tail = tl.where((missing > 0) & (free > 0), mass, NEG_INF)
    u_max = tl.maximum(tl.max(u, axis=1), u_tail)
    u_max = tl.where(u_max == NEG_INF, 0.0, u_max)
    lse_t = u_max + tl.log(tl.sum(tl.exp(u - u_max[:, None]), axis=1) + tl.exp(u_tail - u_max))
    lp_k = u - lse_t[:, None]
    p_k = tl.where(listed, tl.exp(lp_k), 0.0)
    lp_tail = u_tail - lse_t
    p_tail = tl.exp(lp_tail)
    ps_tail = tl.maximum(1.0 - tl.sum(ps_k, axis=1), tail_floor)
    div = tl.sum(tl.where(p_k > 0, p_k * (lp_k - lps_k), 0.0), axis=1)
    div += tl.where(p_tail > 0, p_tail * (lp_tail - tl.log(ps_tail)), 0.0)
    has_teacher = n_listed > 0  # no listed class: no divergence term
    kd_g = tl.where(has_teacher, kd_scale * inv_temp, 0.0)
    loss = tl.where(has_teacher, kd_scale * div, 0.0)
    if HAS_CE:
        loss += ce_scale * (lse_1 - x_label)
    tl.store(loss_ptr + rows, tl.where(keep, loss * w, 0.0))

    if GRAD_S:
        c_off = tl.where(has_teacher, 1.0 - p_tail / ps_tail, 0.0)  # a row listing nothing: p_tail is NaN
        if ONE_PASS:
            g = _dense_grad(x, cols, lse_a, lse_1, label, inv_temp, kd_g, ce_scale, c_off, gw, s_nic2, HAS_CE, S_CAP)
            tl.store(gs_ptr + rows[:, None] * stride_gs + cols[None, :], g.to(gs_ptr.dtype.element_ty), mask=mask)
        else:
            for c0 in range(0, n_cols, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                x, mask = _load_row(s_ptr, row_off, cols, n_cols)
                x = _transform(x, s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
                g = _dense_grad(x, cols, lse_a, lse_1, label, inv_temp, kd_g, ce_scale, c_off, gw, s_nic2, HAS_CE,
                                S_CAP)
                tl.store(gs_ptr + rows[:, None] * stride_gs + cols[None, :], g.to(gs_ptr.dtype.element_ty),
                         mask=mask)
        tl.debug_barrier()  # the dense stores land before the listed classes are overwritten
        g_k = kd_g[:, None] * (ps_k - p_k)
        if HAS_CE:
            g_k += ce_scale * (tl.exp(x_k - lse_1[:, None]) - tl.where(at == label[:, None], 1.0, 0.0))
        if S_CAP:
            g_k = g_k * _cap_slope(x_k, s_nic2)
        g_k = tl.where(gw[:, None] != 0, g_k * gw[:, None], 0.0)
        tl.store(gs_ptr + rows[:, None] * stride_gs + at, g_k.to(gs_ptr.dtype.element_ty), mask=listed)
    if METER:
        acc = _meter_rows(_meter_zeros(1, BINS_P2), edges_ptr, keep, m, z_1, z_2, arg, x_label, label,
                          NUM_BINS, BINS_P2, False)
        _meter_flush(meter_ptr, acc, NUM_BINS, BINS_P2)


def sparse_kd_forward(s, ids, lp, labels, row_count, spec: KDSpec, tail: int, grad_s: bool, meter,
                      reduce: bool = False):
    """Rows (N, V), ids and log-probabilities (N, K) -> (loss: fp32 per row, or their sum; grad_s);
    ``tail`` a Tail code."""
    n, c = s.shape
    k = ids.shape[1]
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    gs = torch.empty_like(s) if grad_s else None
    if n == 0:
        return (loss.sum() if reduce else loss), gs
    dummy = loss
    num_bins, edges = meter_args(meter, None, s.device, dummy)
    one_pass = c <= ONE_PASS_MAX.get(s.element_size(), 8192)
    block_c = triton.next_power_of_2(c) if one_pass else LOOP_BLOCK_C
    with _on(s.device):
        _launch(
            _sparse_kd_fwd_kernel, (n,),
            s, ids, lp, labels if labels is not None else dummy, loss, gs if grad_s else dummy,
            row_count if torch.is_tensor(row_count) else dummy, edges,
            meter._state_on(s.device) if meter is not None else dummy,
            c, k, s.stride(0), ids.stride(0), gs.stride(0) if grad_s else 0,
            spec.inv_temperature, spec.kd_scale, spec.ce_scale, spec.ignore_index, inv_count_on_host(row_count),
            spec.grad_unit, SPARSE_TAIL_FLOOR, spec.teacher_power, spec.s_scale, spec.s_cap,
            BLOCK_C=block_c, BLOCK_K=triton.next_power_of_2(k), ONE_PASS=one_pass, TAIL=int(tail),
            HAS_LABELS=labels is not None, HAS_CE=spec.has_ce, COUNT_ON_DEVICE=torch.is_tensor(row_count),
            GRAD_S=grad_s, METER=meter is not None, NUM_BINS=num_bins,
            BINS_P2=triton.next_power_of_2(num_bins + 1), STUDENT_T1=spec.has_ce or meter is not None,
            S_SCALE=spec.s_scale != 1.0, S_CAP=spec.s_cap > 0.0, FAST_MATH=not _interpreted(),
            num_warps=min(16, max(4, block_c // 256)),
        )
    return (loss.sum() if reduce else loss), gs
