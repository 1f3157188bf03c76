"""Where the study's teachers come from, for ``fastkd distill`` and ``fastkd cache-teacher``: the
study's classifier, loaded from a checkpoint or trained from the seed, and its logits written into a
teacher cache; a Hugging Face causal LM from a local folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..teacher_cache import TeacherCacheWriter
from .config import StudyConfig
from .train import build_study_model, fit, load_checkpoint, predict


def progress_bar(**kwargs):
    """A tqdm bar; tqdm is a study extra, imported on use so that the CLI parser imports with the core."""
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def load_or_train_teacher(cfg: StudyConfig, data, ckpt: Path, log=None, writer=None):
    """(teacher, its training history): loaded from ``cfg.teacher_ckpt``, else trained (and
    checkpointed to ``ckpt``) from ``cfg.seed``."""
    teacher = build_study_model(cfg, data, cfg.teacher, cfg.seed)
    if not cfg.teacher_ckpt:
        return teacher, fit(teacher, data, cfg, "teacher", ckpt, epochs=cfg.teacher_epochs, log=log,
                            writer=writer)
    ck = load_checkpoint(Path(cfg.teacher_ckpt), cfg.device)
    try:
        teacher.load_state_dict(ck["model"] if "model" in ck else ck)
    except (RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {cfg.teacher_ckpt} does not fit {cfg.teacher}: {e}") from None
    return teacher, []


def write_classifier_rows(writer: TeacherCacheWriter, teacher, data, x: torch.Tensor, progress=True,
                          chunk: int = 4096):
    """The teacher's logits on ``x`` (as the study's distillation sees them), row by row into the cache."""
    logits = predict(teacher, data, x)
    with progress_bar(total=len(x), desc="teacher cache", unit="row", disable=not progress) as bar:
        for part in logits.split(chunk):
            writer.add_logits(part)
            bar.update(len(part))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("--model needs transformers (pip install transformers)") from None
    return transformers


def causal_lm_vocab(folder: Path) -> int:
    """The vocabulary size in a local Hugging Face folder's config, read without loading weights."""
    return _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True).vocab_size


def load_causal_lm(folder: Path, device, progress: bool):
    """The model in a local Hugging Face folder, in evaluation mode on ``device``; with
    ``progress`` off, transformers' own loading bar is silenced too."""
    transformers = _transformers()
    bars = transformers.utils.logging
    was_on = bars.is_progress_bar_enabled()
    if not progress:
        bars.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    finally:
        if was_on:
            bars.enable_progress_bar()
    return model.to(device).eval()
