"""Writing the study's results: report.md, reliability diagrams and training curves (PNG)."""
from __future__ import annotations

from pathlib import Path

COLUMNS = [("parameters", "params", "{:,}"), ("accuracy", "acc", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
           ("mce", "MCE", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("brier", "Brier", "{:.4f}"),
           ("agreement", "agree w/ teacher", "{:.4f}"), ("fitted_temperature", "T*", "{:.3f}"),
           ("ece_after_scaling", "ECE after T*", "{:.4f}")]
LABELS = {"teacher": "teacher", "student": "student alone", "distilled": "distilled student"}
CACHED = "distilled-top"  # results keys distilled-top<K>: the student distilled from the cached top-K


def label(key: str) -> str:
    """The name of a model (results key) in tables, plots and curves."""
    if key.startswith(CACHED):
        return f"distilled, top-{key[len(CACHED):]} cache"
    return LABELS[key]


def _cell(r: dict, key: str, fmt: str) -> str:
    if key == "fitted_temperature" and r.get("fitted_temperature_bound"):
        return f"{r[key]:g} (bound)"  # the fit stopped at the end of its range: see _bound_note
    return fmt.format(r[key])


def results_table(results: dict) -> str:
    """The results as a Markdown table (also what the CLI prints)."""
    head = "| model | arch | " + " | ".join(c[1] for c in COLUMNS) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    rows = [f"| {label(k)} | {r['model']} | " + " | ".join(_cell(r, key, fmt) for key, _, fmt in COLUMNS)
            + " |" for k, r in results.items()]
    return "\n".join([head, rule, *rows])


def _bound_note(results: dict, t_range) -> list[str]:
    """report.md's lines on the models whose T* sits at an end of the fit's range (none usually)."""
    lo, hi = t_range
    at = {side: ", ".join(label(k) for k, r in results.items() if r.get("fitted_temperature_bound") == side)
          for side in ("upper", "lower")}
    lines = []
    if at["upper"]:
        lines += [f"T* = {hi:g} (bound), {at['upper']}: the validation NLL still falls as T grows past {hi:g}. "
                  "The predictions are near uniform, or no better than chance: there is no confidence for "
                  "temperature scaling to calibrate, and T* is held at the bound instead of running away.", ""]
    if at["lower"]:
        lines += [f"T* = {lo:g} (bound), {at['lower']}: the validation NLL still falls as T shrinks below "
                  f"{lo:g}. The model is far less confident than it is accurate (its logits close together, "
                  "as after few epochs) or right on (nearly) every validation image; T* is held at the bound.",
                  ""]
    return lines


def per_class_reports(data, preds) -> tuple[dict, dict]:
    """scikit-learn's classification_report for each student: (dicts, text tables)."""
    from sklearn.metrics import classification_report

    y = data.y_test.cpu().numpy()
    kw = dict(labels=list(range(data.num_classes)), target_names=data.class_names, zero_division=0)
    dicts, texts = {}, {}
    for key in ("student", "distilled"):
        p = preds[key].cpu().numpy()
        dicts[key] = classification_report(y, p, output_dict=True, **kw)
        texts[key] = classification_report(y, p, digits=3, **kw)
    return dicts, texts


def draw_reliability(ax, rep, title: str):
    """One reliability diagram of a CalibrationReport on ``ax``: accuracy per confidence bin, the gap
    to the diagonal shaded."""
    bins = [b for b in rep.bins if b.upper > b.lower]  # the extra bin of confidence == 1.0
    last = rep.bins[-1]  # is drawn inside the top bin
    width = bins[0].upper - bins[0].lower
    counts = [b.count for b in bins]
    accs = [b.accuracy * b.count for b in bins]
    confs = [b.confidence * b.count for b in bins]
    counts[-1] += last.count
    accs[-1] += last.accuracy * last.count
    confs[-1] += last.confidence * last.count
    centers = [b.lower + width / 2 for b in bins]
    acc = [a / c if c else 0 for a, c in zip(accs, counts)]
    conf = [s / c if c else 0 for s, c in zip(confs, counts)]
    ax.bar(centers, acc, width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar(centers, [c - a if n else 0 for a, c, n in zip(acc, conf, counts)], bottom=acc,
           width=width, color="#dd8452", alpha=0.5, edgecolor="#dd8452", label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(title=title, xlabel="confidence", xlim=(0, 1), ylim=(0, 1))


def plot_reliability(meters: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(meters), 4)  # the three models in a row; rows of four with cached-teacher students
    rows = -(-len(meters) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(meters):]:
        ax.set_visible(False)
    for ax, (key, meter) in zip(axes.flat, meters.items()):
        rep = meter.compute()
        draw_reliability(ax, rep, f"{label(key)}\nECE {rep.ece:.3f}  acc {rep.accuracy:.3f}")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes[0, 0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_loss", "training loss"), ("val_accuracy", "validation accuracy"),
              ("val_ece", "validation ECE"), ("temperature", "distillation T / alpha")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for stage, rows in history.items():
            if not rows or (key == "temperature" and stage != "distilled"):
                continue
            ep = [r["epoch"] for r in rows]
            ax.plot(ep, [r[key] for r in rows], label=label(stage) if key != "temperature" else "T")
            if key == "temperature":
                ax.plot(ep, [r["alpha"] for r in rows], label="alpha")
        ax.set(title=title, xlabel="epoch")
        if ax.get_legend_handles_labels()[0]:  # no curve with --epochs 0
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cache_note(cache: dict | None) -> list[str]:
    """report.md's lines on the cached-teacher rows (none without ``--teacher-cache``)."""
    if cache is None:
        return []
    return [f"Rows \"distilled, top-K cache\": the same student (same initialisation, same batches) "
            f"distilled with `sparse_kd_loss` (tail `{cache['tail']}`) from the teacher's top-K "
            f"log-probabilities, stored once in `{cache['path']}` (top-{cache['k']}, {cache['dtype']}, "
            f"{cache['bytes']:,} bytes of shards) instead of the live teacher's logits.", ""]


def write_outputs(out: Path, report: dict, data, preds: dict, meters: dict, figures: bool = True) -> dict:
    """Writes report.md and (``figures``) the PNGs; returns the per-class tables (as dicts) for report.json."""
    per_class, texts = per_class_reports(data, preds)
    if figures:
        plot_reliability(meters, out / "reliability.png")
        plot_curves(report["history"], out / "curves.png")
    cfg = report["config"]
    t_range = report["temperature_fit"]["range"]
    traj = report["policy"]["trajectory"]
    pairs = [f"{r['temperature']:.2f}/{r['alpha']:.2f}" for r in traj]
    moves = f"stayed at {pairs[0]}" if len(set(pairs)) == 1 else ", ".join(pairs)
    lines = [
        f"# fastkd distillation study: {cfg['dataset']}",
        "",
        f"Teacher `{cfg['teacher']}`, student `{cfg['student']}`; T = {cfg['temperature']}, "
        f"alpha = {cfg['alpha']}, divergence `{cfg['divergence']}`, seed {cfg['seed']}, "
        f"device `{cfg['device']}`. Split: {report['dataset']['train']} train / "
        f"{report['dataset']['val']} validation / {report['dataset']['test']} test.",
        "",
        "## Test results",
        "",
        results_table(report["results"]),
        "",
        "ECE/MCE with " + str(cfg["num_bins"]) + " equal-width bins; T* = temperature minimising the NLL "
        f"on the validation split within [{t_range[0]:g}, {t_range[1]:g}] (Guo et al. 2017), ECE after T* "
        "on the test split.",
        "",
        *_bound_note(report["results"], t_range),
        *_cache_note(report.get("teacher_cache")),
        f"## Feedback policy: `{report['policy']['name']}`",
        "",
        f"T / alpha per epoch of the distilled student: {moves}",
        "",
        "## Per-class report (test split)",
        "",
    ]
    for key in ("student", "distilled"):
        lines += [f"### {LABELS[key]}", "", "```", texts[key].rstrip(), "```", ""]
    lines += (["![reliability](reliability.png)", "", "![curves](curves.png)", ""] if figures else
              [f"No figures: one seed of a multi-seed run, whose summary draws them pooled. "
               f"`fastkd distill --seed {cfg['seed']} --out-dir {cfg['out_dir']} --name {cfg['name']} --resume` "
               "draws this seed's from its checkpoints (with the settings it was run with).", ""])
    (out / "report.md").write_text("\n".join(lines))
    return per_class
