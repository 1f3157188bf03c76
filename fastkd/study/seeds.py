"""``fastkd distill --seeds 0-9``: the study once per seed, and what the seeds say together.

Seed S is the whole single-seed study, exactly ``fastkd distill --seed S`` (the teacher, the two
students' shared initialisation and every batch order drawn from S), written to
``<out-dir>/<name>/s<S>/`` without its PNGs (drawing them cost a third of a digits seed; the summary
draws the reliability diagrams pooled over seeds); the summary (report.md, report.json, summary.png)
goes in ``<out-dir>/<name>/``, name by default ``<dataset>-seeds<seeds>``. The data split is the same
for every seed. ``--resume`` reuses a seed whose report.json is written (its files are left as they
are) and continues the others from their checkpoints, all with the settings the seeds were run with;
a folder holding an earlier multi-seed run is otherwise refused, or cleared first with ``--overwrite``.

The teacher is retrained per seed unless ``--teacher-ckpt`` names one. The claim under test is
"distilling from a teacher trained this way helps the student", so the teacher's own variation
belongs inside the error bars; a teacher shared by every seed would make them conditional on that
one teacher, and seed S here would no longer be ``fastkd distill --seed S``.

Per metric and model: the mean over the n seeds and the sample standard deviation (n - 1). Per
metric, the paired difference d_S = distilled_S - alone_S (one seed: one initialisation, one batch
order, one teacher): its mean, the 95% t-interval mean ± t(0.975, n - 1) sd(d) / sqrt(n), and in how
many seeds the distilled student was strictly better. The seeds vary training only; the test split
is fixed, so the interval says how far the result moves between training runs, not between test sets.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import scipy.stats

from .config import StudyConfig, check_same_settings, resolve_device, saved_settings, with_saved_settings

MODEL_KEYS = ("teacher", "student", "distilled")
# (results key, name in tables, decimals, direction: +1 higher is better, -1 lower is better, 0 neither)
METRICS = [("accuracy", "accuracy", 4, 1), ("ece", "ECE", 4, -1), ("mce", "MCE", 4, -1),
           ("nll", "NLL", 4, -1), ("brier", "Brier", 4, -1), ("agreement", "agree w/ teacher", 4, 1),
           ("ece_after_scaling", "ECE after T*", 4, -1), ("fitted_temperature", "T*", 3, 0)]


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,7"`` or both (``"0-4,8"``) -> the sorted seeds; a ValueError naming --seeds
    for anything else (a negative seed, a range running backwards, a seed listed twice)."""
    seeds = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
        if m is None:
            raise ValueError(f"--seeds takes seeds >= 0 as a range or a list, like 0-9, 0,3,7 or 0-4,8; got {text!r}")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f"--seeds range {lo}-{hi} runs backwards (write {hi}-{lo})")
        seeds.extend(range(lo, hi + 1))
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"--seeds lists seed {twice[0]} twice")
    return sorted(seeds)


def seeds_label(seeds: list[int]) -> str:
    """The seeds written back as ranges: [0, ..., 9] -> "0-9", [0, 1, 2, 5] -> "0-2,5"."""
    runs, start = [], None
    for i, s in enumerate(seeds):
        start = s if start is None else start
        if i + 1 == len(seeds) or seeds[i + 1] != s + 1:
            runs.append(str(s) if s == start else f"{start}-{s}")
            start = None
    return ",".join(runs)


