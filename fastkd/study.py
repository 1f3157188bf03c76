"""The distillation study behind ``fastkd distill``: teacher, student alone, distilled student.

The two students start from the same initialisation; the only difference is the loss. Each model
is then measured on the test split: accuracy, calibration (ECE, MCE, NLL, Brier), top-1 agreement
with the teacher, and the ECE after temperature scaling fitted on the validation split
(Guo et al. 2017), plus a per-class precision / recall / F1 table for the students.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from . import distributed
from .calibration import CalibrationMeter
from .data import load_data
from .models import build_model, count_parameters
from .policies import make_policy
from .report import write_outputs
from .train import StudyConfig, fit, load_checkpoint, predict, summarize

MODEL_KEYS = ("teacher", "student", "distilled")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T): L-BFGS on log T, in float64 and run to
    convergence, so that T depends on the logits and not on where the optimiser stopped."""
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    x, y = logits.detach().cpu().double(), labels.cpu()  # a copy: not an inference tensor
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def build_study_model(cfg: StudyConfig, data, name: str, seed: int) -> torch.nn.Module:
    """Model ``name`` for ``data``, initialised from ``seed``, on the device (SyncBatchNorm under
    torchrun on GPUs, channels_last for images): the same seed gives the same model everywhere."""
    torch.manual_seed(seed)
    m = build_model(name, data.input_shape, data.num_classes)
    if distributed.rank_and_world()[1] > 1 and cfg.device.startswith("cuda"):
        m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)  # the statistics of the global batch
    m = m.to(cfg.device)
    return m.to(memory_format=torch.channels_last) if len(data.input_shape) == 3 else m


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


def _open_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


def run_study(cfg: StudyConfig) -> dict:
    """Runs the study (on every rank under torchrun; rank 0 writes) and returns the report."""
    cfg = cfg.resolved()
    policy = make_policy(cfg.policy, cfg.temperature, cfg.alpha)  # checks the name early
    cfg.device = distributed.init_from_env(cfg.device)
    main = distributed.is_main()
    out = Path(cfg.out_dir) / cfg.name
    if main:
        out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_data(cfg.dataset, cfg.device, cfg.data_dir, cfg.download)

    def new_model(name, seed):
        return build_study_model(cfg, data, name, seed)

    writer = _open_writer(out / "tensorboard") if main else None
    history = {}
    with open(out / "metrics.jsonl", "a" if cfg.resume else "w") if main else nullcontext() as log:
        teacher, history["teacher"] = load_or_train_teacher(cfg, data, out / "teacher.pt", log, writer)
        init = new_model(cfg.student, cfg.seed + 1).state_dict()  # one start for both students
        student = new_model(cfg.student, cfg.seed + 1)
        student.load_state_dict(init)
        history["student"] = fit(student, data, cfg, "student", out / "student.pt", epochs=cfg.epochs,
                                 log=log, writer=writer)
        distilled = new_model(cfg.student, cfg.seed + 1)
        distilled.load_state_dict(init)
        history["distilled"] = fit(distilled, data, cfg, "distilled", out / "distilled.pt",
                                   epochs=cfg.epochs, teacher=teacher, policy=policy, log=log,
                                   writer=writer)
    if writer is not None:
        writer.close()

    models = dict(zip(MODEL_KEYS, (teacher, student, distilled)))
    teacher_test = predict(teacher, data, data.x_test)
    results, meters, preds = {}, {}, {}
    shard = distributed.shard  # every rank holds the logits; the meters split the rows
    for key, model in models.items():
        test_logits = teacher_test if key == "teacher" else predict(model, data, data.x_test)
        res, meters[key] = summarize(shard(test_logits), shard(data.y_test), shard(teacher_test),
                                     cfg.num_bins, cfg.backend)
        t_star = fit_temperature(predict(model, data, data.x_val), data.y_val)
        scaled = CalibrationMeter(cfg.num_bins).update(test_logits / t_star, data.y_test).compute()
        preds[key] = test_logits.argmax(-1)
        results[key] = {"model": getattr(cfg, key if key == "teacher" else "student"),
                        "parameters": count_parameters(model), **res,
                        "agreement": float((preds[key] == teacher_test.argmax(-1)).float().mean()),
                        "fitted_temperature": t_star, "ece_after_scaling": scaled.ece}
    report = {
        "config": asdict(cfg),
        "dataset": {"name": data.name, "classes": data.class_names, "train": len(data.x_train),
                    "val": len(data.x_val), "test": len(data.x_test)},
        "results": results,
        "policy": {"name": cfg.policy,
                   "trajectory": [{"epoch": r["epoch"], "temperature": r["temperature"],
                                   "alpha": r["alpha"]} for r in history["distilled"]]},
        "history": history,
        "timing": {"seconds": time.perf_counter() - started, "device": str(cfg.device)},
    }
    if main:
        report["per_class"] = write_outputs(out, report, data, preds, meters)
        with open(out / "report.json", "w") as f:
            json.dump(report, f, indent=2)
    return report
