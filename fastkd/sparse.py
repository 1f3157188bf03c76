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

from torch import Tensor

from ._core.enums import TAILS  # noqa: F401  (the public choices, read by the study's CLI)
from ._core.options import Options, OptionsModule
from ._dispatch import sparse as dispatch
from .calibration import CalibrationMeter


def sparse_kd_loss(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                   labels: Tensor | None = None, *, temperature: float = 4.0, alpha: float = 0.9,
                   divergence: str = "kl", tail: str = "bucket", teacher_temperature: float = 1.0,
                   ignore_index: int = -100,
                   reduction: str = "batchmean", meter: CalibrationMeter | None = None,
                   backend: str | None = None, validate_labels: bool = True,
                   num_items: float | Tensor | None = None, student_logit_scale: float = 1.0,
                   student_softcap: float | None = None, group=None) -> Tensor:
    """``alpha T^2 D(teacher || student) + (1 - alpha) CE(student, labels)`` from a top-K teacher.

    ``teacher_ids`` ``(..., K)`` integer (-1 pads a row with fewer classes) and ``teacher_logprobs``
    ``(..., K)``: the teacher's log-probabilities at T = 1 over the whole vocabulary (what
    ``log_softmax(logits).topk(K)`` or a serving engine returns). ``teacher_temperature``: the
    temperature those log-probabilities were computed at (1.0: the teacher's own distribution;
    ``temperature``: rows already at T, used as given, e.g. a sampled teacher's log(count / S)).
    ``tail``: the missing mass in the target, matched by the student's mass off the list:
    "bucket" (spread evenly over the unlisted classes and tempered with them), "lumped" (one class
    tempered as a whole) or "renormalize" (dropped). See the module docstring for the exact
    objective; the
    reductions, ``ignore_index``, ``meter`` (the student's calibration), ``num_items`` and the
    student's logit transforms (``student_logit_scale``, ``student_softcap``) are
    :func:`fastkd.kd_loss`'s. ``validate_labels=True`` also checks the teacher: ids in range, no
    class listed twice, probabilities summing to at most 1 (one host synchronisation for all);
    unchecked, a row with an id out of range is NaN and a duplicated id is undefined.

    ``group``: the student's vocabulary split over a process group, as in :func:`fastkd.kd_loss`;
    every rank passes the same teacher ids (global class ids) and log-probabilities, and each
    listed class is its owner's (see :mod:`fastkd._dispatch.vocab_parallel`).

    Second derivatives are not supported: a backward with ``create_graph=True`` raises (as
    :func:`fastkd.kd_loss`).
    """
    options = Options.build(temperature=temperature, alpha=alpha, divergence=divergence, ignore_index=ignore_index,
                            reduction=reduction, has_labels=labels is not None, backend=backend,
                            validate_labels=validate_labels, num_items=num_items,
                            student_logit_scale=student_logit_scale, student_softcap=student_softcap, group=group,
                            tail=tail, teacher_temperature=teacher_temperature, sparse=True)
    return dispatch.run(student_logits, teacher_ids, teacher_logprobs, labels, options, meter)


class SparseKDLoss(OptionsModule):
    """Module form of :func:`sparse_kd_loss`; its arguments are checked at construction (and again
    when one is assigned, e.g. ``loss.temperature = 2.0``)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, tail: str = "bucket", ignore_index: int = -100,
                 reduction: str = "batchmean", backend: str | None = None, student_logit_scale: float = 1.0,
                 student_softcap: float | None = None, group=None, teacher_temperature: float = 1.0):
        super().__init__(dict(sparse=True), temperature=temperature, alpha=alpha, tail=tail,
                         teacher_temperature=teacher_temperature, ignore_index=ignore_index, reduction=reduction,
                         backend=backend, student_logit_scale=student_logit_scale, student_softcap=student_softcap, group=group)

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                labels: Tensor | None = None, meter: CalibrationMeter | None = None) -> Tensor:
        self.options.require_labels(labels is not None)
        return dispatch.run(student_logits, teacher_ids, teacher_logprobs, labels, self.options, meter)
