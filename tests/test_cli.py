"""What a user of ``fastkd distill`` / ``fastkd cache-teacher`` meets around the study itself: a resume
that keeps the run's settings and finishes it, a run folder that is not silently overwritten, errors
that come before any work as one line (exit 2), Ctrl-C as one line naming --resume (exit 130), and
the help text. Each command runs in a temporary folder on the digits data, one or two epochs."""
import json
import shutil

import pytest
import torch

import fastkd.study.cache_teacher
import fastkd.study.train
from fastkd.study.cli import main
from test_study import strip_timing

TINY = ["--epochs", "2", "--teacher-epochs", "1"]


def run_cli(capsys, *args, command="distill"):
    capsys.readouterr()
    code = main([command, "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def one_line(err: str, *parts: str):
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("fastkd: "), err
    for part in parts:
        assert part in err, err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def without_timing(report):
    """strip_timing's report, also without the resume flag (a resumed run differs in it only)."""
    report = strip_timing(report)
    report["config"].pop("resume")
    return report


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (2 student epochs), made once; tests copy it."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["distill", "--no-progress", "--out-dir", str(out), *TINY]) == 0
    return out / "digits-s0"


def copy_run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "digits-s0")
    return tmp_path / "digits-s0"


# ---- --resume keeps the settings the run was started with ----

@pytest.mark.parametrize("args,message", [
    (["--temperature", "2"], "was run with --temperature = 4.0, not 2.0"),
    (["--epochs", "5"], "was run with --epochs = 2, not 5"),
    (["--policy", "anneal"], "was run with --policy = 'constant', not 'anneal'"),
], ids=["temperature", "epochs", "policy"])
def test_resume_refuses_other_settings(capsys, tmp_path, finished, args, message):
    folder = copy_run(finished, tmp_path)
    before = snapshot(folder)
    code, out, err = run_cli(capsys, "--out-dir", str(tmp_path), "--resume", *args)
    assert code == 2
    one_line(err, f"--resume: {folder} ", message, "--overwrite")
    assert snapshot(folder) == before and not out


def test_plain_resume_finishes_the_interrupted_run(capsys, tmp_path, finished, monkeypatch):
    """Ctrl-C during the distilled student's last epoch: exit 130, one line naming --resume; a plain
    --resume (no --epochs: the default would be 40) then runs the 2 epochs the run was started with,
    to the result of the run that was never interrupted."""
    real_save = fastkd.study.train.atomic_save
    saves = []

    def ctrl_c(obj, path):
        saves.append(path.name)
        if saves.count("distilled.pt") == 2:  # after epoch 1 of 2 was checkpointed
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(fastkd.study.train, "atomic_save", ctrl_c)
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), *TINY)
    assert code == 130
    one_line(err, "interrupted", "--resume")
    folder = tmp_path / "digits-s0"
    assert torch.load(folder / "distilled.pt", weights_only=True)["state"]["epoch"] == 1
    assert not (folder / "report.json").exists()

    monkeypatch.setattr(fastkd.study.train, "atomic_save", real_save)
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), "--resume")
    assert code == 0, err
    resumed = json.loads((folder / "report.json").read_text())
    assert resumed["config"]["epochs"] == 2 and len(resumed["history"]["distilled"]) == 2
    expected = json.loads((finished / "report.json").read_text())
    resumed["config"].pop("out_dir"), expected["config"].pop("out_dir")
    assert without_timing(resumed) == without_timing(expected)


# ---- an existing run folder is refused, or replaced with --overwrite ----

def test_a_second_run_into_the_same_folder_is_refused(capsys, tmp_path, finished):
    folder = copy_run(finished, tmp_path)
    before = snapshot(folder)
    code, out, err = run_cli(capsys, "--out-dir", str(tmp_path), *TINY)
    assert code == 2
    one_line(err, str(folder), "--resume", "--overwrite", "--out-dir", "--name")
    assert snapshot(folder) == before and not out


