"""Distillation from a sparse teacher: its top-K classes and their log-probabilities per row.

A teacher's output often arrives truncated: the K most likely classes with their
log-probabilities at T = 1, computed once offline (``fastkd.teacher_cache``) or by a serving
engine. The loss then reads the student's row once, gathers its K entries and writes the
student's gradient; no ``rows x vocab`` teacher tensor exists anywhere.

Per row, with student logits s over V classes, listed ids k (padding id -1) and teacher
log-probabilities l_k at T = 1 (q_k = exp l_k, missing mass m = 1 - sum_k q_k, K' listed ids):

    student      p_s = softmax(s / T) over all V classes (never renormalised)
    teacher      p_k ~ q_k^(1/T) over the listed classes, and with tail="bucket" one more class
                 holding the missing mass, taken as spread evenly over the V - K' unlisted
                 classes: (V - K') (m / (V - K'))^(1/T) before normalisation; "renormalize"
                 drops it (the teacher restricted to its K classes)
    divergence   D = sum_k p_k log(p_k / p_s,k) + p_tail log(p_tail / p_s,tail),
                 p_s,tail = 1 - sum_k p_s,k (the student's mass off the list)

At T = 1 the bucket is exact (the teacher's own tail mass); at K = V both modes equal
``kd_loss`` on the dense teacher. The objective is ``kd_loss``'s: alpha T^2 D + (1 - alpha) CE.
The student's logit transforms (``student_logit_scale``, ``student_softcap``) are ``kd_loss``'s;
the teacher has none here: its log-probabilities are already its output distribution.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from . import backends
from ._core.spec import KDSpec
from .calibration import CalibrationMeter, _check_labels
from .loss import (REDUCTIONS, _backward_factor, _check_logits, _check_meter, _row_count,
                   _check_objective, _check_real, _check_transforms, _grad_unit, _refuse_second_derivative,
                   _scaled_grads, _wide)

TAILS = ("bucket", "renormalize")
SPARSE_KERNELS = {"fastkd._torch_kd": "fastkd._torch_kd", "fastkd.backends.triton": "fastkd.backends.triton"}
SUM_TOLERANCE = 1e-2  # teacher probabilities may sum above 1 by this much (fp16/bf16 rounding)


class _SparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, ids, logprobs, labels, row_count, spec, bucket, reduction, impl, meter, kernel):
        """``impl``: the backend (its scale_grad runs the backward); ``kernel``: its sparse_kd_forward."""
        loss, gs = kernel.sparse_kd_forward(s, ids, logprobs, labels, row_count, spec, bucket,
                                            ctx.needs_input_grad[0], meter, reduce=reduction != "none")
        ctx.impl, ctx.grads = impl, (gs, None)
        ctx.factor = _backward_factor(row_count, spec, _wide(s.dtype, logprobs.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_second_derivative("sparse_kd_loss")
        gs, _ = _scaled_grads(ctx, grad_output)
        return (gs,) + (None,) * 10


def _check_teacher(ids, logprobs, rows_shape, device):
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError("teacher_logprobs must be a floating-point tensor (fp32, fp16, bf16) of log-probabilities")
    if ids.dim() == 0 or tuple(ids.shape[:-1]) != tuple(rows_shape) or ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids must have shape {tuple(rows_shape)} + (K,) with K >= 1, got {tuple(ids.shape)}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs {tuple(logprobs.shape)} must have teacher_ids' shape {tuple(ids.shape)}")
    for x, name in ((ids, "teacher_ids"), (logprobs, "teacher_logprobs")):
        if x.device != device:
            raise ValueError(f"{name} ({x.device}) must be on the student logits' device ({device})")


def sparse_checks(ids, logprobs, rows_shape, n_cols, device, validate):
    """Shapes, dtypes and devices of a sparse teacher; with ``validate`` its values too."""
    _check_teacher(ids, logprobs, rows_shape, device)
    if validate and ids.numel():
        bad = _first_bad_teacher_row(ids, logprobs, n_cols)
        if bad is not None:
            raise ValueError(f"teacher_ids / teacher_logprobs row {bad[0]}: {bad[1]}")


def _first_bad_teacher_row(ids, logprobs, n_cols):
    """(row, what is wrong) of the first invalid teacher row, or None — one host synchronisation."""
    ids2, lp2 = ids.reshape(-1, ids.shape[-1]), logprobs.reshape(-1, ids.shape[-1]).float()
    listed = ids2 >= 0
    out_of_range = (ids2 < -1) | (ids2 >= n_cols)
    ordered = torch.where(listed, ids2, -1 - torch.arange(ids2.shape[-1], device=ids2.device)).sort(-1).values
    duplicate = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    mass = torch.where(listed, lp2.exp(), 0.0).sum(-1)
    problems = [(out_of_range.any(-1), f"ids outside [-1, {n_cols}) (-1 pads)"),
                (duplicate.any(-1), "a class listed twice"),
                (torch.where(listed, lp2.isnan() | (lp2 > SUM_TOLERANCE), False).any(-1) | (mass > 1 + SUM_TOLERANCE),
                 "log-probabilities above 0 or summing above 1 (pass log_softmax of the teacher's logits)")]
    flags = torch.stack([p for p, _ in problems])
    if not bool(flags.any()):
        return None
    row = int(flags.any(0).nonzero()[0])
    return row, problems[int(flags[:, row].nonzero()[0])][1]


def sparse_kd_loss(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                   labels: Tensor | None = None, *, temperature: float = 4.0, alpha: float = 0.9,
                   divergence: str = "kl", tail: str = "bucket", ignore_index: int = -100,
                   reduction: str = "batchmean", meter: CalibrationMeter | None = None,
                   backend: str | None = None, validate_labels: bool = True,
                   num_items: float | Tensor | None = None, student_logit_scale: float = 1.0,
                   student_softcap: float | None = None, group=None) -> Tensor:
    """``alpha T^2 D(teacher || student) + (1 - alpha) CE(student, labels)`` from a top-K teacher.

    ``teacher_ids`` ``(..., K)`` integer (-1 pads a row with fewer classes) and ``teacher_logprobs``
    ``(..., K)``: the teacher's log-probabilities at T = 1 over the whole vocabulary (what
    ``log_softmax(logits).topk(K)`` or a serving engine returns). ``tail``: "bucket" (the missing
    mass is one more class, matched by the student's mass off the list) or "renormalize" (the
    teacher restricted to its K classes). See the module docstring for the exact objective; the
    reductions, ``ignore_index``, ``meter`` (the student's calibration), ``num_items`` and the
    student's logit transforms (``student_logit_scale``, ``student_softcap``) are
    :func:`fastkd.kd_loss`'s. ``validate_labels=True`` also checks the teacher: ids in range, no
    class listed twice, probabilities summing to at most 1 (one host synchronisation for all);
    unchecked, a row with an id out of range is NaN and a duplicated id is undefined.

    ``group``: the student's vocabulary split over a process group, as in :func:`fastkd.kd_loss`;
    every rank passes the same teacher ids (global class ids) and log-probabilities, and each
    listed class is its owner's (see :mod:`fastkd.vocab_parallel`).

    Second derivatives are not supported: a backward with ``create_graph=True`` raises (as
    :func:`fastkd.kd_loss`).
    """
    if group is not None or (not torch.compiler.is_compiling() and type(student_logits).__name__ == "DTensor"):
        from . import vocab_parallel

        if group is not None or vocab_parallel.vocab_sharded_dtensor(student_logits):
            vocab_parallel.refuse_unsupported(student_logit_scale=None if student_logit_scale == 1.0 else
                                              student_logit_scale, student_softcap=student_softcap)
            return vocab_parallel.sparse(student_logits, teacher_ids, teacher_logprobs, labels, group=group,
                                         temperature=temperature, alpha=alpha, divergence=divergence, tail=tail,
                                         ignore_index=ignore_index, reduction=reduction, meter=meter,
                                         backend=backend, validate_labels=validate_labels, num_items=num_items)
    _check_logits(student_logits, "student_logits")
    s = student_logits
    c = s.shape[-1]
    sparse_checks(teacher_ids, teacher_logprobs, s.shape[:-1], c, s.device, validate_labels)
    alpha = _check_real(alpha, "alpha", 0.0, 1.0, False, False)
    if divergence != "kl":
        raise ValueError(f"divergence must be 'kl' for a sparse teacher (its unlisted classes make reverse KL "
                         f"and JSD undefined), got {divergence!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    temperature, _ = _check_objective(temperature, divergence, 0.5, ignore_index, reduction, labels, 1.0 - alpha,
                                      REDUCTIONS)
    s_scale, _, s_cap, _ = _check_transforms(student_logit_scale, 1.0, student_softcap, None)
    if labels is not None:
        _check_labels(labels, s.shape[:-1], c, ignore_index, check_range=validate_labels)
        if labels.device != s.device:
            raise ValueError(f"labels ({labels.device}) must be on the logits' device ({s.device})")
    _check_meter(meter, "meter", s.device)
    if meter is not None and labels is None:
        raise ValueError("meter needs labels (calibration compares predictions with them)")
    name = backends.resolve_name(backend, s.device, (s.dtype, teacher_logprobs.dtype))
    impl = backends.module(name)  # its scale_grad runs the backward
    if impl.__name__ not in SPARSE_KERNELS:
        raise ValueError(f"backend {name!r} has no sparse-teacher kernel; use backend='triton' or 'torch'")

    k = teacher_ids.shape[-1]
    s2 = s.reshape(-1, c)
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    ids2 = teacher_ids.reshape(-1, k).to(torch.int64).contiguous()
    lp2 = teacher_logprobs.reshape(-1, k).contiguous()
    labels2 = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    row_count = _row_count(labels2, ignore_index, reduction, s2.shape[0], s.device, num_items)
    kd_scale = alpha * temperature**2 / (c if reduction == "mean" else 1)
    spec = KDSpec(1.0 / temperature, kd_scale, 1.0 - alpha, 0, 0.5, ignore_index,
                  _grad_unit(kd_scale / temperature, 1.0 - alpha, divergence, (s.dtype,), s_scale),
                  s_scale=s_scale, s_cap=s_cap)
    with torch.autocast(s.device.type, enabled=False):
        loss = _SparseKD.apply(s2, ids2, lp2, labels2, row_count, spec, tail == "bucket", reduction, impl, meter,
                               importlib.import_module(SPARSE_KERNELS[impl.__name__]))
    return loss.reshape(s.shape[:-1]) if reduction == "none" else loss


class SparseKDLoss(nn.Module):
    """Module form of :func:`sparse_kd_loss`."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, tail: str = "bucket", ignore_index: int = -100,
                 reduction: str = "batchmean", backend: str | None = None, student_logit_scale: float = 1.0,
                 student_softcap: float | None = None, group=None):
        super().__init__()
        self.kw = dict(temperature=temperature, alpha=alpha, tail=tail, ignore_index=ignore_index,
                       reduction=reduction, backend=backend, student_logit_scale=student_logit_scale,
                       student_softcap=student_softcap, group=group)

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                labels: Tensor | None = None, meter: CalibrationMeter | None = None) -> Tensor:
        return sparse_kd_loss(student_logits, teacher_ids, teacher_logprobs, labels, meter=meter, **self.kw)
