"""The distillation study on a shortened schedule: report contents, resume, determinism, CLI errors,
and the CIFAR loading code on a tiny data set written here in the real batch format."""
import json
import pickle

import numpy as np
import pytest
import torch

import fastkd.study.teachers
import fastkd.study.train
from fastkd.study.cli import main
from fastkd.study.config import StudyConfig
from fastkd.study.data import load_cifar, random_crop_flip
from fastkd.study.run import run_study

SHORT = dict(epochs=3, teacher_epochs=6, progress=False)


def strip_timing(report):
    """The report without wall-clock numbers (the only part allowed to differ between runs)."""
    report = json.loads(json.dumps(report))
    report.pop("timing")
    for rows in report["history"].values():
        for r in rows:
            r.pop("samples_per_s")
    return report


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run_study(StudyConfig(out_dir=str(out), name="short", **SHORT)), out / "short"


def test_report_has_every_field_in_range(short_run):
    report, folder = short_run
    for name in ("report.md", "report.json", "metrics.jsonl", "reliability.png", "curves.png"):
        assert (folder / name).stat().st_size > 0, name
    assert any((folder / "tensorboard").iterdir())
    assert report["dataset"]["train"] + report["dataset"]["val"] + report["dataset"]["test"] == 1797
    for key, r in report["results"].items():
        for metric in ("accuracy", "ece", "mce", "brier", "agreement", "ece_after_scaling"):
            assert 0.0 <= r[metric] <= (2.0 if metric == "brier" else 1.0), (key, metric)
        assert r["nll"] > 0 and r["fitted_temperature"] > 0 and r["parameters"] > 0
    assert report["results"]["teacher"]["agreement"] == 1.0
    assert report["results"]["teacher"]["accuracy"] > 0.85  # a real teacher, not chance
    assert report["results"]["teacher"]["parameters"] > 10 * report["results"]["student"]["parameters"]
    for key in ("student", "distilled"):
        table = report["per_class"][key]
        assert [table[str(c)]["support"] for c in range(10)] == \
            torch.bincount(torch.tensor(_test_labels())).tolist()
        assert {"precision", "recall", "f1-score"} <= set(table["0"])
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 3 + 3 and json.loads(lines[-1])["stage"] == "distilled"
    for row in map(json.loads, lines):  # T and alpha where the loss used them, only
        assert ({"temperature", "alpha"} <= set(row)) == (row["stage"] == "distilled"), row
    md = (folder / "report.md").read_text()
    assert "distilled student" in md and "precision" in md and "constant" in md


def _test_labels():
    from fastkd.study.data import load_digits

    return load_digits("cpu").y_test.tolist()


def test_distilled_student_trains_on_the_teachers_logits(tmp_path, monkeypatch):
    seen = []
    real = fastkd.study.train.kd_loss

    def spy(student_logits, teacher_logits, *a, **k):
        if student_logits.requires_grad:
            seen.append(teacher_logits.detach().clone())
        return real(student_logits, teacher_logits, *a, **k)

    monkeypatch.setattr(fastkd.study.train, "kd_loss", spy)
    saved = {}
    real_fit = fastkd.study.train.fit

    def keep_teacher(model, data, cfg, stage, *a, **k):
        out = real_fit(model, data, cfg, stage, *a, **k)
        saved.setdefault(stage, (model, data))
        return out

    monkeypatch.setattr(fastkd.study.teachers, "fit", keep_teacher)
    run_study(StudyConfig(out_dir=str(tmp_path), **SHORT))
    teacher, data = saved["teacher"]
    full = fastkd.study.train.predict(teacher, data, data.x_train)
    assert len(seen) == 3 * 9  # 3 epochs x 9 batches of 128 out of 1078
    for batch in seen:  # each teacher row is the teacher's output on some training image
        nearest = (batch[:, None, :] - full[None, :, :]).abs().amax(-1).min(dim=1).values
        assert nearest.max() < 1e-6


def test_same_seed_same_report(short_run, tmp_path):
    again = run_study(StudyConfig(out_dir=str(tmp_path), name="short", **SHORT))
    first = strip_timing(short_run[0])
    second = strip_timing(again)
    first["config"].pop("out_dir")
    second["config"].pop("out_dir")
    assert first == second


