"""The distillation study behind ``fastkd distill``: teacher, student alone, distilled student.

The two students start from the same initialisation; the only difference is the loss. Each model
is then measured on the test split: accuracy, calibration (ECE, MCE, NLL, Brier), top-1 agreement
with the teacher, and the ECE after temperature scaling fitted on the validation split
(Guo et al. 2017; T* within [0.05, 100], flagged at a bound), plus a per-class precision / recall /
F1 table for the students.

The run folder starts with config.json, the resolved settings: ``--resume`` continues the run with
them (and refuses others); a new run refuses a folder an earlier run wrote unless ``--overwrite``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import scipy.optimize
import torch

from ..calibration import CalibrationMeter
from ..teacher_cache import INDEX, CacheError, TeacherCache, TeacherCacheWriter, fingerprint
from . import torchrun
from .config import StudyConfig, check_same_settings, saved_settings, write_settings
from .data import load_data
from .folders import check_new_run, clear
from .models import count_parameters
from .policies import make_policy
from .report import write_outputs
from .teachers import load_or_train_teacher, write_classifier_rows
from .train import build_study_model, fit, predict, summarize

MODEL_KEYS = ("teacher", "student", "distilled")


TEMPERATURE_RANGE = (0.05, 100.0)  # where T* is searched; a T* at an end is flagged in the report


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds=TEMPERATURE_RANGE) -> float:
    """The T in ``bounds`` (default [0.05, 100]) minimising the mean NLL of softmax(logits / T).

    With w_i = z_i - z_i,y (row i's logits less its label's), NLL(b) = mean_i logsumexp(b w_i) at
    b = 1/T: convex in b, its derivative mean_i E_p[w_i] (p = softmax(b w_i)) only grows. T* is the
    root of that derivative (scipy's Brent method, in float64, to machine precision), so it depends
    on the logits and not on where an optimiser stopped. The answer is a bound when the minimum lies
    beyond it: at the upper bound the NLL keeps falling as T grows (predictions near
    uniform, or no better than chance: no confidence to calibrate; exactly flat logits land here
    too); at the lower bound it keeps falling as T shrinks (far less confident than accurate, or a
    split (nearly) perfectly separated). NaN logits give NaN; no rows give 1 (nothing to fit)."""
    t_lo, t_hi = bounds
    z = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    if len(z) == 0:
        return 1.0
    w = z - z.gather(1, y[:, None])  # logits relative to the label's: a row of equal logits is all 0
    w_fin = torch.where(w == -math.inf, 0.0, w)  # a -inf logit has p = 0 and adds nothing below

    def slope(b: float) -> float:
        """d NLL / d b at b = 1 / T: the mean over rows of E_p[w]."""
        return float((torch.softmax(w * b, dim=1) * w_fin).sum(1).mean())

    lo, hi = 1.0 / t_hi, 1.0 / t_lo  # the bracket, in b
    g_lo, g_hi = slope(lo), slope(hi)
    if math.isnan(g_lo) or math.isnan(g_hi):  # NaN logits
        return math.nan
    if g_lo >= 0:  # rising from the smallest b on: the minimum is at T = t_hi or beyond
        return t_hi
    if g_hi <= 0:  # still falling at the largest b: at T = t_lo or below
        return t_lo
    # the slope changes sign once inside the bracket: Brent's method finds where, to float precision
    return 1.0 / scipy.optimize.brentq(slope, lo, hi, xtol=1e-300, rtol=4 * sys.float_info.epsilon)


def temperature_bound(t_star: float, bounds=TEMPERATURE_RANGE) -> str | None:
    """ "upper" or "lower" when a fitted temperature sits at that end of ``bounds``, else None."""
    return "upper" if t_star >= bounds[1] else "lower" if t_star <= bounds[0] else None


def check_teacher_cache(cfg: StudyConfig, data) -> dict:
    """``--teacher-cache`` asks for inputs that repeat exactly and K no larger than the classes; a
    folder it names must hold a cache of the training split (rows, classes, the inputs' sha256),
    a sampled one drawn at the training temperature. Read whole here, before any training (a bad
    row is refused now, not after the teacher trained): {results key: (cache, ids, logprobs)}."""
    if not cfg.teacher_cache:
        return {}
    if data.augment:
        raise ValueError(f"--teacher-cache needs inputs that repeat exactly; {data.name} is augmented every "
                         "step, so a cached teacher would not have seen the student's images")
    ks = [v for v in cfg.teacher_cache if isinstance(v, int)]
    if ks and max(ks) > data.num_classes:
        raise ValueError(f"--teacher-cache {max(ks)}: more entries than the "
                         f"{data.num_classes} classes of {data.name}")
    x, loaded = data.x_train, {}
    for folder in (v for v in cfg.teacher_cache if isinstance(v, str)):
        cache = TeacherCache(folder, rows=len(x), vocab=data.num_classes, row_shape=(), inputs_sha256=fingerprint(x))
        check_sampled_temperature(cache, cfg)
        ids, logprobs = cache.batch(torch.arange(len(cache)))
        key = base = f"distilled-{cache_row_name(cache, cfg.teacher_cache_tail)}"
        n = 1
        while key in loaded:  # two caches of the same kind and size (drawn with other seeds, say)
            n += 1
            key = f"{base}-{n}"
        loaded[key] = (cache, ids.to(x.device), logprobs.to(x.device))
    return loaded


def cache_row_name(cache: TeacherCache, tail: str) -> str:
    """The report's name of a student distilled from a cache folder: sampled-S16, top16-bucket."""
    return f"sampled-S{cache.samples}" if cache.kind == "sampled" else f"top{cache.k}-{tail}"


def check_sampled_temperature(cache: TeacherCache, cfg: StudyConfig):
    """A sampled cache holds draws from the teacher at its temperature, used as they are
    (teacher_temperature = T): the student must be distilled at that T, every epoch."""
    if cache.kind != "sampled":
        return
    t, where = cache.temperature, cache.path / INDEX
    if t != cfg.temperature:
        raise CacheError(f"{where}: sampled at temperature {t:g}, but --temperature is {cfg.temperature:g}; "
                         f"sample again with fastkd cache-teacher --sample {cache.samples} --temperature "
                         f"{cfg.temperature:g}, or distil at --temperature {t:g}")
    if cfg.policy != "constant":
        raise CacheError(f"{where}: sampled at temperature {t:g}, which --policy {cfg.policy} would change "
                         "during training; use --policy constant with a sampled cache")


def _cache_folder_info(cache: TeacherCache, tail: str) -> dict:
    return {"path": str(cache.path), "kind": cache.kind, "k": cache.k, "samples": cache.samples,
            "temperature": cache.temperature, "dtype": cache.dtype, "tail": tail,
            "bytes": sum(f.stat().st_size for f in cache.path.glob("shard-*.npy"))}


def cached_teacher(cfg: StudyConfig, teacher, data, folder: Path):
    """The teacher's top-K over the training split (K the largest asked), written once to a teacher
    cache and read back through it: ((ids, logprobs) of every training row on the device, what the
    report says about the cache)."""
    k, x = max(v for v in cfg.teacher_cache if isinstance(v, int)), data.x_train
    started = time.perf_counter()
    if torchrun.is_main():
        source = {"kind": "study", "dataset": data.name, "split": "train", "teacher": cfg.teacher}
        with TeacherCacheWriter(folder, k=k, vocab=data.num_classes, rows=len(x), inputs_sha256=fingerprint(x),
                                source=source, overwrite=True) as w:  # a resumed run rewrites the same rows
            write_classifier_rows(w, teacher, data, x, progress=False)
    torchrun.barrier()
    cache = TeacherCache(folder, rows=len(x), vocab=data.num_classes, k=k, inputs_sha256=fingerprint(x))
    ids, logprobs = cache.batch(torch.arange(len(cache)))
    info = {"path": str(folder), "k": k, "dtype": cache.dtype, "tail": cfg.teacher_cache_tail,
            "bytes": sum(f.stat().st_size for f in folder.glob("shard-*.npy")),
            "write_seconds": time.perf_counter() - started}
    return (ids.to(x.device), logprobs.to(x.device)), info


def _open_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


def check_run_folder(cfg: StudyConfig, out: Path):
    """Before any work: a resumed run holds the settings it was started with; a new run does not
    write into a folder an earlier run wrote, unless told to replace it."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if not cfg.resume:
        check_new_run(out, cfg.overwrite)
        if cfg.overwrite and cfg.teacher_ckpt and out.resolve() in Path(cfg.teacher_ckpt).resolve().parents:
            raise ValueError(f"--teacher-ckpt {cfg.teacher_ckpt} lies in {out}, which --overwrite clears first; "
                             "copy it elsewhere, or give the new run another --name")
        return
    saved = saved_settings(out)
    if saved is not None:  # (a folder without settings holds nothing to continue: the run starts)
        check_same_settings(out, saved, cfg, "drop that option to continue the run as it was started, "
                            "or pass --overwrite instead of --resume to start it again")


def run_study(cfg: StudyConfig, figures: bool = True) -> dict:
    """Runs the study (on every rank under torchrun; rank 0 writes) and returns the report.
    ``figures=False`` skips the PNGs (the multi-seed run, whose summary draws them pooled)."""
    cfg = cfg.resolved()
    policy = make_policy(cfg.policy, cfg.temperature, cfg.alpha)  # checks the name early
    out = Path(cfg.out_dir) / cfg.name
    check_run_folder(cfg, out)
    settings = replace(cfg)  # as resolved here: under torchrun each rank's device gets its index below
    cfg.device = torchrun.init_from_env(cfg.device)
    torchrun.barrier()  # every rank has looked at the folder before rank 0 writes into it
    main = torchrun.is_main()
    started = time.perf_counter()
    data = load_data(cfg.dataset, cfg.device, cfg.data_dir, cfg.download)
    cache_folders = check_teacher_cache(cfg, data)
    if main:  # only once the data are known good: bad data leave an earlier run as it was
        if cfg.overwrite:
            clear(out)
        out.mkdir(parents=True, exist_ok=True)
        write_settings(out, settings)  # what a later --resume holds its settings to

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
        from_cache, cache_info = {}, None
        if any(isinstance(v, int) for v in cfg.teacher_cache or ()):
            (ids, logprobs), cache_info = cached_teacher(cfg, teacher, data, out / "teacher-cache")
            for k in (v for v in cfg.teacher_cache if isinstance(v, int)):  # the same student, the same batches
                key = f"distilled-top{k}"
                from_cache[key] = new_model(cfg.student, cfg.seed + 1)
                from_cache[key].load_state_dict(init)
                history[key] = fit(from_cache[key], data, cfg, key, out / f"{key}.pt", epochs=cfg.epochs,
                                   sparse_teacher=(ids[:, :k], logprobs[:, :k]), policy=policy, log=log,
                                   writer=writer)
        for key, (cache, ids, logprobs) in cache_folders.items():  # a sampled cache: its rows are at T already
            from_cache[key] = new_model(cfg.student, cfg.seed + 1)
            from_cache[key].load_state_dict(init)
            history[key] = fit(from_cache[key], data, cfg, key, out / f"{key}.pt", epochs=cfg.epochs,
                               sparse_teacher=(ids, logprobs), teacher_temperature=cache.temperature,
                               policy=policy, log=log, writer=writer)
    if writer is not None:
        writer.close()

    models = {**dict(zip(MODEL_KEYS, (teacher, student, distilled))), **from_cache}
    teacher_test = predict(teacher, data, data.x_test)
    results, meters, preds = {}, {}, {}
    shard = torchrun.shard  # every rank holds the logits; the meters split the rows
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
                        "fitted_temperature": t_star, "fitted_temperature_bound": temperature_bound(t_star),
                        "ece_after_scaling": scaled.ece}
    report = {
        "config": asdict(cfg),
        "dataset": {"name": data.name, "classes": data.class_names, "train": len(data.x_train),
                    "val": len(data.x_val), "test": len(data.x_test)},
        "results": results,
        "temperature_fit": {"split": "validation", "range": list(TEMPERATURE_RANGE)},
        # each model's test reliability bins (count, mean confidence, accuracy): what --seeds pools
        "bins": {key: [asdict(b) for b in meter.compute().bins] for key, meter in meters.items()},
        "policy": {"name": cfg.policy,
                   "trajectory": [{"epoch": r["epoch"], "temperature": r["temperature"],
                                   "alpha": r["alpha"]} for r in history["distilled"]]},
        "history": history,
        "timing": {"seconds": time.perf_counter() - started, "device": str(cfg.device)},
    }
    if cache_info is not None:
        report["teacher_cache"] = cache_info
    if cache_folders:
        report["teacher_caches"] = {key: _cache_folder_info(cache, cfg.teacher_cache_tail)
                                    for key, (cache, _, _) in cache_folders.items()}
    if main:
        report["per_class"] = write_outputs(out, report, data, preds, meters, figures)
        with open(out / "report.json", "w") as f:
            json.dump(report, f, indent=2)
    return report
