"""The fused loss as a ``torch.library`` custom op: what ``torch.compile`` traces.

Eager calls go through ``loss._FusedKD`` (the backward scales the saved gradient in place, and moves
no data when grad_output is 1). Under ``torch.compile`` the same backend call runs inside the opaque
op ``fastkd::kd_forward`` instead: only tensors and scalars cross the graph, a fake implementation
gives the shapes, and the op is functional — the meters' statistics come back as outputs that the
caller adds to the meters' state, and the backward is one multiplication that Inductor can fuse.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._core.spec import KDSpec, count_on_device
from ..backends.torch import scale_grad  # out of place, in fp32 (float64 for float64): traceable tensor ops

EMPTY = (0,)  # the stand-in for an output that is not asked for (custom ops cannot return None)


def _meter_size(num_bins: int) -> int:
    return 3 * (num_bins + 1) + 2  # CalibrationMeter.state


@torch.library.custom_op("fastkd::kd_forward", mutates_args=())
def kd_forward(s: Tensor, t: Tensor, labels: Optional[Tensor], row_count: Optional[Tensor], rows_on_host: float,
               inv_temperature: float, kd_scale: float, ce_scale: float, divergence: int, beta: float,
               ignore_index: int, grad_unit: float, grad_s: bool, grad_t: bool, reduce: bool, num_bins: int,
               meter_s: bool, meter_t: bool, backend: str, s_scale: float, t_scale: float, s_cap: float,
               t_cap: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_s, grad_t, student meter delta, teacher meter delta); absent ones are empty.
    ``rows_on_host``: the row count when the host knows it (a count, or a caller's num_items)."""
    from ..calibration import CalibrationMeter

    spec = KDSpec(inv_temperature, kd_scale, ce_scale, divergence, beta, ignore_index, grad_unit, s_scale, t_scale,
                  s_cap, t_cap)
    meters = [CalibrationMeter(num_bins) if on else None for on in (meter_s, meter_t)]
    loss, gs, gt = backends.module(backend).kd_forward(
        s, t, labels, row_count if row_count is not None else rows_on_host, spec, grad_s, grad_t, *meters,
        reduce=reduce)
    gs = gs if gs is not None else s.new_empty(EMPTY)
    gt = gt if gt is not None else t.new_empty(EMPTY)
    deltas = [m._state_on(s.device).clone() if m is not None else s.new_empty(EMPTY, dtype=torch.float64)
              for m in meters]
    return loss, gs, gt, *deltas


@kd_forward.register_fake
def _(s, t, labels, row_count, rows_on_host, inv_temperature, kd_scale, ce_scale, divergence, beta,
      ignore_index, grad_unit, grad_s, grad_t, reduce, num_bins, meter_s, meter_t, backend, s_scale, t_scale,
      s_cap, t_cap):
    wide = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32  # the torch backend's loss
    loss = s.new_empty(() if reduce else (s.shape[0],), dtype=wide)
    gs = torch.empty_like(s) if grad_s else s.new_empty(EMPTY)
    gt = torch.empty_like(t) if grad_t else t.new_empty(EMPTY)
    deltas = [s.new_empty((_meter_size(num_bins),) if on else EMPTY, dtype=torch.float64)
              for on in (meter_s, meter_t)]
    return loss, gs, gt, *deltas


def _setup_context(ctx, inputs, output):
    s, t, _, row_count, rows_on_host = inputs[:5]
    grad_unit, grad_s, grad_t = inputs[11:14]
    _, gs, gt, delta_s, delta_t = output
    ctx.mark_non_differentiable(gs, gt, delta_s, delta_t)
    ctx.save_for_backward(gs, gt, row_count)
    ctx.rows_on_host, ctx.grad_unit, ctx.computed = rows_on_host, grad_unit, (grad_s, grad_t)
    ctx.dtypes = (s.dtype, t.dtype)


def _backward(ctx, grad_loss, *_):
    from ..loss import _refuse_second_derivative

    _refuse_second_derivative("kl_loss / kd_loss (torch.compile)")
    gs, gt, row_count = ctx.saved_tensors
    wide = torch.float64 if torch.float64 in (grad_loss.dtype, *ctx.dtypes) else torch.float32
    factor = grad_loss.to(wide)  # float64 logits: float64 arithmetic, as in the eager backward
    if ctx.grad_unit:  # fp16: the row scale was left to the backward (KDSpec.grad_unit)
        count = count_on_device(row_count, wide) if row_count is not None else \
            (ctx.rows_on_host if ctx.rows_on_host > 0 else 1.0)
        factor = factor / (count * ctx.grad_unit)
    grads = [scale_grad(g, factor) if computed else None for g, computed in zip((gs, gt), ctx.computed)]
    return (*grads,) + (None,) * 21


kd_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_kd(s, t, labels, row_count, spec: KDSpec, reduce: bool, backend: str, meter, teacher_meter):
    """The traced form of ``loss._FusedKD.apply``: one op call, then the meters' in-place update."""
    grad_on = torch.is_grad_enabled()
    num_bins = (meter or teacher_meter).num_bins if (meter or teacher_meter) is not None else 1
    loss, _, _, delta_s, delta_t = kd_forward(
        s, t, labels, row_count if torch.is_tensor(row_count) else None,
        float(row_count) if not torch.is_tensor(row_count) else 0.0, spec.inv_temperature, spec.kd_scale, spec.ce_scale,
        spec.divergence, spec.beta, spec.ignore_index, spec.grad_unit, grad_on and s.requires_grad,
        grad_on and t.requires_grad, reduce,
        num_bins, meter is not None, teacher_meter is not None, backend, spec.s_scale, spec.t_scale, spec.s_cap,
        spec.t_cap)
    for m, delta in ((meter, delta_s), (teacher_meter, delta_t)):
        if m is not None:
            m.state.add_(delta.detach())  # statistics, not part of the loss's graph
    return loss
