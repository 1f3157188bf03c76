"""The language-model study's report: the tables of one run and of several seeds (report.md) and the
figure of each student against K = S (sparse.png, summary.png). The study itself: lm.py."""
from __future__ import annotations

import json
from pathlib import Path

from .lm_models import LM_TAILS


def label(key: str) -> str:
    """A model's name in tables."""
    if key.startswith("distilled-top"):
        k, tail = key[len("distilled-top"):].split("-", 1)
        return f"top-{k}, {tail} tail"
    if key.startswith("distilled-sampled"):
        return f"sampled, S = {key[len('distilled-sampled'):]}"
    return {"teacher": "teacher", "student": "student alone (CE)", "distilled": "dense KD (live teacher)"}[key]


# --- report -------------------------------------------------------------------------------------------------

# (results key, column, decimals, direction: +1 higher is better, -1 lower is better, 0 neither)
METRICS = [("perplexity", "ppl", 2, -1), ("nll", "NLL", 4, -1), ("accuracy", "token acc", 4, 1),
           ("ece", "ECE", 4, -1), ("ece_after_scaling", "ECE after T*", 4, -1), ("fitted_temperature", "T*", 3, 0),
           ("agreement", "agree w/ teacher", 4, 1), ("kl_teacher", "KL(teacher‖model)", 4, -1),
           ("tokens_per_s", "train tokens/s", 0, 1)]


