"""The study on bad or degenerate data: every CIFAR file torchvision (or the digits loader) cannot read
ends in one line naming the file, exit status 2 and no run folder. CIFAR folders are written here in
the real python-pickle format (str keys, (N, 3072) uint8 rows, a list of labels, batches.meta); the
loader's torchvision subclass checks that each file exists instead of its MD5."""
import gzip
import pickle

import numpy as np
import pytest

from fastkd.cli import main
from fastkd.data import load_cifar

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
    files = {"train": cifar_batch(rng, n_train, 100, "fine_labels"), "test": cifar_batch(rng, n_test, 100, "fine_labels")}
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
    from fastkd.data import load_digits

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
