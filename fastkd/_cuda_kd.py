"""The CUDA C++ backend (kernels/): the same contract as _triton_kd.kd_forward / scale_grad."""
from __future__ import annotations

import torch

from ._cuda_build import load
from ._spec import KDSpec

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
    meters = [m for m in (meter, teacher_meter) if m is not None]
    num_bins = meters[0].num_bins if meters else 1
    edges = meters[0]._edges_on(s.device) if meters else loss  # loss: a stand-in, never read
    on_device = torch.is_tensor(row_count)
    ext.kd_forward(s, t, labels, row_count if on_device else None, 1.0 if on_device else 1.0 / max(row_count, 1),
                   edges, loss, gs, gt,
                   meter._state_on(s.device) if meter is not None else None,
                   teacher_meter._state_on(s.device) if teacher_meter is not None else None,
                   spec.inv_temperature, spec.kd_scale, spec.ce_scale, spec.beta, spec.divergence,
                   spec.ignore_index, spec.has_ce, num_bins)
    if gs is not None and gs.dtype != out_s:
        gs = gs.to(out_s)
    if gt is not None and gt.dtype != out_t:
        gt = gt.to(out_t)
    return (loss.sum() if reduce else loss), gs, gt


def scale_grad(grad, grad_output):
    """The backward: grad *= grad_output in place; skipped on the device where it is 1."""
    load().scale_grad(grad, grad_output.detach().to(torch.float32).contiguous())
    return grad