def test_overwrite_leaves_nothing_of_the_earlier_run(capsys, tmp_path, finished):
    folder = copy_run(finished, tmp_path)
    (folder / "distilled-top3.pt").write_bytes(b"a stale cached-teacher student")  # --teacher-cache 3 earlier
    (folder / "distilled-sampled-S8.pt").write_bytes(b"another")  # --teacher-cache DIR, a sampled cache
    (folder / "teacher-cache").mkdir()
    (folder / "teacher-cache" / "index.json").write_text("{}")
    (folder / "tensorboard" / "events.out.tfevents.0.earlier").write_bytes(b"")
    (folder / "notes.txt").write_text("the user's own file")
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), "--overwrite", "--epochs", "1", "--teacher-epochs", "1")
    assert code == 0, err
    assert not list(folder.glob("distilled-*")) and not (folder / "teacher-cache").exists()
    events = list((folder / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name != "events.out.tfevents.0.earlier"
    assert (folder / "notes.txt").read_text() == "the user's own file"  # not the study's: kept
    report = json.loads((folder / "report.json").read_text())
    assert report["config"]["epochs"] == 1 and len(report["history"]["distilled"]) == 1
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1 + 1 + 1


def test_overwrite_keeps_a_teacher_checkpoint_it_would_delete(capsys, tmp_path, finished):
    folder = copy_run(finished, tmp_path)
    before = snapshot(folder)
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), "--overwrite", "--teacher-ckpt", str(folder / "teacher.pt"))
    assert code == 2
    one_line(err, f"--teacher-ckpt {folder / 'teacher.pt'} lies in {folder}, which --overwrite clears first")
    assert snapshot(folder) == before


def test_resume_and_overwrite_exclude_each_other(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), "--resume", "--overwrite")
    assert code == 2
    one_line(err, "--resume and --overwrite exclude each other")
    assert not any(tmp_path.iterdir())


# ---- errors before any work ----

@pytest.mark.parametrize("command", ["distill", "cache-teacher"])
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["--device", "cuda"] + (["--out-dir", str(tmp_path)] if command == "distill" else
                                   ["--out", str(tmp_path / "c"), "--k", "2"])
    code, _, err = run_cli(capsys, *args, command=command)
    assert code == 2
    one_line(err, "--device cuda: no CUDA GPU is visible here", "--device cpu")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("device,message", [
    ("cuda:3", "--device cuda:3: this machine has 2 CUDA GPUs (cuda:0 to cuda:1)"),
    ("gpu", "--device 'gpu' is not a device: auto, cpu or cuda[:i]"),
], ids=["index", "name"])
def test_a_device_this_machine_lacks_is_one_line(capsys, tmp_path, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), "--device", device)
    assert code == 2
    one_line(err, message)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("backend,reason", [
    ("triton", "tensors are on the CPU"), ("cuda", "the cuda backend needs CUDA tensors"),
], ids=["triton", "cuda"])
def test_a_backend_that_cannot_run_is_refused_before_training(capsys, tmp_path, monkeypatch, backend, reason):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the suite's interpreter would run Triton on the CPU)
    code, _, err = run_cli(capsys, "--out-dir", str(tmp_path), "--device", "cpu", "--backend", backend)
    assert code == 2
    one_line(err, f"--backend {backend} cannot run on cpu: {reason}")
    assert not any(tmp_path.iterdir())


def test_cache_teacher_ctrl_c_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    from fastkd.study.models import build_model

    torch.save({"model": build_model("mlp-large", (64,), 10).state_dict()}, tmp_path / "teacher.pt")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastkd.study.cache_teacher, "write_classifier_rows", ctrl_c)
    code, _, err = run_cli(capsys, "--out", str(tmp_path / "c"), "--k", "2", "--device", "cpu",
                           "--teacher-ckpt", str(tmp_path / "teacher.pt"), command="cache-teacher")
    assert code == 130
    one_line(err, "interrupted", "no cache was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pt"]


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit) as done:
        main(["distill", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    text = text.split("-h, --help", 1)[1]  # past the usage line
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    assert "do not:" not in text and ") (default" not in text
    for option, help_ in [("--no-progress", "no progress bars"), ("--temperature TEMPERATURE", "(default: 4.0)"),
                          ("--epochs EPOCHS", "student epochs (default: 40 on digits, 30 on CIFAR)"),
                          ("--teacher TEACHER", "(default: mlp-large on digits, resnet18 on CIFAR)")]:
        assert f"{option} " in text and help_ in text.split(option, 1)[1].split(" --", 1)[0], option
