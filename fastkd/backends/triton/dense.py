"""The Triton backend: one fused kernel for the KD loss, its gradients and calibration statistics.

Imported lazily (only when the triton backend runs). Under ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors, which is how the test suite checks them without a GPU.

Per row, a = s/T and b = t/T: max and sum of exp of a and b (and of s at T = 1 for the
cross-entropy and the calibration statistics), the divergence, then the gradients, all from one
exp2 per element and tensor (exp((x - m) / T) = exp2(x k - m k), k = log2(e) / T, kept in
registers and reused). ``_plan`` picks the path of a call; traffic per path, N rows, C classes, b
bytes per logit (floor: read s, read t, write grad_s = 3 N C b; + N C b for grad_t; labels 8 and
the loss 4 bytes per row):

- one-pass (C <= ONE_PASS_MAX = 8192): rows in registers, read once, written once: the floor. A
  row is read by 1-64 threads (``LANES``), each holding ``VECS`` 16-byte vectors, so per-row work
  (reductions, logs, labels, meters) is done by few threads; short rows several per program.
- split-row (longer rows; KL or reverse KL with a gradient): a row split over PARTS programs that
  keep their chunks in registers and exchange per-chunk statistics through global memory inside
  one cooperative launch: the floor again (6 bytes per element in bf16).
- looping (the fallback: JSD, the teacher's meter, graph capture, no cooperative launch): sweep 1
  keeps running statistics per thread (and KL's or reverse KL's divergence), sweep 2 writes the
  gradients: 5 N C b; JSD with a gradient needs its divergence first, a third sweep: 7 N C b.
  Without gradients one sweep (KL, reverse KL) or two (JSD). With a meter a program takes several
  rows (one flush of its statistics for all of them).

Logit transforms (KDSpec.s_scale / s_cap, t_scale / t_cap; ``_transform``): every tile is transformed
as it is loaded, on every path, and so is the label's logit; the gradients take the chain rule (a
scale folded into per-row coefficients, a softcap's slope per element). Compiled in only where set
(S_SCALE, T_SCALE, S_CAP, T_CAP): the default compiles to the code it had without them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._core.spec import KDSpec, inv_count_on_host, meter_args

NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel may read must be a constexpr
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NSTAT = tl.constexpr(8)  # split path, per part: max, sum-exp of s, of t, KL's sum, T = 1 sums, argmax
# A program's meter counts, per bin count + PACK * correct in one fp32: exact while a program has
# added at most PACK_ROWS rows since its last flush (PACK_ROWS (PACK + 1) < 2^24, and count < PACK
# so that correct = floor(packed / PACK)). Plans keep a program's rows within it; the split path,
# whose groups take any number of rows, flushes every PACK_ROWS rows.
PACK_ROWS = tl.constexpr(4095)
PACK = tl.constexpr(4096.0)
# Defaults, chosen from the compiler's register counts and SASS on sm_90 (no spills; the issue
# time below the memory time by the static model of bench/RESULTS.md), not from timings: measured
# configurations per card (bench/tune_triton.py) take precedence. Longest row kept in registers
# (one pass) by element size; beyond it the split-row or the looping path runs.
ONE_PASS_MAX = {"light": {1: 8192, 2: 8192, 4: 8192}, "heavy": {1: 8192, 2: 8192, 4: 8192}}
LOOP_BLOCK_C = 4096  # columns per tile of the looping path
# elements of a row per thread (one-pass): short rows are read by one or a few threads each, so that
# per-row work (reductions, logs, labels, meters) is done by few threads; heavy variants keep more
# tensors live per element
ELEMENTS_PER_THREAD = {"light": 16, "heavy": 8}
# one program reads several blocks of rows when a block is small (short rows), so that its fixed
# work (the loss partial and ticket, the meters' atomics) is shared: up to this many elements of
# a row per thread, while at least MIN_PROGRAMS programs remain
PROGRAM_ELEMENTS_PER_THREAD = 64
MIN_PROGRAMS = 1024
# The looping path with a meter: a long row is work enough for a program, but each program's flush
# is ~50 float64 atomics onto the same few cache lines; a program takes several rows while at least
# this many programs remain (several waves on 132 SMs, so that the last one stays short)
LOOP_METER_PROGRAMS = 2048
# Rows beyond one pass: split over several programs that keep their chunks in registers and
# exchange per-chunk statistics (3 N C bytes instead of 5), where a cooperative launch keeps the
# programs of a row resident together; else the looping path. SPLIT_INTERPRETED: also under the
# interpreter, as two launches (tests).
SPLIT_ROWS = True
SPLIT_INTERPRETED = False
SPLIT_STATIC = False  # static models (CPU tensors, no interpreter) see the looping path unless set
SPLIT_WARPS = 4
SPLIT_VECS = 4  # vectors of 16 bytes per thread and row: 4096 bf16 columns per program
SPLIT_PROGRAMS_PER_SM = 4  # at most; the launch takes what the compiled kernel's registers allow
SPLIT_MAX_PARTS = 64


# --- tiles: [VECS, BLOCK_N, LANES, VEC]: a row is read by LANES threads, each holding VECS vectors
# of VEC elements (16 bytes where alignment allows). One load instruction reads LANES consecutive
# vectors of each of its rows (coalesced); all reductions but the last (over LANES) stay inside a
# thread, so per-row work is done by LANES threads, not by every thread of a wide tile. ---------

@triton.jit
def _tile(c0, row_ok, n_cols, VECS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
          N_COLS: tl.constexpr):
    """Column indices [VECS, 1, LANES, VEC] of the tile starting at column c0, and its mask: per
    vector (C is a multiple of VEC), so that loads and stores stay vectorised. With N_COLS (C
    known when compiling; one thread per row) the padding columns are known too: no code for them."""
    vecs = tl.arange(0, VECS)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    cols = c0 + vecs[:, None, :, None] * VEC + tl.arange(0, VEC)[None, None, None, :]
    if N_COLS > 0:
        n_cols = N_COLS
    ok = row_ok[None, :, None, None] & ((c0 // VEC + vecs) < n_cols // VEC)[:, None, :, None]
    return cols, ok


@triton.jit
def _load(ptr, off, cols, ok):
    """A tile of logits as fp32; masked elements read as -inf (zero mass)."""
    return tl.load(ptr + off[None, :, None, None] + cols, mask=ok, other=NEG_INF).to(tl.float32)


@triton.jit
def _rows(v):
    """A per-row vector broadcast against a tile."""
    return v[None, :, None, None]


@triton.jit
def _lanes(v):
    """A per-thread [BLOCK_N, LANES] value broadcast against a tile."""
    return v[None, :, :, None]


@triton.jit
def _thread_sum(x):
    return tl.sum(tl.sum(x, axis=3), axis=0)


@triton.jit
def _thread_max(x):
    return tl.max(tl.max(x, axis=3), axis=0)


@triton.jit
def _row_sum(x):
    return tl.sum(_thread_sum(x), axis=1)


@triton.jit
def _row_max(x):
    return tl.max(_thread_max(x), axis=1)


@triton.jit
def _thread_argmax(x, m, cols):
    """Per thread, the first column where x reaches m (broadcast as a tile): torch.argmax's rule."""
    return tl.min(tl.min(tl.where(x == m, cols, 2147483647), axis=3), axis=0).to(tl.int32)


