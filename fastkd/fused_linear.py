"""Fused linear distillation: hidden states and output projections in, logits never materialised.

    s = h_s W_s^T + b_s    (N, V_s)        t = h_t W_t^T + b_t    (N, V_t)
    loss = kd_loss(s, t, labels, ...)      (the same objective, reductions and ignore_index)

Rows are processed in chunks of ``chunk_size``: the chunk's logits (one GEMM each, fp32
accumulation inside the GEMM, written in fp32 from fp16/bf16 inputs so that the softmax reads
them unrounded — float64 inputs stay float64), the fused kernel's loss and logit gradients (fp32),
then the gradients of the hidden states (per chunk) and of the weights and biases (accumulated
over chunks in fp32, float64 for float64 inputs, returned in their dtypes); on CUDA the projection
GEMMs take the chunk's logit gradient in the inputs' dtype. Off CUDA, 16-bit weights are widened to
fp32 once per call (4 V H bytes each, held for the call), every GEMM runs in fp32 and the weight
gradient is accumulated in place. Only one chunk of logits exists at a time.
The teacher's gradients are computed only when its tensors require grad.

Memory per chunk of R rows over V classes, in bytes: at the kernel, the student's and the
teacher's logits (4 R V each, fp32 from 16-bit inputs too) and the kernel's logit gradients (4 R V
for the student, 4 R V more for a learning teacher): 12 R V, 16 R V with a learning teacher. The
logits are then freed, and with 16-bit inputs each gradient is cast once for the projection GEMMs
(2 R V each). The default ``chunk_size`` keeps R V near 2^25 per side on a GPU (128 MiB of fp32
logits) and near 2^18 on a CPU, at least 32 rows (about five fp32 copies of a chunk's logits live at
once there; bench/RESULTS.md, CPU section).
fp32 chunk logits from a 16-bit GEMM need ``torch.mm``'s ``out_dtype`` on CUDA (torch >= 2.8);
without it the CUDA GEMM writes the inputs' dtype, widened afterwards (the logits then carry that
rounding). Off CUDA the 16-bit operands are widened to fp32 for the GEMM (exact products).

A sparse teacher (``fused_linear_sparse_kd_loss``): the teacher is its listed ids and
log-probabilities per row, no projection at all, and the loss is ``sparse_kd_loss(h_s W_s^T + b_s,
ids, logprobs, ...)``, the same target per chunk (fastkd/sparse.py derives it): the listed
probabilities q_k, computed at T0 = ``teacher_temperature``, tempered to T as q_k^r with
r = T0 / T, and the missing mass m = 1 - sum q_k, with K' classes listed of V, as one more target
class of weight (V - K') (m / (V - K'))^r (``tail="bucket"``, an upper bound on the full teacher's
tempered off-list weight for r < 1), m^r (``"lumped"``, a lower bound) or 0 (``"renormalize"``);
both bounds are the truth at r = 1 and every mode is the dense loss at K' = V. ``"conditional"``:
the teacher as "renormalize", p_k = q_k^r / sum_k q_k^r, and the student conditioned on the list
too, p~_k = exp(s_k / T) / sum_k exp(s_k / T) over the K' listed classes, D = sum_k p_k log(p_k /
p~_k), whose gradient w.r.t. s / T is p~_k - p_k on the list and 0 off it (TRL's server loss
without its tail). Sampled rows (log(count / S) of S draws at T, ``teacher_temperature =
temperature``; any tail but "conditional"): the weights' gradients are unbiased for the dense
teacher's at T (the logits' gradient is linear in the target, and the projections are linear in
it), the loss value is biased upward by the sample's entropy gap.

Vocabularies of different sizes: the distributions are compared over the student's classes.
Teacher classes beyond the student's vocabulary are dropped (the teacher's softmax is taken over
the shared classes); student classes beyond the teacher's get teacher probability 0 (logit -inf,
never 0), so the student is taught to put no mass there.
"""
from __future__ import annotations

from torch import Tensor

from ._core.enums import LINEAR_REDUCTIONS
from ._core.options import Options, OptionsModule
from ._dispatch import fused_linear as dispatch
from .calibration import CalibrationMeter


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, labels: Tensor | None = None, *,
                         student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                         temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl",
                         beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
                         chunk_size: int | None = None, backend: str | None = None,
                         num_items: float | Tensor | None = None, meter: CalibrationMeter | None = None,
                         teacher_meter: CalibrationMeter | None = None,
                         return_entropy: bool = False, student_logit_scale: float = 1.0,
                         teacher_logit_scale: float = 1.0, student_softcap: float | None = None,
                         teacher_softcap: float | None = None, group=None) -> Tensor | tuple[Tensor, Tensor]:
    """``kd_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, labels, ...)`` without materialising the logits.

    Hidden states ``(..., H)`` (student and teacher may have different H), weights ``(V, H)``.
    Reductions "batchmean", "sum" and "mean" ("none" would need a weight gradient per row: use
    :func:`fastkd.kd_loss` on materialised logits for that). Under ``torch.autocast`` the inputs are
    cast to its dtype as ``F.linear``'s would be (fp32 weights, bf16 hidden states: fine).

    Only the rows whose label is not ``ignore_index`` are projected. Weights that are DTensors
    (FSDP2, tensor parallel) are gathered once per call. ``num_items``: as in :func:`kd_loss`
    (gradient accumulation). ``meter`` / ``teacher_meter``: the calibration statistics of the
    student's / teacher's logits at T = 1, per labelled row, from the chunks the loss computes
    anyway (the teacher's over the student's classes, as the loss compares them).
    ``return_entropy``: return ``(loss, entropy_sum)``, the second the sum over the rows that
    count of the entropy (nats) of the student's softmax(s / T), detached: a training metric.
    The logit transforms (``*_logit_scale``, ``*_softcap``) are :func:`kd_loss`'s (the entropy is
    of the transformed student). ``group``: column-parallel heads, each rank holding its vocabulary rows of both weights (and
    biases) and the same hidden states (see :mod:`fastkd._dispatch.vocab_parallel`).

    Second derivatives are not supported: a backward with ``create_graph=True`` raises a RuntimeError
    (the gradients are computed in the forward pass and carry no graph); materialise the logits and use
    plain PyTorch ops for a term you differentiate twice.
    """
    options = Options.build(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                            ignore_index=ignore_index, reduction=reduction, reductions=LINEAR_REDUCTIONS,
                            has_labels=labels is not None, backend=backend, num_items=num_items,
                            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                            student_softcap=student_softcap, teacher_softcap=teacher_softcap, group=group,
                            chunk_size=chunk_size, return_entropy=return_entropy)
    loss, entropy_sum = dispatch.run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                     teacher_bias, labels, options, meter, teacher_meter)
    return (loss, entropy_sum) if return_entropy else loss


