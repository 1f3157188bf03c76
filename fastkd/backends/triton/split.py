"""The split-row kernel (``_kd_split_kernel``): a long row kept on chip over several programs."""
# No `from __future__ import annotations`: Triton 3.0's interpreter spots constexpr parameters
# only by the annotation object, not by the string "tl.constexpr".

import triton
import triton.language as tl

from .helpers import (LOG2E, NEG_INF, PACK_ROWS, _cap_constants, _inv_count, _last_program_sum, _load, _merge,
                      _meter_flush, _meter_rows, _meter_zeros, _off, _rescale, _row_labels, _row_loss, _row_max,
                      _row_offsets, _row_sum, _row_terms, _rows, _store_grads, _thread_argmax, _tile, _transform,
                      _weighted_gap)

NSTAT = tl.constexpr(8)  # split path, per part: max, sum-exp of s, of t, KL's sum, T = 1 sums, argmax


@triton.jit
def _split_stat(stats_ptr, slot, parts, PARTS: tl.constexpr, J: tl.constexpr, other):
    """Statistic J of every part of a row ([1, PARTS_P2]; masked parts read ``other``)."""
    return tl.load(stats_ptr + (slot[:, None] * PARTS + parts[None, :]) * NSTAT + J, mask=parts[None, :] < PARTS,
                   other=other, cache_modifier=".cg")