@triton.jit
def _weighted_gap(e, a, b):
    """e (a - b) with 0 where e = 0 (a = -inf; also b = -inf): a - b clamped at -FLT_MAX ignoring NaN
    (one FMNMX); a NaN row is NaN through its sum of exponentials anyway."""
    return e * tl.maximum(a - b, -3.4028234663852886e38, propagate_nan=tl.PropagateNan.NONE)


@triton.jit
def _safe(m):
    """A row's max where it is finite; 0 for a row of -inf so that exp2(x - m) stays 0."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _off(m, k):
    """The exponent offset of a max m: exponentials are exp2(x k - _off(m, k)) (one FFMA, whose
    product is not rounded, so the top term is not exactly 1). Log-sum-exps, confidences and rescales
    are written against this same rounded offset, never against m k, so they stay consistent with
    the sums however large the logits."""
    return _safe(m) * k


@triton.jit
def _rescale(m_from, m_to, k):
    """exp2(_off(m_from) - _off(m_to)): moves sums from one offset to another; 0 from a max of -inf
    (an empty sum, which a huge factor would turn into NaN)."""
    return tl.where(m_from == NEG_INF, 0.0, tl.math.exp2(_off(m_from, k) - _off(m_to, k)))


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 of per-row sums (>= 1 for a row with a finite max); lg2.approx on a GPU."""
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _log(x, FAST: tl.constexpr):
    return _log2(x, FAST) * LN2


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_dividef(1.0, x)
    else:
        return 1.0 / x


# --- per-model logit transforms (KDSpec.s_scale, s_cap, t_scale, t_cap), before the temperature;
# constexpr-gated: without them the kernels compile to the code they had before --------------------

@triton.jit
def _transform(x, scale, cap, kc, SCALE: tl.constexpr, CAP: tl.constexpr, FAST: tl.constexpr):
    """A model's logits as it outputs them: cap tanh(scale x / cap) with a softcap (CAP), else
    scale x (SCALE); -inf stays -inf (padding columns and masked classes keep no mass). tanh(v) =
    1 - 2 / (exp(2 v) + 1) with kc = 2 log2(e) scale / cap: one exp2 (ex2.approx) and one reciprocal
    (rcp.approx on a GPU) per element, |error| a few ulp of cap; +inf -> cap, NaN -> NaN. Written so
    rather than with libdevice's tanh (the same two MUFU operations plus a polynomial branch for small
    arguments: 16 more SASS instructions per element on sm_90) or tanh.approx (one MUFU, but relative
    error 2^-11: 0.015 on a logit near cap = 30); exp2 and the reciprocal run the same under the
    interpreter and on triton 3.x."""
    if CAP:
        r = _rcp(tl.math.exp2(x * kc) + 1.0, FAST)
        x = tl.where(x == NEG_INF, x, cap - (cap + cap) * r)
    elif SCALE:
        x = x * scale
    return x


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


@triton.jit
def _cap_constants(s_scale, s_cap, t_scale, t_cap, S_CAP: tl.constexpr, T_CAP: tl.constexpr):
    """Per program: (kc, -1 / cap^2) of each model's softcap (stand-ins where there is none)."""
    s_kc = s_scale
    s_nic2 = s_scale
    t_kc = t_scale
    t_nic2 = t_scale
    if S_CAP:
        s_kc = s_scale * (2.0 * LOG2E) / s_cap
        s_nic2 = -1.0 / (s_cap * s_cap)
    if T_CAP:
        t_kc = t_scale * (2.0 * LOG2E) / t_cap
        t_nic2 = -1.0 / (t_cap * t_cap)
    return s_kc, s_nic2, t_kc, t_nic2


@triton.jit
def _cap_slope(z, nic2):
    """d z' / d (scale x) of a softcap from its output z': 1 - tanh^2 = 1 - z'^2 / cap^2 (nic2 =
    -1 / cap^2), clamped at 0: 0 at z' = -inf (a masked class) and at z' = cap (+inf)."""
    return tl.maximum(1.0 + (z * nic2) * z, 0.0)


@triton.jit
def _times(c, v, ON: tl.constexpr):
    """c * v where ON (a per-row coefficient times a logit scale), else c."""
    if ON:
        c = c * v
    return c


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
def _merge(m, z, k):
    """Per-thread (max, sum) of a row -> the row's (max, sum); also the per-thread rescale."""
    m_row = tl.max(m, axis=1)
    f = _rescale(m, m_row[:, None], k)
    return m_row, tl.sum(z * f, axis=1), f


# --- per element: divergence terms and gradients -----------------------------------------------

@triton.jit
def _jsd_terms(x, y, e_s, e_t, a0, b0, rz_s, rz_t, inv_temp, beta, FAST: tl.constexpr):
    """JSD against M = beta p_t + (1 - beta) p_s: p_s, p_t, log p - log M (a0, b0: the rows'
    log-sum-exps of s/T and t/T). On a GPU log M by lg2.approx (absolute error ~1e-7), with M
    kept >= the smallest normal float, where the approximation flushes to -inf."""
    ps = e_s * _rows(rz_s)
    pt = e_t * _rows(rz_t)
    mix = beta * pt + (1.0 - beta) * ps
    if FAST:
        lm = libdevice.fast_log2f(tl.maximum(mix, 1.1754943508222875e-38)) * LN2
    else:
        lm = tl.log(mix)
    ref_s = x * inv_temp - _rows(a0) - lm
    ref_t = y * inv_temp - _rows(b0) - lm
    return ps, pt, ref_s, ref_t