def test_interrupted_run_resumes_to_the_same_result(short_run, tmp_path, monkeypatch):
    real_save = fastkd.study.train.atomic_save
    calls = []

    def crash_midway(obj, path):
        calls.append(path.name)
        if path.name == "distilled.pt" and calls.count("distilled.pt") == 2:
            raise KeyboardInterrupt  # killed after two epochs of the distilled student
        real_save(obj, path)

    monkeypatch.setattr(fastkd.study.train, "atomic_save", crash_midway)
    cfg = dict(out_dir=str(tmp_path), name="short", **SHORT)
    with pytest.raises(KeyboardInterrupt):
        run_study(StudyConfig(**cfg))
    assert not list(tmp_path.glob("short/*.tmp"))
    monkeypatch.setattr(fastkd.study.train, "atomic_save", real_save)
    resumed = run_study(StudyConfig(resume=True, **cfg))
    first, second = strip_timing(short_run[0]), strip_timing(resumed)
    first["config"].pop("out_dir"), second["config"].pop("out_dir")
    second["config"]["resume"] = False
    assert first == second


@pytest.mark.parametrize("policy", ["anneal", "calibration"])
def test_policies_move_temperature_and_alpha(policy, tmp_path):
    report = run_study(StudyConfig(out_dir=str(tmp_path), policy=policy, **SHORT))
    traj = report["policy"]["trajectory"]
    assert report["policy"]["name"] == policy and len(traj) == 3
    assert traj[0]["temperature"] == 4.0 and traj[0]["alpha"] == 0.9
    if policy == "anneal":  # cosine from T=4 to 1 and alpha 0.9 to 0.45 over 3 epochs
        assert traj[1]["temperature"] == pytest.approx(1 + 3 * 0.75)
        assert traj[2]["alpha"] == pytest.approx(0.9 * (0.5 + 0.5 * 0.25))
    else:
        rows = report["history"]["distilled"]
        for before, after in zip(rows, rows[1:]):
            gap = before["val_confidence"] - before["val_accuracy"]
            expected = before["temperature"] * (1.25 if gap > 0.02 else 1 / 1.25 if gap < -0.02 else 1)
            assert after["temperature"] == pytest.approx(min(max(expected, 1.0), 20.0))


