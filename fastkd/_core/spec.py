"""The scalar description of one fused KD evaluation, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd")  # index = the kernels' DIVERGENCE code
# the sparse loss's student mass off the teacher's list, 1 - sum_k p_s,k, is resolved to fp32's
# epsilon: below it, it counts as this (a finite loss where cancellation would make it inf)
SPARSE_TAIL_FLOOR = 2.0**-23


@dataclass(frozen=True)
class KDSpec:
    inv_temperature: float
    kd_scale: float  # weight of the per-row divergence (alpha * T^2 in kd_loss, / C for "mean")
    ce_scale: float  # weight of the per-row hard-label cross-entropy at T = 1 (1 - alpha)
    divergence: int  # index into DIVERGENCES
    beta: float  # JSD mixture weight: M = beta * p_t + (1 - beta) * p_s
    ignore_index: int
    # 0: gradients are written final (times the row scale 1/count), so a backward with
    # grad_output == 1 moves no data. > 0 (fp16 gradients, whose range a loss scaler's 2^16 times
    # 1/rows would leave): written as grad_unit * (kd_g ga + ce_scale (p - onehot)) without the row
    # scale, so the largest coefficient is 1; the backward multiplies by
    # grad_output * (1/count) / grad_unit (see deferred_grad_factor).
    grad_unit: float = 0.0
    # per-model logit transforms, before the temperature: z' = cap tanh(scale z / cap) with a
    # softcap (cap > 0), else scale z; -inf stays -inf. s_: the student's, t_: the teacher's.
    s_scale: float = 1.0
    t_scale: float = 1.0
    s_cap: float = 0.0  # 0: no softcap
    t_cap: float = 0.0

    @property
    def has_ce(self) -> bool:
        return self.ce_scale != 0.0

    def transforms_set(self) -> list[str]:
        """The public arguments of the logit transforms this spec sets (not at their defaults)."""
        values = (("student_logit_scale", self.s_scale != 1.0), ("teacher_logit_scale", self.t_scale != 1.0),
                  ("student_softcap", self.s_cap > 0.0), ("teacher_softcap", self.t_cap > 0.0))
        return [name for name, on in values if on]

    @property
    def row_scaled_grad(self) -> bool:
        return self.grad_unit == 0.0


def inv_count_on_host(row_count) -> float:
    """1 / rows that count when the host knows it (a count, or a caller's positive ``num_items``;
    no rows: 1); 1.0 when the kernel reads a tensor."""
    return 1.0 if torch.is_tensor(row_count) else 1.0 / row_count if row_count > 0 else 1.0


COUNT_FLOOR = torch.finfo(torch.float32).tiny  # a device count is clamped here, not at 1


def count_on_device(row_count, dtype=torch.float32):
    """A device count (1-element tensor: rows that count, or a caller's ``num_items``, integer or
    floating, possibly below 1) as a 0-d tensor of ``dtype`` to divide by: clamped at fp32's smallest
    normal number, so that any positive count is used as is; 0 rows that count (all ignored) scale
    only zeros; NaN stays NaN. The kernels do the same (_triton_kd._inv_count)."""
    return row_count.to(dtype).reshape(()).clamp(min=COUNT_FLOOR)


def meter_args(meter, teacher_meter, device, stand_in):
    """(num_bins, bin edges) for the kernels; ``stand_in`` for the edges when there is no meter
    (never read). Both meters share num_bins (checked by the caller)."""
    meters = [m for m in (meter, teacher_meter) if m is not None]
    if not meters:
        return 1, stand_in
    return meters[0].num_bins, meters[0]._edges_on(device)
