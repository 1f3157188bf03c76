"""The shared ``@triton.jit`` helpers of the Triton backend's kernels (dense, split-row, sparse,
vocabulary-parallel): tiles and loads, per-thread and per-row reductions, the max offsets and
rescales of online softmax, the logit transforms, the gradient of a tile, the calibration meter's
rows and flush, the in-launch sum of the loss, row offsets and labels. Defined once here."""
# No `from __future__ import annotations`: Triton 3.0's interpreter spots constexpr parameters
# only by the annotation object, not by the string "tl.constexpr".

import triton
import triton.language as tl
from triton.language.extra import libdevice

NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel may read must be a constexpr
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# A program's meter counts, per bin count + PACK * correct in one fp32: exact while a program has
# added at most PACK_ROWS rows since its last flush (PACK_ROWS (PACK + 1) < 2^24, and count < PACK
# so that correct = floor(packed / PACK)). Plans keep a program's rows within it; the split path,
# whose groups take any number of rows, flushes every PACK_ROWS rows.
PACK_ROWS = tl.constexpr(4095)
PACK = tl.constexpr(4096.0)


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
def _rescale(m_from, m_to, k, DIFFERENCE_FIRST: tl.constexpr = False):
    """exp2(_off(m_from) - _off(m_to)): moves sums from one offset to another; 0 from a max of -inf
    (an empty sum, which a huge factor would turn into NaN). DIFFERENCE_FIRST: exp2((m_from - m_to) k)
    instead, for sums taken as exp2((x - m) k) (the vocabulary-parallel kernels)."""
    if DIFFERENCE_FIRST:
        return tl.where(m_from == NEG_INF, 0.0, tl.math.exp2((_safe(m_from) - _safe(m_to)) * k))
    else:
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
