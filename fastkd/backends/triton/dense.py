"""The dense kernel, one-pass and looping paths (``_kd_fwd_kernel``): see the package's docstring."""
# No `from __future__ import annotations`: Triton 3.0's interpreter spots constexpr parameters
# only by the annotation object, not by the string "tl.constexpr".

import triton
import triton.language as tl

from .helpers import (LOG2E, NEG_INF, _cap_constants, _inv_count, _jsd_terms, _lanes, _last_program_sum, _load,
                      _merge, _meter_flush, _meter_rows, _meter_zeros, _off, _rescale, _row_labels, _row_loss,
                      _row_max, _row_offsets, _row_sum, _row_terms, _rows, _store_grads, _thread_argmax,
                      _thread_max, _thread_sum, _tile, _transform, _weighted_gap)


@triton.jit
def _reread_tile(s_ptr, t_ptr, off_s, off_t, c0, row_ok, n_cols, m_s, m_t, k, s_scale, s_cap, s_kc, t_scale, t_cap,
                 t_kc, VECS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, HAS_CE: tl.constexpr,
                 TEMP_ONE: tl.constexpr, S_SCALE: tl.constexpr, S_CAP: tl.constexpr, T_SCALE: tl.constexpr,
                 T_CAP: tl.constexpr, FAST: tl.constexpr):
    """A tile of the looping path's later sweeps, the row maxima known: its columns and mask, the
    transformed logits x, y and their exponentials against the maxima (e_1 at T = 1 for the CE)."""
    cols, ok = _tile(c0, row_ok, n_cols, VECS, LANES, VEC, 0)
    x = _transform(_load(s_ptr, off_s, cols, ok), s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST)
    y = _transform(_load(t_ptr, off_t, cols, ok), t_scale, t_cap, t_kc, T_SCALE, T_CAP, FAST)
    e_s = tl.math.exp2(x * k - _rows(_off(m_s, k)))
    e_t = tl.math.exp2(y * k - _rows(_off(m_t, k)))
    e_1 = e_s
    if HAS_CE and not TEMP_ONE:
        e_1 = tl.math.exp2(x * LOG2E - _rows(_off(m_s, LOG2E)))
    return cols, ok, x, y, e_s, e_t, e_1




# --- statistics of a tile; the looping path keeps them per thread (one vector each) -------------

@triton.jit
def _online(m, z, x, k):
    """Merges a tile into running per-thread (max m, sum z of exp2((x - m) k)): one rescale per
    thread and tile, one exp2 per element. Returns the new (m, z), the tile's exp2 terms e and the
    rescale r of the old terms."""
    m_new = tl.maximum(m, _thread_max(x))
    r = _rescale(m, m_new, k)
    e = tl.math.exp2(x * k - _lanes(_off(m_new, k)))
    return m_new, z * r + _thread_sum(e), e, r


@triton.jit
def _online_t1(m, z_1, z_2, x):
    """Running per-thread sums of exp(x - m) and exp(2 (x - m)) at T = 1 against the running max m
    of the tempered statistics (updated by _online right after)."""
    m_new = tl.maximum(m, _thread_max(x))
    r = _rescale(m, m_new, LOG2E)
    e = tl.math.exp2(x * LOG2E - _lanes(_off(m_new, LOG2E)))
    return z_1 * r + _thread_sum(e), z_2 * r * r + _thread_sum(e * e)



