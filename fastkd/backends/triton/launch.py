"""The dense launcher (``kd_forward``) and the backend's launch state: the in-launch sum's ticket
counters, devices that refused a split-row launch, resident programs per compiled kernel."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton

from ..._core.spec import KDSpec, inv_count_on_host, meter_args
from . import plan as knobs
from .dense import _kd_fwd_kernel
from .plan import _occupancy, _plan, _row_strides
from .split import NSTAT, _kd_split_kernel

_TICKETS: dict = {}  # one self-resetting ticket counter per (device, stream), outside graph capture


# --- hooks for tools (bench/tools, tests/aot_compile.py): every launch of this backend goes through
# _launch, so that a recorder sees all of them; plan knobs are overridden through plan_override ------

class Launch(NamedTuple):
    """A kernel launch as the launcher asked for it: ``kernel[grid](*args, **kwargs)``."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


_RECORDERS: list = []  # the innermost active recorder's list takes the launches


def _launch(kernel, grid, *args, **kwargs):
    """Every kernel launch of the Triton backend (dense, split-row, scale, sparse, vocabulary-
    parallel): run, or recorded where a ``recorded_launches`` block is active."""
    if _RECORDERS:
        _RECORDERS[-1].append(Launch(kernel, tuple(grid), args, kwargs))
        return None
    if _interpreted():
        import numpy as np

        # the interpreter computes padding lanes (rows past N, columns past C) on -inf with numpy, which
        # warns about the inf - inf and 0 * inf there; those lanes are masked on store, so the warnings
        # say nothing about the results and must not reach the user's script
        with np.errstate(all="ignore"):
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recorded_launches():
    """A tools' hook: inside the block every launch of this backend is recorded instead of run
    (outputs stay as allocated). Yields the list of ``Launch`` in launch order."""
    launches: list[Launch] = []
    _RECORDERS.append(launches)
    try:
        yield launches
    finally:
        _RECORDERS.remove(launches)


@contextlib.contextmanager
def plan_override(**values):
    """A tools' hook: the plan's knobs (module constants of ``plan``: SPLIT_STATIC, SPLIT_ROWS,
    ONE_PASS_MAX, LOOP_BLOCK_C, TUNED_CONFIGS, ...) set to ``values`` inside the block, restored after.
    A name that is not a knob raises."""
    unknown = [name for name in values if not name.isupper() or not hasattr(knobs, name)]
    if unknown:
        raise ValueError(f"plan_override: not a plan knob: {', '.join(unknown)}")
    saved = {name: getattr(knobs, name) for name in values}
    try:
        for name, value in values.items():
            setattr(knobs, name, value)
        knobs._tuned_configs.cache_clear()
        yield
    finally:
        for name, value in saved.items():
            setattr(knobs, name, value)
        knobs._tuned_configs.cache_clear()


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
        _launch(
            _kd_fwd_kernel, (plan["programs"],),
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
        return knobs.SPLIT_INTERPRETED
    if device.type != "cuda":
        return knobs.SPLIT_STATIC
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
            _launch(_kd_split_kernel, (groups * parts,), *args(groups), num_warps=plan["num_warps"],
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
