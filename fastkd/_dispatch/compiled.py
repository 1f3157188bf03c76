"""The fused loss as a ``torch.library`` custom op: what ``torch.compile`` traces.

Eager calls go through ``functions.FusedKD`` (the backward scales the saved gradient in place, and
moves no data when grad_output is 1). Under ``torch.compile`` the same backend call runs inside the
opaque op ``fastkd::kd_forward`` instead: only tensors and scalars cross the graph, a fake
implementation gives the shapes, and the op is functional — the meters' statistics come back as
outputs that the caller adds to the meters' state, and the backward is one multiplication that
Inductor can fuse. The spec crosses as its fields, in KDSpec's order: the op's schema is built from
that field list, so the spec's fields are named once (in KDSpec).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import backends
from .._core.spec import KDSpec, backward_factor, wide
from ..backends.torch import scale_grad  # out of place, in fp32 (float64 for float64): traceable tensor ops
from ..calibration import CalibrationMeter
from .functions import refuse_second_derivative

EMPTY = (0,)  # the stand-in for an output that is not asked for (custom ops cannot return None)
# the op's arguments before the spec's fields; ``rows_on_host``: the row count when the host knows it
# (a count, or a caller's num_items), used when ``row_count`` (a device count) is None
ARGS = ("Tensor s", "Tensor t", "Tensor? labels", "Tensor? row_count", "float rows_on_host", "bool grad_s",
        "bool grad_t", "bool reduce", "int num_bins", "bool meter_s", "bool meter_t", "str backend")
SPEC_TYPES = {"float": "float", "int": "int", "Divergence": "int"}  # KDSpec's annotations -> schema types
SPEC_ARGS = tuple(f"{SPEC_TYPES[f.type]} {f.name}" for f in dataclasses.fields(KDSpec))
SCHEMA = f"({', '.join(ARGS + SPEC_ARGS)}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(KDSpec))


def _meter_size(num_bins: int) -> int:
    return 3 * (num_bins + 1) + 2  # CalibrationMeter.state


def _forward(s, t, labels, row_count, rows_on_host, grad_s, grad_t, reduce, num_bins, meter_s, meter_t, backend,
             *spec_fields):
    """(loss, grad_s, grad_t, student meter delta, teacher meter delta); absent ones are empty."""
    meters = [CalibrationMeter(num_bins) if on else None for on in (meter_s, meter_t)]
    loss, gs, gt = backends.load(backend).kd_forward(
        s, t, labels, row_count if row_count is not None else rows_on_host, KDSpec(*spec_fields), grad_s, grad_t,
        *meters, reduce=reduce)
    gs = gs if gs is not None else s.new_empty(EMPTY)
    gt = gt if gt is not None else t.new_empty(EMPTY)
    deltas = [m._state_on(s.device).clone() if m is not None else s.new_empty(EMPTY, dtype=torch.float64)
              for m in meters]
    return loss, gs, gt, *deltas


kd_forward = torch.library.custom_op("fastkd::kd_forward", _forward, mutates_args=(), schema=SCHEMA)


@kd_forward.register_fake
def _(s, t, labels, row_count, rows_on_host, grad_s, grad_t, reduce, num_bins, meter_s, meter_t, backend,
      *spec_fields):
    loss = s.new_empty(() if reduce else (s.shape[0],), dtype=wide(s.dtype, t.dtype))  # the torch backend's loss
    gs = torch.empty_like(s) if grad_s else s.new_empty(EMPTY)
    gt = torch.empty_like(t) if grad_t else t.new_empty(EMPTY)
    deltas = [s.new_empty((_meter_size(num_bins),) if on else EMPTY, dtype=torch.float64)
              for on in (meter_s, meter_t)]
    return loss, gs, gt, *deltas


def _setup_context(ctx, inputs, output):
    s, t, _, row_count, rows_on_host, grad_s, grad_t = inputs[:7]
    _, gs, gt, delta_s, delta_t = output
    ctx.mark_non_differentiable(gs, gt, delta_s, delta_t)
    ctx.save_for_backward(gs, gt, row_count)
    ctx.rows_on_host, ctx.spec, ctx.computed = rows_on_host, KDSpec(*inputs[len(ARGS):]), (grad_s, grad_t)
    ctx.dtypes, ctx.n_inputs = (s.dtype, t.dtype), len(inputs)


def _backward(ctx, grad_loss, *_):
    refuse_second_derivative("kl_loss / kd_loss (torch.compile)")
    gs, gt, row_count = ctx.saved_tensors
    dtype = wide(grad_loss.dtype, *ctx.dtypes)
    factor = grad_loss.to(dtype)  # float64 logits: float64 arithmetic, as in the eager backward
    rows = backward_factor(row_count if row_count is not None else ctx.rows_on_host, ctx.spec, dtype)
    if rows is not None:  # fp16: the row scale was left to the backward (KDSpec.grad_unit)
        factor = factor * rows
    grads = [scale_grad(g, factor) if computed else None for g, computed in zip((gs, gt), ctx.computed)]
    return (*grads,) + (None,) * (ctx.n_inputs - 2)


kd_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_kd(s, t, labels, row_count, spec: KDSpec, reduce: bool, backend: str, meter, teacher_meter):
    """The traced form of ``functions.FusedKD.apply``: one op call, then the meters' in-place update."""
    grad_on = torch.is_grad_enabled()
    num_bins = (meter or teacher_meter).num_bins if (meter or teacher_meter) is not None else 1
    fields = [int(spec.divergence) if name == "divergence" else getattr(spec, name) for name in SPEC_FIELDS]
    loss, _, _, delta_s, delta_t = kd_forward(
        s, t, labels, row_count if torch.is_tensor(row_count) else None,
        float(row_count) if not torch.is_tensor(row_count) else 0.0, grad_on and s.requires_grad,
        grad_on and t.requires_grad, reduce, num_bins, meter is not None, teacher_meter is not None, backend,
        *fields)
    for m, delta in ((meter, delta_s), (teacher_meter, delta_t)):
        if m is not None:
            m.state.add_(delta.detach())  # statistics, not part of the loss's graph
    return loss
