"""TRL's ``ServerDistillationTrainer`` with its top-k forward KL computed by
:func:`fastkd.fused_linear_sparse_kd_loss`.

One line: ``from fastkd.integrations.trl_server import FastKDServerDistillationTrainer as
ServerDistillationTrainer``; arguments, config (``ServerDistillationConfig``), the teacher's vLLM
server and logged metrics stay TRL's. Importing this module imports ``trl.experimental`` (TRL
warns about that, as it does for its own class); TRL 1.15 and 1.16 have the same server trainer.

What TRL computes (``compute_loss``): the teacher's per-token top-k log-probabilities at the
training temperature T come from the server (``VLLMClient.get_sequence_logprobs(...,
temperature=T)``, which ``trl vllm-serve --logprobs-mode processed_logprobs`` reports after
temperature scaling: q_k = softmax(z_t / T)_k, listed ids k, missing mass m = 1 - sum_k q_k). The
student runs its full forward pass, materialises log_softmax(z_s / T) over the vocabulary for every
completion position and gathers the listed ids. With ``beta == 0`` and ``loss_add_tail`` (TRL's
defaults are ``loss_top_k=1``, ``loss_add_tail=True``) the per-token divergence is a forward KL
over K + 1 classes, the listed ones and one tail class holding the rest of each side's mass::

    D = sum_k q_k (log q_k - log p_s,k) + m (log m - log(1 - sum_k p_s,k)),   p_s = softmax(z_s / T)

summed over the completion tokens and divided by their count (TRL's server path does not use
``num_items_in_batch``), then divided by the gradient-accumulation steps while training. That is
fastkd's sparse loss with ``teacher_temperature=T`` (the rows are already at T: used as given),
``tail="lumped"`` (the missing mass as one class; at the power r = 1 it equals "bucket"),
``alpha=1``, divided by T^2 (fastkd weighs the divergence by T^2, TRL does not). This trainer
computes it from the student's last hidden states and head, so no ``tokens x vocab`` tensor exists;
the logit transforms HF's forward applies (logit scale, final-logit softcap) are read from the
config as TRL's ``DistillationTrainer`` reads them. One difference, at the edge of fp32: TRL
clamps the summed listed mass of each side at exp(-1e-7) (a tail of at least ~1e-7), fastkd uses
the teacher's missing mass as given and floors the student's at 2^-23 (1.2e-7): the two agree
wherever both tails exceed 1.2e-7.

With ``loss_add_tail=False`` (and ``beta == 0``) TRL renormalises both sides over the listed
classes (a log-sum-exp over them, subtracted in log space, no clamp or floor)::

    D = sum_k q~_k (log q~_k - log p~_k),   q~_k = q_k / sum_k q_k,   p~_k = p_s,k / sum_k p_s,k

the student's distribution conditioned on the teacher's list: fastkd's ``tail="conditional"``
(same reduction, divided by T^2 likewise). fastkd conditions in log space too (its Triton kernel
takes the log-sum-exp over the K gathered logits), so the two agree to fp32 rounding. Where they
part, at the edges: a counted position for which the server returned no entry adds 0 in both, but
TRL's log-sum-exp over an empty list is -inf - -inf, masked to 0 with a zero gradient (fastkd's
row simply has no divergence term); a listed class whose student logit is -inf (a masked
vocabulary) makes the divergence infinite: fastkd returns inf, TRL's ``nan_to_num`` turns the
token's term into fp32's largest number (3.4e38) before averaging.

What stays TRL's (the trainer calls TRL's ``compute_loss`` for these configs):

- ``beta > 0`` (top-1 only in TRL): a JSD or reverse KL over the teacher's top-1 token, the
  sampled token (with the teacher's log-probability of it) and the tail. fastkd's sparse loss is a
  forward KL: the teacher's off-list mass has no per-class values, so its reverse KL and JSD over
  the vocabulary are undefined, and TRL's partition into at most three classes is another objective.

Padded vocabularies: the server's teacher has no head here. The student's head must have a row for
each of the tokenizer's tokens (rows beyond are padding; checked when the trainer is made), and each
id the teacher lists must be a row of the student's head: a teacher with more (padding) rows than
the student is fine as long as it lists none of them. An id beyond is refused, naming it and the
sizes (TRL's gather would fail with an index error, on CUDA a device assert).
"""
from __future__ import annotations

import functools

import torch

from ..fused_linear import fused_linear_sparse_kd_loss
from .trl import IGNORE_INDEX, _compute_dtype, check_trl_version, check_vocabularies, tokenizer_size

try:
    from trl.experimental.server_distillation import server_distillation_trainer as _trl_server
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("fastkd.integrations.trl_server needs TRL >= 1.15 (trl.experimental.server_distillation): "
                      "pip install 'fastkd[trl]'") from exc


def fastkd_tail(beta: float, loss_add_tail: bool) -> str | None:
    """fastkd's tail for TRL's server loss with this ``beta`` and ``loss_add_tail``; None where the
    loss stays TRL's (module docstring)."""
    if beta != 0:
        return None
    return "lumped" if loss_add_tail else "conditional"