@triton.jit
def _kd_split_kernel(
    # pointers
    s_ptr, t_ptr, labels_ptr, loss_ptr, gs_ptr, gt_ptr, row_count_ptr, edges_ptr, meter_s_ptr,
    partial_ptr, counter_ptr, total_ptr,
    stats_ptr,  # the parts' statistics: [slots, PARTS, NSTAT] fp32
    arrive_ptr,  # per group of PARTS programs, arrivals (int32, zero at launch)
    # shapes and strides (elements), as _kd_fwd_kernel; groups of PARTS programs take rows in turn
    n_rows, n_cols, n_inner, stride_so, stride_si, stride_to, stride_ti, n_groups, rows_per_group,
    # scalars
    inv_temp, kd_scale, ce_scale, beta, ignore_index, inv_count, grad_unit,
    s_scale, t_scale, s_cap, t_cap,  # logit transforms (read where S_SCALE, T_SCALE, S_CAP, T_CAP)
    # constants
    PARTS: tl.constexpr, PARTS_P2: tl.constexpr, VECS: tl.constexpr, LANES: tl.constexpr,
    VEC: tl.constexpr, ROWS_3D: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    METER_S: tl.constexpr, NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr, STUDENT_T1: tl.constexpr,
    TEMP_ONE: tl.constexpr, REDUCE: tl.constexpr, FAST_MATH: tl.constexpr,
    S_SCALE: tl.constexpr, T_SCALE: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    PHASE: tl.constexpr,  # 0: the whole path in one (cooperative) launch; 1, 2: its halves, in two
):
    """Long rows kept on chip: a row is split over PARTS programs, each holding its chunk of s and t
    in registers. Each writes its chunk's statistics, waits for the row's other parts (arrivals
    counted in global memory; a cooperative launch keeps them all resident), merges the PARTS
    statistics in part order (deterministic, the same in every part) and writes its chunk's
    gradient from registers: s and t read once, the gradient written once (3 N C bytes). KL and
    reverse KL (their divergence is a sum over the row); PHASE 1 / 2 split the path at the wait
    into two launches (the interpreter, which runs programs one after another), re-reading the
    chunk in the second."""
    group = tl.program_id(0) // PARTS
    part = tl.program_id(0) % PARTS
    c0 = part * (VECS * LANES * VEC)
    if COUNT_ON_DEVICE:
        inv_count = _inv_count(row_count_ptr)
    k = inv_temp * LOG2E
    kd_g = kd_scale * inv_temp
    s_kc, s_nic2, t_kc, t_nic2 = _cap_constants(s_scale, s_cap, t_scale, t_cap, S_CAP, T_CAP)
    parts = tl.arange(0, PARTS_P2)
    loss_sum = tl.zeros([1], dtype=tl.float32)
    if METER_S:
        meter_s = _meter_zeros(1, BINS_P2)
    for it in range(0, rows_per_group):
        rows = group + it * n_groups + tl.arange(0, 1)
        row_ok = rows < n_rows
        off_s, off_t, off_g = _row_offsets(rows, n_cols, n_inner, stride_so, stride_si, stride_to, stride_ti,
                                           VEC, ROWS_3D)
        label, keep, bad, x_label, y_label, w, gw = _row_labels(
            labels_ptr, s_ptr, t_ptr, rows, row_ok, off_s, off_t, n_cols, ignore_index, inv_count, grad_unit,
            HAS_LABELS, False)
        x_label = _transform(x_label, s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
        cols, ok = _tile(c0, row_ok, n_cols, VECS, LANES, VEC, 0)
        x = _transform(_load(s_ptr, off_s, cols, ok), s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
        y = _transform(_load(t_ptr, off_t, cols, ok), t_scale, t_cap, t_kc, T_SCALE, T_CAP, FAST_MATH)
        # the slot of this row's statistics: two per group, alternating (a part may write the next
        # row's while another still reads this one's); one per row when split in two launches
        if PHASE > 0:
            slot = rows
        else:
            slot = group * 2 + it % 2 + tl.zeros([1], dtype=tl.int32)

        # --- this chunk's exponentials, against the chunk's max: kept for the gradient ---
        mc_s = _row_max(x)
        mc_t = _row_max(y)
        e_s = tl.math.exp2(x * k - _rows(_off(mc_s, k)))
        e_t = tl.math.exp2(y * k - _rows(_off(mc_t, k)))
        e_1 = e_s  # at T = 1
        if STUDENT_T1 and not TEMP_ONE:
            e_1 = tl.math.exp2(x * LOG2E - _rows(_off(mc_s, LOG2E)))
        if PHASE != 2:  # --- this chunk's statistics, published ---
            if DIVERGENCE == 0:
                acc = _row_sum(_weighted_gap(e_t, y, x))
            else:
                acc = _row_sum(_weighted_gap(e_s, x, y))
            z1 = tl.zeros([1], dtype=tl.float32)
            z2 = z1
            arg = z1
            if STUDENT_T1:
                z1 = _row_sum(e_1)
                if METER_S:
                    z2 = _row_sum(e_1 * e_1)
                    arg = tl.min(_thread_argmax(x, _rows(mc_s), cols), axis=1).to(tl.float32)
            at = stats_ptr + (slot * PARTS + part) * NSTAT
            tl.store(at, mc_s)
            tl.store(at + 1, _row_sum(e_s))
            tl.store(at + 2, mc_t)
            tl.store(at + 3, _row_sum(e_t))
            tl.store(at + 4, acc)
            tl.store(at + 5, z1)
            tl.store(at + 6, z2)
            tl.store(at + 7, arg)
        if PHASE == 0:  # --- wait for the row's other parts ---
            tl.debug_barrier()  # this program's statistics are written before it arrives (release)
            tl.atomic_add(arrive_ptr + group, 1, sem="release")
            seen = tl.atomic_add(arrive_ptr + group, 0, sem="acquire")
            while seen < PARTS * (it + 1):
                seen = tl.atomic_add(arrive_ptr + group, 0, sem="acquire")
            tl.debug_barrier()  # every thread reads the statistics after they arrived (acquire)
        if PHASE != 1:  # --- the row's statistics, merged in part order; this chunk's gradient ---
            pm_s = _split_stat(stats_ptr, slot, parts, PARTS, 0, NEG_INF)
            pm_t = _split_stat(stats_ptr, slot, parts, PARTS, 2, NEG_INF)
            m_s, z_s, f_s = _merge(pm_s, _split_stat(stats_ptr, slot, parts, PARTS, 1, 0.0), k)
            m_t, z_t, f_t = _merge(pm_t, _split_stat(stats_ptr, slot, parts, PARTS, 3, 0.0), k)
            if DIVERGENCE == 0:  # KL's sum is weighted by the teacher's exponentials
                acc = tl.sum(_split_stat(stats_ptr, slot, parts, PARTS, 4, 0.0) * f_t, axis=1)
            else:
                acc = tl.sum(_split_stat(stats_ptr, slot, parts, PARTS, 4, 0.0) * f_s, axis=1)
            z1_s = z_s
            if STUDENT_T1 and not TEMP_ONE:
                m1, z1_s, f1 = _merge(pm_s, _split_stat(stats_ptr, slot, parts, PARTS, 5, 0.0), LOG2E)
            rz_s, rz_t, a0, b0, d_s, d_t, shift, c_s, c_t, c_1, c_label, lse_1 = _row_terms(
                m_s, z_s, m_t, z_t, acc, z1_s, gw, k, inv_temp, kd_g, ce_scale, DIVERGENCE, STUDENT_T1, FAST_MATH)
            if GRAD_S or GRAD_T:  # the chunk's exponentials, rescaled through the coefficients
                fc_s = _rescale(mc_s, m_s, k)
                fc_t = _rescale(mc_t, m_t, k)
                c_1 = c_1 * _rescale(mc_s, m_s, LOG2E)
                if tl.sum(keep.to(tl.int32), axis=0) > 0:  # the row is one for the whole program
                    _store_grads(gs_ptr, gt_ptr, off_g, cols, ok, keep, x, y, e_s, e_t, e_1, label, c_s * fc_s,
                                 c_t * fc_t, c_1, c_label, shift, d_s, d_t, inv_temp, beta, rz_s, rz_t, a0, b0,
                                 s_scale, t_scale, s_nic2, t_nic2,
                                 DIVERGENCE, HAS_CE, GRAD_S, GRAD_T, FAST_MATH,
                                 S_SCALE, T_SCALE, S_CAP, T_CAP, False)
                else:  # an ignored row: zeros
                    zero = tl.zeros(x.shape, dtype=tl.float32)
                    _store_grads(gs_ptr, gt_ptr, off_g, cols, ok, keep, zero, zero, zero, zero, zero, label,
                                 c_s * 0.0, c_t * 0.0, c_1 * 0.0, c_label * 0.0, shift * 0.0, d_s, d_t, inv_temp,
                                 beta, rz_s, rz_t, a0, b0, s_scale, t_scale, s_nic2, t_nic2,
                                 DIVERGENCE, False, GRAD_S, GRAD_T, FAST_MATH, False, False, False, False, False)
            if part == 0:  # one part per row: its loss and calibration statistics
                loss = _row_loss(d_s, d_t, lse_1, x_label, keep, w, kd_scale, ce_scale, beta, DIVERGENCE,
                                 HAS_CE)
                tl.store(loss_ptr + rows, loss, mask=row_ok)
                loss_sum += loss
                if METER_S:
                    f1_s = f_s
                    if not TEMP_ONE:
                        f1_s = f1
                    z2_s = tl.sum(_split_stat(stats_ptr, slot, parts, PARTS, 6, 0.0) * f1_s * f1_s, axis=1)
                    parg = _split_stat(stats_ptr, slot, parts, PARTS, 7, 0.0)
                    arg_s = tl.min(tl.where(pm_s == m_s[:, None], parg, 3.0e38), axis=1).to(tl.int32)
                    meter_s = _meter_rows(meter_s, edges_ptr, keep, m_s, z1_s, z2_s, arg_s, x_label, label,
                                          NUM_BINS, BINS_P2, FAST_MATH)
                    # a group takes any number of rows: flushed while its packed counts are exact
                    # (.value: the interpreter's loop index is a Python int, which has no % constexpr)
                    if it % PACK_ROWS.value == PACK_ROWS.value - 1:
                        _meter_flush(meter_s_ptr, meter_s, NUM_BINS, BINS_P2)
                        meter_s = _meter_zeros(1, BINS_P2)

    if PHASE != 1:
        if REDUCE:
            _last_program_sum(partial_ptr, counter_ptr, total_ptr, tl.sum(loss_sum, axis=0), 512)
        if METER_S:
            if part == 0:
                _meter_flush(meter_s_ptr, meter_s, NUM_BINS, BINS_P2)