def describe(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def paired_difference(alone: list[float], distilled: list[float], direction: int) -> dict:
    """distilled - alone, seed by seed: mean, std, the 95% t-interval of the mean (None for one
    seed) and, for a metric with a direction, the seeds where the distilled student was strictly
    better, strictly worse, or tied."""
    d = [b - a for a, b in zip(alone, distilled)]
    n = len(d)
    out = {"n": n, **describe(d), "t_quantile": None, "ci95": None}
    if n > 1:
        t = float(scipy.stats.t.ppf(0.975, n - 1))
        half = t * out["std"] / math.sqrt(n)
        out.update(t_quantile=t, ci95=[out["mean"] - half, out["mean"] + half])
    if direction:
        better, worse = sum(direction * x > 0 for x in d), sum(direction * x < 0 for x in d)
        out.update(better=better, worse=worse, ties=n - better - worse)
    return out


def summarize_seeds(reports: dict) -> dict:
    """{metric: {model: {mean, std}, "difference": paired_difference}} over the seeds' reports."""
    seeds = sorted(reports)
    summary = {}
    for key, _, _, direction in METRICS:
        values = {m: [reports[s]["results"][m][key] for s in seeds] for m in MODEL_KEYS}
        summary[key] = {m: describe(v) for m, v in values.items()}
        summary[key]["difference"] = paired_difference(values["student"], values["distilled"], direction)
    for m in MODEL_KEYS:  # fits that stopped at an end of the range (report.json of a run flags them)
        summary["fitted_temperature"][m]["at_bound"] = sum(
            bool(reports[s]["results"][m].get("fitted_temperature_bound")) for s in seeds)
    return summary


def pooled_meters(reports: dict) -> dict:
    """Per model, a CalibrationMeter holding every seed's test predictions at once: the seeds' bins
    (count, mean confidence, accuracy) and NLL / Brier summed into the meter's state. The reports'
    bins hold the rows at confidence exactly 1.0 in their top bin, so the pooled ECE is that of the
    histogram the diagrams show (a single run's ECE, torchmetrics', weighs those rows as a bin apart)."""
    import torch

    from ..calibration import CalibrationMeter

    meters = {}
    for m in MODEL_KEYS:
        state = None
        for r in reports.values():
            bins = r["bins"][m]
            count = torch.tensor([b["count"] for b in bins], dtype=torch.float64)
            conf = torch.tensor([b["confidence"] for b in bins], dtype=torch.float64) * count
            correct = (torch.tensor([b["accuracy"] for b in bins], dtype=torch.float64) * count).round()
            if bins[-1]["upper"] <= bins[-1]["lower"]:  # an older report (reused by --resume): its 1.0 bin apart
                count, conf, correct = (torch.cat([x[:-2], x[-2:].sum(0, keepdim=True)])
                                        for x in (count, conf, correct))
            rows, zero = count.sum(), count.new_zeros(1)
            # the meter's layout: counts, confidence sums, correct sums (the bins, then the empty exactly-1.0
            # slot: the bins hold those rows), NLL sum, Brier sum
            part = torch.cat([count, zero, conf, zero, correct, zero,
                              torch.stack([r["results"][m]["nll"] * rows, r["results"][m]["brier"] * rows])])
            state = part if state is None else state + part
        meters[m] = CalibrationMeter(len(count))
        meters[m].load_state_dict({"num_bins": len(count), "state": state})
    return meters


def _mean_std(d: dict, digits: int) -> str:
    return f"{d['mean']:.{digits}f}" + (f" ± {d['std']:.{digits}f}" if d["std"] is not None else "")


def summary_table(summary: dict) -> str:
    """The summary as a Markdown table: one row per metric (also what the CLI prints)."""
    rows = ["| metric | teacher | student alone | distilled student | distilled − alone [95% CI] | distilled better |",
            "|---|---|---|---|---|---|"]
    for key, name, digits, direction in METRICS:
        s, d = summary[key], summary[key]["difference"]
        diff = f"{d['mean']:+.{digits}f}"
        if d["ci95"] is not None:
            diff += f" [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]"
        held = "—"
        if direction:
            held = f"{d['better']}/{d['n']}" + (f" ({d['ties']} tied)" if d["ties"] else "")
        arrow = {1: " ↑", -1: " ↓", 0: ""}[direction]
        rows.append(f"| {name}{arrow} | " + " | ".join([*(_mean_std(s[m], digits) for m in MODEL_KEYS), diff, held])
                    + " |")
    return "\n".join(rows)


def per_seed_table(summary_report: dict) -> str:
    """One row per seed: each metric as student alone -> distilled student."""
    metrics = [m for m in METRICS if m[3]]
    rows = ["| seed | " + " | ".join(name for _, name, _, _ in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for seed, res in summary_report["per_seed"].items():
        cells = [f"{res['student'][k]:.{digits}f} → {res['distilled'][k]:.{digits}f}" for k, _, digits, _ in metrics]
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_figure(reports: dict, summary: dict, meters: dict):
    """The summary figure (summary.png): per metric the two students' values per seed, joined by a line (green:
    distilled better, red: worse, grey: tied or a metric without a better side), their means in black,
    the teacher's mean dotted, in a legend above; below, each model's reliability diagram pooled over
    the seeds, with its rows per bin."""
    from matplotlib.lines import Line2D

    from .report import pyplot, draw_reliability, label, reliability_axes

    plt = pyplot()

    seeds = sorted(reports)
    colour = {1: "#55a868", -1: "#c44e52", 0: "0.6"}  # distilled better, worse, neither
    fig = plt.figure(figsize=(16, 15), constrained_layout=True)
    grid = fig.add_gridspec(4, 12, height_ratios=[0.12, 1, 1, 1.75])
    for i, (key, name, digits, direction) in enumerate(METRICS):
        ax = fig.add_subplot(grid[1 + i // 4, 3 * (i % 4):3 * (i % 4) + 3])
        pairs = [(reports[s]["results"]["student"][key], reports[s]["results"]["distilled"][key]) for s in seeds]
        for a, b in pairs:
            gain = direction * (b - a)
            ax.plot([0, 1], [a, b], "-o", color=colour[(gain > 0) - (gain < 0)], alpha=0.7, lw=1, ms=3)
        ax.plot([0, 1], [summary[key]["student"]["mean"], summary[key]["distilled"]["mean"]], "k-s", lw=2, ms=6)
        ax.axhline(summary[key]["teacher"]["mean"], color="0.35", ls=":", lw=1.2)
        d = summary[key]["difference"]
        title = f"{name}: Δ {d['mean']:+.{digits}f}"
        if d["ci95"] is not None:
            title += f" [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]"
        if direction:
            title += f"\ndistilled better in {d['better']}/{d['n']} seeds"
        ax.set_title(title, fontsize=10)
        ax.set(xticks=[0, 1], xticklabels=["student alone", "distilled"], xlim=(-0.3, 1.3))
    key = fig.add_subplot(grid[0, :])
    key.axis("off")
    key.legend(handles=[Line2D([], [], color=colour[1], marker="o", ms=3, label="one seed: distilled better"),
                        Line2D([], [], color=colour[-1], marker="o", ms=3, label="one seed: distilled worse"),
                        Line2D([], [], color=colour[0], marker="o", ms=3, label="one seed: tied, or T* (no better side)"),
                        Line2D([], [], color="k", marker="s", lw=2, ms=6, label="mean over seeds"),
                        Line2D([], [], color="0.35", ls=":", lw=1.2, label="teacher (mean over seeds)")],
               loc="center", ncol=5, frameon=False, fontsize=10)
    for j, m in enumerate(MODEL_KEYS):
        ax, count_ax = reliability_axes(fig, grid[3, 4 * j:4 * j + 4])
        rep = meters[m].compute()
        draw_reliability(ax, rep, f"{label(m)}, {len(seeds)} seeds pooled ({rep.count:,} test rows)\n"
                                  f"ECE {rep.ece:.3f}  acc {rep.accuracy:.3f}", count_ax)
        if j == 0:
            ax.set_ylabel("accuracy")
            count_ax.set_ylabel("test rows")
            ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"distilled student vs student alone over seeds {seeds_label(seeds)} "
                 "(Δ = distilled − alone, mean [95% t-interval])")
    return fig


def plot_summary(reports: dict, summary: dict, meters: dict, path: Path):
    from .report import save_figure

    save_figure(summary_figure(reports, summary, meters), path, dpi=100)


def write_summary(folder: Path, summary_report: dict, reports: dict, meters: dict):
    """report.md, report.json and summary.png of the summary folder."""
    from .report import label

    cfg, ds = summary_report["config"], summary_report["dataset"]
    n = len(summary_report["seeds"])
    t = summary_report["metrics"]["accuracy"]["difference"]["t_quantile"]
    pooled = ", ".join(f"{label(m)} {p['ece']:.4f}" for m, p in summary_report["pooled"].items())
    plot_summary(reports, summary_report["metrics"], meters, folder / "summary.png")
    lines = [
        f"# fastkd distillation study over seeds: {cfg['dataset']}",
        "",
        f"Teacher `{cfg['teacher']}` ({summary_report['teacher']}), student `{cfg['student']}`; "
        f"T = {cfg['temperature']}, alpha = {cfg['alpha']}, divergence `{cfg['divergence']}`, policy "
        f"`{cfg['policy']}`, device `{cfg['device']}`. Seeds {seeds_label(summary_report['seeds'])} "
        f"(n = {n}), each a whole `fastkd distill --seed S` run in `s<S>/`. Split: {ds['train']} train / "
        f"{ds['val']} validation / {ds['test']} test, the same for every seed.",
        "",
        "## Test results over seeds",
        "",
        summary_table(summary_report["metrics"]),
        "",
        "Mean ± sample standard deviation over the seeds. The difference is paired by seed (a seed's two "
        "students share their initialisation, batches and teacher): its mean and 95% t-interval, mean ± "
        "t(0.975, n − 1) · sd / √n" + (f" with t = {t:.3f}" if t is not None else " (none for one seed)")
        + ". \"Distilled better\": the seeds where the distilled student was strictly better (↑ higher is "
        "better, ↓ lower). Seeds vary training only: the test split is fixed, so the interval says how far "
        "the result moves between training runs, not between test sets.",
        "",
        f"ECE of the {n} seeds' test predictions pooled into one histogram (the diagrams below): {pooled}.",
        "",
        *_bound_note(summary_report["metrics"]["fitted_temperature"], n),
        "![summary](summary.png)",
        "",
        "## Per seed (student alone → distilled student)",
        "",
        per_seed_table(summary_report),
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))
    with open(folder / "report.json", "w") as f:
        json.dump(summary_report, f, indent=2)


def _bound_note(fits: dict, n: int) -> list[str]:
    """A line naming the models whose T* fit stopped at an end of its range in some seeds (their mean
    T* is then partly the bound's), else nothing."""
    from .report import label

    at = [f"{label(m)} {fits[m]['at_bound']}/{n}" for m in MODEL_KEYS if fits[m].get("at_bound")]
    return [f"T* at an end of its fitted range in: {', '.join(at)} seeds (see each run's report.md).", ""] if at else []


def _finished(seed_cfg: StudyConfig) -> dict | None:
    """The report of a seed already run to the end with the same settings, else None (a report
    cut short, or one without reliability bins, runs again: from its checkpoints under --resume)."""
    folder = Path(seed_cfg.out_dir) / seed_cfg.name
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if "bins" not in report:
        return None
    check_same_settings(folder, saved_settings(folder) or {}, seed_cfg,
                        "drop that option to reuse the seeds as they were run, or pass --overwrite instead of "
                        "--resume to run every seed again (or give another --name)")
    return report


def run_each_seed(cfg: StudyConfig, seeds: list[int], folder: Path, run_one, log_line) -> tuple[dict, list, dict]:
    """``run_one(seed_cfg)`` per seed, each in ``folder/s<seed>``; under ``cfg.resume`` a seed run to
    the end with the same settings is reused instead. ``log_line(seed, report, seconds, reused)``
    after each. Returns (reports, the seeds reused, seconds per seed)."""
    reports, reused, seconds = {}, [], {}
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed, out_dir=str(folder), name=f"s{seed}")
        t0 = time.perf_counter()
        done = _finished(seed_cfg) if cfg.resume else None
        if done is not None:
            reused.append(seed)
        reports[seed] = done if done is not None else run_one(seed_cfg)
        seconds[seed] = time.perf_counter() - t0
        log_line(seed, reports[seed], seconds[seed], done is not None)
    return reports, reused, seconds


def _seed_line(seed: int, report: dict, seconds: float, reused: bool) -> str:
    res, names = report["results"], {key: name for key, name, _, _ in METRICS}
    moves = ", ".join(f"{names[k]} {res['student'][k]:.4f} → {res['distilled'][k]:.4f}"
                      for k in ("accuracy", "ece", "nll", "ece_after_scaling"))
    return f"seed {seed}: " + ("reused" if reused else f"{seconds:.1f} s") + f"; alone → distilled: {moves}"


def run_seeds(cfg: StudyConfig, seeds: list[int], log=print) -> dict:
    """Runs the study once per seed (reusing finished seeds under ``cfg.resume``), writes the summary
    (rank 0 under torchrun) and returns it."""
    from . import torchrun
    from .run import run_study

    from .folders import check_seeds_run, clear

    started = time.perf_counter()
    name = cfg.name or f"{cfg.dataset}-seeds{seeds_label(seeds)}"
    folder = Path(cfg.out_dir) / name
    clear_first = check_seeds_run(folder, cfg.resume, cfg.overwrite)
    if not cfg.resume:
        torchrun.init_from_env(resolve_device(cfg.device))  # (again in each seed's run: a no-op then)
        if clear_first and torchrun.is_main():
            clear(folder, seeds=True)
        torchrun.barrier()

    def log_line(*args):
        if torchrun.is_main():
            log(_seed_line(*args))

    reports, reused, seconds = run_each_seed(cfg, seeds, folder, lambda c: run_study(c, figures=False), log_line)
    base = asdict(replace(cfg, name=name).resolved())
    base.pop("seed")
    summary = summarize_seeds(reports)
    meters = pooled_meters(reports)
    pooled = {m: meter.compute() for m, meter in meters.items()}
    result = {
        "config": {**base, "seeds": seeds},
        "seeds": seeds,
        "teacher": f"shared: {cfg.teacher_ckpt}" if cfg.teacher_ckpt else "retrained per seed",
        "dataset": reports[seeds[0]]["dataset"],
        "interval": "95% t-interval over seeds of the paired difference distilled - alone",
        "metrics": summary,
        "pooled": {m: {"ece": p.ece, "mce": p.mce, "accuracy": p.accuracy, "nll": p.nll, "count": p.count}
                   for m, p in pooled.items()},
        "per_seed": {str(s): {m: {k: reports[s]["results"][m][k] for k, *_ in METRICS} for m in MODEL_KEYS}
                     for s in seeds},
        "runs": {str(s): f"s{s}" for s in seeds},
        "reused": reused,
        "timing": {"seconds": time.perf_counter() - started, "per_seed": {str(s): seconds[s] for s in seeds},
                   "device": reports[seeds[0]]["config"]["device"]},
    }
    if torchrun.is_main():
        write_summary(folder, result, reports, meters)
    return result


def distill_seeds(cfg: StudyConfig, text: str, validate, given=frozenset()) -> int:
    """``fastkd distill --seeds``: one line and exit status 2 on bad settings, as the single-seed run.
    Under --resume the settings not ``given`` are those the seeds were run with."""
    from . import torchrun

    try:
        seeds = parse_seeds(text)
        if cfg.resume:
            folder = Path(cfg.out_dir) / (cfg.name or f"{cfg.dataset}-seeds{seeds_label(seeds)}")
            saved = next(filter(None, (saved_settings(folder / f"s{s}") for s in seeds)), None)
            cfg = with_saved_settings(cfg, saved, {*given, "seed"}) if saved is not None else cfg
        validate(cfg)
        summary = run_seeds(cfg, seeds)
    except (ValueError, OSError) as e:
        print(f"fastkd: error: {e}", file=sys.stderr)
        return 2
    main_rank = torchrun.is_main()
    torchrun.shutdown()
    if not main_rank:
        return 0
    folder = Path(cfg.out_dir) / summary["config"]["name"]
    print(summary_table(summary["metrics"]))
    reused = summary["reused"]
    reuse = (f"seed{'s' if len(reused) > 1 else ''} {seeds_label(reused)} reused from the earlier run" if reused
             else "none reused")
    print(f"\n{len(seeds)} seeds ({seeds_label(seeds)}), {reuse}; teacher {summary['teacher']}; "
          f"{summary['timing']['seconds']:.1f} s on {summary['timing']['device']}; summary, figure and "
          f"per-seed runs in {folder}/")
    return 0
