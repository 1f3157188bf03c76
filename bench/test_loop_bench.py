"""Training-loop throughput: fastkd's loop against the plain loop users write (DataLoader + the
eager KD recipe), same models, same data, samples per second of a distillation epoch."""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU, LOOP_RESULTS, sync
from fastkd.study.config import StudyConfig
from fastkd.study.data import DataBundle, load_digits
from fastkd.study.models import build_model
from fastkd.study.train import fit

EPOCHS = 2


def bench_data() -> tuple[DataBundle, str, str]:
    if not ON_GPU:
        return load_digits(DEVICE), "mlp-large", "mlp-tiny"
    g = torch.Generator().manual_seed(0)  # CIFAR-shaped: 32x32 RGB uint8, 10 classes

    def split(n):
        return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(DEVICE),
                torch.randint(0, 10, (n,), generator=g).to(DEVICE))

    (x, y), (xv, yv) = split(16384), split(1024)
    return DataBundle("cifar-shaped", 10, [str(i) for i in range(10)], x, y, xv, yv, xv, yv, True), \
        "resnet18", "mobilenet_v2"


def plain_loop(data, teacher, student, epochs, batch_size=128, T=4.0, alpha=0.9):
    """The loop in most KD repositories: a DataLoader on host tensors, per-batch copies, teacher under
    no_grad, the F.kl_div recipe plus cross-entropy."""
    ds = torch.utils.data.TensorDataset(data.x_train.cpu(), data.y_train.cpu())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                         pin_memory=ON_GPU)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    teacher.eval()
    gen = torch.Generator(device=DEVICE).manual_seed(0)  # augmentation on the device, as fastkd's
    for _ in range(epochs):
        student.train()
        for x, y in loader:
            x, y = x.to(DEVICE), y.to(DEVICE)
            x = data.prepare(x, gen)
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = alpha * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
                                    reduction="batchmean") * T * T + (1 - alpha) * F.cross_entropy(s, y)
            opt.zero_grad()
            loss.backward()
            opt.step()


ROUNDS = 1 if ON_GPU else 9  # a CPU epoch of digits takes ~15 ms: noisy, so rounds alternate, medians kept


def test_distillation_epoch_throughput(tmp_path):
    """Both loops from the same teacher and the same student's start, run alternately (plain, fastkd,
    plain, ...) so that a busy machine slows both alike; the median round of each."""
    data, t_name, s_name = bench_data()
    torch.manual_seed(0)
    teacher = build_model(t_name, data.input_shape, 10).to(DEVICE)
    start = build_model(s_name, data.input_shape, 10).to(DEVICE)
    if data.x_train.dim() == 4:
        teacher = teacher.to(memory_format=torch.channels_last)
        start = start.to(memory_format=torch.channels_last)
    students = {loop: copy.deepcopy(start) for loop in ("plain", "fastkd")}
    cfg = StudyConfig(epochs=EPOCHS, lr=0.05, progress=False).resolved()
    runs = {"plain": lambda: plain_loop(data, teacher, students["plain"], EPOCHS),
            "fastkd": lambda: fit(students["fastkd"], data, cfg, "distilled", tmp_path / "ck.pt", epochs=EPOCHS,
                                  teacher=teacher)}
    times = {loop: [] for loop in runs}
    for r in range(ROUNDS + 1):  # the first round warms up (allocator, kernels), not counted
        for loop, run in runs.items():
            t0 = time.perf_counter()
            run()
            sync()
            if r:
                times[loop].append(time.perf_counter() - t0)
    for loop, seconds in times.items():
        seconds = statistics.median(seconds)
        LOOP_RESULTS.append(dict(loop=loop, data=data.name, teacher=t_name, student=s_name,
                                 samples_per_s=EPOCHS * len(data.x_train) / seconds, epoch_ms=seconds / EPOCHS * 1e3))
