"""The scalar description of one fused KD evaluation, shared by every backend; its one builder, the
one fp16 gradient-unit rule and the one backward factor."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .enums import Divergence

# the sparse loss's student mass off the teacher's list, 1 - sum_k p_s,k, is resolved to fp32's
# epsilon: below it, it counts as this (a finite loss where cancellation would make it inf)
SPARSE_TAIL_FLOOR = 2.0**-23


def transform_names(s_scale, t_scale, s_cap, t_cap) -> list[str]:
    """The public arguments of the logit transforms that these values set (not at their defaults)."""
    values = (("student_logit_scale", s_scale != 1.0), ("teacher_logit_scale", t_scale != 1.0),
              ("student_softcap", s_cap > 0.0), ("teacher_softcap", t_cap > 0.0))
    return [name for name, on in values if on]


@dataclass(frozen=True)
class KDSpec:
    inv_temperature: float
    kd_scale: float  # weight of the per-row divergence (alpha * T^2 in kd_loss, / C for "mean")
    ce_scale: float  # weight of the per-row hard-label cross-entropy at T = 1 (1 - alpha)
    divergence: Divergence  # its value is the kernels' DIVERGENCE code (a plain int compares equal)
    beta: float  # JSD mixture weight: M = beta * p_t + (1 - beta) * p_s
    ignore_index: int
    # 0: gradients are written final (times the row scale 1/count), so a backward with
    # grad_output == 1 moves no data. > 0 (fp16 gradients, whose range a loss scaler's 2^16 times
    # 1/rows would leave): written as grad_unit * (kd_g ga + ce_scale (p - onehot)) without the row
    # scale (see grad_unit for its value); the backward multiplies by grad_output * backward_factor.
    grad_unit: float = 0.0
    # per-model logit transforms, before the temperature: z' = cap tanh(scale z / cap) with a
    # softcap (cap > 0), else scale z; -inf stays -inf. s_: the student's, t_: the teacher's.
    s_scale: float = 1.0
    t_scale: float = 1.0
    s_cap: float = 0.0  # 0: no softcap
    t_cap: float = 0.0
    # a sparse teacher's power r = teacher_temperature / T: its listed probabilities (and tail) enter
    # the target as q^r. 1/T for log-probabilities at T = 1 (the default), 1 for rows already at T.
    teacher_power: float = 1.0

    @property
    def has_ce(self) -> bool:
        return self.ce_scale != 0.0

    def transforms_set(self) -> list[str]:
        """The public arguments of the logit transforms this spec sets (not at their defaults)."""
        return transform_names(self.s_scale, self.t_scale, self.s_cap, self.t_cap)

    @property
    def row_scaled_grad(self) -> bool:
        return self.grad_unit == 0.0


# the largest saved-gradient entry (its bound for KL) grad_unit aims at, by what reads the gradient next
SAVED_PEAK = 2.0**14  # saved in fp16 and only scaled in the backward (kl_loss, kd_loss, sparse_kd_loss)
GEMM_PEAK = 1.0  # fed to fp16 GEMMs that sum it over classes and rows (the fused-linear losses)
LOG_RATIO_PEAK = 2.0**4  # reverse KL, JSD: their gradient multiplies by a log-ratio (room up to ~2^11)


def grad_unit(kd_g, ce_scale, divergence, dtypes, logit_scale=1.0, peak=SAVED_PEAK) -> float:
    """KDSpec.grad_unit, the one rule: 0 (gradients saved final) unless a gradient is fp16; then
    ``peak / bound``, so that a saved entry is at most ``peak``.

    The bound: for KL |kd_g (p_s - p_t) + ce (p - onehot)| <= kd_g + ce_scale, times ``logit_scale``
    (the larger of the two models' logit scales: d z' / d z <= scale, with or without a softcap).
    Reverse KL and JSD multiply by a log-ratio, unbounded a priori: their peak is at most 2^4, which
    leaves room for log-ratios up to about 2^11 before fp16 overflows.

    ``peak`` says what reads the gradient next. SAVED_PEAK = 2^14 when the fp16 gradient is saved and
    only scaled in the backward: the forward does not round it before a loss scaler's 2^16 is known,
    and high in fp16's range an entry is at least the final one (no normal fp16 entry flushed to 0)
    whenever grad_output / rows <= 2^14 / bound. GEMM_PEAK = 1 when it feeds fp16 GEMMs (the
    fused-linear losses), whose sums over classes and rows must stay in range; the row scale is
    applied after them, in fp32."""
    if torch.float16 not in dtypes:
        return 0.0
    if divergence != Divergence.KL:
        peak = min(peak, LOG_RATIO_PEAK)
    return peak / ((kd_g + ce_scale) * logit_scale)


def build_spec(options, n_classes: int, dtypes, peak=SAVED_PEAK) -> KDSpec:
    """THE spec of a call: ``options`` (a checked ``Options``), the classes a row's divergence sums
    over (the global vocabulary under group=; "mean" divides by it), the logits' dtypes (fp16 gets
    a grad_unit) and ``peak`` (see grad_unit)."""
    o = options
    temperature = o.temperature
    kd_scale = o.kd_weight * (temperature**2 if o.t_squared else 1.0) / (n_classes if o.reduction == "mean" else 1)
    s_scale, t_scale, s_cap, t_cap = o.transforms
    unit = grad_unit(kd_scale / temperature, o.ce_weight, o.divergence, dtypes, max(s_scale, t_scale), peak)
    # teacher_temperature / T, not teacher_temperature * (1 / T): at teacher_temperature = 1 both are
    # 1 / T exactly, and at teacher_temperature = T only the division gives exactly 1
    return KDSpec(1.0 / temperature, kd_scale, o.ce_weight, o.divergence, o.beta, o.ignore_index, unit,
                  s_scale, t_scale, s_cap, t_cap, o.teacher_temperature / temperature)


def wide(*dtypes):
    """The dtype of sums and scale factors: float64 when any tensor is float64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def inv_count_on_host(row_count) -> float:
    """1 / rows that count when the host knows it (a count, or a caller's positive ``num_items``;
    no rows: 1); 1.0 when the kernel reads a tensor."""
    return 1.0 if torch.is_tensor(row_count) else 1.0 / row_count if row_count > 0 else 1.0


