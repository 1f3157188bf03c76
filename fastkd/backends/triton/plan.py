"""The launch plan of a dense call: path, kernel, grid, warps and constants (``_plan``); the
defaults and the measured configurations per card; tile shapes, vector widths, occupancy."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton

from ..._core.spec import KDSpec
from .dense import _kd_fwd_kernel
from .helpers import PACK_ROWS
from .split import _kd_split_kernel

# Defaults, chosen from the compiler's register counts and SASS on sm_90 (no spills; the issue
# time below the memory time by the static model of bench/RESULTS.md), not from timings: measured
# configurations per card (bench/tools/tune_triton.py) take precedence. Longest row kept in registers
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


TUNED_CONFIGS = Path(__file__).with_name("triton_configs.json")  # written by bench/tools/tune_triton.py


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
    configuration for this card when bench/tools/tune_triton.py has stored one, else the defaults. The
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
        DIVERGENCE=int(spec.divergence), HAS_LABELS=has_labels, HAS_CE=spec.has_ce,
        COUNT_ON_DEVICE=False, GRAD_S=grad_s, GRAD_T=grad_t, METER_S=meter_s, METER_T=meter_t,
        NUM_BINS=15, BINS_P2=16, STUDENT_T1=spec.has_ce or meter_s, TEMP_ONE=spec.inv_temperature == 1.0,
        THIRD_SWEEP=third, REDUCE=reduce, N_COLS=c if one_pass and lanes == 1 else 0, FAST_MATH=fast_math,
        **_transform_consts(spec))
    split = _split_plan(n, c, spec, grad_s, grad_t, meter_t, size, (so, si, to, ti), addresses, sms)
    if not one_pass and split_ok and split is not None:
        return dict(split, consts=dict(split["consts"], ROWS_3D=n_inner > 1, DIVERGENCE=int(spec.divergence),
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




def _occupancy(n_regs, shared, num_warps, props) -> int:
    """Programs of num_warps warps, n_regs registers per thread and ``shared`` bytes of shared memory
    that the device of ``props`` holds at once: registers are allocated per warp, 256 at a time; the
    driver reserves 1 KB of shared memory per block; at most 32 blocks per SM."""
    per_warp = -(-max(1, n_regs) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024) if shared else 32
    return props.multi_processor_count * max(0, min(32, by_regs, by_threads, by_smem))
