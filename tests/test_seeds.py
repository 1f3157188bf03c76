"""fastkd distill --seeds: parsing, the statistics against plain references, the summary's files, and
--resume reusing finished seeds. The runs are tiny (3 seeds, 1 epoch)."""
import contextlib
import io
import json
import math
import shutil

import pytest

from fastkd.study.cli import main
from fastkd.study.config import StudyConfig
from fastkd.study.run import run_study
from fastkd.study.seeds import METRICS, MODEL_KEYS, paired_difference, parse_seeds, seeds_label

TINY = ["--no-progress", "--epochs", "1", "--teacher-epochs", "1"]


@pytest.mark.parametrize("text,seeds", [
    ("0-9", list(range(10))), ("0,3,7", [0, 3, 7]), ("0-2,5", [0, 1, 2, 5]), (" 4 ", [4]),
    ("7, 1", [1, 7]), ("3-3", [3]), ("10 - 12", [10, 11, 12]),
], ids=["range", "list", "mixed", "one", "unsorted", "range-of-one", "spaces"])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds
    assert parse_seeds(seeds_label(seeds)) == seeds


def test_seeds_label_writes_ranges():
    assert seeds_label(list(range(10))) == "0-9"
    assert seeds_label([0, 3, 7]) == "0,3,7"
    assert seeds_label([0, 1, 2, 5, 6]) == "0-2,5-6"


