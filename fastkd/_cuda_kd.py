"""The CUDA C++ backend (kernels/): the same contract as _triton_kd.kd_forward / scale_grad."""
from __future__ import annotations

import torch

from ._cuda_build import load
from ._spec import KDSpec, inv_count_on_host, meter_args

INPLACE_BACKWARD = True  # scale_grad reuses the saved gradient


def kd_forward(s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
               reduce: bool = False):
    """Rows (N, C) -> (loss per row fp32 (N,) or with ``reduce`` their sum, grad_s, grad_t)."""
    ext = load()
    out_s, out_t = s.dtype, t.dtype
    if s.dtype != t.dtype:  # mixed precision: compute both in fp32 (exact upcast), cast grads back
        s, t = s.float(), t.float()
    n = s.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    gs = torch.empty_like(s) if grad_s else None
    gt = torch.empty_like(t) if grad_t else None
    num_bins, edges = meter_args(meter, teacher_meter, s.device, loss)
    ext.kd_forward(s, t, labels, row_count if torch.is_tensor(row_count) else None,
                   inv_count_on_host(row_count), edges, loss, gs, gt,
                   meter._state_on(s.device) if meter is not None else None,
                   teacher_meter._state_on(s.device) if teacher_meter is not None else None,
                   spec.inv_temperature, spec.kd_scale, spec.ce_scale, spec.beta, spec.divergence,
                   spec.ignore_index, spec.has_ce, num_bins, spec.grad_unit)
    if gs is not None and gs.dtype != out_s:
        gs = gs.to(out_s)
    if gt is not None and gt.dtype != out_t:
        gt = gt.to(out_t)
    return (loss.sum() if reduce else loss), gs, gt


def scale_grad(grad, factor):
    """The backward: grad *= factor (a scalar or one per row) in place, in fp32; skipped on the
    device where the factor is 1."""
    load().scale_grad(grad, factor.detach().to(device=grad.device, dtype=torch.float32).contiguous())
    return grad
