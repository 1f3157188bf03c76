"""The study's settings: one dataclass, from which ``fastkd distill``'s command line is built; and
the rule a resumed run follows: the settings it was started with, never others."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from ..sparse import TAILS
from .lm_models import LM_DEFAULTS
from .models import DEFAULTS


def teacher_cache_value(text: str) -> int | str:
    """One value of --teacher-cache: an integer K, else a cache folder (./16 is a folder named 16)."""
    try:
        return int(text)
    except ValueError:
        return text


def _teacher_caches(values) -> list[int | str] | None:
    """The K asked for, sorted, then the folders in the order given; each once."""
    if not values:
        return None
    folders = [v for v in values if isinstance(v, str)]
    return sorted({v for v in values if isinstance(v, int)}) + list(dict.fromkeys(folders))


@dataclass
class StudyConfig:
    """Every knob of ``fastkd distill``; the command line is built from these fields."""

    dataset: str = field(default="digits", metadata={"help": "digits | cifar10 | cifar100"})
    data_dir: str | None = field(default=None, metadata={"help": "where the CIFAR batches live (required for CIFAR)"})
    download: bool = field(default=False, metadata={"help": "download CIFAR if it is missing"})
    task: str = field(default="classify", metadata={
        "help": "classify (the digits or CIFAR study) | lm, a small causal language model on text "
                "(fastkd/study/lm.py), whose defaults differ: teacher {teacher}, student {student}, {epochs} epochs "
                "(teacher {teacher_epochs}), lr {lr}, batch {batch_size}".format(**LM_DEFAULTS)})
    text: list[str] | None = field(default=None, metadata={
        "type": str, "metavar": "PATH", "help": "lm: UTF-8 text files to train on (default: Python's standard-library source, see lm_data.py)"})
    corpus_chars: int | None = field(default=None, metadata={"help": "lm: characters of text read (default: 300000)"})
    vocab_size: int | None = field(default=None, metadata={"help": "lm: the BPE vocabulary trained (default: 2048)"})
    seq_len: int | None = field(default=None, metadata={"help": "lm: tokens per sequence (default: 64)"})
    sparse_k: list[int] | None = field(default=None, metadata={
        "help": "lm: K = S of the sparse teachers: per value one student per top-K tail and one sampled "
                "(default: 4 16)"})
    teacher: str | None = field(default=None, metadata={
        "help": "teacher model (default: mlp-large on digits, resnet18 on CIFAR)"})
    student: str | None = field(default=None, metadata={
        "help": "student model (default: mlp-tiny on digits, mobilenet_v2 on CIFAR)"})
    teacher_ckpt: str | None = field(default=None, metadata={
        "help": "load the teacher from this checkpoint (an earlier run's teacher.pt) instead of training it"})
    epochs: int | None = field(default=None, metadata={"help": "student epochs (default: 40 on digits, 30 on CIFAR)"})
    teacher_epochs: int | None = field(default=None, metadata={"help": "teacher epochs (default: --epochs)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "batch size (default: 128; with --task lm 32 sequences)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: 0.05 on digits, 0.1 on CIFAR)"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    temperature: float = field(default=4.0, metadata={"help": "distillation temperature T > 0"})
    alpha: float = field(default=0.9, metadata={"help": "weight of the distillation term in [0, 1]"})
    divergence: str = field(default="kl", metadata={"help": "kl | reverse_kl | jsd"})
    policy: str = field(default="constant", metadata={"help": "constant | anneal | calibration"})
    teacher_cache: list[int | str] | None = field(default=None, metadata={
        "type": teacher_cache_value, "metavar": "K|DIR",
        "help": "also distil the student from sparse teachers, one more report row each: an integer K is "
                "the teacher's top-K, cached by the run (e.g. 1 2 3 5 10); a folder is a cache fastkd "
                "cache-teacher wrote over the training split, top-K (row \"top<K>-<tail>\") or sampled "
                "(--sample S, row \"sampled-S<S>\"; its temperature must be --temperature, with --policy "
                "constant). Integers and folders mix; write ./16 for a folder named 16"})
    teacher_cache_tail: str = field(default="bucket", metadata={
        "help": "a top-K teacher's missing mass (see sparse_kd_loss): " + " | ".join(TAILS)})
    num_bins: int = field(default=15, metadata={"help": "calibration bins"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and batch order"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i]"})
    backend: str | None = field(default=None, metadata={
        "help": "fastkd backend: auto | triton | cuda | torch (default: $FASTKD_BACKEND, else auto)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the models"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run"})
    name: str | None = field(default=None, metadata={
        "help": "run name (default: <dataset>-s<seed>; with --seeds, <dataset>-seeds<seeds>)"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --out-dir/--name from its checkpoints, with the settings it was started "
                "with (an option given that differs from them is refused)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the run in --out-dir/--name: its checkpoints, reports, figures, logs and teacher "
                "cache are deleted first"})
    log_interval: int = field(default=50, metadata={"help": "steps between progress updates"})
    progress: bool = field(default=True, metadata={"help": "show progress bars", "off": "no progress bars"})

    def resolved(self) -> StudyConfig:
        """A copy with the dataset-dependent defaults filled in."""
        if self.task == "lm":  # the language-model study's defaults (fastkd/study/lm.py)
            given = asdict(self)
            filled = {k: given[k] if given[k] is not None else v for k, v in LM_DEFAULTS.items()}
            if self.epochs is not None and self.teacher_epochs is None:
                filled["teacher_epochs"] = self.epochs  # as below: --teacher-epochs defaults to --epochs
            return StudyConfig(**{**given, **filled, "sparse_k": sorted(set(filled["sparse_k"])),
                                  "name": self.name or f"lm-s{self.seed}", "device": resolve_device(self.device)})
        small = self.dataset == "digits"
        teacher, student = DEFAULTS.get(self.dataset, (None, None))
        epochs = self.epochs if self.epochs is not None else (40 if small else 30)
        return StudyConfig(**{**asdict(self),
                              "teacher": self.teacher or teacher, "student": self.student or student,
                              "epochs": epochs, "batch_size": self.batch_size if self.batch_size is not None else 128,
                              "teacher_epochs": self.teacher_epochs if self.teacher_epochs is not None else epochs,
                              "lr": self.lr if self.lr is not None else (0.05 if small else 0.1),
                              "name": self.name or f"{self.dataset}-s{self.seed}",
                              "teacher_cache": _teacher_caches(self.teacher_cache),
                              "device": resolve_device(self.device)})


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_device(device: str):
    """A ValueError naming --device, before any work, for a device this machine does not have."""
    if device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: auto, cpu or cuda[:i]") from None
    if d.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         "use --device cpu, or auto")
    n = torch.cuda.device_count()
    if d.index is not None and d.index >= n:
        raise ValueError(f"--device {device}: this machine has {n} CUDA GPU{'s' if n > 1 else ''} (cuda:0 to cuda:{n - 1})")


# What a resumed run (or a finished seed reused by --seeds --resume) may change: where the run lives,
# how it reports progress, what to do with its folder. Every other setting changes what is computed.
NOT_COMPARED = ("resume", "overwrite", "progress", "log_interval", "out_dir", "name", "download")
SETTINGS = "config.json"  # in a run folder: the resolved StudyConfig it was started with


def saved_settings(folder: Path) -> dict | None:
    """The settings the run in ``folder`` was started with (its config.json; before that file existed,
    a finished run's report.json), or None for a folder holding neither."""
    for name, key in ((SETTINGS, None), ("report.json", "config")):
        try:
            saved = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            continue
        saved = saved.get(key) if key else saved
        if isinstance(saved, dict):
            return saved
    return None


def write_settings(folder: Path, cfg: StudyConfig):
    (Path(folder) / SETTINGS).write_text(json.dumps(asdict(cfg.resolved()), indent=2) + "\n")


def check_same_settings(folder: Path, saved: dict, cfg: StudyConfig, hint: str):
    """A ValueError naming the first setting (and both values) in which ``cfg`` differs from the
    settings ``saved`` of the run in ``folder``; ``hint`` says what to do instead."""
    want = json.loads(json.dumps(asdict(cfg.resolved())))  # tuples as lists, as read back from JSON
    default = {f.name: f.default for f in fields(StudyConfig)}  # a setting newer than the run: its default
    for k, v in want.items():
        if k not in NOT_COMPARED and saved.get(k, default[k]) != v:
            raise ValueError(f"--resume: {folder} was run with --{k.replace('_', '-')} = {saved.get(k)!r}, "
                             f"not {v!r}; {hint}")


def with_saved_settings(cfg: StudyConfig, saved: dict, given) -> StudyConfig:
    """``cfg`` with every compared setting that was not ``given`` on the command line taken from
    ``saved``: a plain ``--resume`` continues the run as it was started (its epochs, its T, ...)."""
    names = {f.name for f in fields(StudyConfig)} - set(NOT_COMPARED) - set(given)
    return replace(cfg, **{k: v for k, v in saved.items() if k in names})
