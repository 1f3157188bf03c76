"""TRL's ``DistillationTrainer`` with its loss computed by :func:`fastkd.fused_linear_kd_loss`.

One line: ``from fastkd.integrations.trl import FastKDDistillationTrainer as DistillationTrainer``
(or use the name as it is); every argument, config field and logged metric is TRL's.

A subclass, not a patch of TRL. TRL's ``DistillationTrainer._compute_loss`` runs the two backbones,
reads the heads, resolves each model's logit scale and softcap from its config (``logit_scale``,
``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``, ``final_logit_softcapping``: a
table that grows with each model family) and then calls its module-level function
``_chunked_divergence_loss``. Copying that method would freeze that table at one TRL version; so the
subclass keeps TRL's method and puts :func:`chunked_divergence_loss` (same signature, same return)
in the place of that one call, for the duration of its own ``_compute_loss`` only. Other
``DistillationTrainer`` objects in the process keep TRL's loss (two trainers stepping at the same
time in two threads of one process would see each other's choice: train them in processes).

TRL's objective, mapped exactly: with the same hidden states, heads, mask and temperature,
TRL's per-token divergence D (``beta`` = 0: KL(p_t || p_s); 1: KL(p_s || p_t); else the generalized
JSD ``beta KL(p_t || M) + (1 - beta) KL(p_s || M)``, ``M = beta p_t + (1 - beta) p_s``, which is
fastkd's ``divergence="jsd"`` with the same ``beta``) summed over the completion tokens and divided by
their count or by ``num_items_in_batch``, equals ``fused_linear_kd_loss(..., alpha=1) / T^2`` (fastkd
weighs the divergence by T^2 as Hinton's recipe does; TRL does not). The mask becomes labels
(``ignore_index`` where it is 0), which with ``alpha=1`` only select the rows.

Padded vocabularies: TRL refuses a teacher whose ``vocab_size`` differs from the student's, even
when the two heads differ only by padding rows (Qwen2.5: 151936 rows for the small models, 152064
for the large ones, 151665 tokens in the tokenizer). This trainer accepts heads of different sizes
when every token the tokenizer can produce has a row in both, i.e. ``len(tokenizer) <= min(V_s,
V_t)``: the rows beyond are padding, which no token id reaches. The divergence is then taken over
the first ``min(V_s, V_t)`` rows of both heads (the larger head's extra padding rows are left out of
its softmax, so they get no gradient; uniform across TRL's divergences, where giving them teacher
probability 0 would make the reverse KL infinite). Any other mismatch is refused, naming the three
sizes (see :func:`check_vocabularies`).

Calibration meters are not wired in: TRL's completions are sampled from the student itself, so the
student's "accuracy" on them would measure agreement with its own sampler, not calibration. Call
:func:`fastkd.fused_linear_kd_loss` with ``meter=`` where the labels are data.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch

# The TRL releases this module supports: from 1.15 (in 1.14, _chunked_divergence_loss took chunk_size as
# its 7th positional argument); the seam check below catches a newer release that changes the function.
# scripts/check_trl_matrix.sh runs the tests against each of TRL_TESTED.
TRL_MIN = "1.15"
TRL_TESTED = ("1.15.0", "1.16.0")


def check_trl_version(version: str | None = None) -> None:
    """Raises one line naming the installed TRL and the supported range when TRL is older than
    :data:`TRL_MIN`."""
    from packaging.version import Version

    if version is None:
        import trl

        version = trl.__version__
    if Version(version) < Version(TRL_MIN):
        raise RuntimeError(f"fastkd.integrations.trl supports TRL >= {TRL_MIN} (tested: {', '.join(TRL_TESTED)}); "
                           f"TRL {version} is installed: pip install 'fastkd[trl]'")


try:
    from trl.trainer import distillation_trainer as _trl
except (ImportError, RuntimeError) as exc:  # pragma: no cover - the message is the point (TRL's lazy
    # modules wrap a failed import in a RuntimeError)
    try:
        import trl as _installed
    except ImportError:
        raise ImportError("fastkd.integrations.trl needs TRL: pip install 'fastkd[trl]'") from exc
    check_trl_version(_installed.__version__)  # an older TRL: name it and the range
    raise

from ..fused_linear import fused_linear_kd_loss

IGNORE_INDEX = -100
_TRL_NAME = "_chunked_divergence_loss"  # the module-level function DistillationTrainer._compute_loss calls


def trl_divergence(beta: float) -> tuple[str, float]:
    """TRL's ``beta`` as fastkd's ``(divergence, beta)``."""
    if beta == 0.0:
        return "kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    return "jsd", float(beta)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16's ``_chunked_divergence_loss`` (same arguments, same ``(loss, entropy_sum, n_valid)``)
    computed by :func:`fastkd.fused_linear_kd_loss`.

    Hidden states ``(B, K, H)`` (the teacher's H may differ), heads ``(V, H)``, ``completion_mask``
    ``(B, K)`` (nonzero = counted). ``loss`` = the summed divergence / ``num_items_in_batch`` (a number
    or a one-element tensor) or / the counted tokens; ``entropy_sum`` = the student's entropy in nats
    of softmax(z / T) summed over the counted tokens (detached); ``n_valid`` = the counted tokens.
    Logits are transformed as TRL does: ``z = softcap tanh(scale x / softcap)`` (or ``scale x``), then
    divided by T. Weights are cast to the hidden states' compute dtype as TRL casts them.
    ``backend`` / ``chunk_size``: fastkd's.
    """
    divergence, jsd_beta = trl_divergence(beta)
    rows = min(student_lm_head_weight.shape[0], teacher_lm_head_weight.shape[0])
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:  # padding rows (checked by the trainer)
        student_lm_head_weight, teacher_lm_head_weight = student_lm_head_weight[:rows], teacher_lm_head_weight[:rows]
        student_lm_head_bias = None if student_lm_head_bias is None else student_lm_head_bias[:rows]
        teacher_lm_head_bias = None if teacher_lm_head_bias is None else teacher_lm_head_bias[:rows]
    valid = completion_mask.to(student_hidden_states.device) != 0
    labels = torch.where(valid, 0, IGNORE_INDEX).reshape(student_hidden_states.shape[:-1])
    s_dtype, t_dtype = _compute_dtype(student_hidden_states), _compute_dtype(teacher_hidden_states)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(student_hidden_states.device)
    loss, entropy_sum = fused_linear_kd_loss(
        student_hidden_states.to(s_dtype), student_lm_head_weight.to(s_dtype),
        teacher_hidden_states.to(t_dtype), teacher_lm_head_weight.to(t_dtype), labels,
        student_bias=student_lm_head_bias, teacher_bias=teacher_lm_head_bias,
        temperature=temperature, alpha=1.0, divergence=divergence, beta=jsd_beta, ignore_index=IGNORE_INDEX,
        reduction="batchmean", num_items=num_items_in_batch,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping,
        return_entropy=True, backend=backend, chunk_size=chunk_size)
    return loss / temperature**2, entropy_sum, completion_mask.reshape(-1).ne(0).sum()


