"""The Triton backend's interface (the kernels load, and Triton imports, only when this runs).

For now re-exported from the flat modules fastkd/_triton_*.py, until they move in here split by
kernel family."""
from ..._triton_kd import INPLACE_BACKWARD, kd_forward, scale_grad
from ..._triton_sparse import sparse_kd_forward
from ..._triton_vocab import grads, jsd_partials, local_stats

__all__ = ["INPLACE_BACKWARD", "kd_forward", "scale_grad", "sparse_kd_forward", "local_stats", "jsd_partials",
           "grads"]
