"""``fastkd distill --task lm``: distilling a small causal transformer into a smaller one, on text.

The question: a sparse teacher (a few entries per token instead of the whole vocabulary) saves the
storage and bandwidth of a teacher's logits; which kind keeps the student calibrated? One run trains
a teacher (``--teacher``, default gpt-2x128: lm_models.py) on the corpus (lm_data.py), then
students (``--student``, default gpt-2x64) from one shared initialisation, over the same batches,
differing only in what they learn from:

- ``student``: the labels alone (cross-entropy);
- ``distilled``: the live teacher, dense: ``fastkd.fused_linear_kd_loss`` on both models' hidden
  states and heads (the teacher's forward runs every step; no logits are materialised);
- ``distilled-top<K>-<tail>``: the teacher's top-K log-probabilities at T = 1
  (``fastkd.teacher_cache.top_k_logprobs``) through ``fastkd.fused_linear_sparse_kd_loss`` with each
  tail of ``LM_TAILS`` (lm_models.py: bucket, renormalize, lumped);
- ``distilled-sampled<S>``: S draws per token from the teacher tempered at the training T
  (``fastkd.teacher_cache.sample_teacher``), as log(count / S) with ``teacher_temperature=T``: the
  same storage as top-K at K = S (an id and a 16-bit number per entry).

The sparse rows are computed once per run, in this process, from the teacher's logits over the
training blocks (the inputs repeat exactly), before the first sparse student, and held in memory:
an in-process teacher cache. The sampled draws come from a generator seeded by (seed, S), so they
are fixed per token for the whole run, as a cache written once would be, never redrawn per epoch.

Every model is measured on the test tokens: perplexity (exp of the mean NLL), token accuracy, ECE
(15 bins, the student's statistics through the loss's ``meter=``), ECE after temperature scaling
(T* fitted on validation tokens, run.py's fit), top-1 agreement with the teacher, KL(teacher ‖ model)
at T = 1 (the dense loss's value), training tokens/s and (CUDA) peak memory. Optimiser: AdamW with
a one-cycle schedule, gradients clipped at norm 1. ``--seeds`` repeats the run per seed (teacher
included) and adds paired 95% t-intervals of each student against the dense-KD student and the
student alone, as the digits study's ``--seeds`` does.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..calibration import CalibrationMeter
from ..fused_linear import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from .config import StudyConfig, saved_settings, with_saved_settings, write_settings
from .folders import clear
from .lm_data import LMData, load_lm_data
from .lm_models import LM_TAILS, build_lm, parse_lm_model
from .lm_report import (label, lm_results_table, lm_summary_tables, summarize_lm_seeds, write_lm_report,
                        write_lm_summary)
from .models import count_parameters
from .train import _autocast, atomic_save, log_epoch, restore, seed_rngs

T_FIT_TOKENS = 2048  # validation tokens the T* fit reads (evenly strided): each step of its root search reads
# tokens x vocabulary logits (about 3 s per model at 2048 x 2048 on one core; 9 s at 8192)
EVAL_BATCH = 64  # blocks per forward in evaluation and in computing the teacher's rows (the draws follow it)
# what each sparse entry would take in a cache (decision 4): an int32 id and a 16-bit log-prob or count
BYTES_PER_ENTRY = 6
STUDENT_STAGE = 1  # every student draws the batches of stage 1 (the teacher: 0): paired runs


def validate_lm(cfg: StudyConfig):
    """The checks of the options the language-model study reads, and a refusal of those it ignores."""
    for name in ("teacher", "student"):
        if getattr(cfg, name) is not None:
            parse_lm_model(getattr(cfg, name))
    for name in ("corpus_chars", "vocab_size", "seq_len"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.vocab_size is not None and cfg.vocab_size < 260:
        raise ValueError(f"--vocab-size must be >= 260 (the 256 bytes, the end-of-text token and a few merges), "
                         f"got {cfg.vocab_size}")
    if cfg.sparse_k is not None and min(cfg.sparse_k) < 1:
        raise ValueError(f"--sparse-k values must be >= 1 (entries per token), got {min(cfg.sparse_k)}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    digits_only = {"dataset": "digits", "data_dir": None, "download": False, "teacher_ckpt": None,
                   "teacher_cache": None, "policy": "constant", "divergence": "kl", "compile": False}
    for name, default in digits_only.items():
        if getattr(cfg, name) != default:
            raise ValueError(f"--{name.replace('_', '-')} is not an option of --task lm")


def student_keys(cfg: StudyConfig) -> list[str]:
    """The results keys of the students, in the order they train."""
    keys = ["student", "distilled"]
    for k in cfg.sparse_k:
        keys += [f"distilled-top{k}-{tail}" for tail in LM_TAILS] + [f"distilled-sampled{k}"]
    return keys


# --- training -------------------------------------------------------------------------------------------------

def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _meter_metrics(meter: CalibrationMeter) -> dict:
    rep = meter.compute()
    return {"nll": rep.nll, "perplexity": math.exp(rep.nll), "accuracy": rep.accuracy, "ece": rep.ece,
            "mce": rep.mce, "brier": rep.brier, "confidence": rep.confidence}


@torch.no_grad()
def val_metrics(model, blocks: torch.Tensor, num_bins: int) -> dict:
    """Perplexity, accuracy and calibration of ``model`` on ``blocks`` (the per-epoch validation)."""
    model.eval()
    meter = CalibrationMeter(num_bins)
    for b in blocks.split(EVAL_BATCH):
        with _autocast(b.device):
            logits = model(b[:, :-1]).float()
        meter.update(logits, b[:, 1:])
    return _meter_metrics(meter)


def fit_lm(model, data: LMData, cfg: StudyConfig, stage: str, ckpt: Path, *, epochs: int, teacher=None,
           sparse=None, log=None, writer=None) -> list[dict]:
    """Trains ``model`` for ``epochs`` (continuing from ``ckpt`` under ``cfg.resume``); returns the
    per-epoch history. The loss: cross-entropy without a teacher; with ``teacher`` (a CausalLM) the
    dense fused-linear KD loss against its live hidden states; with ``sparse`` = (ids, logprobs,
    teacher_temperature, tail), the rows of every training block, the sparse fused-linear loss."""
    device = data.train.device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    n = len(data.train)
    steps = -(-n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(epochs * steps, 1), pct_start=0.15,
                                                cycle_momentum=False)
    state = {"epoch": 0, "history": [], "finished": False}
    if cfg.resume and ckpt.exists():
        state = restore(ckpt, device, model, opt, sched)
    if state["finished"]:
        return state["history"]
    distilling = teacher is not None or sparse is not None
    stage_id = 0 if stage == "teacher" else STUDENT_STAGE
    from tqdm.auto import tqdm  # the study extra, checked before any stage runs

    tokens = n * data.seq_len
    bar = tqdm(total=tokens * epochs, initial=tokens * state["epoch"], desc=stage, unit="tok", unit_scale=True,
               disable=not cfg.progress, dynamic_ncols=True)
    with bar:
        for epoch in range(state["epoch"], epochs):
            seed = cfg.seed * 1_000_003 + stage_id * 10_007 + epoch
            seed_rngs(seed, device)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
            model.train()
            total = torch.zeros((), device=device)
            train_meter = CalibrationMeter(cfg.num_bins) if distilling else None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for i, batch in enumerate(perm.split(cfg.batch_size)):
                x, y = data.train[batch, :-1], data.train[batch, 1:]
                with _autocast(device):
                    if teacher is None and sparse is None:
                        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
                    elif teacher is not None:
                        with torch.no_grad():
                            teacher.eval()
                            h_t = teacher.hidden(x)
                        loss = fused_linear_kd_loss(model.hidden(x), model.head.weight, h_t,
                                                    teacher.head.weight.detach(), y, temperature=cfg.temperature,
                                                    alpha=cfg.alpha, meter=train_meter, backend=cfg.backend)
                    else:
                        ids, logprobs, teacher_temperature, tail = sparse
                        extra = {"teacher_temperature": teacher_temperature} if teacher_temperature != 1.0 else {}
                        loss = fused_linear_sparse_kd_loss(
                            model.hidden(x), model.head.weight, ids[batch], logprobs[batch], y,
                            temperature=cfg.temperature, alpha=cfg.alpha, tail=tail, meter=train_meter,
                            backend=cfg.backend, validate_labels=False, **extra)  # rows made here, checked once
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                total += loss.detach() * len(batch)
                bar.update(len(batch) * data.seq_len)
                if cfg.progress and i % cfg.log_interval == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            seconds = time.perf_counter() - t0
            val = val_metrics(model, data.val, cfg.num_bins)
            row = {"stage": stage, "epoch": epoch + 1, "train_loss": float(total) / n, "tokens_per_s": tokens / seconds,
                   "train_seconds": seconds, "peak_memory_bytes": _peak_memory(device), "lr": sched.get_last_lr()[0],
                   **({"temperature": cfg.temperature, "alpha": cfg.alpha} if distilling else {}),
                   **{f"val_{k}": v for k, v in val.items()}}
            if train_meter is not None:
                row["train_ece"] = train_meter.compute().ece
            state["history"].append(row)
            state["epoch"] = epoch + 1
            state["finished"] = epoch + 1 == epochs
            log_epoch(row, stage, epoch + 1, log, writer)
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "state": state}, ckpt)
    if epochs == 0:
        state["finished"] = True
    return state["history"]


# --- the teacher's sparse rows ----------------------------------------------------------------------------

def sampled_logprobs(ids: torch.Tensor, counts: torch.Tensor, samples: int) -> torch.Tensor:
    """The sampled teacher's target log(count / S) per listed id (padding, id -1: 0, never read)."""
    return torch.where(ids >= 0, (counts.float() / samples).log(), 0.0)