def tokenizer_size(processing_class) -> int:
    """The number of token ids the tokenizer (or a processor's tokenizer) can produce, added tokens too."""
    return len(getattr(processing_class, "tokenizer", processing_class))


def check_vocabularies(student_rows: int, teacher_rows: int | None, tokens: int) -> None:
    """Heads of different sizes are accepted when the rows beyond the tokenizer's ``tokens`` ids are
    padding: ``tokens <= min(student_rows, teacher_rows)`` (``teacher_rows`` None: a served teacher,
    whose ids are checked as they arrive). Otherwise a ValueError names the three sizes."""
    smaller = student_rows if teacher_rows is None else min(student_rows, teacher_rows)
    if tokens > smaller:
        sizes = f"the student's head has {student_rows} rows" + (
            "" if teacher_rows is None else f", the teacher's {teacher_rows}")
        raise ValueError(f"{sizes} and the tokenizer {tokens} tokens: token ids {smaller}..{tokens - 1} have no row in "
                         f"the {'student' if smaller == student_rows else 'teacher'}'s head. Heads may differ only by "
                         "padding rows, beyond the tokenizer's vocabulary")


@contextlib.contextmanager
def _same_vocab_size_for_trl(student, teacher):
    """While TRL's __init__ runs, the teacher's config reports the student's vocab_size: TRL refuses
    any difference, padding rows too; this module checks the rule instead (check_vocabularies)."""
    config = teacher.config.get_text_config()
    own = config.vocab_size
    config.vocab_size = student.config.get_text_config().vocab_size
    try:
        yield
    finally:
        config.vocab_size = own


def _check_trl_seam():
    """The TRL function replaced must take the arguments this module's takes, in the same order."""
    theirs = getattr(_trl, _TRL_NAME, None)
    ours = [p.name for p in inspect.signature(chunked_divergence_loss).parameters.values()
            if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    found = None if theirs is None else list(inspect.signature(theirs).parameters)
    if found != ours:
        import trl

        raise RuntimeError(f"fastkd.integrations.trl mirrors TRL 1.16's {_TRL_NAME}{tuple(ours)}, but TRL "
                           f"{trl.__version__} has " + (f"{_TRL_NAME}{tuple(found)}" if found else "no such function")
                           + ": use TRL's DistillationTrainer, or a TRL version this fastkd was tested with")


class FastKDDistillationTrainer(_trl.DistillationTrainer):
    """TRL's ``DistillationTrainer`` whose loss is :func:`fastkd.fused_linear_kd_loss`.

    Takes TRL's arguments, plus ``fastkd_backend`` (None = ``FASTKD_BACKEND`` or auto: Triton on CUDA)
    and ``fastkd_chunk_size`` (rows per chunk; None = about 32M logits per chunk and side). Accepts a
    teacher whose head differs from the student's by padding rows (module docstring) when both models
    are passed as loaded models (given as names, TRL loads them and its own check applies).
    """

    def __init__(self, *args, fastkd_backend: str | None = None, fastkd_chunk_size: int | None = None, **kwargs):
        check_trl_version()
        _check_trl_seam()
        bound = inspect.signature(_trl.DistillationTrainer.__init__).bind_partial(self, *args, **kwargs).arguments
        student, teacher = bound.get("model"), bound.get("teacher_model")
        padded = (isinstance(student, torch.nn.Module) and isinstance(teacher, torch.nn.Module)
                  and student.config.get_text_config().vocab_size != teacher.config.get_text_config().vocab_size)
        with _same_vocab_size_for_trl(student, teacher) if padded else contextlib.nullcontext():
            super().__init__(*args, **kwargs)
        if padded:
            check_vocabularies(student.get_output_embeddings().weight.shape[0],
                               teacher.get_output_embeddings().weight.shape[0], tokenizer_size(self.processing_class))
        self.fastkd_loss = functools.partial(chunked_divergence_loss, backend=fastkd_backend,
                                             chunk_size=fastkd_chunk_size)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        trl_loss = getattr(_trl, _TRL_NAME)
        setattr(_trl, _TRL_NAME, self.fastkd_loss)
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            setattr(_trl, _TRL_NAME, trl_loss)