@triton.jit
def _kd_fwd_kernel(
    # pointers
    s_ptr, t_ptr, labels_ptr, loss_ptr, gs_ptr, gt_ptr, row_count_ptr, edges_ptr,
    meter_s_ptr, meter_t_ptr, partial_ptr, counter_ptr, total_ptr,
    # shapes and strides (elements): row r of a (B, T, C) input is (r // n_inner, r % n_inner);
    # the gradients are contiguous (N, C)
    n_rows, n_cols, n_inner, stride_so, stride_si, stride_to, stride_ti, blocks_per_program,
    # scalars
    inv_temp, kd_scale, ce_scale, beta, ignore_index, inv_count,
    grad_unit,  # 0: gradients times the row scale; > 0: times grad_unit instead (fp16 gradients)
    s_scale, t_scale, s_cap, t_cap,  # logit transforms (read where S_SCALE, T_SCALE, S_CAP, T_CAP)
    # constants
    BLOCK_N: tl.constexpr, VECS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
    ONE_PASS: tl.constexpr,
    ROWS_3D: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    METER_S: tl.constexpr, METER_T: tl.constexpr, NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr,
    STUDENT_T1: tl.constexpr,  # statistics of s at T = 1 (cross-entropy or meter)
    TEMP_ONE: tl.constexpr,  # T == 1: those are the tempered ones
    THIRD_SWEEP: tl.constexpr,  # looping JSD with gradients: they need the divergence first
    REDUCE: tl.constexpr,  # also the scalar loss (sum of the scaled rows), in this launch
    N_COLS: tl.constexpr,  # C when compiled for it (short rows, one thread each), else 0
    FAST_MATH: tl.constexpr,  # per-row logs and reciprocals by lg2/rcp.approx (a GPU, not the interpreter)
    S_SCALE: tl.constexpr, T_SCALE: tl.constexpr,  # a logit scale != 1 (student, teacher)
    S_CAP: tl.constexpr, T_CAP: tl.constexpr,  # a softcap (student, teacher)
):
    # --- per program: blocks_per_program consecutive blocks of BLOCK_N rows; the per-program work
    # (scalars, the loss partial and its ticket, the meters' atomics) is shared by them ---
    if COUNT_ON_DEVICE:  # rows that count, summed on the device, or a caller's num_items
        inv_count = _inv_count(row_count_ptr)
    k = inv_temp * LOG2E  # exp((x - m) / T) = exp2(x k - m k)
    kd_g = kd_scale * inv_temp
    s_kc, s_nic2, t_kc, t_nic2 = _cap_constants(s_scale, s_cap, t_scale, t_cap, S_CAP, T_CAP)
    loss_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    if METER_S:
        meter_s = _meter_zeros(BLOCK_N, BINS_P2)
    if METER_T:
        meter_t = _meter_zeros(BLOCK_N, BINS_P2)
    for blk in range(0, blocks_per_program):
        # --- the program's rows: offsets, labels, scales (once per row) ---
        rows = (tl.program_id(0) * blocks_per_program + blk) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        off_s, off_t, off_g = _row_offsets(rows, n_cols, n_inner, stride_so, stride_si, stride_to, stride_ti,
                                           VEC, ROWS_3D)
        label, keep, bad, x_label, y_label, w, gw = _row_labels(
            labels_ptr, s_ptr, t_ptr, rows, row_ok, off_s, off_t, n_cols, ignore_index, inv_count, grad_unit,
            HAS_LABELS, METER_T)
        x_label = _transform(x_label, s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
        if METER_T:
            y_label = _transform(y_label, t_scale, t_cap, t_kc, T_SCALE, T_CAP, FAST_MATH)

        # --- row statistics: max, sum of exp, and (KL, reverse KL) the divergence's sum ---
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        z1_s = acc
        if ONE_PASS:  # the rows live in registers: read once, write once; exponentials reused
            cols, ok = _tile(0, row_ok, n_cols, VECS, LANES, VEC, N_COLS)
            x = _transform(_load(s_ptr, off_s, cols, ok), s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
            y = _transform(_load(t_ptr, off_t, cols, ok), t_scale, t_cap, t_kc, T_SCALE, T_CAP, FAST_MATH)
            m_s = _row_max(x)
            m_t = _row_max(y)
            e_s = tl.math.exp2(x * k - _rows(_off(m_s, k)))
            e_t = tl.math.exp2(y * k - _rows(_off(m_t, k)))
            if N_COLS > 0:  # padding columns known when compiling: their exponentials fold away
                e_s = tl.where(cols < N_COLS, e_s, 0.0)
                e_t = tl.where(cols < N_COLS, e_t, 0.0)
            z_s = _row_sum(e_s)
            z_t = _row_sum(e_t)
            if DIVERGENCE == 0:
                acc = _row_sum(_weighted_gap(e_t, y, x))
            elif DIVERGENCE == 1:
                acc = _row_sum(_weighted_gap(e_s, x, y))
            e_1 = e_s
            if STUDENT_T1:
                if not TEMP_ONE:
                    e_1 = tl.math.exp2(x * LOG2E - _rows(_off(m_s, LOG2E)))
                    if N_COLS > 0:
                        e_1 = tl.where(cols < N_COLS, e_1, 0.0)
                z1_s = _row_sum(e_1)
                if METER_S:
                    z2_s = _row_sum(e_1 * e_1)
                    arg_s = tl.min(_thread_argmax(x, _rows(m_s), cols), axis=1)
            if METER_T:
                e1_t = tl.math.exp2(y * LOG2E - _rows(_off(m_t, LOG2E)))
                if N_COLS > 0:
                    e1_t = tl.where(cols < N_COLS, e1_t, 0.0)
                z1_t = _row_sum(e1_t)
                z2_t = _row_sum(e1_t * e1_t)
                arg_t = tl.min(_thread_argmax(y, _rows(m_t), cols), axis=1)
        else:  # sweep 1 over tiles: running statistics per thread, merged per row at the end
            pm_s = tl.full([BLOCK_N, LANES], NEG_INF, tl.float32)
            pm_t = pm_s
            pz_s = tl.zeros([BLOCK_N, LANES], dtype=tl.float32)
            pz_t = pz_s
            pacc = pz_s
            pz1_s = pz_s
            pz2_s = pz_s
            pz1_t = pz_s
            pz2_t = pz_s
            parg_s = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
            parg_t = parg_s
            for c0 in range(0, n_cols, VECS * LANES * VEC):
                cols, ok = _tile(c0, row_ok, n_cols, VECS, LANES, VEC, 0)
                x = _transform(_load(s_ptr, off_s, cols, ok), s_scale, s_cap, s_kc, S_SCALE, S_CAP, FAST_MATH)
                y = _transform(_load(t_ptr, off_t, cols, ok), t_scale, t_cap, t_kc, T_SCALE, T_CAP, FAST_MATH)
                tm_s = _thread_max(x)
                tm_t = _thread_max(y)
                if METER_S:
                    targ = _thread_argmax(x, _lanes(tm_s), cols)
                    parg_s = tl.where(tm_s > pm_s, targ, parg_s)  # the first maximum wins
                if METER_T:
                    targ = _thread_argmax(y, _lanes(tm_t), cols)
                    parg_t = tl.where(tm_t > pm_t, targ, parg_t)
                if STUDENT_T1 and not TEMP_ONE:
                    pz1_s, pz2_s = _online_t1(pm_s, pz1_s, pz2_s, x)
                if METER_T:
                    pz1_t, pz2_t = _online_t1(pm_t, pz1_t, pz2_t, y)
                pm_s_new, pz_s, e_s, r_s = _online(pm_s, pz_s, x, k)
                pm_t, pz_t, e_t, r_t = _online(pm_t, pz_t, y, k)
                if STUDENT_T1 and TEMP_ONE:
                    pz1_s = pz_s
                    if METER_S:
                        pz2_s = pz2_s * r_s * r_s + _thread_sum(e_s * e_s)
                pm_s = pm_s_new
                if DIVERGENCE == 0:
                    pacc = pacc * r_t + _thread_sum(_weighted_gap(e_t, y, x))
                elif DIVERGENCE == 1:
                    pacc = pacc * r_s + _thread_sum(_weighted_gap(e_s, x, y))
            m_s, z_s, f_s = _merge(pm_s, pz_s, k)
            m_t, z_t, f_t = _merge(pm_t, pz_t, k)
            if DIVERGENCE == 0:
                acc = tl.sum(pacc * f_t, axis=1)
            elif DIVERGENCE == 1:
                acc = tl.sum(pacc * f_s, axis=1)
            if STUDENT_T1:
                if TEMP_ONE:
                    z1_s = z_s
                    f1_s = f_s
                else:
                    m1_s, z1_s, f1_s = _merge(pm_s, pz1_s, LOG2E)
                if METER_S:
                    z2_s = tl.sum(pz2_s * f1_s * f1_s, axis=1)
                    arg_s = tl.min(tl.where(pm_s == m_s[:, None], parg_s, 2147483647), axis=1)
            if METER_T:
                m1_t, z1_t, f1_t = _merge(pm_t, pz1_t, LOG2E)
                z2_t = tl.sum(pz2_t * f1_t * f1_t, axis=1)
                arg_t = tl.min(tl.where(pm_t == m_t[:, None], parg_t, 2147483647), axis=1)

        # --- per row: log-sum-exps, the divergence (KL, reverse KL), gradient coefficients ---
        rz_s, rz_t, a0, b0, d_s, d_t, shift, c_s, c_t, c_1, c_label, lse_1 = _row_terms(
            m_s, z_s, m_t, z_t, acc, z1_s, gw, k, inv_temp, kd_g, ce_scale, DIVERGENCE, STUDENT_T1, FAST_MATH)

        # --- the gradients (and JSD's divergence, which needs the log-sum-exps first) ---
        if ONE_PASS:
            if DIVERGENCE == 2:
                ps, pt, ref_s, ref_t = _jsd_terms(x, y, e_s, e_t, a0, b0, rz_s, rz_t, inv_temp, beta,
                                                  FAST_MATH)
                d_s = _row_sum(tl.where(ps > 0, ps * ref_s, 0.0))
                d_t = _row_sum(tl.where(pt > 0, pt * ref_t, 0.0))
            if GRAD_S or GRAD_T:
                _store_grads(gs_ptr, gt_ptr, off_g, cols, ok, keep, x, y, e_s, e_t, e_1, label, c_s, c_t,
                             c_1, c_label, shift, d_s, d_t, inv_temp, beta, rz_s, rz_t, a0, b0,
                             s_scale, t_scale, s_nic2, t_nic2,
                             DIVERGENCE, HAS_CE, GRAD_S, GRAD_T, FAST_MATH,
                             S_SCALE, T_SCALE, S_CAP, T_CAP)
        elif DIVERGENCE == 2 or GRAD_S or GRAD_T:
            # sweep 2: JSD's divergence, and the gradients unless they wait for it (THIRD_SWEEP)
            for c0 in range(0, n_cols, VECS * LANES * VEC):
                cols, ok, x, y, e_s, e_t, e_1 = _reread_tile(
                    s_ptr, t_ptr, off_s, off_t, c0, row_ok, n_cols, m_s, m_t, k, s_scale, s_cap, s_kc, t_scale, t_cap,
                    t_kc, VECS, LANES, VEC, HAS_CE, TEMP_ONE, S_SCALE, S_CAP, T_SCALE, T_CAP, FAST_MATH)
                if DIVERGENCE == 2:
                    ps, pt, ref_s, ref_t = _jsd_terms(x, y, e_s, e_t, a0, b0, rz_s, rz_t, inv_temp, beta,
                                                           FAST_MATH)
                    d_s += _row_sum(tl.where(ps > 0, ps * ref_s, 0.0))
                    d_t += _row_sum(tl.where(pt > 0, pt * ref_t, 0.0))
                if not THIRD_SWEEP and (GRAD_S or GRAD_T):
                    _store_grads(gs_ptr, gt_ptr, off_g, cols, ok, keep, x, y, e_s, e_t, e_1, label, c_s,
                                 c_t, c_1, c_label, shift, d_s, d_t, inv_temp, beta, rz_s, rz_t, a0, b0,
                                 s_scale, t_scale, s_nic2, t_nic2,
                                 DIVERGENCE, HAS_CE, GRAD_S, GRAD_T, FAST_MATH,
                                 S_SCALE, T_SCALE, S_CAP, T_CAP)
            if THIRD_SWEEP:  # sweep 3: JSD's gradients
                for c0 in range(0, n_cols, VECS * LANES * VEC):
                    cols, ok, x, y, e_s, e_t, e_1 = _reread_tile(
                        s_ptr, t_ptr, off_s, off_t, c0, row_ok, n_cols, m_s, m_t, k, s_scale, s_cap, s_kc, t_scale,
                        t_cap, t_kc, VECS, LANES, VEC, HAS_CE, TEMP_ONE, S_SCALE, S_CAP, T_SCALE, T_CAP, FAST_MATH)
                    _store_grads(gs_ptr, gt_ptr, off_g, cols, ok, keep, x, y, e_s, e_t, e_1, label, c_s,
                                 c_t, c_1, c_label, shift, d_s, d_t, inv_temp, beta, rz_s, rz_t, a0, b0,
                                 s_scale, t_scale, s_nic2, t_nic2,
                                 DIVERGENCE, HAS_CE, GRAD_S, GRAD_T, FAST_MATH,
                                 S_SCALE, T_SCALE, S_CAP, T_CAP)

        # --- the loss of each row, its sum, the calibration statistics ---
        loss = _row_loss(d_s, d_t, lse_1, x_label, keep, w, kd_scale, ce_scale, beta, DIVERGENCE, HAS_CE)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        loss_sum += loss
        if METER_S:
            meter_s = _meter_rows(meter_s, edges_ptr, keep, m_s, z1_s, z2_s, arg_s, x_label, label,
                                  NUM_BINS, BINS_P2, FAST_MATH)
        if METER_T:
            meter_t = _meter_rows(meter_t, edges_ptr, keep, m_t, z1_t, z2_t, arg_t, y_label, label,
                                  NUM_BINS, BINS_P2, FAST_MATH)

    if REDUCE:
        _last_program_sum(partial_ptr, counter_ptr, total_ptr, tl.sum(loss_sum, axis=0), 512)
    if METER_S:
        _meter_flush(meter_s_ptr, meter_s, NUM_BINS, BINS_P2)
    if METER_T:
        _meter_flush(meter_t_ptr, meter_t, NUM_BINS, BINS_P2)
