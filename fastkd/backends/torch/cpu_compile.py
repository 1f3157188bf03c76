"""The torch backend's dense loss with each chunk's math compiled by ``torch.compile`` (Inductor's C++
backend): opt-in with ``FASTKD_CPU_COMPILE=1``, for kl_loss / kd_loss on CPU tensors outside an outer
torch.compile (the dispatch layer asks ``requested``). Off, nothing here runs.

Eager, each tensor op of a chunk is one sweep over it; compiled, the chunk (transforms, both
log-softmaxes, the divergence, CE, the meter's statistics, both gradients) is a few fused C++ loops.
One compile serves a shape family: the row count is dynamic (any N, 1 included, no recompile);
the classes, the dtypes, the spec's constants, which gradients and meters, labels or not, each make
a family of their own. The first call of a family compiles: 27-31 s for the first one on 2 CPU
cores with a cold Inductor cache (the toolchain starts up), 4-6 s for each further one, a few
seconds from a warm cache; Dynamo keeps 8 (its recompile_limit), later families run eager. So it
pays only in runs long enough to repay that. Steady state, forward + backward, 1 thread
(bench/tools/cpu_compile_ab.py, the table in the README's "Backends"): 2.4x faster at 64 x 32000
bf16, 1.35-1.9x at 1024 x 1000, 1.1-1.2x at 4096 x 100 (the upper ends with a meter), nothing at
16384 x 10 since the eager path takes few-class log-softmaxes from their parts (0.9-1.1x), and
little at 128 x 10 (Dynamo's guards, per call).

Inside the compiled function no decision needs the host: every row is masked unless there are no
labels (``every_row`` only then), and a KL sum is always masked (``on_host`` False), as the eager
path does under torch.compile. The numbers match the eager path to rounding, not bit for bit.
If Inductor or its C++ compiler is missing, or compiling raises, a warning naming FASTKD_CPU_COMPILE
is given once and the eager chunk runs from then on.
"""
from __future__ import annotations

import os
import warnings

import torch

from .dense import INPLACE_BACKWARD, chunk, drive, scale_grad

ENV = "FASTKD_CPU_COMPILE"
_STATE: dict = {}  # "fn": the compiled chunk (made on first use); "failed": why it could not run


def requested(device: torch.device) -> bool:
    """FASTKD_CPU_COMPILE=1 (read at each call; 0 or unset: off), a CPU tensor, no outer torch.compile
    tracing the call, and compiling has not failed before."""
    value = os.environ.get(ENV, "0").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1" and device.type == "cpu" and not torch.compiler.is_compiling() and "failed" not in _STATE


def _compiled():
    if "fn" not in _STATE:
        # static shapes but for the rows, marked dynamic per call; the classes stay a constant
        _STATE["fn"] = torch.compile(chunk, backend="inductor", dynamic=False)
    return _STATE["fn"]


def _first_row(x):
    return None if x is None else tuple(_first_row(v) for v in x) if isinstance(x, tuple) else x[:1]


def _compiled_chunk(s, t, lab, scale, spec, grad_s, grad_t, meter_on, teacher_meter_on, every_row):
    if "failed" not in _STATE:
        # a dynamic size of 1 would be specialised (a second compile): one row runs as two copies of
        # it, and the first copy's results are kept (rows are independent)
        one = s.shape[0] == 1
        s, t = s.detach(), t.detach()  # a copy below does not require grad: the views must not either (a guard)
        if one:
            s, t, lab = s.repeat(2, 1), t.repeat(2, 1), None if lab is None else lab.repeat(2)
        for x in (s, t) if lab is None else (s, t, lab):
            # backed, not unbacked: Inductor fuses a row's passes into one loop only for a backed size
            torch._dynamo.mark_dynamic(x, 0)  # this chunk's own views or copies: the caller's stay unmarked
        try:
            out = _compiled()(s, t, lab, scale, spec, grad_s, grad_t, meter_on, teacher_meter_on, every_row)
            return _first_row(out) if one else out
        except Exception as e:  # no C++ compiler, Inductor missing or failing: eager, said once
            _STATE["failed"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"fastkd: {ENV}=1 but torch.compile of the loss failed ({_STATE['failed'][:300]}); "
                          "running the eager torch backend instead", RuntimeWarning, stacklevel=2)
            if one:
                s, t, lab = s[:1], t[:1], None if lab is None else lab[:1]
    return chunk(s, t, lab, scale, spec, grad_s, grad_t, meter_on, teacher_meter_on, every_row)


def kd_forward(s, t, labels, row_count, spec, grad_s: bool, grad_t: bool, meter, teacher_meter,
               reduce: bool = False):
    """The torch backend's kd_forward (same arguments and results) with each chunk compiled."""
    return drive(s, t, labels, row_count, spec, grad_s, grad_t, meter, teacher_meter, reduce, _compiled_chunk)


__all__ = ["INPLACE_BACKWARD", "ENV", "kd_forward", "requested", "scale_grad"]
