"""The reference backend: the losses' math in plain tensor ops, on any device (float64 included).

dense.py (kd_forward, scale_grad), sparse.py (sparse_kd_forward), vocab.py (the vocabulary-parallel
executor's local_stats, jsd_partials, grads), math.py (what they share)."""
from .dense import INPLACE_BACKWARD, kd_forward, scale_grad
from .sparse import sparse_kd_forward
from .vocab import grads, jsd_partials, local_stats

__all__ = ["INPLACE_BACKWARD", "kd_forward", "scale_grad", "sparse_kd_forward", "local_stats", "jsd_partials",
           "grads"]