def fused_linear_sparse_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor,
                                teacher_logprobs: Tensor, labels: Tensor | None = None, *,
                                student_bias: Tensor | None = None, temperature: float = 4.0, alpha: float = 0.9,
                                tail: str = "bucket", teacher_temperature: float = 1.0, ignore_index: int = -100,
                                reduction: str = "batchmean",
                                chunk_size: int | None = None, backend: str | None = None,
                                validate_labels: bool = True, num_items: float | Tensor | None = None,
                                meter: CalibrationMeter | None = None, return_entropy: bool = False,
                                student_logit_scale: float = 1.0,
                                student_softcap: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``sparse_kd_loss(h_s W_s^T + b_s, teacher_ids, teacher_logprobs, labels, ...)`` without
    materialising the student's logits (and with no teacher forward at all: its top-K come from a
    cache or a serving engine). Peak memory: one chunk of student logits and its gradient (fp32,
    4 bytes per logit each; 16-bit inputs add the gradient cast for the GEMMs, 2 bytes) plus the
    gradients (fp32 for the weights). ``tail`` and ``teacher_temperature``: as in
    :func:`fastkd.sparse_kd_loss`.
    ``num_items``, ``meter``, ``return_entropy``, the student's logit transforms, the projected
    rows and second derivatives (not supported: a backward with ``create_graph=True`` raises): as in
    :func:`fused_linear_kd_loss`."""
    options = Options.build(temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                            reductions=LINEAR_REDUCTIONS, has_labels=labels is not None, backend=backend,
                            validate_labels=validate_labels, num_items=num_items,
                            student_logit_scale=student_logit_scale, student_softcap=student_softcap, tail=tail,
                            teacher_temperature=teacher_temperature, sparse=True, chunk_size=chunk_size,
                            return_entropy=return_entropy)
    loss, entropy_sum = dispatch.run_sparse(student_hidden, student_weight, student_bias, teacher_ids,
                                            teacher_logprobs, labels, options, meter)
    return (loss, entropy_sum) if return_entropy else loss


class FusedLinearKDLoss(OptionsModule):
    """Module form of :func:`fused_linear_kd_loss`; its arguments are checked at construction (and
    again when one is assigned, e.g. ``loss.temperature = 2.0``), ``num_items`` at each call."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "batchmean", chunk_size: int | None = None,
                 backend: str | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, group=None):
        super().__init__(dict(reductions=LINEAR_REDUCTIONS), temperature=temperature, alpha=alpha,
                         divergence=divergence, beta=beta, ignore_index=ignore_index, reduction=reduction,
                         chunk_size=chunk_size, backend=backend, student_logit_scale=student_logit_scale,
                         teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                         teacher_softcap=teacher_softcap, group=group)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Tensor | None = None, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None, *, num_items: float | Tensor | None = None,
                meter: CalibrationMeter | None = None, teacher_meter: CalibrationMeter | None = None) -> Tensor:
        self.options.require_labels(labels is not None)
        loss, _ = dispatch.run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                               teacher_bias, labels, self.options.with_num_items(num_items), meter, teacher_meter)
        return loss


class FusedLinearSparseKDLoss(OptionsModule):
    """Module form of :func:`fused_linear_sparse_kd_loss`; its arguments are checked at construction
    (and again when one is assigned, e.g. ``loss.tail = "lumped"``), ``num_items`` at each call."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, tail: str = "bucket",
                 teacher_temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean",
                 chunk_size: int | None = None, backend: str | None = None, student_logit_scale: float = 1.0,
                 student_softcap: float | None = None):
        super().__init__(dict(sparse=True, reductions=LINEAR_REDUCTIONS), temperature=temperature, alpha=alpha,
                         tail=tail, teacher_temperature=teacher_temperature, ignore_index=ignore_index,
                         reduction=reduction, chunk_size=chunk_size, backend=backend,
                         student_logit_scale=student_logit_scale, student_softcap=student_softcap)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                labels: Tensor | None = None, student_bias: Tensor | None = None, *,
                num_items: float | Tensor | None = None, meter: CalibrationMeter | None = None) -> Tensor:
        self.options.require_labels(labels is not None)
        loss, _ = dispatch.run_sparse(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs,
                                      labels, self.options.with_num_items(num_items), meter)
        return loss
