"""The study's settings: one dataclass, from which ``fastkd distill``'s command line is built."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .models import DEFAULTS


@dataclass
class StudyConfig:
    """Every knob of ``fastkd distill``; the command line is built from these fields."""

    dataset: str = field(default="digits", metadata={"help": "digits | cifar10 | cifar100"})
    data_dir: str | None = field(default=None, metadata={"help": "where the CIFAR batches live"})
    download: bool = field(default=False, metadata={"help": "download CIFAR if it is missing"})
    teacher: str | None = field(default=None, metadata={"help": "teacher model (default by dataset)"})
    student: str | None = field(default=None, metadata={"help": "student model (default by dataset)"})
    teacher_ckpt: str | None = field(default=None, metadata={"help": "reuse a trained teacher"})
    epochs: int | None = field(default=None, metadata={"help": "student epochs (digits 40, CIFAR 30)"})
    teacher_epochs: int | None = field(default=None, metadata={"help": "teacher epochs (default: epochs)"})
    batch_size: int = field(default=128, metadata={"help": "batch size"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (digits 0.05, CIFAR 0.1)"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    temperature: float = field(default=4.0, metadata={"help": "distillation temperature T > 0"})
    alpha: float = field(default=0.9, metadata={"help": "weight of the distillation term in [0, 1]"})
    divergence: str = field(default="kl", metadata={"help": "kl | reverse_kl | jsd"})
    policy: str = field(default="constant", metadata={"help": "constant | anneal | calibration"})
    teacher_cache: list[int] | None = field(default=None, metadata={
        "help": "also distil the student from the teacher's top-K log-probabilities, cached once, "
                "for each K given (e.g. 1 2 3 5 10); one more report row per K"})
    teacher_cache_tail: str = field(default="bucket", metadata={
        "help": "the cached teacher's missing mass: bucket | renormalize (see sparse_kd_loss)"})
    num_bins: int = field(default=15, metadata={"help": "calibration bins"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and batch order"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i]"})
    backend: str | None = field(default=None, metadata={"help": "fastkd backend: auto | triton | cuda | torch"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the models"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of the run"})
    name: str | None = field(default=None, metadata={"help": "run name (default <dataset>-s<seed>)"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run"})
    log_interval: int = field(default=50, metadata={"help": "steps between progress updates"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def resolved(self) -> StudyConfig:
        """A copy with the dataset-dependent defaults filled in."""
        small = self.dataset == "digits"
        teacher, student = DEFAULTS.get(self.dataset, (None, None))
        epochs = self.epochs if self.epochs is not None else (40 if small else 30)
        return StudyConfig(**{**asdict(self),
                              "teacher": self.teacher or teacher, "student": self.student or student,
                              "epochs": epochs,
                              "teacher_epochs": self.teacher_epochs if self.teacher_epochs is not None else epochs,
                              "lr": self.lr if self.lr is not None else (0.05 if small else 0.1),
                              "name": self.name or f"{self.dataset}-s{self.seed}",
                              "teacher_cache": sorted(set(self.teacher_cache)) if self.teacher_cache else None,
                              "device": resolve_device(self.device)})


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