@torch.no_grad()
def teacher_rows(teacher, data: LMData, cfg: StudyConfig) -> dict:
    """The sparse teachers of every training token, once: {"top": (ids, logprobs) of the largest K
    (a top-k is its first k columns), S: (ids, logprobs) sampled at the training temperature}.
    A ValueError when a K exceeds the vocabulary."""
    from ..teacher_cache import sample_teacher, top_k_logprobs

    k_max = max(cfg.sparse_k)
    if k_max > data.vocab:
        raise ValueError(f"--sparse-k {k_max}: more entries than the {data.vocab} tokens of the vocabulary")
    device = data.train.device
    gens = {s: torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + s) for s in cfg.sparse_k}
    top, sampled = [], {s: [] for s in cfg.sparse_k}
    teacher.eval()
    for b in data.train.split(EVAL_BATCH):
        with _autocast(device):
            logits = teacher(b[:, :-1]).float()
        top.append(top_k_logprobs(logits, k_max))
        for s in cfg.sparse_k:
            ids, counts = sample_teacher(logits, s, cfg.temperature, generator=gens[s])
            sampled[s].append((ids, sampled_logprobs(ids, counts, s)))
    rows = {"top": tuple(torch.cat(parts) for parts in zip(*top))}
    rows.update({s: tuple(torch.cat(parts) for parts in zip(*v)) for s, v in sampled.items()})
    return rows


