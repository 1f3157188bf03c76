"""Writing the study's results: report.md, reliability diagrams and training curves (PNG)."""
from __future__ import annotations

from pathlib import Path

COLUMNS = [("parameters", "params", "{:,}"), ("accuracy", "acc", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
           ("mce", "MCE", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("brier", "Brier", "{:.4f}"),
           ("agreement", "agree w/ teacher", "{:.4f}"), ("fitted_temperature", "T*", "{:.3f}"),
           ("ece_after_scaling", "ECE after T*", "{:.4f}")]
LABELS = {"teacher": "teacher", "student": "student alone", "distilled": "distilled student"}
CACHED = "distilled-top"  # results keys distilled-top<K>: the student distilled from the cached top-K
FROM_FOLDER = "distilled-"  # distilled-<name>: from a cache folder, named by it (sampled-S16, top16-bucket)


def label(key: str) -> str:
    """The name of a model (results key) in tables, plots and curves."""
    if key.startswith(CACHED) and key[len(CACHED):].isdigit():
        return f"distilled, top-{key[len(CACHED):]} cache"
    if key.startswith(FROM_FOLDER):
        return f"distilled, {key[len(FROM_FOLDER):]} cache"
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


def _bins(rep):
    """(lower edges, width, counts, accuracies, mean confidences) of a report's equal-width bins; a
    zero-width bin at confidence 1.0 (the meter's exact-1.0 bin, where it keeps one) folds into the top one."""
    bins = [b for b in rep.bins if b.upper > b.lower]
    counts = [b.count for b in bins]
    correct = [b.accuracy * b.count for b in bins]
    conf = [b.confidence * b.count for b in bins]
    for b in rep.bins:
        if b.upper <= b.lower:
            counts[-1] += b.count
            correct[-1] += b.accuracy * b.count
            conf[-1] += b.confidence * b.count
    acc = [a / n if n else 0.0 for a, n in zip(correct, counts)]
    conf = [c / n if n else 0.0 for c, n in zip(conf, counts)]
    return [b.lower for b in bins], bins[0].upper - bins[0].lower, counts, acc, conf


def draw_reliability(ax, rep, title: str, count_ax=None):
    """One reliability diagram of a CalibrationReport on ``ax``: accuracy per confidence bin (blue),
    the gap to the bin's mean confidence hatched red (above the bar: over-confident; inside it:
    under-confident), the diagonal. ``count_ax`` (below it, sharing x) gets the rows per bin, as in
    Guo et al. 2017, so that a bin of a few rows is seen as one."""
    lowers, width, counts, acc, conf = _bins(rep)
    shown = [n > 0 for n in counts]
    left = [x for x, s in zip(lowers, shown) if s]
    a = [v for v, s in zip(acc, shown) if s]
    c = [v for v, s in zip(conf, shown) if s]
    ax.bar(left, a, width=width, align="edge", color="#4c72b0", edgecolor="black", lw=0.6, label="accuracy")
    ax.bar(left, [ci - ai for ai, ci in zip(a, c)], bottom=a, width=width, align="edge", facecolor="#c44e5240",
           edgecolor="#c44e52", hatch="///", lw=0.6, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(title=title, xlim=(0, 1), ylim=(0, 1))
    if count_ax is None:
        ax.set_xlabel("confidence")
        return
    ax.tick_params(labelbottom=False)
    count_ax.bar(lowers, counts, width=width, align="edge", color="0.6", edgecolor="black", lw=0.6)
    top = max(counts) if any(counts) else 1
    for x, n in zip(lowers, counts):
        if n:
            count_ax.text(x + width / 2, n + 0.03 * top, f"{n:,}", ha="center", va="bottom", fontsize=6.5)
    count_ax.set(xlim=(0, 1), ylim=(0, 1.3 * top), xlabel="confidence")


def reliability_axes(fig, cell):
    """The axes of one model in a gridspec ``cell``: its diagram, the count histogram close below."""
    inner = cell.subgridspec(2, 1, height_ratios=[3.4, 1], hspace=0.06)
    ax = fig.add_subplot(inner[0])
    return ax, fig.add_subplot(inner[1], sharex=ax)


def pyplot():
    """matplotlib.pyplot drawing to files (the study extra; imported when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int):
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def reliability_figure(meters: dict):
    """Each model's reliability diagram over its count histogram (reliability.png)."""
    plt = pyplot()
    cols = min(len(meters), 4)  # the three models in a row; rows of four with cached-teacher students
    rows = -(-len(meters) // cols)
    fig = plt.figure(figsize=(4.2 * cols, 5.4 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, cols)
    for i, (key, meter) in enumerate(meters.items()):
        rep = meter.compute()
        ax, count_ax = reliability_axes(fig, grid[i // cols, i % cols])
        draw_reliability(ax, rep, f"{label(key)}\nECE {rep.ece:.3f}  acc {rep.accuracy:.3f}", count_ax)
        if i % cols == 0:
            ax.set_ylabel("accuracy")
            count_ax.set_ylabel("test rows")
        if i == 0:
            ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_reliability(meters: dict, path: Path):
    save_figure(reliability_figure(meters), path, dpi=110)


def _changed(rows, key) -> bool:
    return len({r[key] for r in rows}) > 1


def curves_figure(history: dict, config: dict):
    """Per epoch (curves.png): the training loss, the cross-entropy of the teacher and the student alone
    apart from the distillation objective (its T²-scaled term lives on another scale), validation
    accuracy and ECE, and T / alpha of the distilled student when the policy moved them (else the
    objective's title says where they stayed)."""
    plt = pyplot()
    distilled = history.get("distilled") or []
    moved = _changed(distilled, "temperature") or _changed(distilled, "alpha")
    divergence = {"kl": "KL", "reverse_kl": "reverse KL", "jsd": "JSD"}.get(config["divergence"], config["divergence"])
    objective = f"distillation objective\nα·T²·{divergence} + (1−α)·CE"
    if distilled and not moved:
        objective += f", T = {distilled[0]['temperature']:g}, α = {distilled[0]['alpha']:g} throughout"
    panels = [("train_loss", "training cross-entropy", lambda st: st in ("teacher", "student")),
              ("train_loss", objective, lambda st: st not in ("teacher", "student")),
              ("val_accuracy", "validation accuracy", None), ("val_ece", "validation ECE", None)]
    fig, axes = plt.subplots(1, len(panels) + moved, figsize=(4.2 * (len(panels) + moved), 3.8))
    for ax, (key, title, which) in zip(axes, panels):
        for j, (stage, rows) in enumerate(history.items()):
            if rows and (which is None or which(stage)):
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], color=f"C{j}", label=label(stage))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:  # no curve with --epochs 0
            ax.legend(fontsize=8)
    if moved:  # T and alpha on their own scales
        ax = axes[-1]
        ep = [r["epoch"] for r in distilled]
        ax.plot(ep, [r["temperature"] for r in distilled], color="k", label="T")
        ax.set(xlabel="epoch", ylabel="T")
        twin = ax.twinx()
        twin.plot(ep, [r["alpha"] for r in distilled], color="0.5", ls="--", label="α")
        twin.set(ylabel="α", ylim=(0, 1.05))
        ax.legend(handles=ax.get_lines() + twin.get_lines(), fontsize=8)
        ax.set_title(f"distilled student's T and α\n({config['policy']} policy)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(history: dict, config: dict, path: Path):
    save_figure(curves_figure(history, config), path, dpi=110)


def _cache_note(cache: dict | None, folders: dict | None = None) -> list[str]:
    """report.md's lines on the cached-teacher rows (none without ``--teacher-cache``)."""
    lines = []
    if cache is not None:
        lines += [f"Rows \"distilled, top-K cache\": the same student (same initialisation, same batches) "
                  f"distilled with `sparse_kd_loss` (tail `{cache['tail']}`) from the teacher's top-K "
                  f"log-probabilities, stored once in `{cache['path']}` (top-{cache['k']}, {cache['dtype']}, "
                  f"{cache['bytes']:,} bytes of shards) instead of the live teacher's logits.", ""]
    for key, c in (folders or {}).items():
        what = (f"{c['samples']} draws per row from the teacher at T = {c['temperature']:g}, as ids and counts, "
                f"used as given (`teacher_temperature={c['temperature']:g}`: gradients unbiased for the dense "
                "teacher's at that T)" if c["kind"] == "sampled" else
                f"the teacher's top-{c['k']} log-probabilities ({c['dtype']}, tail `{c['tail']}`)")
        lines += [f"Row \"{label(key)}\": the same student distilled with `sparse_kd_loss` from the cache "
                  f"`{c['path']}`: {what}; {c['bytes']:,} bytes of shards.", ""]
    return lines


def write_outputs(out: Path, report: dict, data, preds: dict, meters: dict, figures: bool = True) -> dict:
    """Writes report.md and (``figures``) the PNGs; returns the per-class tables (as dicts) for report.json."""
    per_class, texts = per_class_reports(data, preds)
    if figures:
        plot_reliability(meters, out / "reliability.png")
        plot_curves(report["history"], report["config"], out / "curves.png")
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
        *_cache_note(report.get("teacher_cache"), report.get("teacher_caches")),
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
