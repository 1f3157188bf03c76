"""The reference backend: the losses' math in plain tensor ops, on any device (float64 included)."""
from .dense import INPLACE_BACKWARD, kd_forward, scale_grad, sparse_kd_forward

__all__ = ["INPLACE_BACKWARD", "kd_forward", "scale_grad", "sparse_kd_forward"]