# --- evaluation ---------------------------------------------------------------------------------------------

@torch.no_grad()
def fitted_temperature(model, blocks: torch.Tensor) -> float:
    """T* on up to T_FIT_TOKENS validation tokens (evenly strided over the split's tokens)."""
    from .run import fit_temperature

    model.eval()
    logits, labels = [], []
    for b in blocks.split(EVAL_BATCH):
        with _autocast(b.device):
            logits.append(model(b[:, :-1]).float().flatten(0, 1))
        labels.append(b[:, 1:].flatten())
    logits, labels = torch.cat(logits), torch.cat(labels)
    pick = torch.linspace(0, len(labels) - 1, min(T_FIT_TOKENS, len(labels))).round().long().unique()
    return fit_temperature(logits[pick.to(logits.device)], labels[pick.to(labels.device)])


@torch.no_grad()
def measure(model, teacher, data: LMData, cfg: StudyConfig) -> tuple[dict, CalibrationMeter]:
    """Test metrics of ``model`` (the teacher itself too): perplexity, accuracy and calibration from
    the meter (filled by the dense loss's ``meter=`` for a student, whose value there is the
    KL(teacher ‖ model) at T = 1), agreement with the teacher's top-1, T* and the ECE after it."""
    from .run import temperature_bound

    t_star = fitted_temperature(model, data.val)
    meter, scaled = CalibrationMeter(cfg.num_bins), CalibrationMeter(cfg.num_bins)
    kl_sum = torch.zeros((), dtype=torch.float64, device=data.test.device)
    agree = torch.zeros((), dtype=torch.long, device=data.test.device)
    model.eval()
    teacher.eval()
    for b in data.test.split(EVAL_BATCH):
        x, y = b[:, :-1], b[:, 1:]
        with _autocast(b.device):
            h_t = teacher.hidden(x)
            h = h_t if model is teacher else model.hidden(x)
            logits, t_logits = model.head(h).float(), teacher.head(h_t).float()
        if model is teacher:
            meter.update(logits, y)
        else:
            kl = fused_linear_kd_loss(h, model.head.weight.detach(), h_t, teacher.head.weight.detach(), y,
                                      temperature=1.0, alpha=1.0, reduction="sum", meter=meter, backend=cfg.backend)
            kl_sum += kl.double()
        scaled.update(logits / t_star, y)
        agree += (logits.argmax(-1) == t_logits.argmax(-1)).sum()
    n = data.tokens("test")
    res = {**_meter_metrics(meter), "agreement": float(agree) / n, "kl_teacher": float(kl_sum) / n,
           "fitted_temperature": t_star, "fitted_temperature_bound": temperature_bound(t_star),
           "ece_after_scaling": scaled.compute().ece}
    return res, meter