def logit_transform(config) -> tuple[float, float | None]:
    """(logit scale, final-logit softcap) of a model config, as TRL's ``DistillationTrainer`` reads
    them: the first of ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` that is set,
    else 1 / ``logits_scaling`` (HyperCLOVA X multiplies by it); the softcap is
    ``final_logit_softcapping``."""
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            break
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def server_forward_kl_loss(student_hidden_states: torch.Tensor, student_lm_head_weight: torch.Tensor,
                           teacher_token_ids: torch.Tensor, teacher_logprobs: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 1.0, *, student_lm_head_bias: torch.Tensor | None = None,
                           student_logit_scale: float = 1.0, student_final_logit_softcapping: float | None = None,
                           backend: str | None = None, chunk_size: int | None = None,
                           loss_add_tail: bool = True) -> torch.Tensor:
    """TRL's server forward KL (``_compute_server_forward_kl_loss``) from the student's hidden
    states ``(B, C, H)`` and head ``(V, H)``: with the tail (``loss_add_tail=True``, TRL's default;
    fastkd's ``tail="lumped"``) or over the listed classes only, both sides renormalised there
    (``loss_add_tail=False``; ``tail="conditional"``).

    ``teacher_token_ids`` / ``teacher_logprobs`` ``(B, C, K)``: the server's top-k at T, a
    log-probability of -inf marking an entry the server did not return (TRL's padding);
    ``labels`` ``(B, C)``: -100 where a position is not counted. Returns the divergence summed over
    the counted positions / their count (0 when none). Logits: ``z = softcap tanh(scale x /
    softcap)`` (or ``scale x``), then / T. A listed id beyond the head's rows raises ValueError."""
    listed = teacher_logprobs > float("-inf")
    counted = labels != IGNORE_INDEX
    rows = student_lm_head_weight.shape[0]
    beyond = listed & counted[..., None] & (teacher_token_ids >= rows)
    if bool(beyond.any()):
        raise ValueError(f"the teacher server listed token id {int(teacher_token_ids[beyond].max())}, but the "
                         f"student's head has {rows} rows: the teacher's vocabulary may differ from the student's only "
                         "by padding rows that it never lists")
    listed &= counted[..., None]  # what an uncounted position holds is not read (TRL's prompt positions: ids 0)
    ids = torch.where(listed, teacher_token_ids, -1)
    logprobs = torch.where(listed, teacher_logprobs, 0.0)
    dtype = _compute_dtype(student_hidden_states)
    loss = fused_linear_sparse_kd_loss(
        student_hidden_states.to(dtype), student_lm_head_weight.to(dtype), ids, logprobs,
        torch.where(counted, 0, IGNORE_INDEX), student_bias=student_lm_head_bias, temperature=temperature,
        teacher_temperature=temperature, tail=fastkd_tail(0.0, loss_add_tail), alpha=1.0, ignore_index=IGNORE_INDEX,
        reduction="batchmean", student_logit_scale=student_logit_scale,
        student_softcap=student_final_logit_softcapping, backend=backend, chunk_size=chunk_size)
    return loss / temperature**2


class FastKDServerDistillationTrainer(_trl_server.ServerDistillationTrainer):
    """TRL's ``ServerDistillationTrainer`` whose forward KL (``beta=0``, with or without
    ``loss_add_tail``) is :func:`fastkd.fused_linear_sparse_kd_loss`; ``beta > 0`` keeps TRL's loss
    (module docstring says why). Takes TRL's arguments, plus ``fastkd_backend`` (None =
    ``FASTKD_BACKEND`` or auto: Triton on CUDA) and ``fastkd_chunk_size`` (rows per chunk)."""

    def __init__(self, *args, fastkd_backend: str | None = None, fastkd_chunk_size: int | None = None, **kwargs):
        check_trl_version()
        super().__init__(*args, **kwargs)
        # the student's head must cover the tokenizer (rows beyond it are padding); the teacher's ids
        # are checked as they arrive
        check_vocabularies(self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0], None,
                           tokenizer_size(self.processing_class))
        self.fastkd_tail = fastkd_tail(self.beta, self.loss_add_tail)
        self.fastkd_loss = functools.partial(server_forward_kl_loss, backend=fastkd_backend,
                                             chunk_size=fastkd_chunk_size, loss_add_tail=self.loss_add_tail)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fastkd_tail is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's layout for the server request: prompt and completion in one padded row, labels -100
        # outside the completions
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        completion_labels = torch.where(completion_mask.bool(), completion_ids, IGNORE_INDEX)
        inputs = {**inputs, "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
                  "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
                  "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), completion_labels], dim=1),
                  "prompt_attention_mask": prompt_mask}
        prompt_length = self._compute_prompt_length(inputs)
        teacher = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)  # outside the wrapped forward
        # the student's forward through its DDP/FSDP wrapper, as DistillationTrainer.compute_loss runs it
        unwrapped = self.accelerator.unwrap_model(model)
        loss = self._forward_redirection(model, unwrapped, self._fastkd_server_loss, unwrapped, inputs, prompt_length,
                                         teacher)
        if self.model.training:  # TRL's server path scales for gradient accumulation itself
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, None) if return_outputs else loss

    def _fastkd_server_loss(self, unwrapped, inputs, prompt_length, teacher):
        """The loss over TRL's window: positions from ``prompt_length`` on (those predicted from
        ``prompt_length - 1`` on), as many as the teacher's tensors have."""
        input_ids = inputs["input_ids"]
        window = teacher["topk_logprobs"].shape[1]
        hidden = self._get_last_hidden_state(unwrapped, input_ids, inputs["attention_mask"],
                                             input_ids.shape[1] - prompt_length)[:, :window]
        labels = inputs["labels"][:, prompt_length:prompt_length + window]
        head = unwrapped.get_output_embeddings()
        scale, softcap = logit_transform(unwrapped.config.get_text_config())
        device = head.weight.device
        return self.fastkd_loss(hidden.to(device), head.weight, teacher["topk_token_ids"].to(device),
                                teacher["topk_logprobs"].to(device), labels.to(device), self.temperature,
                                student_lm_head_bias=head.bias, student_logit_scale=scale,
                                student_final_logit_softcapping=softcap)