@pytest.mark.parametrize("text,message", [
    ("", "--seeds takes seeds >= 0"), ("a", "--seeds takes seeds >= 0"), ("-1", "--seeds takes seeds >= 0"),
    ("1.5", "--seeds takes seeds >= 0"), ("0..3", "--seeds takes seeds >= 0"), ("1,", "--seeds takes seeds >= 0"),
    ("5-2", "--seeds range 5-2 runs backwards"), ("0-3,2", "--seeds lists seed 2 twice"),
], ids=["empty", "word", "negative", "float", "dots", "trailing-comma", "backwards", "twice"])
def test_bad_seeds_end_in_one_line(capsys, tmp_path, text, message):
    code = main(["distill", "--out-dir", str(tmp_path), *TINY, "--seeds", text])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("fastkd: error:")
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_bad_settings_with_seeds_end_in_one_line(capsys, tmp_path):
    code = main(["distill", "--out-dir", str(tmp_path), *TINY, "--seeds", "0-1", "--alpha", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--alpha must lie in [0, 1]" in err


@pytest.mark.parametrize("df,t", [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (9, 2.262157163),
                                  (30, 2.042272456)], ids=lambda v: str(v))
def test_t_quantile_matches_the_tables(df, t):
    """The interval's t(0.975, n - 1) (scipy's) against printed tables, for n = df + 1 seeds."""
    out = paired_difference([0.0] * (df + 1), [0.1 * i for i in range(df + 1)], direction=1)
    assert out["t_quantile"] == pytest.approx(t, abs=1e-8)


def test_paired_difference_against_a_plain_reference():
    alone = [0.947, 0.950, 0.939, 0.953, 0.944, 0.961, 0.950, 0.942, 0.947, 0.958]
    distilled = [0.956, 0.953, 0.961, 0.953, 0.950, 0.958, 0.967, 0.950, 0.953, 0.964]
    d = [b - a for a, b in zip(alone, distilled)]
    mean = sum(d) / 10
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 9)
    half = 2.262157163 * sd / math.sqrt(10)  # t(0.975, 9), from a table
    out = paired_difference(alone, distilled, direction=1)
    assert out["mean"] == pytest.approx(mean, abs=1e-15) and out["std"] == pytest.approx(sd, rel=1e-12)
    assert out["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-9)
    assert (out["better"], out["worse"], out["ties"]) == (8, 1, 1)
    lower = paired_difference(alone, distilled, direction=-1)  # a metric where lower is better
    assert (lower["better"], lower["worse"]) == (out["worse"], out["better"])
    one = paired_difference([0.5], [0.6], direction=1)
    assert one["std"] is None and one["ci95"] is None and one["better"] == 1


def test_pooled_meters_hold_every_seeds_rows():
    """The pooled meter of three seeds' reports (one written before the bins were folded): the per-bin
    counts, accuracy, NLL and Brier of one meter fed every seed's rows, and the ECE of that histogram
    (rows at confidence exactly 1.0 in the top bin) from a plain float64 formula."""
    from dataclasses import asdict

    import torch

    from fastkd import CalibrationMeter
    from fastkd.study.seeds import pooled_meters

    gen = torch.Generator().manual_seed(27)
    xs = [torch.randn(n, 6, generator=gen) * 4 for n in (37, 1)]
    xs[0][:5, 2] = 300.0  # softmax exactly 1.0 in fp32
    ys = [torch.randint(0, 6, (x.shape[0],), generator=gen) for x in xs]
    reports = {}
    for seed, (x, y) in enumerate(zip(xs, ys)):
        rep = CalibrationMeter(7).update(x, y).compute()
        reports[seed] = {"bins": {m: [asdict(b) for b in rep.bins] for m in MODEL_KEYS},
                         "results": {m: {"nll": rep.nll, "brier": rep.brier} for m in MODEL_KEYS}}
    # a third seed as reports kept bins before: the exactly-1.0 rows in a bin [1.0, 1.0] of their own
    older = CalibrationMeter(7).update(xs[0], ys[0]).state[:24].reshape(3, 8).T.tolist()
    edges = [i / 7 for i in range(8)] + [1.0]
    bins = [dict(lower=edges[i], upper=edges[i + 1], count=int(c), confidence=cs / max(c, 1), accuracy=ks / max(c, 1))
            for i, (c, cs, ks) in enumerate(older)]
    assert bins[-1]["count"] == 5
    reports[2] = {"bins": {m: bins for m in MODEL_KEYS}, "results": reports[0]["results"]}
    pooled = pooled_meters(reports)["student"].compute()
    xs, ys = xs + xs[:1], ys + ys[:1]
    both = CalibrationMeter(7).update(torch.cat(xs), torch.cat(ys)).compute()
    assert [b.count for b in pooled.bins] == [b.count for b in both.bins] and len(pooled.bins) == 7
    assert pooled.count == 75 and pooled.accuracy == pytest.approx(both.accuracy, abs=1e-12)
    assert pooled.nll == pytest.approx(both.nll, rel=1e-12) and pooled.brier == pytest.approx(both.brier, rel=1e-12)
    conf, pred = torch.cat(xs).softmax(-1).max(-1)
    shown = (conf.double() * 7).floor().clamp(max=6).long()  # fp32 confidences, 7 bins, the last closed
    correct = (pred == torch.cat(ys)).double()
    ece = sum(abs(correct[shown == b].sum() - conf[shown == b].double().sum()) for b in range(7)) / 75
    assert pooled.ece == pytest.approx(float(ece), abs=1e-12)


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["distill", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code, stdout, err = run_cli("--out-dir", str(out), *TINY, "--seeds", "0-2")
    assert code == 0, err
    return out / "digits-seeds0-2", stdout


def _seed_reports(folder):
    return {s: json.loads((folder / f"s{s}" / "report.json").read_text()) for s in (0, 1, 2)}


def test_summary_statistics_are_those_of_the_seed_reports(three_seeds):
    folder, stdout = three_seeds
    summary = json.loads((folder / "report.json").read_text())
    seeds = _seed_reports(folder)
    assert summary["seeds"] == [0, 1, 2] and summary["teacher"] == "retrained per seed" and summary["reused"] == []
    for key, _, _, direction in METRICS:
        for model in MODEL_KEYS:
            values = [seeds[s]["results"][model][key] for s in (0, 1, 2)]
            mean = sum(values) / 3
            assert summary["metrics"][key][model]["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
            assert summary["metrics"][key][model]["std"] == pytest.approx(
                math.sqrt(sum((v - mean) ** 2 for v in values) / 2), rel=1e-9, abs=1e-15)
        d = [seeds[s]["results"]["distilled"][key] - seeds[s]["results"]["student"][key] for s in (0, 1, 2)]
        diff = summary["metrics"][key]["difference"]
        mean = sum(d) / 3
        half = 4.302652730 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)  # t(0.975, 2)
        assert diff["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-9, abs=1e-12)
        if direction:
            assert diff["better"] == sum(direction * x > 0 for x in d)
            assert diff["better"] + diff["worse"] + diff["ties"] == 3
    for model in MODEL_KEYS:  # T* fits that stopped at an end of the range, counted from the runs' flags
        flagged = sum(bool(seeds[s]["results"][model]["fitted_temperature_bound"]) for s in (0, 1, 2))
        assert summary["metrics"]["fitted_temperature"][model]["at_bound"] == flagged
    # pooled over seeds: every seed's 360 test rows, and (equal test sets) the mean accuracy and NLL
    for model in MODEL_KEYS:
        pooled = summary["pooled"][model]
        assert pooled["count"] == 3 * summary["dataset"]["test"]
        assert pooled["accuracy"] == pytest.approx(summary["metrics"]["accuracy"][model]["mean"], abs=1e-12)
        assert pooled["nll"] == pytest.approx(summary["metrics"]["nll"][model]["mean"], rel=1e-9)
    assert "| accuracy ↑ |" in stdout and "3 seeds (0-2), none reused;" in stdout and "seed 2:" in stdout


def test_summary_report_and_figure(three_seeds):
    folder, _ = three_seeds
    md = (folder / "report.md").read_text()
    assert "| metric | teacher | student alone | distilled student | distilled − alone [95% CI] |" in md
    for _, name, _, _ in METRICS:
        assert f"| {name}" in md
    assert "![summary](summary.png)" in md and "t = 4.303" in md and "| 2 |" in md  # the per-seed table
    png = (folder / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(folder / "summary.png").shape[:2]
    assert (width, height) == (1600, 1500)  # 16 x 15 inches at 100 dpi: a legend, 8 metric panels, 3 diagrams
    for s in (0, 1, 2):  # each seed is a whole single-seed run, without its figures
        assert (folder / f"s{s}" / "report.json").exists() and not list((folder / f"s{s}").glob("*.png"))
        assert "No figures: one seed of a multi-seed run" in (folder / f"s{s}" / "report.md").read_text()


def test_summary_figure_says_what_its_lines_are(three_seeds):
    from fastkd.study.report import pyplot
    from fastkd.study.seeds import pooled_meters, summarize_seeds, summary_figure

    reports = _seed_reports(three_seeds[0])
    fig = summary_figure(reports, summarize_seeds(reports), pooled_meters(reports))
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend() and not ax.axison]
    handles = getattr(legend, "legend_handles", None) or legend.legendHandles  # (the name before matplotlib 3.7)
    colours = {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), handles)}
    assert colours["one seed: distilled better"] == "#55a868" and colours["one seed: distilled worse"] == "#c44e52"
    assert {"mean over seeds", "teacher (mean over seeds)"} <= set(colours)
    accuracy = fig.axes[0]  # its seed lines are drawn in those colours, by the sign of distilled - alone
    for s, line in zip(sorted(reports), accuracy.get_lines()):
        gain = reports[s]["results"]["distilled"]["accuracy"] - reports[s]["results"]["student"]["accuracy"]
        assert line.get_color() == {1: "#55a868", -1: "#c44e52", 0: "0.6"}[(gain > 0) - (gain < 0)]
    counts = [ax for ax in fig.axes if ax.get_ylabel() == "test rows"]
    assert len(counts) == 1 and sum(p.get_height() for p in counts[0].patches) == 3 * 360  # the teacher's, pooled
    pyplot().close(fig)


def test_seed_s_is_the_single_seed_run(three_seeds, tmp_path):
    folder, _ = three_seeds
    single = run_study(StudyConfig(out_dir=str(tmp_path), seed=1, epochs=1, teacher_epochs=1, progress=False),
                       figures=False)
    assert single["results"] == _seed_reports(folder)[1]["results"]


def _snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_resume_reuses_finished_seeds(three_seeds, tmp_path):
    folder = tmp_path / "digits-seeds0-2"
    shutil.copytree(three_seeds[0], folder)
    (folder / "s2" / "report.json").unlink()  # seed 2 stopped after training, before its report
    before = {s: _snapshot(folder / f"s{s}") for s in (0, 1)}
    old = json.loads((folder / "report.json").read_text())
    code, stdout, err = run_cli("--out-dir", str(tmp_path), *TINY, "--seeds", "0-2", "--resume")
    assert code == 0, err
    assert all(_snapshot(folder / f"s{s}") == before[s] for s in (0, 1))  # untouched
    assert "seed 0: reused" in stdout and "seed 2: reused" not in stdout
    assert "3 seeds (0-2), seeds 0-1 reused from the earlier run;" in stdout
    new = json.loads((folder / "report.json").read_text())
    assert new["reused"] == [0, 1] and (folder / "s2" / "report.json").exists()
    assert new["metrics"] == old["metrics"]  # seed 2 continued from its checkpoints to the same result


def test_resume_refuses_seeds_run_with_other_settings(three_seeds, tmp_path):
    shutil.copytree(three_seeds[0], tmp_path / "digits-seeds0-2")
    code, _, err = run_cli("--out-dir", str(tmp_path), *TINY, "--seeds", "0-2", "--resume", "--epochs", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "was run with --epochs = 1, not 2" in err and "--resume" in err


def test_a_second_multi_seed_run_into_the_same_folder_is_refused(three_seeds, tmp_path):
    folder = tmp_path / "digits-seeds0-2"
    shutil.copytree(three_seeds[0], folder)
    before = _snapshot(folder)
    code, _, err = run_cli("--out-dir", str(tmp_path), *TINY, "--seeds", "0-2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and _snapshot(folder) == before
    assert f"{folder} holds an earlier run: pass --resume" in err and "--overwrite" in err and "--out-dir" in err


def test_overwrite_replaces_every_seed(three_seeds, tmp_path):
    folder = tmp_path / "digits-seeds0-2"
    shutil.copytree(three_seeds[0], folder)
    (folder / "s1" / "distilled-top2.pt").write_bytes(b"stale")
    (folder / "s7").mkdir()  # a seed of an earlier run under this --name, not run now
    (folder / "s7" / "report.json").write_text("{}")
    code, stdout, err = run_cli("--out-dir", str(tmp_path), "--no-progress", "--epochs", "1", "--teacher-epochs", "2",
                                "--seeds", "0-1", "--name", folder.name, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "report.md", "s0", "s1", "summary.png"]
    assert not (folder / "s1" / "distilled-top2.pt").exists()
    assert json.loads((folder / "s1" / "report.json").read_text())["config"]["teacher_epochs"] == 2
