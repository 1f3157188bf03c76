"""Distillation from a sparse teacher: a few classes per row and their log-probabilities.

A teacher's output often arrives truncated: its K most likely classes with their
log-probabilities (top-K), computed once offline (``fastkd.teacher_cache``) or by a serving
engine; or S draws from its tempered distribution, kept as the classes drawn with their counts (a
sampled teacher). The loss reads the student's row once, gathers its K entries and writes the
student's gradient; no ``rows x vocab`` teacher tensor exists anywhere.

Per row, with student logits s over V classes, listed ids k (padding id -1, K' of them listed),
teacher log-probabilities l_k computed at the temperature T0 = ``teacher_temperature``
(q_k = exp l_k, missing mass m = 1 - sum_k q_k), the training temperature T and the power
r = T0 / T:

    student      p_s = softmax(s / T) over all V classes (never renormalised);
                 p_s,tail = 1 - sum_k p_s,k, its mass off the list (at least 2^-23, fp32's resolution)
    target       p_k = q_k^r / Z over the listed classes and p_tail = w / Z, Z = sum_k q_k^r + w, with
                   tail="bucket"        w = (V - K') (m / (V - K'))^r   m spread evenly over the unlisted
                                                                        classes, each tempered
                   tail="lumped"        w = m^r                         m as one class, tempered as a whole
                   tail="renormalize"   w = 0                           the teacher restricted to its list
                 (w = 0 in every mode when m = 0 or nothing is unlisted, K' = V)
    divergence   D = sum_k p_k log(p_k / p_s,k) + p_tail log(p_tail / p_s,tail)
    gradient     dD/d(s_j / T) = p_s,j - p_j (listed j),  p_s,j (1 - p_tail / p_s,tail) (unlisted j)
    objective    alpha T^2 D + (1 - alpha) CE(s, label), as ``kd_loss``

Why q^r: a listed log-probability at T0 is z_k / T0 - log Z_T0 (z the teacher's logits), so
l_k T0 / T = z_k / T - const: q_k^r is the full teacher's tempered probability up to the
normalisation, exactly, for every listed class. Only the tail is unknown: the full teacher's
tempered off-list weight is sum_j q_j^r over the unlisted j, with sum_j q_j = m. For r < 1 (a
teacher at T0 = 1 tempered to T > 1, the usual case) x^r is concave and subadditive, so

    m^r  <=  sum_j q_j^r  <=  (V - K') (m / (V - K'))^r
    lumped    the truth        bucket

and p_tail, increasing in w, is bounded the same way: "lumped" is the tail of a teacher whose
missing mass sits on one class, "bucket" of one that spreads it evenly, the most a tempered tail
of mass m can weigh (at T = 4 it gives the tail more of the target than the teacher's own
off-list mass; "lumped" invents no structure). For r > 1 the two bounds swap. At r = 1 (T0 = T)
both equal m, the true tail; at K' = V every mode is ``kd_loss`` on the dense teacher.

``teacher_temperature``: 1.0 (the default) for log-probabilities of the teacher's own distribution
(``log_softmax(logits).topk(K)``): r = 1/T, the loss as it was before the keyword, bit for bit.
``teacher_temperature = temperature`` for rows already at T, used as given (r = 1): the sampled mode.

A sampled teacher (``fastkd.teacher_cache.sample_teacher``): per row, S draws from
p_T = softmax(z / T) at the training temperature, kept as unique ids with counts c_k (sum S);
pass ``teacher_logprobs = log(c_k / S)`` with ``teacher_temperature = temperature``. Then the
target is q_hat = c / S (m = 0 up to rounding: every tail is the same), E[q_hat] = p_T, and the
gradient, T (p_s - q_hat) per row times alpha (plus the CE's), is linear in q_hat: an unbiased
estimate of ``kd_loss``'s gradient for the dense teacher at T, its variance falling as 1/S. The
loss VALUE is biased: E[sum q_hat log q_hat] >= sum p_T log p_T (x log x is convex), so it
overestimates the dense divergence by the expected entropy gap (compare values only at equal S).
Draws from another proposal, with importance weights w_k in place of c_k / S: pass log w_k with
``tail="renormalize"``, which divides by their sum (the self-normalised estimator: consistent,
biased at O(1/S)).

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
    """``alpha T^2 D(teacher || student) + (1 - alpha) CE(student, labels)`` from a sparse teacher.

    ``teacher_ids`` ``(..., K)`` integer (-1 pads a row with fewer classes) and ``teacher_logprobs``
    ``(..., K)``: the teacher's log-probabilities over the whole vocabulary (what
    ``log_softmax(logits).topk(K)`` or a serving engine returns), or a sampled teacher's
    log(count / S). ``teacher_temperature`` (> 0, default 1.0): the temperature those were computed
    at; the loss tempers them to ``temperature`` with the power teacher_temperature / temperature
    (``temperature`` itself: rows already at T, used as given). ``tail``: the missing mass in the
    target, matched by the student's mass off the list: "bucket" (spread evenly over the unlisted
    classes and tempered with them), "lumped" (one class tempered as a whole) or "renormalize"
    (dropped). See the module docstring for the exact objective, the bounds the two tails put on
    the full teacher's and the sampled estimator (unbiased gradient, biased value); the
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
