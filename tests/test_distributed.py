"""The study under torchrun: two CPU processes (gloo) give the report of one process."""
import json
import os
import socket
import subprocess
import sys

import pytest

ARGS = ["distill", "--epochs", "3", "--teacher-epochs", "6", "--no-progress", "--backend", "torch",
        "--name", "run"]
METRICS = ("accuracy", "ece", "mce", "nll", "brier", "agreement", "fitted_temperature", "ece_after_scaling")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd, out_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, *ARGS, "--out-dir", str(out_dir)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out_dir / "run" / "report.json").read_text()), done.stdout


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single, _ = run([sys.executable, "-m", "fastkd"], tmp_path / "single")
    double, stdout = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "fastkd"], tmp_path / "ddp")
    assert stdout.count("distilled student") == 1  # only rank 0 reports
    for model in ("teacher", "student", "distilled"):
        for metric in METRICS:  # equal up to the order of float reductions
            assert double["results"][model][metric] == pytest.approx(single["results"][model][metric],
                                                                     rel=1e-4, abs=1e-5), (model, metric)
    for stage in ("teacher", "student", "distilled"):
        for a, b in zip(single["history"][stage], double["history"][stage]):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
            assert b["val_nll"] == pytest.approx(a["val_nll"], rel=1e-4)
    lines = (tmp_path / "ddp" / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12  # rank 0 alone writes the log
