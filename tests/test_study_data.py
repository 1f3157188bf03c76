"""The study on bad or degenerate data: every CIFAR file torchvision (or the digits loader) cannot read
ends in one line naming the file, exit status 2 and no run folder; the temperature fit stays in
[0.05, 100] and a bound is flagged in the report. CIFAR folders are written here in the real
python-pickle format (str keys, (N, 3072) uint8 rows, a list of labels, batches.meta); the loader's
torchvision subclass checks that each file exists instead of its MD5."""
import gzip
import json
import math
import pickle

import numpy as np
import pytest
import torch

import fastkd.study.train
from fastkd.study.cli import main
from fastkd.study.config import StudyConfig
from fastkd.study.data import load_cifar
from fastkd.study.run import fit_temperature, run_study, temperature_bound

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(rng, n, classes=10, label_key="labels"):
    """One batch as the CIFAR tarballs hold it (Python 2 pickles whose str keys load as str)."""
    labels = [int(c) for c in (np.arange(n) % classes)]  # every class in every batch file
    batch = {"batch_label": "training batch", label_key: labels,
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "filenames": [f"img_{i}.png" for i in range(n)]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [c // 5 for c in labels]
    return batch


def write_cifar10(root, n=10, seed=0, edit=None):
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} under ``root``; ``edit(name,
    obj)`` may return a replacement object for a file (or bytes, written as they are)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = {name: cifar_batch(rng, n) for name in CIFAR10_BATCHES}
    files["batches.meta"] = {"num_cases_per_batch": n, "label_names": list(CIFAR10_NAMES), "num_vis": 3072}
    for name, obj in files.items():
        obj = edit(name, obj) if edit else obj
        if obj is None:
            continue
        (folder / name).write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2))
    return folder