def _fmt(v, digits: int) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def lm_results_table(results: dict) -> str:
    cols = [*METRICS, ("peak_memory_bytes", "peak MiB", 1, -1)]
    rows = ["| model | params | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for key, r in results.items():
        cells = [_fmt(r[k] / 2**20 if k == "peak_memory_bytes" and r[k] is not None else r[k], d) for k, _, d, _ in cols]
        if r.get("fitted_temperature_bound"):
            cells[5] += " (bound)"
        rows.append(f"| {label(key)} | {r['parameters']:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _setup_line(cfg: dict, ds: dict) -> str:
    return (f"Teacher `{cfg['teacher']}` ({cfg['teacher_epochs']} epochs), students `{cfg['student']}` "
            f"({cfg['epochs']} epochs, one initialisation, the same batches); T = {cfg['temperature']}, "
            f"alpha = {cfg['alpha']}, lr {cfg['lr']}, batch {cfg['batch_size']} × {ds['seq_len']} tokens, device "
            f"`{cfg['device']}`. Text: {ds['source']}, {len(ds['files'])} files, {ds['chars']:,} characters "
            f"(sha256 {ds['sha256'][:12]}…), byte-level BPE vocabulary {ds['vocab']:,}; "
            f"{ds['tokens']['train']:,} train / {ds['tokens']['val']:,} validation / {ds['tokens']['test']:,} test tokens.")


NOTES = ("Test tokens. ppl = exp(NLL); ECE with {bins} equal-width bins (the meter filled by the loss); T* = the "
         "temperature minimising the NLL of up to {fit:,} validation tokens, ECE after T* on the test tokens; "
         "agreement = top-1 equal to the teacher's; KL at T = 1. Sparse students: top-K log-probabilities at "
         "T = 1 with each tail, or S draws from the teacher at the training T (log(count / S), "
         "teacher_temperature = T), {bytes} bytes per token at K = S (an int32 id and 16 bits per entry); rows "
         "computed once per run in process, draws fixed per token. tokens/s: training only; the dense student's "
         "includes the live teacher's forward. Peak memory: CUDA only.")


def write_lm_report(out: Path, report: dict):
    cfg, ds = report["config"], report["dataset"]
    bytes_ = ", ".join(f"{v} (K = {k})" for k, v in report["sparse_teachers"]["bytes_per_token"].items())
    stats = {m: {k: {"mean": r[m], "std": None} for k, r in report["results"].items()} for m, _ in FIGURE_METRICS}
    plot_sparse(stats, f"students against K = S, seed {cfg['seed']} (test tokens)", out / "sparse.png")
    lines = [f"# fastkd distillation study: language model (seed {cfg['seed']})", "", _setup_line(cfg, ds), "",
             "## Test results", "", lm_results_table(report["results"]), "",
             NOTES.format(bins=cfg["num_bins"], fit=report["temperature_fit"]["tokens"], bytes=bytes_), "",
             "![students against K = S](sparse.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


FIGURE_METRICS = (("ece", "ECE"), ("ece_after_scaling", "ECE after T*"), ("perplexity", "perplexity"),
                  ("kl_teacher", "KL(teacher ‖ student), T = 1"))


def sparse_figure(stats: dict, title: str):
    """Each metric against K = S (log scale): one line per tail and the sampled teacher, the dense-KD
    student and the student alone as horizontal lines. ``stats``: {metric: {model: {mean, std}}}
    (std None for one seed: no error bars)."""
    from .report import pyplot

    plt = pyplot()
    models = list(stats["ece"])
    ks = sorted({int(m[len("distilled-sampled"):]) for m in models if m.startswith("distilled-sampled")})
    kinds = [(t, f"top-K, {t} tail", [f"distilled-top{k}-{t}" for k in ks]) for t in LM_TAILS]
    kinds.append(("sampled", "sampled (S = K)", [f"distilled-sampled{k}" for k in ks]))
    fig, axes = plt.subplots(1, len(FIGURE_METRICS), figsize=(4.4 * len(FIGURE_METRICS), 3.9), constrained_layout=True)
    for ax, (metric, name) in zip(axes, FIGURE_METRICS):
        for j, (_, kind_label, keys) in enumerate(kinds):
            mean = [stats[metric][m]["mean"] for m in keys]
            err = [stats[metric][m]["std"] or 0.0 for m in keys]
            ax.errorbar(ks, mean, yerr=err, color=f"C{j}", marker="o", ms=4, capsize=3, label=kind_label)
        for base, style in (("distilled", "-"), ("student", ":")):
            d = stats[metric][base]
            ax.axhline(d["mean"], color="k", ls=style, lw=1.2, label=label(base))
            if d["std"]:
                ax.axhspan(d["mean"] - d["std"], d["mean"] + d["std"], color="k", alpha=0.08)
        ax.set_xscale("log", base=2)
        if metric == "perplexity":  # an over-confident student's runs to 10^5
            ax.set_yscale("log")
        ax.set(xticks=ks, xticklabels=[str(k) for k in ks], xlabel="K = S (entries per token)", title=name)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_sparse(stats: dict, title: str, path: Path):
    from .report import save_figure

    save_figure(sparse_figure(stats, title), path, dpi=110)


# --- several seeds ---------------------------------------------------------------------------------

BASELINES = ("distilled", "student")  # each student is paired with these, seed by seed


def summarize_lm_seeds(reports: dict) -> dict:
    """{metric: {model: {mean, std}, "vs_<baseline>": {model: paired_difference}}} over the seeds."""
    from .seeds import describe, paired_difference

    seeds = sorted(reports)
    models = list(reports[seeds[0]]["results"])
    summary = {}
    for key, _, _, direction in METRICS:
        values = {m: [reports[s]["results"][m][key] for s in seeds] for m in models}
        summary[key] = {m: describe(v) for m, v in values.items()}
        for base in BASELINES:
            summary[key][f"vs_{base}"] = {m: paired_difference(values[base], values[m], direction)
                                          for m in models if m not in ("teacher", base)}
    return summary


def _mean_std(d: dict, digits: int) -> str:
    return f"{d['mean']:,.{digits}f}" + (f" ± {d['std']:,.{digits}f}" if d["std"] is not None else "")


def _diff(d: dict, digits: int) -> str:
    s = f"{d['mean']:+.{digits}f}"
    if d["ci95"] is not None:
        s += f" [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]"
    return s


SUMMARY_METRICS = ("perplexity", "accuracy", "ece", "ece_after_scaling", "fitted_temperature", "agreement",
                   "kl_teacher", "tokens_per_s")
DIFF_METRICS = ("nll", "ece", "ece_after_scaling", "agreement", "kl_teacher")


def lm_summary_tables(summary: dict) -> tuple[str, str]:
    """(mean ± std per model and metric, paired difference against the dense-KD student [95% CI])."""
    spec = {k: (name, digits) for k, name, digits, _ in METRICS}
    models = [m for m in summary["perplexity"] if not m.startswith("vs_")]
    head = "| model | " + " | ".join(spec[k][0] for k in SUMMARY_METRICS) + " |"
    means = [head, "|" + "---|" * (len(SUMMARY_METRICS) + 1)]
    for m in models:
        means.append(f"| {label(m)} | " + " | ".join(_mean_std(summary[k][m], spec[k][1]) for k in SUMMARY_METRICS) + " |")
    head = "| model − dense KD | " + " | ".join(f"Δ {spec[k][0]}" for k in DIFF_METRICS) + " |"
    diffs = [head, "|" + "---|" * (len(DIFF_METRICS) + 1)]
    for m in summary["nll"]["vs_distilled"]:
        diffs.append(f"| {label(m)} | " + " | ".join(_diff(summary[k]["vs_distilled"][m], spec[k][1])
                                                      for k in DIFF_METRICS) + " |")
    return "\n".join(means), "\n".join(diffs)


def write_lm_summary(folder: Path, result: dict):
    from .seeds import seeds_label

    cfg, ds = result["config"], result["dataset"]
    n = len(result["seeds"])
    means, diffs = lm_summary_tables(result["metrics"])
    t = result["metrics"]["nll"]["vs_distilled"]
    t = next(iter(t.values()))["t_quantile"] if t else None
    lines = [f"# fastkd distillation study over seeds: language model", "", _setup_line(cfg, ds),
             f"Seeds {seeds_label(result['seeds'])} (n = {n}), each a whole run in `s<S>/` (teacher retrained per seed).",
             "", "## Test results over seeds (mean ± sample std)", "", means, "",
             "## Against the dense-KD student, paired by seed (mean [95% t-interval])", "", diffs, "",
             "The interval: mean ± t(0.975, n − 1) · sd / √n" + (f" with t = {t:.3f}" if t else " (none for one seed)")
             + "; report.json also holds each student against the student alone (`vs_student`). Seeds vary "
             "training only (the split is fixed).", "",
             NOTES.format(bins=cfg["num_bins"], fit=result["temperature_fit"]["tokens"], bytes="6 K"), "",
             "![students against K = S](summary.png)", ""]
    folder.mkdir(parents=True, exist_ok=True)
    plot_sparse(result["metrics"], f"students against K = S: mean ± std over seeds {seeds_label(result['seeds'])} "
                "(test tokens)", folder / "summary.png")
    (folder / "report.md").write_text("\n".join(lines))
    with open(folder / "report.json", "w") as f:
        json.dump(result, f, indent=2)
