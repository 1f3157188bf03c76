"""Feedback between epochs: after each epoch the student's validation metrics go to a policy that
may set the temperature and alpha of the next epoch (the last step of the method: evaluate each
epoch and feed it back into the distillation loss).

- ``constant``: T and alpha stay as configured.
- ``anneal``: a cosine schedule over the run, T from its start value down to 1 (softer targets
  early, sharper late) and alpha from its start value down to half of it (more weight on the hard
  labels late); it ignores the metrics.
- ``calibration``: driven by the validation confidence gap g = mean confidence - accuracy of the
  student. Over-confident (g > tol): raise T by ``step`` (softer teacher targets carry more
  uncertainty); under-confident (g < -tol): lower it, never below 1. If the validation NLL got
  worse than the best seen, lean on the hard labels: alpha *= 0.9 (never below 0.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("constant", "anneal", "calibration")


@dataclass
class Policy:
    name: str
    temperature: float  # start values
    alpha: float
    tol: float = 0.02
    step: float = 1.25
    max_temperature: float = 20.0

    def next(self, epoch: int, epochs: int, val: dict, temperature: float, alpha: float,
             best_nll: float) -> tuple[float, float]:
        """(T, alpha) for epoch ``epoch + 1``, given the metrics after epoch ``epoch`` (0-based)."""
        if self.name == "anneal":
            w = 0.5 * (1 + math.cos(math.pi * min(epoch + 1, epochs) / epochs))  # 1 -> 0
            return 1 + (self.temperature - 1) * w, self.alpha * (0.5 + 0.5 * w)
        if self.name == "calibration":
            gap = val["confidence"] - val["accuracy"]
            if gap > self.tol:
                temperature = min(temperature * self.step, self.max_temperature)
            elif gap < -self.tol:
                temperature = max(temperature / self.step, 1.0)
            if val["nll"] > best_nll:
                alpha = max(alpha * 0.9, 0.1)
        return temperature, alpha


def make_policy(name: str, temperature: float, alpha: float) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return Policy(name, temperature, alpha)
