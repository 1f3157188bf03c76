"""The public losses: ``kl_loss``, ``kd_loss`` and their ``nn.Module`` wrappers ``KLLoss``, ``KDLoss``
(``KLDivLoss``: ``KLLoss``'s deprecated name; both take logits, unlike ``torch.nn.KLDivLoss``).

Shapes: logits ``(..., C)`` are flattened to rows ``(N, C)``; labels ``(...)``. Per row, with
p_s = softmax(s / T), p_t = softmax(t / T):

    kl:          D = KL(p_t || p_s) = sum p_t (log p_t - log p_s)      (Hinton et al. 2015)
    reverse_kl:  D = KL(p_s || p_t)
    jsd:         D = beta KL(p_t || M) + (1 - beta) KL(p_s || M),  M = beta p_t + (1 - beta) p_s

    kd_loss row  = alpha T^2 D + (1 - alpha) CE(s, label)    (CE at T = 1)
    kl_loss row  = D                                         (no T^2: F.kl_div's value)

Reductions: "batchmean" = sum / rows that count, "sum", "mean" = F.kl_div's (the divergence
also divided by C; the CE part is a mean over rows, as F.cross_entropy's), "none" = per row.
Rows whose label is ``ignore_index`` add nothing and do not count.

Scalar arguments (temperature, alpha, beta, the logit transforms) are real numbers; a 0-d CPU tensor
that does not require grad counts as one (read once, on the host). Any other tensor in their place
raises a TypeError naming the argument: the losses give their scalars no gradient, and a tensor on
a GPU would synchronise the host in every call (pass ``float(T)`` once instead).

Logit transforms (per model, before the temperature; the hard-label CE and the meters see them
too): z' = cap tanh(scale z / cap) with a softcap, else scale z — ``logit_scale`` (Cohere; Granite's
1 / logits_scaling) and Gemma's final-logit softcapping, in TRL's order (scale, softcap, then 1/T).
A -inf logit stays -inf under a softcap (a masked class keeps no mass; the plain formula would give
it -cap), and its gradient is 0; +inf tends to +cap.

The gradient is computed in the forward pass (the loss is almost always the last op); the
backward only scales it by ``grad_output``. Second derivatives are not supported: a backward with
``create_graph=True`` (a gradient penalty, ``gradgradcheck``, a Hessian-vector product) raises a
RuntimeError rather than return a gradient without a graph; write a term you differentiate twice
with plain PyTorch ops.
"""
from __future__ import annotations

import warnings

from torch import Tensor

from ._core.enums import DIVERGENCES, REDUCTIONS  # noqa: F401  (the public choices, read by the study's CLI)
from ._core.options import Options, OptionsModule
from ._dispatch import dense
from .calibration import CalibrationMeter


def kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
            reduction: str = "batchmean", *, ignore_index: int = -100, labels: Tensor | None = None,
            backend: str | None = None, validate_labels: bool = True,
            num_items: float | Tensor | None = None, student_logit_scale: float = 1.0,
            teacher_logit_scale: float = 1.0, student_softcap: float | None = None,
            teacher_softcap: float | None = None, group=None) -> Tensor:
    """KL(p_t || p_s) of tempered softmaxes: a drop-in for the PyTorch KD recipe's ``F.kl_div``.

    ``kl_loss(s, t, temperature=T)`` equals
    ``F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")`` for
    ``(N, C)`` logits, in value and gradient (the ``T^2`` factor is the caller's, as there); second
    derivatives are not supported (a backward with ``create_graph=True`` raises: use the recipe itself
    for a term you differentiate twice).
    ``temperature`` and ``reduction`` may be passed by position, as to ``F.kl_div``; the rest is
    keyword-only, and a tensor in their place raises a TypeError naming them (``kl_loss(s, t, labels)``
    is refused: labels go in ``labels=``). ``labels`` only masks rows equal to ``ignore_index``.
    ``validate_labels=False`` skips the range check of labels (its one host synchronisation).
    ``num_items``, the logit transforms (``*_logit_scale``, ``*_softcap``) and ``group``: see
    :func:`kd_loss`.
    """
    options = Options.build(temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                            has_labels=labels is not None, backend=backend, validate_labels=validate_labels,
                            num_items=num_items, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap, group=group)
    return dense.run(student_logits, teacher_logits, labels, options)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
            temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl", beta: float = 0.5,
            ignore_index: int = -100, reduction: str = "batchmean", meter: CalibrationMeter | None = None,
            teacher_meter: CalibrationMeter | None = None, backend: str | None = None,
            validate_labels: bool = True, num_items: float | Tensor | None = None,
            student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
            student_softcap: float | None = None, teacher_softcap: float | None = None, group=None) -> Tensor:
    """The distillation objective ``alpha T^2 D(p_t, p_s) + (1 - alpha) CE(s, labels)`` in one pass.

    ``meter`` / ``teacher_meter`` (:class:`CalibrationMeter`) collect the calibration statistics
    of the student's / teacher's logits at T = 1 inside the same pass. See the module docstring
    for the divergences and reductions. ``num_items`` (with "batchmean"): divide the sum by this
    instead of the rows that count — the global count under gradient accumulation or DDP (a
    positive number, or a one-element integer or floating tensor, used as is when > 0, e.g. TRL's
    ``num_items_in_batch / num_processes``); the scale is folded into the kernel, so the backward
    still moves no data.

    Logit transforms, each model's own, applied before the temperature: with a softcap
    ``z' = softcap tanh(logit_scale z / softcap)``, else ``z' = logit_scale z`` (``logit_scale``:
    Cohere's, Granite's ``1 / logits_scaling``; ``softcap``: Gemma's final-logit softcapping;
    TRL's order). The divergence compares softmax(z'_s / T) with softmax(z'_t / T); the CE and the
    meters see z' at T = 1. A -inf logit stays -inf (a masked class keeps no mass). Triton and
    torch backends only.

    ``group`` (a ``torch.distributed`` process group): the vocabulary is split over its ranks, each
    holding the same rows and its slice ``(..., V_r)`` of both logits (in rank order; labels are
    global class ids); DTensors sharded on the last dimension are recognised without it. The loss,
    each slice's gradient and the meters equal the one-process result, for O(N) floats of
    communication: see :mod:`fastkd._dispatch.vocab_parallel`.

    First derivatives only: second derivatives are not supported (a backward with
    ``create_graph=True`` raises a RuntimeError; use plain PyTorch ops for a term you differentiate
    twice, e.g. a gradient penalty).
    """
    options = Options.build(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                            ignore_index=ignore_index, reduction=reduction, has_labels=labels is not None,
                            backend=backend, validate_labels=validate_labels, num_items=num_items,
                            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                            student_softcap=student_softcap, teacher_softcap=teacher_softcap, group=group)
    return dense.run(student_logits, teacher_logits, labels, options, meter, teacher_meter)


class KLLoss(OptionsModule):
    """Module form of :func:`kl_loss`: ``forward(student_logits, teacher_logits, labels=None)``.

    It takes *logits* of both models and applies the tempered softmaxes itself; it is not
    ``torch.nn.KLDivLoss``, which takes the student's log-probabilities and the teacher's
    probabilities. The arguments are checked here, at construction (assigning one, e.g.
    ``loss.temperature = 2.0``, checks it again)."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", *, ignore_index: int = -100,
                 backend: str | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, group=None):
        super().__init__({}, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                         backend=backend, student_logit_scale=student_logit_scale,
                         teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                         teacher_softcap=teacher_softcap, group=group)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return dense.run(student_logits, teacher_logits, labels, self.options)


class KLDivLoss(KLLoss):
    """Deprecated: :class:`KLLoss` under its old name, which invited swapping it with
    ``torch.nn.KLDivLoss`` (log-probabilities and probabilities in: fed to this module they give
    another number, silently). Warns at construction; removed in the next release."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                 backend: str | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, group=None):
        warnings.warn("fastkd.KLDivLoss is deprecated and will be removed in the next release: use fastkd.KLLoss, "
                      "the same module under a name that does not promise torch.nn.KLDivLoss's inputs. It takes "
                      "the student's and the teacher's logits (it applies the tempered softmaxes), not "
                      "log-probabilities and probabilities as torch.nn.KLDivLoss does.",
                      DeprecationWarning, stacklevel=2)
        super().__init__(temperature, reduction, ignore_index=ignore_index, backend=backend,
                         student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                         student_softcap=student_softcap, teacher_softcap=teacher_softcap, group=group)


class KDLoss(OptionsModule):
    """Module form of :func:`kd_loss`; ``forward(s, t, labels, meter=None, teacher_meter=None)``. The
    arguments are checked here, at construction (assigning one, e.g. ``loss.temperature = 2.0``,
    checks it again)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "batchmean", backend: str | None = None,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, group=None):
        super().__init__({}, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                         ignore_index=ignore_index, reduction=reduction, backend=backend,
                         student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                         student_softcap=student_softcap, teacher_softcap=teacher_softcap, group=group)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                meter: CalibrationMeter | None = None, teacher_meter: CalibrationMeter | None = None) -> Tensor:
        self.options.require_labels(labels is not None)
        return dense.run(student_logits, teacher_logits, labels, self.options, meter, teacher_meter)
