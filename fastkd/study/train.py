"""The lean training loop: one model, one stage (teacher, student alone, distilled student).

Data live on the device; batches are index slices of a per-epoch permutation drawn from a
generator seeded by (seed, stage, epoch), so a resumed run draws the same batches. No host
synchronisation inside a step: ``.item()`` only at the log interval. The teacher runs under
``inference_mode`` (bf16 autocast on CUDA) and its logits are computed once when the inputs
repeat exactly (no augmentation). Checkpoints are written atomically after every epoch.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..calibration import CalibrationMeter
from ..loss import kd_loss
from ..sparse import sparse_kd_loss
from . import torchrun
from .config import StudyConfig
from .data import DataBundle
from .models import build_model
from .policies import Policy


def atomic_save(obj, path: Path):
    """torch.save to a temporary file in the same folder, then rename: a crash leaves either the
    old checkpoint or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)  # tensors and plain data only
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]  # torch's messages run over several lines
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None


def restore(ckpt: Path, device, model, opt, sched) -> dict:
    """A stage's checkpoint back into its model, optimiser and schedule; returns the loop's state
    (epoch, history, finished, ...)."""
    ck = load_checkpoint(ckpt, device)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    return ck["state"]


def log_epoch(row: dict, stage: str, epoch: int, log=None, writer=None):
    """An epoch's row into metrics.jsonl (``log``, flushed: a crash keeps what was trained) and its
    numbers into TensorBoard (``writer``) as ``stage/name``."""
    if log is not None:
        log.write(json.dumps(row) + "\n")
        log.flush()
    if writer is not None:
        for k, v in row.items():
            if isinstance(v, float):
                writer.add_scalar(f"{stage}/{k}", v, epoch)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(model, data: DataBundle, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """fp32 logits of a whole split, in evaluation mode."""
    model.eval()
    with _autocast(x.device):
        out = [model(data.prepare(x[i:i + batch_size])).float() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def summarize(logits, y, teacher_logits=None, num_bins=15, backend=None) -> tuple[dict, CalibrationMeter]:
    """Accuracy and calibration of this rank's rows of logits, the meter summed over ranks; the
    statistics come from the fused loss's meter when teacher logits are given."""
    meter = CalibrationMeter(num_bins)
    if teacher_logits is not None:
        with torch.inference_mode():
            kd_loss(logits, teacher_logits, y, alpha=1.0, meter=meter, backend=backend)
    else:
        meter.update(logits, y)
    rep = meter.all_reduce(device=logits.device).compute()
    return {"accuracy": rep.accuracy, "confidence": rep.confidence, "ece": rep.ece, "mce": rep.mce,
            "nll": rep.nll, "brier": rep.brier}, meter


def evaluate(model, data, x, y, teacher_logits=None, num_bins=15, backend=None) -> dict:
    """:func:`summarize` of ``model`` on (x, y); under torchrun each rank predicts its shard."""
    shard = torchrun.shard
    teacher_logits = shard(teacher_logits) if teacher_logits is not None else None
    return summarize(predict(model, data, shard(x)), shard(y), teacher_logits, num_bins, backend)[0]


def seed_rngs(seed: int, device: torch.device) -> None:
    """torch.manual_seed for the generators a run on ``device`` draws from (dropout and friends): the
    CPU's, and on CUDA the GPUs'. (torch.manual_seed also queues a seed for CUDA and XPU where they are
    not initialised, capturing a traceback each time: ~0.4 ms a call, a few per cent of a small CPU epoch.)"""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def _optimizer(model, lr, weight_decay, device):
    kw = dict(lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if device.type == "cuda":
        kw["fused"] = True  # one kernel for the whole update where the build has it
    try:
        return torch.optim.SGD(model.parameters(), **kw)
    except (RuntimeError, TypeError):
        kw.pop("fused", None)
        return torch.optim.SGD(model.parameters(), **kw)


def build_study_model(cfg: StudyConfig, data, name: str, seed: int) -> torch.nn.Module:
    """Model ``name`` for ``data``, initialised from ``seed``, on the device (SyncBatchNorm under
    torchrun on GPUs, channels_last for images): the same seed gives the same model everywhere."""
    torch.manual_seed(seed)
    m = build_model(name, data.input_shape, data.num_classes)
    if torchrun.rank_and_world()[1] > 1 and cfg.device.startswith("cuda"):
        m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)  # the statistics of the global batch
    m = m.to(cfg.device)
    return m.to(memory_format=torch.channels_last) if len(data.input_shape) == 3 else m


def fit(model, data: DataBundle, cfg: StudyConfig, stage: str, ckpt: Path, *, epochs: int,
        teacher=None, sparse_teacher=None, teacher_temperature: float = 1.0, policy: Policy | None = None,
        log=None, writer=None) -> list[dict]:
    """Trains ``model`` for ``epochs`` (continuing from ``ckpt`` when ``cfg.resume``); returns the
    per-epoch history. With a teacher the loss is ``kd_loss``; with ``sparse_teacher`` (the top-K
    ids and log-probabilities of every training row, on the device) ``sparse_kd_loss``, its rows at
    ``teacher_temperature`` (1: a top-K cache; T: a sampled cache, used as given); else
    cross-entropy. A stage named ``distilled-...`` draws the distilled student's batches. Under torchrun
    the model is wrapped in DistributedDataParallel and each rank takes its slice of every batch;
    only rank 0 writes the log and the checkpoint."""
    device = data.x_train.device
    rank, world = torchrun.rank_and_world()
    opt = _optimizer(model, cfg.lr, cfg.weight_decay, device)
    steps = -(-len(data.x_train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(epochs * steps, 1),
                                                pct_start=0.15)
    state = {"epoch": 0, "temperature": cfg.temperature, "alpha": cfg.alpha,
             "best_nll": float("inf"), "history": [], "finished": False}
    if cfg.resume and ckpt.exists():
        state = restore(ckpt, device, model, opt, sched)
    if state["finished"]:
        return state["history"]
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    step_fn = torch.compile(net) if cfg.compile else net
    cached = None
    if teacher is not None and not data.augment:  # the inputs repeat exactly: teacher once
        cached = predict(teacher, data, data.x_train)
    teacher_val = predict(teacher, data, data.x_val) if teacher is not None else None  # fixed teacher
    stage_id = ("teacher", "student", "distilled").index(stage.split("-")[0])
    n = len(data.x_train)
    from tqdm.auto import tqdm  # the study extra: `fastkd distill` checks it before any stage runs

    bar = tqdm(total=n * epochs, initial=n * state["epoch"], desc=stage, unit="img",
               disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    with bar:  # closed (its line ended) however the loop ends, Ctrl-C included
        for epoch in range(state["epoch"], epochs):
            seed = cfg.seed * 1_000_003 + stage_id * 10_007 + epoch
            seed_rngs(seed, device)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
            gen = torch.Generator(device=device).manual_seed(seed)  # augmentation, drawn on the device
            model.train()
            total = torch.zeros((), device=device)
            distilling = teacher is not None or sparse_teacher is not None
            train_meter = CalibrationMeter(cfg.num_bins) if distilling else None
            t0 = time.perf_counter()
            for i, batch in enumerate(perm.split(cfg.batch_size)):
                # every rank draws the same augmentation, then keeps its slice of the global batch;
                # DDP averages gradients over ranks, hence sum / global batch * world
                x = torchrun.shard(data.prepare(data.x_train[batch], gen))
                idx = torchrun.shard(batch)
                y = data.y_train[idx]
                per_rank = len(batch) / world
                with _autocast(device):
                    out = step_fn(x)
                if sparse_teacher is not None:
                    ids, logprobs = sparse_teacher[0][idx], sparse_teacher[1][idx]
                    loss = sparse_kd_loss(out, ids, logprobs, y, temperature=state["temperature"],
                                          alpha=state["alpha"], tail=cfg.teacher_cache_tail,
                                          teacher_temperature=teacher_temperature, num_items=per_rank,
                                          meter=train_meter, backend=cfg.backend,
                                          validate_labels=False)  # labels checked at loading; the cache is log_softmax
                elif teacher is None:
                    loss = F.cross_entropy(out.float(), y, reduction="sum") / per_rank
                else:
                    if cached is not None:
                        t_logits = cached[idx]
                    else:
                        with torch.inference_mode(), _autocast(device):
                            teacher.eval()
                            t_logits = teacher(x)
                    loss = kd_loss(out, t_logits, y, temperature=state["temperature"], alpha=state["alpha"],
                                   divergence=cfg.divergence, num_items=per_rank, meter=train_meter,
                                   backend=cfg.backend,  # the scale in the kernel: a backward moving no data
                                   validate_labels=False)  # labels were checked at loading
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach() * per_rank
                bar.update(len(batch))
                if cfg.progress and i % cfg.log_interval == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            torchrun.all_reduce_sum(total)
            seconds = time.perf_counter() - t0
            val = evaluate(model, data, data.x_val, data.y_val, teacher_val, cfg.num_bins, cfg.backend)
            row = {"stage": stage, "epoch": epoch + 1, "train_loss": float(total) / n,
                   "samples_per_s": n / seconds, "lr": sched.get_last_lr()[0],
                   # T and alpha only where the loss used them (not the teacher's or the student alone's)
                   **({"temperature": state["temperature"], "alpha": state["alpha"]} if distilling else {}),
                   **{f"val_{k}": v for k, v in val.items()}}
            if train_meter is not None:
                row["train_ece"] = train_meter.all_reduce(device=device).compute().ece
            state["history"].append(row)
            if policy is not None:
                state["temperature"], state["alpha"] = policy.next(epoch, epochs, val, state["temperature"],
                                                                   state["alpha"], state["best_nll"])
            state["best_nll"] = min(state["best_nll"], val["nll"])
            state["epoch"] = epoch + 1
            state["finished"] = epoch + 1 == epochs
            log_epoch(row, stage, epoch + 1, log, writer)
            if rank == 0:
                atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "state": state}, ckpt)
            torchrun.barrier()
    if epochs == 0:
        state["finished"] = True
    return state["history"]