def _training_summary(history: list[dict]) -> dict:
    """Tokens/s over all epochs (resumed ones included) and the peak memory of the heaviest epoch."""
    seconds = sum(r["train_seconds"] for r in history)
    tokens = sum(r["tokens_per_s"] * r["train_seconds"] for r in history)
    peaks = [r["peak_memory_bytes"] for r in history if r.get("peak_memory_bytes") is not None]
    return {"tokens_per_s": tokens / seconds if seconds else None, "train_seconds": seconds,
            "peak_memory_bytes": max(peaks) if peaks else None}


# --- one run ------------------------------------------------------------------------------------------------

def run_lm(cfg: StudyConfig) -> dict:
    """One seed of the language-model study, in ``cfg.out_dir/cfg.name``; returns the report."""
    from .run import _open_writer, check_run_folder, TEMPERATURE_RANGE

    cfg = cfg.resolved()
    out = Path(cfg.out_dir) / cfg.name
    check_run_folder(cfg, out)
    started = time.perf_counter()
    device = torch.device(cfg.device)
    # the data first: bad text leaves an earlier run as it was (the tokenizer is written once it is known good)
    tokenizer_path = out / "tokenizer.json"
    reuse = cfg.resume and tokenizer_path.exists()
    data, tokenizer = load_lm_data(cfg.text, cfg.corpus_chars, cfg.vocab_size, cfg.seq_len, device,
                                   tokenizer_path if reuse else None)
    if max(cfg.sparse_k) > data.vocab:
        raise ValueError(f"--sparse-k {max(cfg.sparse_k)}: more entries than the {data.vocab} tokens of the vocabulary")
    corpus_path = out / "corpus.json"  # what the run was started on: a resumed run must read the same text
    if reuse and corpus_path.exists():
        started_on = json.loads(corpus_path.read_text())
        if started_on["sha256"] != data.info["sha256"]:
            raise ValueError(f"--resume: the text changed since {out} was started (sha256 {data.info['sha256'][:12]}, "
                             f"not {started_on['sha256'][:12]}; files {', '.join(started_on['files'])}): put it back, "
                             "or start a new run (--overwrite, or another --name)")
    if cfg.overwrite:
        clear(out)
    out.mkdir(parents=True, exist_ok=True)
    if not reuse:
        tokenizer.save(str(tokenizer_path))
    if not reuse or not corpus_path.exists():
        corpus_path.write_text(json.dumps({k: data.info[k] for k in ("source", "files", "chars", "sha256")}, indent=1))
    write_settings(out, cfg)

    def new_model(name, seed):
        torch.manual_seed(seed)
        return build_lm(name, data.vocab, data.seq_len).to(device)

    writer = _open_writer(out / "tensorboard")
    history, models = {}, {}
    with open(out / "metrics.jsonl", "a" if cfg.resume else "w") as log:
        teacher = new_model(cfg.teacher, cfg.seed)
        history["teacher"] = fit_lm(teacher, data, cfg, "teacher", out / "teacher.pt", epochs=cfg.teacher_epochs,
                                    log=log, writer=writer)
        teacher.requires_grad_(False)
        init = new_model(cfg.student, cfg.seed + 1).state_dict()  # one start for every student
        rows, rows_seconds = None, None
        for key in student_keys(cfg):
            kw = {}
            if key == "distilled":
                kw["teacher"] = teacher
            elif key != "student":
                if rows is None:
                    t0 = time.perf_counter()
                    rows = teacher_rows(teacher, data, cfg)
                    rows_seconds = time.perf_counter() - t0
                if key.startswith("distilled-sampled"):
                    s = int(key[len("distilled-sampled"):])
                    kw["sparse"] = (*rows[s], cfg.temperature, "bucket")  # nothing is missing: every tail agrees
                else:
                    k, tail = key[len("distilled-top"):].split("-", 1)
                    ids, logprobs = rows["top"]
                    kw["sparse"] = (ids[..., :int(k)].contiguous(), logprobs[..., :int(k)].contiguous(), 1.0, tail)
            models[key] = new_model(cfg.student, cfg.seed + 1)
            models[key].load_state_dict(init)
            history[key] = fit_lm(models[key], data, cfg, key, out / f"{key}.pt", epochs=cfg.epochs, log=log,
                                  writer=writer, **kw)
    if writer is not None:
        writer.close()

    results, meters = {}, {}
    for key, model in {"teacher": teacher, **models}.items():
        res, meters[key] = measure(model, teacher, data, cfg)
        name = cfg.teacher if key == "teacher" else cfg.student
        results[key] = {"model": name, "parameters": count_parameters(model), **res, **_training_summary(history[key])}
    report = {
        "task": "lm",
        "config": asdict(cfg),
        "dataset": {"name": "lm", **data.info},
        "results": results,
        "temperature_fit": {"split": "validation", "range": list(TEMPERATURE_RANGE),
                            "tokens": min(T_FIT_TOKENS, data.tokens("val"))},
        "sparse_teachers": {"computed": "once per run, in process, from the teacher's logits over the training "
                                        "blocks, before the first sparse student; sampled draws fixed per token",
                            "bytes_per_token": {str(k): k * BYTES_PER_ENTRY for k in cfg.sparse_k},
                            "seconds": rows_seconds},
        "bins": {key: [asdict(b) for b in meter.compute().bins] for key, meter in meters.items()},
        "history": history,
        "timing": {"seconds": time.perf_counter() - started, "device": str(cfg.device),
                   "threads": torch.get_num_threads()},
    }
    write_lm_report(out, report)
    with open(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    return report


# --- several seeds ------------------------------------------------------------------------------------------

def run_lm_seeds(cfg: StudyConfig, seeds: list[int], log=print) -> dict:
    """The language-model study once per seed in ``<out>/<name>/s<S>`` and the summary beside them,
    with the digits study's rules: ``--resume`` reuses a finished seed and continues the others,
    ``--overwrite`` clears the earlier run first, a folder holding one is refused otherwise."""
    from .folders import check_seeds_run
    from .seeds import run_each_seed, seeds_label

    started = time.perf_counter()
    name = cfg.name or f"lm-seeds{seeds_label(seeds)}"
    folder = Path(cfg.out_dir) / name
    if check_seeds_run(folder, cfg.resume, cfg.overwrite):
        clear(folder, seeds=True)

    def log_line(seed, report, seconds, reused):
        log(f"seed {seed}: " + ("reused" if reused else f"{seconds:.1f} s") + "; ECE " +
            ", ".join(f"{label(m)} {r['ece']:.4f}" for m, r in report["results"].items()))

    reports, reused, seconds = run_each_seed(cfg, seeds, folder, run_lm, log_line)
    base = asdict(replace(cfg, name=name).resolved())
    base.pop("seed")
    summary = summarize_lm_seeds(reports)
    result = {
        "task": "lm",
        "config": {**base, "seeds": seeds},
        "seeds": seeds,
        "dataset": reports[seeds[0]]["dataset"],
        "temperature_fit": reports[seeds[0]]["temperature_fit"],
        "interval": "95% t-interval over seeds of the paired difference model - baseline (vs_distilled: the dense-KD "
                    "student, vs_student: the student alone)",
        "metrics": summary,
        "per_seed": {str(s): reports[s]["results"] for s in seeds},
        "runs": {str(s): f"s{s}" for s in seeds},
        "reused": reused,
        "timing": {"seconds": time.perf_counter() - started, "per_seed": {str(s): seconds[s] for s in seeds},
                   "device": reports[seeds[0]]["config"]["device"]},
    }
    write_lm_summary(folder, result)
    return result


# --- the command --------------------------------------------------------------------------------------------

def distill_lm(cfg: StudyConfig, seeds_text: str | None, validate, given=frozenset()) -> int:
    """``fastkd distill --task lm [--seeds ...]``: bad settings or text end in one line, exit status 2."""
    from .seeds import parse_seeds, seeds_label

    try:
        seeds = parse_seeds(seeds_text) if seeds_text is not None else None
        if cfg.resume:  # the settings not given are those the run was started with
            if seeds is not None:
                folder = Path(cfg.out_dir) / (cfg.name or f"lm-seeds{seeds_label(seeds)}")
                saved = next(filter(None, (saved_settings(folder / f"s{s}") for s in seeds)), None)
                given = {*given, "seed"}
            else:
                saved = saved_settings(Path(cfg.out_dir) / cfg.resolved().name)
            cfg = with_saved_settings(cfg, saved, given) if saved is not None else cfg
        validate(cfg)
        result = run_lm_seeds(cfg, seeds) if seeds is not None else run_lm(cfg)
    except (ValueError, OSError) as e:  # TextError is a ValueError
        print(f"fastkd: error: {e}", file=sys.stderr)
        return 2
    folder = Path(result["config"]["out_dir"]) / result["config"]["name"]
    if seeds is not None:
        means, diffs = lm_summary_tables(result["metrics"])
        print(means + "\n\n" + diffs)
    else:
        print(lm_results_table(result["results"]))
    print(f"\n{result['timing']['seconds']:.1f} s on {result['timing']['device']}; report in {folder}/")
    return 0