def run_cli(capsys, *args):
    code = main(["distill", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'; choose from digits, cifar10, cifar100"),
    (["--student", "vit"], "unknown student model 'vit'; choose from mlp-large"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["--policy", "magic"], "unknown policy 'magic'"),
    (["--backend", "fastest"], "unknown backend 'fastest'; choose from auto, triton, cuda, torch"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist (pass --download"),
    (["--dataset", "cifar10"], "--data-dir is required"),
])
def test_cli_bad_arguments_end_in_one_line(capsys, args, message, tmp_path):
    code, err = run_cli(capsys, "--out-dir", str(tmp_path), *args)
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_cli_unreadable_checkpoint(capsys, tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a checkpoint")
    code, err = run_cli(capsys, "--out-dir", str(tmp_path), "--teacher-ckpt", str(bad))
    assert code == 2 and len(err.splitlines()) == 1 and "cannot read checkpoint" in err


def test_cli_runs_with_a_trained_teacher_checkpoint(capsys, short_run, tmp_path):
    ckpt = short_run[1] / "teacher.pt"
    code = main(["distill", "--no-progress", "--out-dir", str(tmp_path), "--teacher-ckpt", str(ckpt),
                 "--epochs", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "distilled student" in out
    report = json.loads((tmp_path / "digits-s0" / "report.json").read_text())
    for metric in ("accuracy", "ece", "nll", "parameters"):  # the same teacher, not a retrained one
        assert report["results"]["teacher"][metric] == short_run[0]["results"]["teacher"][metric]


def write_tiny_cifar10(root, n_per_batch=8, n_test=8, seed=0):
    """The layout torchvision reads: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n):
        # the real files are Python 2 pickles whose str keys load as str under latin1
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist()}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)


def test_cifar_loads_through_torchvision(tmp_path):
    """(The study on such a folder, through the CLI: tests/test_study_data.py.)"""
    write_tiny_cifar10(tmp_path / "data")
    data = load_cifar("cifar10", tmp_path / "data", "cpu")
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape[1:] == (3, 32, 32)
    assert len(data.x_train) + len(data.x_val) == 40 and len(data.x_test) == 8
    assert data.class_names[0] == "airplane"


def test_random_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    g = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, g, pad=2)
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        img = padded[i] if not flip[i] else padded[i].flip(-1)
        x0 = int(dx[i]) if not flip[i] else 4 - int(dx[i])  # flipping mirrors the window too
        assert torch.equal(out[i], img[:, dy[i]:dy[i] + 6, x0:x0 + 6])


def test_fit_temperature_finds_the_nll_minimum():
    from fastkd.study.run import fit_temperature

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 4
    labels = torch.where(torch.rand(500, generator=g) < 0.6, logits.argmax(1), torch.randint(0, 10, (500,), generator=g))
    t_star = fit_temperature(logits, labels)
    grid = torch.linspace(0.2, 5.0, 4801, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits.double() / t, labels) for t in grid])
    assert abs(t_star - float(grid[nll.argmin()])) <= 1e-3


def _history(temperatures, alphas):
    """A made-up history: the teacher 4 epochs, the students 3 (the distilled one with these T, alpha)."""
    rows = lambda stage, n, loss: [{"epoch": e + 1, "train_loss": loss / (e + 1), "val_accuracy": 0.5 + 0.1 * e,
                                    "val_ece": 0.1 / (e + 1)} for e in range(n)]
    history = {"teacher": rows("teacher", 4, 2.3), "student": rows("student", 3, 2.2),
               "distilled": rows("distilled", 3, 30.0)}
    for r, t, a in zip(history["distilled"], temperatures, alphas):
        r.update(temperature=t, alpha=a)
    return history


def _lines(ax):
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


def test_curves_keep_the_distillation_objective_off_the_cross_entropy_axis():
    from fastkd.study.report import curves_figure, pyplot

    fig = curves_figure(_history([4.0] * 3, [0.9] * 3), {"divergence": "kl", "policy": "constant"})
    ce, objective, acc, ece = fig.axes  # a constant policy: no T / alpha panel
    assert _lines(ce) == {"teacher": [2.3, 1.15, 2.3 / 3, 2.3 / 4], "student alone": [2.2, 1.1, 2.2 / 3]}
    assert _lines(objective) == {"distilled student": [30.0, 15.0, 10.0]}
    assert "α·T²·KL + (1−α)·CE" in objective.get_title() and "T = 4, α = 0.9 throughout" in objective.get_title()
    assert set(_lines(acc)) == set(_lines(ece)) == {"teacher", "student alone", "distilled student"}
    pyplot().close(fig)

    fig = curves_figure(_history([4.0, 3.0, 1.5], [0.9, 0.9, 0.8]), {"divergence": "jsd", "policy": "anneal"})
    assert len(fig.axes) == 6  # the four panels, T and alpha on twin axes
    t_axis, alpha_axis = fig.axes[4:]
    assert _lines(t_axis) == {"T": [4.0, 3.0, 1.5]} and _lines(alpha_axis) == {"α": [0.9, 0.9, 0.8]}
    assert "anneal" in t_axis.get_title() and "throughout" not in fig.axes[1].get_title()
    pyplot().close(fig)


def test_reliability_diagram_shows_the_rows_per_bin(gen):
    """The histogram under each diagram holds the rows per confidence bin, labelled with their number;
    the bars hold each bin's accuracy: both against numpy on the same confidences."""
    import numpy as np

    from fastkd.calibration import CalibrationMeter
    from fastkd.study.report import pyplot, reliability_figure

    logits = torch.randn(257, 7, generator=gen, dtype=torch.float64) * 2.5
    labels = torch.randint(0, 7, (257,), generator=gen)
    fig = reliability_figure({"teacher": CalibrationMeter(15).update(logits, labels)})
    diagram, counts = fig.axes
    conf, pred = torch.softmax(logits, -1).max(-1)
    expected, _ = np.histogram(conf.numpy(), bins=15, range=(0, 1))
    assert [p.get_height() for p in counts.patches] == expected.tolist() and expected.sum() == 257
    assert [t.get_text() for t in counts.texts] == [str(n) for n in expected if n]
    which = np.minimum((conf.numpy() * 15).astype(int), 14)
    correct = (pred == labels).numpy()
    accuracy = [correct[which == b].mean() for b in range(15) if expected[b]]
    heights = [p.get_height() for p in diagram.patches[:len(accuracy)]]  # the accuracy bars, then the gaps
    assert heights == pytest.approx(accuracy, abs=1e-12)
    pyplot().close(fig)
