"""The scalar description of one fused KD evaluation, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("kl", "reverse_kl", "jsd")  # index = the kernels' DIVERGENCE code


@dataclass(frozen=True)
class KDSpec:
    inv_temperature: float
    kd_scale: float  # weight of the per-row divergence (alpha * T^2 in kd_loss, / C for "mean")
    ce_scale: float  # weight of the per-row hard-label cross-entropy at T = 1 (1 - alpha)
    divergence: int  # index into DIVERGENCES
    beta: float  # JSD mixture weight: M = beta * p_t + (1 - beta) * p_s
    ignore_index: int

    @property
    def has_ce(self) -> bool:
        return self.ce_scale != 0.0