def write_cifar100(root, n_train=500, n_test=100, seed=0, edit=None):
    """cifar-100-python/{train, test, meta}: 5 training images a class, so 1 a class for validation."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    files = {split: cifar_batch(rng, n, 100, "fine_labels") for split, n in (("train", n_train), ("test", n_test))}
    files["meta"] = {"fine_label_names": [f"class{c}" for c in range(100)],
                     "coarse_label_names": [f"super{c}" for c in range(20)]}
    for name, obj in files.items():
        obj = edit(name, obj) if edit else obj
        (folder / name).write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2))
    return folder


def bytes_keys(obj):
    """What pickling a CIFAR-like dict built from Python 3 bytes often gives: keys and names as bytes."""
    out = {k.encode(): v for k, v in obj.items()}
    if b"label_names" in out:
        out[b"label_names"] = [n.encode() for n in out[b"label_names"]]
    return out


def only(target, change):
    """An ``edit`` that changes file ``target`` and leaves the others as they are."""
    return lambda name, obj: change(obj) if name == target else obj


def truncated(obj):
    whole = pickle.dumps(obj, protocol=2)
    return whole[: len(whole) // 2]


def set_label(obj, row, value):
    obj["labels"][row] = value
    return obj


BROKEN_CIFAR10 = [  # (edit, the file named, what the message says)
    pytest.param(lambda name, obj: bytes_keys(obj), "data_batch_1",
                 "has bytes keys (b'data', b'labels'); torchvision reads str keys", id="bytes-keys"),
    pytest.param(only("data_batch_3", truncated), "data_batch_3", "cannot be unpickled", id="truncated"),
    pytest.param(only("test_batch", lambda obj: b"\x00garbage, not a pickle"), "test_batch",
                 "cannot be unpickled", id="not-a-pickle"),
    pytest.param(only("data_batch_2", lambda obj: {**obj, "data": obj["data"][:, :3000]}), "data_batch_2",
                 "'data' has shape (10, 3000); CIFAR stores one image per row", id="short-rows"),
    # rows of half an image: torchvision would reshape them without a word into half as many images
    pytest.param(only("data_batch_2", lambda obj: {**obj, "data": obj["data"][:, :1536]}), "data_batch_2",
                 "'data' has shape (10, 1536)", id="half-rows"),
    # channels last in one file (in every file, torchvision reads them as images with scrambled
    # channels, as it does rows of 3072 in that order: no check can see it)
    pytest.param(only("data_batch_2", lambda obj: {**obj, "data": obj["data"].reshape(-1, 32, 32, 3)}),
                 "data_batch_2", "'data' has shape (10, 32, 32, 3)", id="channels-last"),
    pytest.param(only("data_batch_1", lambda obj: {**obj, "data": obj["data"].astype(np.float32) / 255}),
                 "data_batch_1", "'data' holds float32, not uint8", id="float-pixels"),
    pytest.param(only("data_batch_4", lambda obj: set_label(obj, 7, 10)), "data_batch_4",
                 "label 10 (image 7) is outside 0-9: cifar10 has 10 classes", id="label-too-large"),
    pytest.param(only("data_batch_5", lambda obj: set_label(obj, 0, -1)), "data_batch_5",
                 "label -1 (image 0) is outside 0-9", id="label-negative"),
    pytest.param(only("data_batch_5", lambda obj: {**obj, "labels": obj["labels"][:-1]}), "data_batch_5",
                 "10 images but 9 labels", id="labels-missing"),
    pytest.param(only("data_batch_1", lambda obj: {**obj, "labels": [0.5] * 10}), "data_batch_1",
                 "'labels' is not a list of integers", id="float-labels"),
    pytest.param(only("data_batch_1", lambda obj: {k: v for k, v in obj.items() if k != "data"}),
                 "data_batch_1", "has no 'data' key (its keys: 'batch_label', 'labels'", id="no-data"),
    pytest.param(only("data_batch_5", lambda obj: [obj["data"], obj["labels"]]), "data_batch_5",
                 "holds a list, not the dict of a CIFAR file", id="not-a-dict"),
    pytest.param(only("batches.meta", lambda obj: {**obj, "label_names": CIFAR10_NAMES[:9]}), "batches.meta",
                 "'label_names' holds 9 entries; cifar10 has 10 class names", id="meta-nine-names"),
    pytest.param(only("batches.meta", lambda obj: {**obj, "label_names": [n.encode() for n in CIFAR10_NAMES]}),
                 "batches.meta", "'label_names' holds bytes names (b'airplane', ...)", id="meta-bytes-names"),
    pytest.param(only("batches.meta", bytes_keys), "batches.meta",
                 "has bytes keys (b'label_names')", id="meta-bytes-keys"),
    pytest.param(only("data_batch_5", lambda obj: None), "cifar-10-batches-py",
                 "lacks data_batch_5 (pass --download to fetch cifar10)", id="missing-file"),
    # each file alone is one torchvision reads, (N, 3, 32, 32) and (N, 3072), but not the two together
    pytest.param(only("data_batch_3", lambda obj: {**obj, "data": obj["data"].reshape(-1, 3, 32, 32)}),
                 "cifar-10-batches-py", "torchvision cannot read cifar10 in ", id="mixed-layouts"),
]


def run_cli(capsys, *args):
    code = main(["distill", "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def assert_one_line_and_nothing_written(code, err, runs, path, message):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fastkd: error: ") and str(path) in err and message in err, err
    assert not runs.exists() or not any(runs.rglob("*")), sorted(runs.rglob("*"))  # nothing for --resume


@pytest.mark.parametrize("edit,name,message", BROKEN_CIFAR10)
def test_cli_broken_cifar10_file_ends_in_one_line(capsys, tmp_path, edit, name, message):
    folder = write_cifar10(tmp_path / "data", edit=edit)
    path = folder / name if name != folder.name else folder
    runs = tmp_path / "runs"
    code, err, _ = run_cli(capsys, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                           "--out-dir", str(runs), "--epochs", "1")
    assert_one_line_and_nothing_written(code, err, runs, path, message)


def test_cli_broken_data_leaves_an_earlier_run_to_resume_untouched(capsys, tmp_path):
    write_cifar10(tmp_path / "data", edit=only("data_batch_2", truncated))
    run = tmp_path / "runs" / "cifar10-s0"
    run.mkdir(parents=True)
    (run / "teacher.pt").write_bytes(b"an earlier run's checkpoint")
    code, err, _ = run_cli(capsys, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                           "--out-dir", str(tmp_path / "runs"), "--resume")
    assert code == 2 and "data_batch_2 cannot be unpickled" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == ["teacher.pt"]
    assert (run / "teacher.pt").read_bytes() == b"an earlier run's checkpoint"


@pytest.mark.parametrize("edit,name,message", [
    pytest.param(lambda name, obj: bytes_keys(obj), "train",
                 "has bytes keys (b'data', b'fine_labels')", id="bytes-keys"),
    pytest.param(only("test", lambda obj: {**obj, "fine_labels": [100] + obj["fine_labels"][1:]}), "test",
                 "label 100 (image 0) is outside 0-99: cifar100 has 100 classes", id="label-too-large"),
    pytest.param(only("meta", lambda obj: {**obj, "fine_label_names": obj["coarse_label_names"]}), "meta",
                 "'fine_label_names' holds 20 entries; cifar100 has 100 class names", id="coarse-names"),
])
def test_cli_broken_cifar100_file_ends_in_one_line(capsys, tmp_path, edit, name, message):
    folder = write_cifar100(tmp_path / "data", edit=edit)
    runs = tmp_path / "runs"
    code, err, _ = run_cli(capsys, "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"),
                           "--out-dir", str(runs))
    assert_one_line_and_nothing_written(code, err, runs, folder / name, message)


def test_cifar100_in_the_real_format_loads(tmp_path):
    write_cifar100(tmp_path / "data")
    data = load_cifar("cifar100", tmp_path / "data", "cpu")
    assert data.num_classes == 100 and len(data.class_names) == 100 and data.class_names[3] == "class3"
    assert len(data.x_train) == 400 and len(data.x_val) == 100 and len(data.x_test) == 100


def test_too_few_images_for_a_validation_split(capsys, tmp_path):
    empty = only("data_batch_5", lambda obj: {**obj, "data": obj["data"][:0], "labels": []})
    write_cifar10(tmp_path / "data", edit=empty)  # 4 images of each class: none to spare
    runs = tmp_path / "runs"
    code, err, _ = run_cli(capsys, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                           "--out-dir", str(runs))
    assert_one_line_and_nothing_written(code, err, runs, tmp_path / "data" / "cifar-10-batches-py",
                                        "40 training images leave the validation split (10% of each class) empty")


@pytest.fixture
def digits_file(tmp_path, monkeypatch):
    """scikit-learn's digits read from a copy in tmp_path (the same gzip + loadtxt sklearn uses), so a
    test can break the copy; returns its path."""
    import sklearn.datasets._base as base

    real = base.load_gzip_compressed_csv_data(data_file_name="digits.csv.gz", delimiter=",")
    path = tmp_path / "digits.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, real, fmt="%d", delimiter=",")

    def from_copy(data_file_name, descr_file_name=None, **kw):
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=kw.get("delimiter"))
        return data if descr_file_name is None else (data, "")

    monkeypatch.setattr(base, "load_gzip_compressed_csv_data", from_copy)
    return path


def test_digits_copy_loads(digits_file):
    from fastkd.study.data import load_digits

    assert len(load_digits("cpu").x_test) == 360


@pytest.mark.parametrize("damage,message", [
    pytest.param(lambda raw: raw[: len(raw) // 2], "cannot read scikit-learn's digits", id="truncated-gzip"),
    pytest.param(lambda raw: gzip.compress(gzip.decompress(raw).replace(b",0\n", b",12\n", 1)),
                 "hold label 12 (image ", id="label-out-of-range"),
])
def test_cli_broken_digits_end_in_one_line(capsys, tmp_path, digits_file, damage, message):
    digits_file.write_bytes(damage(digits_file.read_bytes()))
    runs = tmp_path / "runs"
    code, err, _ = run_cli(capsys, "--out-dir", str(runs))
    assert_one_line_and_nothing_written(code, err, runs, "digits.csv.gz", message)
    assert "reinstalling scikit-learn restores the file" in err


# The temperature fit: bounded to [0.05, 100], the bound flagged; unchanged where the minimum is inside.

def nll(logits, labels, temps):
    """float64 mean NLL of softmax(logits / T) for each T, written plainly."""
    z = logits.double()
    z_y = z.gather(1, labels[:, None])[:, 0]
    out = []
    for t in temps.split(32):  # (32, rows, classes) at a time
        t = t[:, None]
        out.append((torch.logsumexp(z[None] / t[..., None], 2) - z_y[None] / t).mean(1))
    return torch.cat(out)


def grid_fit(logits, labels, lo=0.05, hi=100.0):
    """The NLL's minimum over T by grid search: 201 points log-spaced over [lo, hi], then rounds of
    21 points over the two cells around the best (each a tenth as wide as the last)."""
    grid = torch.logspace(math.log10(lo), math.log10(hi), 201, dtype=torch.float64)
    for _ in range(8):
        i = int(nll(logits, labels, grid).argmin())
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        grid = torch.linspace(float(a), float(b), 21, dtype=torch.float64)
    return float(grid[int(nll(logits, labels, grid).argmin())])


def noisy_predictions(gen, n, classes, scale, right):
    """Logits of standard-normal scale ``scale``; the label is the argmax with probability ``right``,
    else a random class."""
    logits = torch.randn(n, classes, generator=gen) * scale
    other = torch.randint(0, classes, (n,), generator=gen)
    return logits, torch.where(torch.rand(n, generator=gen) < right, logits.argmax(1), other)


@pytest.mark.parametrize("n,classes,scale,right", [
    pytest.param(500, 10, 4.0, 0.6, id="over-confident"),
    pytest.param(500, 10, 0.5, 0.9, id="under-confident"),
    pytest.param(300, 2, 2.0, 0.7, id="two-classes"),
    pytest.param(200, 100, 3.0, 0.5, id="100-classes"),
])
def test_fit_temperature_equals_a_grid_search(gen, n, classes, scale, right):
    logits, labels = noisy_predictions(gen, n, classes, scale, right)
    t_star = fit_temperature(logits, labels)
    reference = grid_fit(logits, labels)
    assert 0.05 < reference < 100
    assert t_star == pytest.approx(reference, rel=1e-6) and temperature_bound(t_star) is None


def test_fit_temperature_ignores_masked_classes(gen):
    logits, labels = noisy_predictions(gen, 300, 10, 2.0, 0.7)
    masked = torch.cat([logits, torch.full((300, 3), -math.inf)], 1)  # three classes never predicted
    assert fit_temperature(masked, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-12)


@pytest.mark.parametrize("case", ["near-uniform, below chance", "exactly uniform"])
def test_fit_temperature_near_uniform_stops_at_the_upper_bound(gen, case):
    logits = torch.randn(2000, 10, generator=gen) * 0.01  # a student after one epoch on hard data
    if case == "exactly uniform":
        logits = logits[:, :1].expand(-1, 10)  # the same logit for every class of a row
        labels = torch.randint(0, 10, (2000,), generator=gen)
    else:
        labels = logits.argmin(1)  # the true class a little below the others: worse than uniform
        # unbounded, the fit runs away: the NLL keeps falling as T grows
        curve = nll(logits, labels, torch.tensor([1.0, 100.0, 1e4, 1e8], dtype=torch.float64))
        assert (curve.diff() < 0).all()
    t_star = fit_temperature(logits, labels)
    assert t_star == 100.0 and temperature_bound(t_star) == "upper"


def test_fit_temperature_separable_stops_at_the_lower_bound(gen):
    logits = torch.randn(500, 10, generator=gen) * 3
    labels = logits.argmax(1)  # every prediction right: sharper is always better
    curve = nll(logits, labels, torch.tensor([1.0, 0.05, 1e-3], dtype=torch.float64))
    assert (curve.diff() < 0).all()
    t_star = fit_temperature(logits, labels)
    assert t_star == 0.05 and temperature_bound(t_star) == "lower"


def test_fit_temperature_nan_logits_and_no_rows():
    assert math.isnan(fit_temperature(torch.full((4, 3), math.nan), torch.zeros(4, dtype=torch.long)))
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_report_flags_a_temperature_at_the_bound(tmp_path, monkeypatch):
    """Students that predict exactly uniformly (last layer zero, no training): T* = 100. A teacher
    after two epochs: accurate (0.76) but its logits still close together, its NLL's minimum at
    T = 0.041 (float64, unbounded): T* = 0.05. Both flagged in report.json and report.md."""
    real = fastkd.study.train.build_model

    def uniform_student(name, *args):
        model = real(name, *args)
        if name == "mlp-tiny":
            torch.nn.init.zeros_(model[-1].weight)
            torch.nn.init.zeros_(model[-1].bias)
        return model

    monkeypatch.setattr(fastkd.study.train, "build_model", uniform_student)
    report = run_study(StudyConfig(out_dir=str(tmp_path), name="flat", epochs=0, teacher_epochs=2,
                                   progress=False))
    saved = json.loads((tmp_path / "flat" / "report.json").read_text())
    assert saved["temperature_fit"] == {"split": "validation", "range": [0.05, 100.0]}
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    for key in ("student", "distilled"):
        assert saved["results"][key]["fitted_temperature"] == 100.0
        assert saved["results"][key]["fitted_temperature_bound"] == "upper"
    assert saved["results"]["teacher"]["fitted_temperature"] == 0.05
    assert saved["results"]["teacher"]["fitted_temperature_bound"] == "lower"
    md = (tmp_path / "flat" / "report.md").read_text()
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| 100 (bound) |" in rows["| student alone"] and "| 100 (bound) |" in rows["| distilled student"]
    assert "| 0.05 (bound) |" in rows["| teacher"]
    assert "within [0.05, 100]" in md
    assert "T* = 100 (bound), student alone, distilled student: the validation NLL still falls" in md
    assert "T* = 0.05 (bound), teacher: the validation NLL still falls" in md


def test_cli_runs_the_cifar10_study_end_to_end(capsys, tmp_path):
    """The whole CIFAR path through the command line with its default models (resnet18 teacher,
    mobilenet_v2 student), one epoch each, on 50 training images (40 train, 10 validation) and 10
    test images written in the real format."""
    write_cifar10(tmp_path / "data")
    runs = tmp_path / "runs"
    code, err, out = run_cli(capsys, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                             "--out-dir", str(runs), "--epochs", "1")
    assert code == 0, err
    assert "| teacher | resnet18 |" in out and "| distilled student | mobilenet_v2 |" in out
    folder = runs / "cifar10-s0"
    report = json.loads((folder / "report.json").read_text())
    assert set(report) == {"config", "dataset", "results", "temperature_fit", "bins", "policy", "history",
                           "timing", "per_class"}
    assert report["config"]["teacher"] == "resnet18" and report["config"]["student"] == "mobilenet_v2"
    assert report["dataset"] == {"name": "cifar10", "classes": CIFAR10_NAMES, "train": 40, "val": 10, "test": 10}
    assert set(report["results"]) == {"teacher", "student", "distilled"}
    for key, r in report["results"].items():
        assert set(r) == {"model", "parameters", "accuracy", "confidence", "ece", "mce", "nll", "brier",
                          "agreement", "fitted_temperature", "fitted_temperature_bound", "ece_after_scaling"}, key
        assert 0.05 <= r["fitted_temperature"] <= 100 and r["fitted_temperature_bound"] in (None, "upper", "lower")
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0
    assert report["results"]["teacher"]["parameters"] > report["results"]["student"]["parameters"]
    assert {len(rows) for rows in report["history"].values()} == {1}
    assert set(report["per_class"]) == {"student", "distilled"}
    assert set(CIFAR10_NAMES) <= set(report["per_class"]["student"])
    md = (folder / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert headings == ["# fastkd distillation study: cifar10", "## Test results",
                        "## Feedback policy: `constant`", "## Per-class report (test split)",
                        "### student alone", "### distilled student"]
    assert "airplane" in md and "![reliability](reliability.png)" in md and "![curves](curves.png)" in md
    for name in ("reliability.png", "curves.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 3
    assert {p.name for p in folder.glob("*.pt")} == {"teacher.pt", "student.pt", "distilled.pt"}


def test_download_with_every_file_present_reads_them(tmp_path):
    """--download fetches nothing when the files are there (torchvision's own check), then reads them."""
    write_cifar10(tmp_path / "data")
    data = load_cifar("cifar10", tmp_path / "data", "cpu", download=True)
    assert len(data.x_train) == 40 and data.class_names == CIFAR10_NAMES