COUNT_FLOOR = torch.finfo(torch.float32).tiny  # a device count is clamped here, not at 1


def count_on_device(row_count, dtype=torch.float32):
    """A device count (1-element tensor: rows that count, or a caller's ``num_items``, integer or
    floating, possibly below 1) as a 0-d tensor of ``dtype`` to divide by: clamped at fp32's smallest
    normal number, so that any positive count is used as is; 0 rows that count (all ignored) scale
    only zeros; NaN stays NaN. The kernels do the same (the Triton backend's _inv_count)."""
    return row_count.to(dtype).reshape(()).clamp(min=COUNT_FLOOR)


def row_scale(row_count, dtype, device):
    """1 / rows that count as a 0-d tensor of ``dtype``: from the device's count, or the host's."""
    if torch.is_tensor(row_count):
        return 1.0 / count_on_device(row_count, dtype)
    return torch.full((), inv_count_on_host(row_count), dtype=dtype, device=device)


def backward_factor(row_count, spec: KDSpec, dtype=torch.float32):
    """THE factor the backward multiplies the saved gradient by besides grad_output: None when the
    forward applied the row scale, else 1 / (rows that count * grad_unit), a device count taken in
    ``dtype`` (float64 when a gradient is float64: float64 stays float64)."""
    if spec.row_scaled_grad:
        return None
    if torch.is_tensor(row_count):
        return 1.0 / (count_on_device(row_count, dtype) * spec.grad_unit)
    return inv_count_on_host(row_count) / spec.grad_unit


def meter_args(meter, teacher_meter, device, stand_in):
    """(num_bins, bin edges) for the kernels; ``stand_in`` for the edges when there is no meter
    (never read). Both meters share num_bins (checked by the caller)."""
    meters = [m for m in (meter, teacher_meter) if m is not None]
    if not meters:
        return 1, stand_in
    return meters[0].num_bins, meters[0]._edges_on(device)
