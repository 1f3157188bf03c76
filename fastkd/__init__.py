"""fastkd: fused knowledge-distillation losses with calibration statistics for free.

Importing fastkd touches no GPU and does not import Triton (the kernels load on first use).
"""
from .backends import available_backends
from .calibration import CalibrationMeter, CalibrationReport, calibration_error
from .fused_linear import FusedLinearKDLoss, FusedLinearSparseKDLoss, fused_linear_kd_loss, fused_linear_sparse_kd_loss
from .loss import KDLoss, KLDivLoss, KLLoss, kd_loss, kl_loss
from .sparse import SparseKDLoss, sparse_kd_loss

__all__ = ["kl_loss", "kd_loss", "KDLoss", "KLLoss", "KLDivLoss", "fused_linear_kd_loss", "FusedLinearKDLoss",
           "sparse_kd_loss", "SparseKDLoss", "fused_linear_sparse_kd_loss", "FusedLinearSparseKDLoss",
           "CalibrationMeter", "CalibrationReport", "calibration_error", "available_backends"]
__version__ = "0.1.0"
