"""torchdistill's ``KDLoss`` computed by :func:`fastkd.kd_loss`, selectable by name in a YAML config.

Importing this module registers :class:`FastKDLoss` with ``register_mid_level_loss``: torchdistill
has low-level losses (plain tensor losses, wrapped to pick their inputs), middle-level losses (modules
called with the student's and teacher's I/O dicts and the targets: its own ``KDLoss`` is one) and
high-level losses (the total, e.g. ``WeightedSumLoss`` over middle-level terms). ``FastKDLoss`` reads
the I/O dicts exactly as ``KDLoss`` does and takes its arguments, so it is a middle-level loss and
replaces ``KDLoss`` by changing the key. The config imports this module through ``dependencies``
(torchdistill's ``import_dependencies`` runs them before the criterion is built)::

    dependencies:
      - name: fastkd.integrations.torchdistill
    train:
      num_epochs: 20
      teacher:
        forward_proc: forward_batch_only   # torchdistill has no default: each model needs one
        requires_grad: False
      student:
        forward_proc: forward_batch_only
      optimizer:
        key: SGD
        kwargs: {lr: 0.1, momentum: 0.9}
      criterion:
        key: WeightedSumLoss
        kwargs:
          sub_terms:
            kd:
              criterion:
                key: FastKDLoss            # was: KDLoss
                kwargs: {student_module_path: '.', student_module_io: output,
                         teacher_module_path: '.', teacher_module_io: output,
                         temperature: 4.0, alpha: 0.5, reduction: batchmean,
                         calibration_bins: 15}   # optional: fastkd's calibration meters
              weight: 1.0

torchdistill's conventions are kept: ``alpha`` weighs the cross-entropy and ``beta`` (default
``1 - alpha``) the divergence, ``loss = alpha CE(s, y) + beta T^2 KL(p_t || p_s)``; with ``alpha`` None
or 0, or no targets, ``loss = KL(p_t || p_s)`` alone (no ``T^2``, no ``beta``). Reductions as
``KDLoss``'s: "batchmean" (KL summed / N, CE averaged), "sum", "mean" (KL averaged over N C, CE over
N). fastkd's ``kd_loss(alpha=a')`` is ``a' T^2 KL + (1 - a') CE``, so this is
``(alpha + beta) kd_loss(alpha=beta / (alpha + beta))``: one fused pass for both terms.
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("fastkd.integrations.torchdistill needs torchdistill: pip install 'fastkd[torchdistill]'") \
        from exc

from ..calibration import CalibrationMeter
from ..loss import kd_loss, kl_loss

REDUCTIONS = ("batchmean", "sum", "mean")


@register_mid_level_loss
class FastKDLoss(nn.Module):
    """torchdistill's ``KDLoss`` (same arguments, same value) computed by :func:`fastkd.kd_loss`.

    Logits ``(N, C)``; targets class indices ``(N,)``. ``calibration_bins``: when set, ``self.meter``
    and ``self.teacher_meter`` (:class:`fastkd.CalibrationMeter`) collect the student's and teacher's
    calibration statistics at T = 1 on every call with targets, inside the same pass.
    ``backend``: fastkd's (None = ``FASTKD_BACKEND`` or auto). ``reduction="none"`` is refused:
    ``KDLoss``'s is an element-wise ``(N, C)`` KL added to a per-row CE, not a per-row loss.
    Cross-entropy options (``KDLoss`` passes extra keyword arguments to ``nn.CrossEntropyLoss``) are
    refused rather than ignored: fastkd's cross-entropy has no class weights or label smoothing.
    """

    def __init__(self, student_module_path, student_module_io, teacher_module_path, teacher_module_io,
                 temperature, alpha=None, beta=None, reduction="batchmean", *, calibration_bins=None,
                 backend=None, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"FastKDLoss takes no cross-entropy options, got {sorted(kwargs)} (KDLoss would pass "
                            "them to nn.CrossEntropyLoss; fastkd's cross-entropy has none)")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r} (KDLoss's 'none' is an "
                             "element-wise (N, C) KL plus a per-row CE)")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if value is not None and not 0 <= value:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io
        self.temperature, self.alpha, self.reduction, self.backend = temperature, alpha, reduction, backend
        self.beta = beta if beta is not None or alpha is None else 1 - alpha
        self.meter = self.teacher_meter = None
        if calibration_bins is not None:
            self.meter, self.teacher_meter = CalibrationMeter(calibration_bins), CalibrationMeter(calibration_bins)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        s = student_io_dict[self.student_module_path][self.student_module_io]
        t = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        if isinstance(s, torch.Tensor) and s.dim() != 2:
            raise ValueError(f"FastKDLoss takes (N, C) logits, got {tuple(s.shape)} (KDLoss's softmax over dim 1 "
                             "and batchmean over dim 0 differ from a per-position loss beyond two dimensions)")
        temperature = self.temperature
        meters = {}
        if self.meter is not None and targets is not None:
            meters = dict(meter=self.meter, teacher_meter=self.teacher_meter)
        if self.alpha is None or self.alpha == 0 or targets is None:  # KDLoss's soft loss alone
            if meters:  # the same value through kd_loss, which carries the meters
                return kd_loss(s, t, targets, temperature=temperature, alpha=1.0, reduction=self.reduction,
                               backend=self.backend, **meters) / temperature**2
            return kl_loss(s, t, temperature, self.reduction, backend=self.backend)
        weight = self.alpha + self.beta  # > 0: alpha > 0 here and beta >= 0
        loss = kd_loss(s, t, targets, temperature=temperature, alpha=self.beta / weight, reduction=self.reduction,
                       backend=self.backend, **meters)
        return loss if weight == 1 else loss * weight
