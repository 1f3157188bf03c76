"""The Triton backend: one fused kernel for the KD loss, its gradients and calibration statistics.

Imported lazily (only when the triton backend runs). Under ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors, which is how the test suite checks them without a GPU.

Per row, a = s/T and b = t/T: the kernel finds max and sum-exp of a and b (and of s at T = 1 for
the cross-entropy and the calibration statistics) with online softmax, then the divergence, then
the gradients. Rows that fit in one tile (``ONE_PASS``) are read once into registers: the traffic
is the floor, read s + read t + write grad (3 N C bytes). Longer rows loop over tiles: one sweep
for the statistics, a second that accumulates the divergence and, for KL(p_t || p_s), already
writes the student's gradient (5 N C bytes); when the gradient needs the divergence value first
(reverse KL, JSD, teacher gradients) a third sweep writes it.
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from ._spec import KDSpec, inv_count_on_host, meter_args

NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel may read must be a constexpr
# Defaults, chosen from the compiler's register counts on sm_90 (no spills, <= 128 registers per
# thread; tests/aot_compile.py checks it), not from timings: measured configurations per card
# (bench/tune_triton.py) take precedence. Longest row kept in registers, by element size; beyond
# it the looping path runs; "heavy" variants (teacher gradient, teacher meter or JSD) keep more
# tensors live per element and spill beyond 8192.
ONE_PASS_MAX = {"light": {1: 16384, 2: 16384, 4: 8192}, "heavy": {1: 8192, 2: 8192, 4: 8192}}
LOOP_BLOCK_C = 4096
# elements per program in the one-pass path (several rows when C is small) and per thread: short
# rows carry more per-row state per thread, so they get smaller tiles and fewer elements a thread
TILE_ELEMENTS = {"short": 2048, "long": 4096}
ELEMENTS_PER_THREAD = {"short": 4, "long": 8}
SHORT_ROW = 256


@triton.jit
def _load_tiles(s_ptr, t_ptr, row_off_s, row_off_t, row_ok, cols, n_cols):
    """Student and teacher logits of a tile as fp32; masked elements read as -inf (zero mass)."""
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(s_ptr + row_off_s + cols[None, :], mask=mask, other=NEG_INF).to(tl.float32)
    y = tl.load(t_ptr + row_off_t + cols[None, :], mask=mask, other=NEG_INF).to(tl.float32)
    return x, y, mask


@triton.jit
def _online_max_sumexp(m, z_t, z_1, z_2, arg, x, cols, inv_temp, NEED_T1: tl.constexpr):
    """Merges one tile of rows into running (max, sum exp((x-max)/T), sum exp(x-max),
    sum exp(2(x-max)), argmax). Masked columns hold -inf."""
    bm = tl.max(x, axis=1)
    m_new = tl.maximum(m, bm)
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)  # all -inf so far: keep exp() finite
    xs = x - m_safe[:, None]
    z_t = z_t * tl.exp((m - m_safe) * inv_temp) + tl.sum(tl.exp(xs * inv_temp), axis=1)
    if NEED_T1:
        r = tl.exp(m - m_safe)
        e = tl.exp(xs)
        z_1 = z_1 * r + tl.sum(e, axis=1)
        z_2 = z_2 * r * r + tl.sum(e * e, axis=1)
        barg = tl.min(tl.where(x == bm[:, None], cols[None, :], 2147483647), axis=1)
        arg = tl.where(bm > m, barg, arg)  # first maximum wins, as torch.argmax
    return m_new, z_t, z_1, z_2, arg


@triton.jit
def _divergence_terms(x, y, lse_a, lse_b, inv_temp, beta, DIVERGENCE: tl.constexpr):
    """Tempered probabilities, log-ratios and the per-element divergence terms of a tile."""
    la = x * inv_temp - lse_a[:, None]
    lb = y * inv_temp - lse_b[:, None]
    ps = tl.exp(la)
    pt = tl.exp(lb)
    ref_t = lb - la
    ref_s = la - lb
    if DIVERGENCE == 2:  # generalised JSD against M = beta p_t + (1 - beta) p_s
        lm = tl.log(beta * pt + (1.0 - beta) * ps)
        ref_t = lb - lm
        ref_s = la - lm
    term_s = tl.where(ps > 0, ps * ref_s, 0.0)  # 0 log 0 = 0: masked classes add nothing
    term_t = tl.where(pt > 0, pt * ref_t, 0.0)
    return ps, pt, ref_s, ref_t, term_s, term_t


@triton.jit
def _store_grads(gs_ptr, gt_ptr, offs_s, offs_t, mask, x, cols, label, lse_1, w,
                 ps, pt, ref_s, ref_t, d_s, d_t, kd_g, ce_scale, beta,
                 DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr,
                 GRAD_S: tl.constexpr, GRAD_T: tl.constexpr):
    """d loss / d logits for one tile, times w: the row scale, or grad_unit (fp16 gradients);
    0 for ignored rows, NaN for rows with an out-of-range label."""
    if DIVERGENCE == 0:  # KL(p_t || p_s)
        ga = ps - pt
        gb = tl.where(pt > 0, pt * (ref_t - d_t[:, None]), 0.0)
    elif DIVERGENCE == 1:  # KL(p_s || p_t)
        ga = tl.where(ps > 0, ps * (ref_s - d_s[:, None]), 0.0)
        gb = pt - ps
    else:
        ga = (1.0 - beta) * tl.where(ps > 0, ps * (ref_s - d_s[:, None]), 0.0)
        gb = beta * tl.where(pt > 0, pt * (ref_t - d_t[:, None]), 0.0)
    keep = w[:, None] != 0
    if GRAD_S:
        g = kd_g * ga
        if HAS_CE:
            p1 = tl.exp(x - lse_1[:, None])
            g += ce_scale * (p1 - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
        g = tl.where(keep, g * w[:, None], 0.0)
        tl.store(gs_ptr + offs_s, g.to(gs_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        g = tl.where(keep, kd_g * gb * w[:, None], 0.0)
        tl.store(gt_ptr + offs_t, g.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _meter_add(meter_ptr, edges_ptr, keep, m, z_1, z_2, arg, x_label, label,
               NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr):
    """Adds a tile of rows to a calibration histogram: one atomic per bin per program. A row of
    all -inf or with NaN has a NaN confidence, lands in the last bin (as in
    CalibrationMeter.update) and counts as wrong; an out-of-range label (x_label NaN) counts as wrong, NLL/Brier NaN."""
    lse_1 = m + tl.log(z_1)
    # the top class has exp(max - max) = 1; z_1 = 0 (all -inf), inf or NaN: no confidence
    conf = tl.where((z_1 > 0) & (z_1 < float("inf")), 1.0 / z_1, float("nan"))
    correct = tl.where((arg == label) & (conf == conf), 1.0, 0.0)  # no confidence: no prediction
    nll = lse_1 - x_label
    brier = z_2 / (z_1 * z_1) - 2.0 * tl.exp(x_label - lse_1) + 1.0
    # bin = number of edges <= conf, minus 1 (torch.bucketize(right=True) on the same fp32 edges)
    b = tl.maximum(tl.minimum((conf * NUM_BINS).to(tl.int32), NUM_BINS), 0)
    b = tl.where(conf < tl.load(edges_ptr + b), b - 1, b)
    b = tl.where(conf >= tl.load(edges_ptr + b + 1), b + 1, b)
    b = tl.where(conf == conf, tl.maximum(tl.minimum(b, NUM_BINS), 0), NUM_BINS)
    bins = tl.arange(0, BINS_P2)
    hit = (b[:, None] == bins[None, :]) & keep[:, None]
    nb = NUM_BINS + 1
    in_range = bins < nb
    tl.atomic_add(meter_ptr + bins, tl.sum(hit.to(tl.float32), axis=0).to(tl.float64), mask=in_range)
    tl.atomic_add(meter_ptr + nb + bins,
                  tl.sum(tl.where(hit, conf[:, None], 0.0), axis=0).to(tl.float64), mask=in_range)
    tl.atomic_add(meter_ptr + 2 * nb + bins,
                  tl.sum(tl.where(hit, correct[:, None], 0.0), axis=0).to(tl.float64), mask=in_range)
    tl.atomic_add(meter_ptr + 3 * nb, tl.sum(tl.where(keep, nll, 0.0), axis=0).to(tl.float64))
    tl.atomic_add(meter_ptr + 3 * nb + 1, tl.sum(tl.where(keep, brier, 0.0), axis=0).to(tl.float64))


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
def _kd_fwd_kernel(
    # pointers
    s_ptr, t_ptr, labels_ptr, loss_ptr, gs_ptr, gt_ptr, row_count_ptr, edges_ptr,
    meter_s_ptr, meter_t_ptr, partial_ptr, counter_ptr, total_ptr,
    # shapes and strides (elements)
    n_rows, n_cols, stride_s, stride_t, stride_gs, stride_gt,
    # scalars
    inv_temp, kd_scale, ce_scale, beta, ignore_index, inv_count,
    grad_unit,  # 0: gradients times the row scale; > 0: times grad_unit instead (fp16 gradients)
    # constants
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    METER_S: tl.constexpr, METER_T: tl.constexpr, NUM_BINS: tl.constexpr, BINS_P2: tl.constexpr,
    STUDENT_T1: tl.constexpr,  # statistics of s at T = 1 (cross-entropy or meter)
    LATE_GRAD: tl.constexpr,  # the gradient needs the divergence's value first (a third sweep)
    REDUCE: tl.constexpr,  # also the scalar loss (sum of the scaled rows), in this launch
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        keep = row_ok & (label != ignore_index)
        label = tl.where(keep, label, 0)
        # a label outside [0, C) (validate_labels=False) counts, reads nothing and makes its row NaN
        bad = (label < 0) | (label >= n_cols)
        at = tl.where(bad, 0, label)
        x_label = tl.load(s_ptr + rows * stride_s + at, mask=keep & ~bad, other=0.0).to(tl.float32)
        y_label = tl.load(t_ptr + rows * stride_t + at, mask=keep & ~bad, other=0.0).to(tl.float32)
        x_label = tl.where(bad, float("nan"), x_label)
        y_label = tl.where(bad, float("nan"), y_label)
    else:
        label = tl.zeros([BLOCK_N], dtype=tl.int64)
        keep = row_ok
        bad = rows < 0  # none
        x_label = tl.zeros([BLOCK_N], dtype=tl.float32)
        y_label = x_label
    if COUNT_ON_DEVICE:  # rows that count, summed on the device: 1 / max(count, 1)
        inv_count = 1.0 / tl.maximum(tl.load(row_count_ptr).to(tl.float32), 1.0)
    w = tl.where(keep, inv_count, 0.0)  # scales the loss of a row; 0 for ignored rows
    gw = tl.where(grad_unit > 0, tl.where(keep, grad_unit, 0.0), w)  # and its gradient
    w = tl.where(bad, float("nan"), w)
    gw = tl.where(bad, float("nan"), gw)
    kd_g = kd_scale * inv_temp

    zeros = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_s = zeros + NEG_INF
    m_t = zeros + NEG_INF
    z_s, z1_s, z2_s, z_t, z1_t, z2_t = zeros, zeros, zeros, zeros, zeros, zeros
    arg_s = tl.zeros([BLOCK_N], dtype=tl.int64)
    arg_t = arg_s
    d_s = zeros
    d_t = zeros
    row_off_s = rows[:, None] * stride_s
    row_off_t = rows[:, None] * stride_t
    row_off_gs = rows[:, None] * stride_gs
    row_off_gt = rows[:, None] * stride_gt

    if ONE_PASS:  # the whole row lives in registers: read once, write once
        cols = tl.arange(0, BLOCK_C)
        x, y, mask = _load_tiles(s_ptr, t_ptr, row_off_s, row_off_t, row_ok, cols, n_cols)
        m_s, z_s, z1_s, z2_s, arg_s = _online_max_sumexp(m_s, z_s, z1_s, z2_s, arg_s, x, cols,
                                                          inv_temp, STUDENT_T1)
        m_t, z_t, z1_t, z2_t, arg_t = _online_max_sumexp(m_t, z_t, z1_t, z2_t, arg_t, y, cols,
                                                          inv_temp, METER_T)
        lse_a = m_s * inv_temp + tl.log(z_s)
        lse_b = m_t * inv_temp + tl.log(z_t)
        lse_1 = m_s + tl.log(z1_s)
        ps, pt, ref_s, ref_t, term_s, term_t = _divergence_terms(x, y, lse_a, lse_b, inv_temp,
                                                                 beta, DIVERGENCE)
        d_s = tl.sum(term_s, axis=1)
        d_t = tl.sum(term_t, axis=1)
        _store_grads(gs_ptr, gt_ptr, row_off_gs + cols[None, :], row_off_gt + cols[None, :], mask,
                     x, cols, label, lse_1, gw, ps, pt, ref_s, ref_t, d_s, d_t, kd_g, ce_scale,
                     beta, DIVERGENCE, HAS_CE, GRAD_S, GRAD_T)
    else:
        for c0 in range(0, n_cols, BLOCK_C):  # sweep 1: softmax statistics
            cols = c0 + tl.arange(0, BLOCK_C)
            x, y, mask = _load_tiles(s_ptr, t_ptr, row_off_s, row_off_t, row_ok, cols, n_cols)
            m_s, z_s, z1_s, z2_s, arg_s = _online_max_sumexp(m_s, z_s, z1_s, z2_s, arg_s, x, cols,
                                                              inv_temp, STUDENT_T1)
            m_t, z_t, z1_t, z2_t, arg_t = _online_max_sumexp(m_t, z_t, z1_t, z2_t, arg_t, y, cols,
                                                              inv_temp, METER_T)
        lse_a = m_s * inv_temp + tl.log(z_s)
        lse_b = m_t * inv_temp + tl.log(z_t)
        lse_1 = m_s + tl.log(z1_s)
        for c0 in range(0, n_cols, BLOCK_C):  # sweep 2: the divergence (and KL's student grad)
            cols = c0 + tl.arange(0, BLOCK_C)
            x, y, mask = _load_tiles(s_ptr, t_ptr, row_off_s, row_off_t, row_ok, cols, n_cols)
            ps, pt, ref_s, ref_t, term_s, term_t = _divergence_terms(x, y, lse_a, lse_b, inv_temp,
                                                                     beta, DIVERGENCE)
            d_s += tl.sum(term_s, axis=1)
            d_t += tl.sum(term_t, axis=1)
            if not LATE_GRAD:
                _store_grads(gs_ptr, gt_ptr, row_off_gs + cols[None, :], row_off_gt + cols[None, :],
                             mask, x, cols, label, lse_1, gw, ps, pt, ref_s, ref_t, d_s, d_t, kd_g,
                             ce_scale, beta, DIVERGENCE, HAS_CE, GRAD_S, GRAD_T)
        if LATE_GRAD:
            for c0 in range(0, n_cols, BLOCK_C):  # sweep 3: gradients that need the divergence
                cols = c0 + tl.arange(0, BLOCK_C)
                x, y, mask = _load_tiles(s_ptr, t_ptr, row_off_s, row_off_t, row_ok, cols, n_cols)
                ps, pt, ref_s, ref_t, term_s, term_t = _divergence_terms(x, y, lse_a, lse_b, inv_temp,
                                                                         beta, DIVERGENCE)
                _store_grads(gs_ptr, gt_ptr, row_off_gs + cols[None, :], row_off_gt + cols[None, :],
                             mask, x, cols, label, lse_1, gw, ps, pt, ref_s, ref_t, d_s, d_t, kd_g,
                             ce_scale, beta, DIVERGENCE, HAS_CE, GRAD_S, GRAD_T)

    if DIVERGENCE == 0:
        div = d_t
    elif DIVERGENCE == 1:
        div = d_s
    else:
        div = beta * d_t + (1.0 - beta) * d_s
    loss = kd_scale * div
    if HAS_CE:
        loss += ce_scale * (lse_1 - x_label)
    loss = tl.where(keep, loss * w, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    if REDUCE:
        _last_program_sum(partial_ptr, counter_ptr, total_ptr, tl.sum(loss, axis=0), 512)
    if METER_S:
        _meter_add(meter_s_ptr, edges_ptr, keep, m_s, z1_s, z2_s, arg_s, x_label, label,
                   NUM_BINS, BINS_P2)
    if METER_T:
        _meter_add(meter_t_ptr, edges_ptr, keep, m_t, z1_t, z2_t, arg_t, y_label, label,
                   NUM_BINS, BINS_P2)


@triton.jit
def _scale_grad_kernel(grad_ptr, factor_ptr, n_cols, n_elements, FACTOR_PER_ROW: tl.constexpr,
                       BLOCK: tl.constexpr):
    """grad *= factor in place. Where the factor is 1 (the usual loss.backward()) the masked loads
    and stores move no data, so the backward costs one scalar read: no host sync, no traffic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_elements
    if FACTOR_PER_ROW:
        f = tl.load(factor_ptr + offs // n_cols, mask=in_range, other=1.0)
    else:
        f = tl.load(factor_ptr) + tl.zeros([BLOCK], dtype=tl.float32)
    todo = in_range & (f != 1.0)
    g = tl.load(grad_ptr + offs, mask=todo, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offs, (g * f).to(grad_ptr.dtype.element_ty), mask=todo)


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
    configuration for this card when bench/tune_triton.py has stored one, else the defaults."""
    variant = "heavy" if heavy else "light"
    tuned = _tuned_configs(device_name).get(f"{elem_size}:{triton.next_power_of_2(n_cols)}:{variant}")
    if tuned:
        return tuned["block_n"], tuned["block_c"], tuned["one_pass"], tuned["num_warps"]
    if n_cols <= ONE_PASS_MAX[variant].get(elem_size, 8192):
        block_c = triton.next_power_of_2(n_cols)
        kind = "short" if block_c <= SHORT_ROW else "long"
        block_n = max(1, TILE_ELEMENTS[kind] // block_c)
        one_pass = True
    else:
        kind, block_c, block_n, one_pass = "long", LOOP_BLOCK_C, 1, False
    num_warps = min(16, max(4, block_n * block_c // (32 * ELEMENTS_PER_THREAD[kind])))
    return block_n, block_c, one_pass, num_warps


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


def kd_forward(s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
               reduce: bool = False):
    """Rows (N, C) -> (loss, grad_s | None, grad_t | None) in one launch; loss is fp32, per row (N,),
    or with ``reduce`` the sum of the rows."""
    n, c = s.shape
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    gs = torch.empty_like(s) if grad_s else None
    gt = torch.empty_like(t) if grad_t else None
    if n == 0:
        return (loss.sum() if reduce else loss), gs, gt
    dummy = loss  # stands in for absent optional pointers (never dereferenced)
    num_bins, edges = meter_args(meter, teacher_meter, s.device, dummy)
    device_name = torch.cuda.get_device_name(s.device) if s.is_cuda else ""
    heavy = grad_t or teacher_meter is not None or spec.divergence == 2
    block_n, block_c, one_pass, num_warps = _launch_config(c, max(s.element_size(), t.element_size()),
                                                           device_name, heavy)
    programs = triton.cdiv(n, block_n)
    partial = torch.empty(programs if reduce else 1, dtype=torch.float32, device=s.device)
    with _on(s.device):  # the capture check and the launch look at the tensors' device
        counter, total = _reduction_state(s.device) if reduce else (dummy, dummy)
        _kd_fwd_kernel[(programs,)](
            s, t, labels if labels is not None else dummy, loss,
            gs if grad_s else dummy, gt if grad_t else dummy,
            row_count if torch.is_tensor(row_count) else dummy, edges,
            meter._state_on(s.device) if meter is not None else dummy,
            teacher_meter._state_on(s.device) if teacher_meter is not None else dummy,
            partial, counter, total,
            n, c, s.stride(0), t.stride(0), gs.stride(0) if grad_s else 0, gt.stride(0) if grad_t else 0,
            spec.inv_temperature, spec.kd_scale, spec.ce_scale, spec.beta, spec.ignore_index,
            inv_count_on_host(row_count), spec.grad_unit,
            BLOCK_N=block_n, BLOCK_C=block_c, ONE_PASS=one_pass, DIVERGENCE=spec.divergence,
            HAS_LABELS=labels is not None, HAS_CE=spec.has_ce, COUNT_ON_DEVICE=torch.is_tensor(row_count),
            GRAD_S=grad_s, GRAD_T=grad_t, METER_S=meter is not None, METER_T=teacher_meter is not None,
            NUM_BINS=num_bins, BINS_P2=triton.next_power_of_2(num_bins + 1),
            STUDENT_T1=spec.has_ce or meter is not None,
            LATE_GRAD=(grad_s and spec.divergence != 0) or (grad_t and spec.divergence != 1),
            REDUCE=reduce, num_warps=num_warps,
        )
    return (total if reduce else loss), gs, gt


def scale_grad(grad, factor):
    """The backward: grad *= factor in place, in fp32; factor is a float32 tensor, 0-d or one per row
    (grad_output times the row scale over grad_unit, from loss.py). Where it is 1 no data moves
    (a device-side check, no host sync)."""
    factor = factor.detach().to(device=grad.device, dtype=torch.float32).contiguous()
    n = grad.numel()
    if n:
        block = 4096
        with _on(grad.device):
            _scale_grad_kernel[(triton.cdiv(n, block),)](grad, factor, grad.shape[-1], n,
                                                         FACTOR_PER_ROW=factor.dim() > 0, BLOCK=block)
    return grad