@triton.jit
def _store_grads(gs_ptr, gt_ptr, off_g, cols, ok, keep, x, y, e_s, e_t, e_1, label, c_s, c_t, c_1,
                 c_label, shift, d_s, d_t, inv_temp, beta, rz_s, rz_t, a0, b0, s_scale, t_scale, s_nic2, t_nic2,
                 DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, GRAD_S: tl.constexpr,
                 GRAD_T: tl.constexpr, FAST: tl.constexpr, S_SCALE: tl.constexpr, T_SCALE: tl.constexpr,
                 S_CAP: tl.constexpr, T_CAP: tl.constexpr, MASK_IGNORED: tl.constexpr = True):
    """d loss / d logits of a tile from the exponentials already computed (e = exp2 of the
    tempered logits minus the row max), with the row scale folded into per-row coefficients
    c_* = gw * kd_scale / T / z_* (gw: row scale, or grad_unit for fp16 gradients; 0 for ignored
    rows, NaN for out-of-range labels). shift: the per-row constant of the log-ratio. x, y: the
    transformed logits; the chain rule back to the raw ones: a logit scale folds into the per-row
    coefficients of its model's gradient (S_SCALE, T_SCALE), a softcap's slope (1 - (z'/cap)^2)
    multiplies per element (S_CAP, T_CAP)."""
    a_s = _times(c_s, s_scale, S_SCALE)  # coefficients of the student's gradient
    a_t = _times(c_t, s_scale, S_SCALE)
    b_s = _times(c_s, t_scale, T_SCALE)  # of the teacher's
    b_t = _times(c_t, t_scale, T_SCALE)
    if DIVERGENCE == 0:  # KL(p_t || p_s): ga = p_s - p_t, gb = p_t (log p_t - log p_s - D)
        ga = e_s * _rows(a_s) - e_t * _rows(a_t)
        if GRAD_T:
            gb = tl.where(e_t > 0, e_t * _rows(b_t) * ((y - x) * inv_temp - _rows(shift)), 0.0)
    elif DIVERGENCE == 1:  # KL(p_s || p_t): ga = p_s (log p_s - log p_t - D), gb = p_t - p_s
        ga = tl.where(e_s > 0, e_s * _rows(a_s) * ((x - y) * inv_temp - _rows(shift)), 0.0)
        if GRAD_T:
            gb = e_t * _rows(b_t) - e_s * _rows(b_s)
    else:
        ps, pt, ref_s, ref_t = _jsd_terms(x, y, e_s, e_t, a0, b0, rz_s, rz_t, inv_temp, beta, FAST)
        ga = (1.0 - beta) * tl.where(ps > 0, ps * (ref_s - _rows(d_s)), 0.0) * _rows(a_s / rz_s)
        if GRAD_T:
            gb = beta * tl.where(pt > 0, pt * (ref_t - _rows(d_t)), 0.0) * _rows(b_t / rz_t)
    keep = _rows(keep)
    if GRAD_S:
        if HAS_CE:  # + ce_scale (softmax(s) - onehot(label)) at T = 1
            ga += e_1 * _rows(_times(c_1, s_scale, S_SCALE)) - tl.where(
                cols == _rows(label), _rows(_times(c_label, s_scale, S_SCALE)), 0.0)
        if S_CAP:
            ga = ga * _cap_slope(x, s_nic2)
        if MASK_IGNORED:  # ignored rows: 0, even where their logits are not finite
            ga = tl.where(keep, ga, 0.0)
        tl.store(gs_ptr + _rows(off_g) + cols, ga.to(gs_ptr.dtype.element_ty), mask=ok)
    if GRAD_T:
        if T_CAP:
            gb = gb * _cap_slope(y, t_nic2)
        if MASK_IGNORED:
            gb = tl.where(keep, gb, 0.0)
        tl.store(gt_ptr + _rows(off_g) + cols, gb.to(gt_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _meter_zeros(BLOCK_N: tl.constexpr, BINS_P2: tl.constexpr):
    """A program's calibration partials, reduced over row slots once (in _meter_flush): per row
    slot and bin, count + PACK * correct (both exact integers in fp32 up to PACK_ROWS rows between
    flushes) and the confidence sum; per row slot the NLL and Brier sums."""
    z = tl.zeros([BLOCK_N, BINS_P2], dtype=tl.float32)
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    return z, z, r, r


@triton.jit
def _meter_rows(acc, edges_ptr, keep, m, z_1, z_2, arg, x_label, label,
                NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr, FAST: tl.constexpr):
    """Adds a block of rows to a program's calibration partials. A row of all -inf or with NaN has
    a NaN confidence, lands in the last bin (as in CalibrationMeter.update) and counts as wrong;
    an out-of-range label (label -1, x_label NaN) counts as wrong with NaN NLL / Brier."""
    lse_1 = (_off(m, LOG2E) + _log2(z_1, FAST)) * LN2
    # the top class's term is exp2(m log2(e) - offset) (1 up to the offset's rounding); z_1 = 0 (all
    # -inf), inf or NaN: no confidence
    top = tl.math.exp2(m * LOG2E - _off(m, LOG2E))
    conf = tl.where((z_1 > 0) & (z_1 < float("inf")), top / z_1, float("nan"))
    correct = (arg == label) & (conf == conf)  # no confidence: no prediction
    nll = lse_1 - x_label
    brier = z_2 / (z_1 * z_1) - 2.0 * tl.exp(x_label - lse_1) + 1.0
    # bin = number of edges <= conf, minus 1 (torch.bucketize(right=True) on the same fp32 edges)
    b = tl.maximum(tl.minimum((conf * NUM_BINS).to(tl.int32), NUM_BINS), 0)
    b = tl.where(conf < tl.load(edges_ptr + b), b - 1, b)
    b = tl.where(conf >= tl.load(edges_ptr + b + 1), b + 1, b)
    b = tl.where(conf == conf, tl.maximum(tl.minimum(b, NUM_BINS), 0), NUM_BINS)
    b = tl.where(keep, b, BINS_P2)  # rows that do not count hit no bin
    hit = b[:, None] == tl.arange(0, BINS_P2)[None, :]
    counts, conf_sum, nll_sum, brier_sum = acc
    counts += hit.to(tl.float32) * tl.where(correct, 1.0 + PACK, 1.0)[:, None]
    conf_sum += tl.where(hit, conf[:, None], 0.0)  # a NaN confidence in its own bin only
    return counts, conf_sum, nll_sum + tl.where(keep, nll, 0.0), brier_sum + tl.where(keep, brier, 0.0)


@triton.jit
def _meter_flush(meter_ptr, acc, NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr):
    """A program's partials into the meter's float64 state: one relaxed atomic per bin and sum."""
    counts, conf_sum, nll_sum, brier_sum = acc
    packed = tl.sum(counts, axis=0)
    correct = tl.floor(packed / PACK)
    bins = tl.arange(0, BINS_P2)
    nb = NUM_BINS + 1
    in_range = bins < nb
    tl.atomic_add(meter_ptr + bins, (packed - PACK * correct).to(tl.float64), mask=in_range, sem="relaxed")
    tl.atomic_add(meter_ptr + nb + bins, tl.sum(conf_sum, axis=0).to(tl.float64), mask=in_range,
                  sem="relaxed")
    tl.atomic_add(meter_ptr + 2 * nb + bins, correct.to(tl.float64), mask=in_range, sem="relaxed")
    tl.atomic_add(meter_ptr + 3 * nb, tl.sum(nll_sum, axis=0).to(tl.float64), sem="relaxed")
    tl.atomic_add(meter_ptr + 3 * nb + 1, tl.sum(brier_sum, axis=0).to(tl.float64), sem="relaxed")


@triton.jit
def _last_program_sum(partial_ptr, counter_ptr, total_ptr, partial, BLOCK: tl.constexpr):
    """The sum of one partial per program, in the same launch and deterministic: every program
    stores its partial and takes a ticket (acq_rel atomic); the last to arrive adds the partials up
    in program order and resets the ticket counter for the next launch."""
    n = tl.num_programs(0)
    tl.store(partial_ptr + tl.program_id(0), partial)
    tl.debug_barrier()  # the partial is written before this program's ticket is taken (release)
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == n - 1:
        _sum_partials(partial_ptr, counter_ptr, total_ptr, n, BLOCK)


@triton.jit(noinline=True)
def _sum_partials(partial_ptr, counter_ptr, total_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg")
    tl.store(total_ptr, tl.sum(acc, axis=0))
    tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _inv_count(row_count_ptr):
    """1 / the count on the device (integer or floating), clamped at fp32's smallest normal number
    (one FMNMX, as the clamp at 1 was): a caller's num_items below 1 (TRL's num_items_in_batch /
    num_processes) is used as is; a count of 0 rows that count multiplies only zeros; NaN stays NaN
    (_core.spec.count_on_device does the same)."""
    c = tl.load(row_count_ptr).to(tl.float32)
    return 1.0 / tl.maximum(c, 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_offsets(rows, n_cols, n_inner, stride_so, stride_si, stride_to, stride_ti, VEC: tl.constexpr,
                 ROWS_3D: tl.constexpr):
    """Where rows start in s, t ((B, T, C) views: two strides each) and in the contiguous gradients."""
    if ROWS_3D:  # a (B, T, C) view read in place
        outer = (rows // n_inner).to(tl.int64)
        inner = (rows % n_inner).to(tl.int64)
        off_s = outer * stride_so + inner * stride_si
        off_t = outer * stride_to + inner * stride_ti
    else:
        off_s = rows.to(tl.int64) * stride_so
        off_t = rows.to(tl.int64) * stride_to
    # the launcher checked: strides and C are multiples of VEC
    return (tl.multiple_of(off_s, VEC), tl.multiple_of(off_t, VEC),
            tl.multiple_of(rows.to(tl.int64) * n_cols, VEC))


@triton.jit
def _row_labels(labels_ptr, s_ptr, t_ptr, rows, row_ok, off_s, off_t, n_cols, ignore_index, inv_count,
                grad_unit, HAS_LABELS: tl.constexpr, WITH_Y: tl.constexpr):
    """Per row: label (int32), keep (counts), bad (label outside [0, C): the row counts, reads
    nothing and is NaN; its label becomes -1, which no column and no argmax matches), the label's
    student (and with WITH_Y teacher) logit, and the scales of the loss (w) and the gradient (gw:
    the row scale, or grad_unit for fp16 gradients); 0 for ignored rows, NaN for bad ones."""
    x_label = tl.zeros(rows.shape, dtype=tl.float32)
    y_label = x_label
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        keep = row_ok & (label != ignore_index)
        bad = keep & ((label < 0) | (label >= n_cols))
        label = tl.where(bad, -1, tl.where(keep, label, 0)).to(tl.int32)
        at = tl.maximum(label, 0)
        x_label = tl.load(s_ptr + off_s + at, mask=keep & ~bad, other=0.0).to(tl.float32)
        x_label = tl.where(bad, float("nan"), x_label)
        if WITH_Y:
            y_label = tl.load(t_ptr + off_t + at, mask=keep & ~bad, other=0.0).to(tl.float32)
            y_label = tl.where(bad, float("nan"), y_label)
    else:
        label = tl.zeros(rows.shape, dtype=tl.int32)
        keep = row_ok
        bad = rows < 0  # none
    w = tl.where(keep, inv_count, 0.0)
    gw = tl.where(grad_unit > 0, tl.where(keep, grad_unit, 0.0), w)
    return (label, keep, bad, x_label, y_label, tl.where(bad, float("nan"), w),
            tl.where(bad, float("nan"), gw))


@triton.jit
def _row_terms(m_s, z_s, m_t, z_t, acc, z1_s, gw, k, inv_temp, kd_g, ce_scale, DIVERGENCE: tl.constexpr,
               STUDENT_T1: tl.constexpr, FAST: tl.constexpr):
    """Per row, from its statistics: 1 / sum-exps, log-sum-exps of s/T and t/T (a0, b0), the
    divergence (KL, reverse KL: from acc = sum e (y - x) or sum e (x - y); JSD's comes later), the
    log-ratio's per-row shift, the gradient coefficients (gw folded in) and CE's log-sum-exp."""
    rz_s = _rcp(z_s, FAST)
    rz_t = _rcp(z_t, FAST)
    a0 = (_off(m_s, k) + _log2(z_s, FAST)) * LN2  # against the offset the sums were taken at
    b0 = (_off(m_t, k) + _log2(z_t, FAST)) * LN2
    d_s = tl.zeros(m_s.shape, dtype=tl.float32)
    d_t = d_s
    shift = a0  # JSD: unused
    if DIVERGENCE == 0:
        d_t = acc * inv_temp * rz_t - (b0 - a0)
        shift = (b0 - a0) + d_t
    elif DIVERGENCE == 1:
        d_s = acc * inv_temp * rz_s - (a0 - b0)
        shift = (a0 - b0) + d_s
    c_1 = rz_s
    lse_1 = a0
    if STUDENT_T1:
        lse_1 = (_off(m_s, LOG2E) + _log2(z1_s, FAST)) * LN2
        c_1 = gw * ce_scale * _rcp(z1_s, FAST)
    return rz_s, rz_t, a0, b0, d_s, d_t, shift, gw * kd_g * rz_s, gw * kd_g * rz_t, c_1, gw * ce_scale, lse_1


@triton.jit
def _row_loss(d_s, d_t, lse_1, x_label, keep, w, kd_scale, ce_scale, beta, DIVERGENCE: tl.constexpr,
              HAS_CE: tl.constexpr):
    """kd_scale D + ce_scale CE, times the row scale; 0 for ignored rows."""
    if DIVERGENCE == 0:
        div = d_t
    elif DIVERGENCE == 1:
        div = d_s
    else:
        div = beta * d_t + (1.0 - beta) * d_s
    loss = kd_scale * div
    if HAS_CE:
        loss += ce_scale * (lse_1 - x_label)
    return tl.where(keep, loss * w, 0.0)


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


@triton.jit
def _scale_grad_kernel(grad_ptr, factor_ptr, n_rows, n_cols, FACTOR_PER_ROW: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """grad *= factor in place, in fp32, on a contiguous (N, C) gradient. One factor: flat blocks of
    BLOCK_R * BLOCK_C elements. A factor per row: tiles of BLOCK_R rows x BLOCK_C columns (grid:
    row tiles x column tiles), so it is read once per row, not found by a division per element.
    Where the factor is 1 (the usual loss.backward()) the masked loads and stores move no data: no
    host sync, no traffic."""
    if FACTOR_PER_ROW:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        f = tl.load(factor_ptr + rows, mask=rows < n_rows, other=1.0)
        todo = ((rows < n_rows) & (f != 1.0))[:, None] & (cols < n_cols)[None, :]
        offs = tl.multiple_of(rows.to(tl.int64) * n_cols, VEC)[:, None] + cols[None, :]
        f = f[:, None]
    else:
        offs = tl.program_id(0).to(tl.int64) * (BLOCK_R * BLOCK_C) + tl.arange(0, BLOCK_R * BLOCK_C)
        f = tl.load(factor_ptr) + tl.zeros([BLOCK_R * BLOCK_C], dtype=tl.float32)
        # tl.cast, not .to(): an integer argument equal to 1 (a one-row batch) arrives as a Python int
        todo = (offs < tl.cast(n_rows, tl.int64) * n_cols) & (f != 1.0)
    g = tl.load(grad_ptr + offs, mask=todo, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offs, (g * f).to(grad_ptr.dtype.element_ty), mask=todo)


SCALE_BLOCK = 4096  # elements per program of scale_grad


TUNED_CONFIGS = Path(__file__).with_name("triton_configs.json")  # written by bench/tune_triton.py


@functools.lru_cache(maxsize=None)
def _tuned_configs(device_name: str) -> dict:
    """Measured launch configurations for this card:
    {"<elem size>:<C rounded up to 2^k>:<light|heavy>": config}."""
    try:
        return json.loads(TUNED_CONFIGS.read_text()).get(device_name, {})
    except (OSError, ValueError):
        return {}


def _launch_config(n_cols: int, elem_size: int, device_name: str = "", heavy: bool = False):
    """(BLOCK_N, BLOCK_C, ONE_PASS, num_warps) for a row length and element size: the measured
    configuration for this card when bench/tune_triton.py has stored one, else the defaults. The
    threads of a program read BLOCK_N rows, 32 * num_warps / BLOCK_N threads per row."""
    variant = "heavy" if heavy else "light"
    tuned = _tuned_configs(device_name).get(f"{elem_size}:{triton.next_power_of_2(n_cols)}:{variant}")
    if tuned:
        return tuned["block_n"], tuned["block_c"], tuned["one_pass"], tuned["num_warps"]
    if n_cols <= ONE_PASS_MAX[variant].get(elem_size, 8192):
        block_c = triton.next_power_of_2(n_cols)
        lanes = max(1, block_c // ELEMENTS_PER_THREAD[variant])
        num_warps = 4 if lanes <= 32 else min(16, lanes // 8)
        return max(1, 32 * num_warps // lanes), block_c, True, num_warps
    return 1, LOOP_BLOCK_C, False, 8


def _tile_shape(block_n: int, block_c: int, num_warps: int, vec: int):
    """(VECS, LANES): threads per row and vectors per thread of a BLOCK_N x BLOCK_C tile."""
    vectors = max(1, block_c // vec)
    lanes = min(vectors, max(1, 32 * num_warps // block_n))
    return vectors // lanes, lanes


INPLACE_BACKWARD = True  # scale_grad reuses the saved gradient


_TICKETS: dict = {}  # one self-resetting ticket counter per (device, stream), outside graph capture


def _on(device):
    """Launches go to the tensors' device, whichever device is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _reduction_state(device):
    """(ticket counter, total) of the in-launch sum. Eagerly: the shared self-resetting counter of
    this (device, stream), no memset per call. Under CUDA-graph capture every launch owns its
    counter: all captures share one capture stream, and two graphs replayed at once on two streams
    would otherwise interleave tickets. Counter and total then live in one zeroed allocation that
    the returned total (a view of it) keeps alive, and the graph's memset re-zeroes it each replay."""
    if _capturing(device):
        state = torch.zeros(2, dtype=torch.int32, device=device)
        return state[:1], state[1:].view(torch.float32).view(())
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _TICKETS[key], torch.empty((), dtype=torch.float32, device=device)


def _vector_width(n_cols: int, strides, elem_size: int, addresses=()) -> int:
    """Elements per vector load: 16 bytes where C, every row stride and the base addresses allow it
    (the kernel tells the compiler about the strides; the addresses it learns from the launch)."""
    vec = 16 // elem_size
    while vec > 1 and (n_cols % vec or any(st % vec for st in strides)
                       or any(a % (vec * elem_size) for a in addresses)):
        vec //= 2
    return vec


def _row_strides(x):
    """(n_inner, outer stride, inner stride) of the rows of a (N, C) or (B, T, C) tensor: row r
    starts at (r // n_inner) * outer + (r % n_inner) * inner; n_inner = 1 when one stride serves."""
    if x.dim() == 2:
        return 1, x.stride(0), 0
    b, t_len = x.shape[0], x.shape[1]
    if t_len == 1:
        return 1, x.stride(0), 0
    if b == 1 or x.stride(0) == t_len * x.stride(1):
        return 1, x.stride(1), 0
    return t_len, x.stride(0), x.stride(1)


def _split_plan(n, c, spec: KDSpec, grad_s, grad_t, meter_t, size, strides, addresses, sms):
    """The split-row launch for rows too long for one pass, or None where it does not apply: KL or
    reverse KL with a gradient (without one, one sweep reads the row once anyway), no teacher
    meter, at most SPLIT_MAX_PARTS parts of SPLIT_VECS vectors per thread a row."""
    if not SPLIT_ROWS or spec.divergence == 2 or not (grad_s or grad_t) or meter_t:
        return None
    vec = _vector_width(c, strides, size, addresses)
    lanes = 32 * SPLIT_WARPS
    parts = triton.cdiv(c, SPLIT_VECS * lanes * vec)
    if parts > SPLIT_MAX_PARTS:
        return None
    groups = max(1, min(n, sms * SPLIT_PROGRAMS_PER_SM // parts))  # all resident at once
    chunk = SPLIT_VECS * lanes * vec
    rows_per_group = triton.cdiv(n, groups)
    return dict(path="split-row", kernel=_kd_split_kernel, programs=groups * parts, num_warps=SPLIT_WARPS,
                consts=dict(PARTS=parts, PARTS_P2=triton.next_power_of_2(parts), VECS=SPLIT_VECS, LANES=lanes,
                            VEC=vec),
                read_sweeps=1, trips=[1], tile_bytes=min(chunk, c) * 2 * size,
                meter_rows=min(rows_per_group, PACK_ROWS.value),  # the kernel flushes every PACK_ROWS rows
                ints=dict(n_groups=groups, rows_per_group=rows_per_group))


def _transform_consts(spec: KDSpec) -> dict:
    """The constexprs of the logit transforms: each compiled in only where set."""
    return dict(S_SCALE=spec.s_scale != 1.0, T_SCALE=spec.t_scale != 1.0, S_CAP=spec.s_cap > 0.0,
                T_CAP=spec.t_cap > 0.0)


def _plan(n, c, s_dtype, t_dtype, spec: KDSpec, grad_s, grad_t, has_labels, meter_s, meter_t, reduce,
          device_name="", rows=(1, None, 0, None, 0), fast_math=True, addresses=(), split_ok=True, sms=132):
    """The launch of one call: path ("one-pass", "split-row", "2-sweep", "3-sweep" or "1-sweep"),
    kernel, grid, warps and the kernel's constants; ``meter_rows``: the most rows a program adds to
    its packed meter counts between two flushes (at most PACK_ROWS). ``rows``: (n_inner, stride_so,
    stride_si, stride_to, stride_ti); None strides stand for C (contiguous rows). ``split_ok``: a
    split-row launch can run here (a cooperative launch on a GPU, or the interpreter's two launches)."""
    n_inner, so, si, to, ti = rows
    so = c if so is None else so
    to = c if to is None else to
    size = max(torch.empty((), dtype=s_dtype).element_size(), torch.empty((), dtype=t_dtype).element_size())
    heavy = grad_t or meter_t or spec.divergence == 2
    block_n, block_c, one_pass, num_warps = _launch_config(c, size, device_name, heavy)
    vec = min(_vector_width(c, (so, si, to, ti), size, addresses), block_c)
    vecs, lanes = _tile_shape(block_n, block_c, num_warps, vec)
    block_c = vecs * lanes * vec
    third = not one_pass and spec.divergence == 2 and (grad_s or grad_t)
    sweeps = 1 if one_pass else (3 if third else 2 if (grad_s or grad_t or spec.divergence == 2) else 1)
    consts = dict(
        BLOCK_N=block_n, VECS=vecs, LANES=lanes, VEC=vec, ONE_PASS=one_pass, ROWS_3D=n_inner > 1,
        DIVERGENCE=spec.divergence, HAS_LABELS=has_labels, HAS_CE=spec.has_ce,
        COUNT_ON_DEVICE=False, GRAD_S=grad_s, GRAD_T=grad_t, METER_S=meter_s, METER_T=meter_t,
        NUM_BINS=15, BINS_P2=16, STUDENT_T1=spec.has_ce or meter_s, TEMP_ONE=spec.inv_temperature == 1.0,
        THIRD_SWEEP=third, REDUCE=reduce, N_COLS=c if one_pass and lanes == 1 else 0, FAST_MATH=fast_math,
        **_transform_consts(spec))
    split = _split_plan(n, c, spec, grad_s, grad_t, meter_t, size, (so, si, to, ti), addresses, sms)
    if not one_pass and split_ok and split is not None:
        return dict(split, consts=dict(split["consts"], ROWS_3D=n_inner > 1, DIVERGENCE=spec.divergence,
                                       HAS_LABELS=has_labels, HAS_CE=spec.has_ce, COUNT_ON_DEVICE=False,
                                       GRAD_S=grad_s, GRAD_T=grad_t, METER_S=meter_s, NUM_BINS=15, BINS_P2=16,
                                       STUDENT_T1=spec.has_ce or meter_s,
                                       TEMP_ONE=spec.inv_temperature == 1.0, REDUCE=reduce,
                                       FAST_MATH=fast_math, PHASE=0, **_transform_consts(spec)),
                    ints=dict(split["ints"], n_rows=n, n_cols=c, n_inner=n_inner, stride_so=so, stride_si=si,
                              stride_to=to, stride_ti=ti))
    n_blocks = triton.cdiv(n, block_n)
    meters = meter_s or meter_t
    if one_pass:  # a meter's flush costs more: spread it over more rows, keeping MIN_PROGRAMS / 2 programs
        per_program = min(PROGRAM_ELEMENTS_PER_THREAD * (4 if meters else 1) // (vecs * vec),
                          n_blocks // (MIN_PROGRAMS // 2 if meters else MIN_PROGRAMS))
    else:
        per_program = n_blocks // LOOP_METER_PROGRAMS if meters else 1
    per_program = max(1, min(per_program, PACK_ROWS.value // block_n))  # the meters' packed counts
    path = "one-pass" if one_pass else f"{sweeps}-sweep"
    return dict(path=path, kernel=_kd_fwd_kernel, programs=triton.cdiv(n_blocks, per_program),
                num_warps=num_warps, consts=consts,
                read_sweeps=sweeps, trips=[] if one_pass else [triton.cdiv(c, block_c)] * sweeps,
                tile_bytes=block_n * min(block_c, c) * 2 * size, meter_rows=block_n * per_program,
                ints=dict(n_rows=n, n_cols=c, n_inner=n_inner, stride_so=so, stride_si=si, stride_to=to,
                          stride_ti=ti, blocks_per_program=per_program))


def kd_forward(s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
               reduce: bool = False):
    """Rows of logits, (N, C) or (B, T, C) with unit stride in C (read in place, e.g. ``x[:, :-1]``)
    -> (loss, grad_s | None, grad_t | None) in one launch. The loss is fp32, per row (N = B T,) or
    with ``reduce`` the sum of the rows; the gradients are fresh contiguous tensors of the logits'
    shapes. ``labels``: (N,) int64, contiguous."""
    if s.stride(-1) != 1 or t.stride(-1) != 1 or s.dim() not in (2, 3) or s.shape != t.shape:
        raise ValueError("kd_forward takes (N, C) or (B, T, C) logits of one shape with unit stride in C")
    c = s.shape[-1]
    n = s.numel() // c if c else 0
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    gs = torch.empty(s.shape, dtype=s.dtype, device=s.device) if grad_s else None
    gt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if grad_t else None
    if n == 0:
        return (loss.sum() if reduce else loss), gs, gt
    dummy = loss  # stands in for absent optional pointers (never dereferenced)
    num_bins, edges = meter_args(meter, teacher_meter, s.device, dummy)
    device_name = torch.cuda.get_device_name(s.device) if s.is_cuda else ""
    (inner_s, so, si), (inner_t, to, ti) = _row_strides(s), _row_strides(t)
    if max(inner_s, inner_t) > 1:  # one of them is a (B, T, C) view that no single stride covers
        inner_s, so, si = s.shape[1], s.stride(0), s.stride(1)
        to, ti = t.stride(0), t.stride(1)
    args = (n, c, s.dtype, t.dtype, spec, grad_s, grad_t, labels is not None, meter is not None,
            teacher_meter is not None, reduce, device_name, (inner_s, so, si, to, ti), not _interpreted(),
            (s.data_ptr(), t.data_ptr()))
    pointers = (s, t, labels if labels is not None else dummy, loss, gs if grad_s else dummy,
                gt if grad_t else dummy, row_count if torch.is_tensor(row_count) else dummy, edges,
                meter._state_on(s.device) if meter is not None else dummy)
    scalars = (spec.inv_temperature, spec.kd_scale, spec.ce_scale, spec.beta, spec.ignore_index,
               inv_count_on_host(row_count), spec.grad_unit, spec.s_scale, spec.t_scale, spec.s_cap, spec.t_cap)
    with _on(s.device):  # the capture check and the launch look at the tensors' device
        split_ok = _split_runs(s.device)
        plan = _plan(*args, split_ok=split_ok, sms=_sm_count(s.device))
        consts = dict(plan["consts"], COUNT_ON_DEVICE=torch.is_tensor(row_count), NUM_BINS=num_bins,
                      BINS_P2=triton.next_power_of_2(num_bins + 1))
        partial = torch.empty(plan["programs"] if reduce else 1, dtype=torch.float32, device=s.device)
        counter, total = _reduction_state(s.device) if reduce else (dummy, dummy)
        if plan["path"] == "split-row":
            try:
                _launch_split(plan, consts, pointers, (partial, counter, total), scalars, dummy,
                              (n, c, inner_s, so, si, to, ti))
                return (total if reduce else loss), gs, gt
            except _SplitRefused as refused:  # the looping path; from now on where the driver refused
                if refused.by_driver:
                    _SPLIT_REFUSED.add(s.device)
                plan = _plan(*args, split_ok=False)
                consts = dict(plan["consts"], COUNT_ON_DEVICE=torch.is_tensor(row_count), NUM_BINS=num_bins,
                              BINS_P2=triton.next_power_of_2(num_bins + 1))
                partial = torch.empty(plan["programs"] if reduce else 1, dtype=torch.float32, device=s.device)
        _kd_fwd_kernel[(plan["programs"],)](
            *pointers, teacher_meter._state_on(s.device) if teacher_meter is not None else dummy,
            partial, counter, total,
            n, c, inner_s, so, si, to, ti, plan["ints"]["blocks_per_program"], *scalars,
            num_warps=plan["num_warps"], **consts,
        )
    return (total if reduce else loss), gs, gt


_SPLIT_REFUSED: set = set()  # devices whose driver refused a split-row launch


def _interpreted() -> bool:
    """Triton's interpreter runs the kernels (TRITON_INTERPRET=1): exact math, programs in turn."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _split_runs(device) -> bool:
    """Whether a split-row launch can run: on a GPU, a cooperative launch (Triton >= 3.3), not while
    a CUDA graph is captured; under the interpreter only when asked (SPLIT_INTERPRETED). CPU tensors
    without the interpreter are a static model compiling what a GPU would run: SPLIT_STATIC."""
    if _interpreted():
        return SPLIT_INTERPRETED
    if device.type != "cuda":
        return SPLIT_STATIC
    from triton.backends.nvidia.compiler import CUDAOptions

    return ("launch_cooperative_grid" in CUDAOptions.__dataclass_fields__ and device not in _SPLIT_REFUSED
            and not _capturing(device))


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device) -> int:
    return _sm_count_of(device.index) if device.type == "cuda" else 132  # an H100 / H200 SXM


class _SplitRefused(RuntimeError):
    """The split-row path's cooperative launch does not fit this device: the launcher falls back to
    the looping path, for this call where the launcher's own check (a row's parts against the
    resident programs of the compiled kernel) said so, for the process where the driver refused the
    launch (``by_driver``: the occupancy estimate is wrong for this device, e.g. under MPS). Nothing
    else (out of memory, a faulting launch) is taken for it."""

    def __init__(self, message, by_driver=False):
        super().__init__(message)
        self.by_driver = by_driver


# cuGetErrorString of CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, as Triton's launcher raises it
_COOPERATIVE_TOO_LARGE = "too many blocks in cooperative launch"


def _launch_split(plan, consts, pointers, reduction, scalars, dummy, shape):
    """The split-row path: one cooperative launch on a GPU, with as many groups of PARTS programs as
    the device holds at once (from the registers and shared memory of the kernel compiled for this
    launch's arguments); under the interpreter, which runs the programs one after another, its two
    halves (statistics, then the rest) as two launches. Raises _SplitRefused where the device does
    not take it; any other error (an allocation's included) propagates."""
    s = pointers[0]
    groups, parts = plan["ints"]["n_groups"], consts["PARTS"]
    interpreted = _interpreted()
    slots = shape[0] if interpreted else 2 * groups
    stats = torch.empty((slots, parts, NSTAT.value), dtype=torch.float32, device=s.device)
    arrive = dummy if interpreted else torch.zeros(groups, dtype=torch.int32, device=s.device)
    options = {} if interpreted else {"launch_cooperative_grid": True}

    def args(n_groups):
        return (*pointers, *reduction, stats, arrive, *shape, n_groups, triton.cdiv(shape[0], n_groups), *scalars)

    if s.is_cuda:  # no more groups than fit: a cooperative launch needs them all resident
        groups = _fitting_groups(
            groups, parts,
            lambda g: _kd_split_kernel.warmup(*args(g), grid=(1,), num_warps=plan["num_warps"],
                                              **dict(consts, PHASE=0, **options)),
            lambda kernel: _resident_programs(s.device, kernel, plan["num_warps"]))
    for phase in ((1, 2) if interpreted else (0,)):
        try:
            _kd_split_kernel[(groups * parts,)](*args(groups), num_warps=plan["num_warps"],
                                                **dict(consts, PHASE=phase), **options)
        except RuntimeError as e:
            if _COOPERATIVE_TOO_LARGE in str(e):
                raise _SplitRefused(str(e), by_driver=True) from e
            raise


def _fitting_groups(groups, parts, compiled_for, resident_of) -> int:
    """The most groups (at most ``groups``) of ``parts`` programs that are resident at once, checked
    against the kernel compiled for that very launch (``compiled_for(groups)``: n_groups and
    rows_per_group are arguments, and Triton specialises them, == 1 or divisible by 16, so fewer
    groups may compile to a kernel with other registers). ``resident_of(kernel)``: programs a device
    holds at once. Each try has fewer groups than the last, so it ends."""
    while True:
        fit = resident_of(compiled_for(groups)) // parts
        if fit >= groups:
            return groups
        if fit < 1:
            raise _SplitRefused(f"a row's {parts} parts do not fit on the device at once")
        groups = fit


_RESIDENT: dict = {}


def _resident_programs(device, kernel, num_warps) -> int:
    """Programs of a compiled kernel that a device holds at once (cached per device and compiled
    kernel: its registers and shared memory are those of its arguments' specialisation)."""
    key = (device.index, kernel.hash, num_warps)
    if key not in _RESIDENT:
        kernel._init_handles()
        _RESIDENT[key] = _occupancy(kernel.n_regs, kernel.metadata.shared, num_warps,
                                    torch.cuda.get_device_properties(device))
    return _RESIDENT[key]


def _occupancy(n_regs, shared, num_warps, props) -> int:
    """Programs of num_warps warps, n_regs registers per thread and ``shared`` bytes of shared memory
    that the device of ``props`` holds at once: registers are allocated per warp, 256 at a time; the
    driver reserves 1 KB of shared memory per block; at most 32 blocks per SM."""
    per_warp = -(-max(1, n_regs) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024) if shared else 32
    return props.multi_processor_count * max(0, min(32, by_regs, by_threads, by_smem))


def scale_grad(grad, factor):
    """The backward: grad *= factor in place, in fp32; factor is a float32 tensor, 0-d or one per row
    (grad_output times the row scale over grad_unit, from loss.py). Where it is 1 no data moves
    (a device-side check, no host sync)."""
    factor = factor.detach().to(device=grad.device, dtype=torch.float32).contiguous()
    n_cols = grad.shape[-1] if grad.dim() else 1
    n_rows = grad.numel() // max(n_cols, 1)
    if grad.numel():
        per_row = factor.dim() > 0
        block_c = min(triton.next_power_of_2(n_cols), SCALE_BLOCK) if per_row else SCALE_BLOCK
        block_r = max(1, SCALE_BLOCK // block_c)
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c)) if per_row else \
            (triton.cdiv(grad.numel(), SCALE_BLOCK),)
        vec = _vector_width(n_cols, (), grad.element_size(), (grad.data_ptr(),))
        with _on(grad.device):
            _scale_grad_kernel[grid](grad, factor, n_rows, n_cols, FACTOR_PER_ROW=per_row, BLOCK_R=block_r,
                                     BLOCK_C=block_c, VEC=vec, num_warps=8)
    return grad
