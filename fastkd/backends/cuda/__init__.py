"""The CUDA C++ backend (kernels/, built by build.py into fastkd._C): kd_forward and scale_grad, the
same contract as the other backends' (dense and scale only: no sparse or vocabulary-parallel kernels)."""
from __future__ import annotations

import torch

from .build import load
from ..._core import checks
from ..._core.spec import KDSpec, count_on_device, inv_count_on_host, meter_args

INPLACE_BACKWARD = True  # scale_grad reuses the saved gradient


def kd_forward(s, t, labels, row_count, spec: KDSpec, grad_s: bool, grad_t: bool, meter, teacher_meter,
               reduce: bool = False):
    """Rows (N, C) -> (loss per row fp32 (N,) or with ``reduce`` their sum, grad_s, grad_t).

    Student and teacher may differ in dtype: the kernels are compiled for every pair and read
    each in its own (no fp32 copies); each gradient comes back in its logits' dtype. The logit
    transforms (KDSpec.s_scale, ...) are not implemented here: a spec that sets one is refused
    before anything runs. A floating count (a caller's num_items tensor) is applied after the kernel,
    on the device: the extension reads an integer count."""
    checks.transforms_on_backend("cuda", spec)
    float_count = torch.is_tensor(row_count) and row_count.is_floating_point()
    if float_count:
        inv = 1.0 / count_on_device(row_count)
        row_count = 1  # the rows unscaled, then times inv below
    ext = load()
    n, c = s.shape
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    gs = torch.empty((n, c), dtype=s.dtype, device=s.device) if grad_s else None
    gt = torch.empty((n, c), dtype=t.dtype, device=t.device) if grad_t else None
    num_bins, edges = meter_args(meter, teacher_meter, s.device, loss)
    ext.kd_forward(s, t, labels, row_count if torch.is_tensor(row_count) else None,
                   inv_count_on_host(row_count), edges, loss, gs, gt,
                   meter._state_on(s.device) if meter is not None else None,
                   teacher_meter._state_on(s.device) if teacher_meter is not None else None,
                   spec.inv_temperature, spec.kd_scale, spec.ce_scale, spec.beta, int(spec.divergence),
                   spec.ignore_index, spec.has_ce, num_bins, spec.grad_unit)
    if float_count:
        loss.mul_(inv)
        if spec.row_scaled_grad:  # fp16 gradients (grad units) get the row scale in the backward
            for g in (gs, gt):
                if g is not None:
                    g.mul_(inv)
    return (loss.sum() if reduce else loss), gs, gt


def scale_grad(grad, factor):
    """The backward: grad *= factor (a scalar or one per row) in place, in fp32; skipped on the
    device where the factor is 1."""
    load().scale_grad(grad, factor.detach().to(device=grad.device, dtype=torch.float32).contiguous())
    return grad
