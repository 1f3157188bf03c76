"""Sparse teacher (top-K ids + log-probabilities) against the dense teacher, same student rows.

The sparse loss reads the student's row and K teacher entries and writes the gradient: its floor
is read s + write grad (+ 12 K bytes per row), against the dense loss's read s + read t + write
grad. Rows appear in the summary table as provider "sparse-K<k>-<backend>", beside "eager" (the
dense recipe) and the dense fastkd providers of test_kd_bench.py on the same shapes.
"""
from __future__ import annotations

import pytest
import torch

import fastkd
from conftest import DEVICE, ON_GPU, measure, record

T = 4.0
if ON_GPU:
    SHAPES = [(8192, 32000, torch.bfloat16), (4096, 128256, torch.bfloat16)]
    BACKENDS = ["triton", "torch"]
else:
    SHAPES = [(64, 32000, torch.bfloat16)]
    BACKENDS = ["torch"]
KS = [16, 64, 256]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda x: f"{x[0]}x{x[1]}-{str(x[2]).split('.')[-1]}")
def test_sparse_kd_loss(benchmark, shape, k, backend):
    n, c, dtype = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = (torch.randn(n, c, device=DEVICE, generator=g) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(n, c, device=DEVICE, generator=g) * 3).float().log_softmax(-1)
    values, ids = teacher.topk(k, dim=-1)
    del teacher
    lp = values.to(dtype)

    def step():
        s.grad = None
        fastkd.sparse_kd_loss(s, ids, lp, temperature=T, alpha=1.0, backend=backend,
                              validate_labels=False).backward()

    extra = measure(benchmark, step, rounds=10 if ON_GPU else 7)
    record(benchmark, provider=f"sparse-K{k}-{backend}", shape=(n, c), dtype=dtype, mode="fwd+bwd",
           floor_bytes=2 * n * c * s.element_size() + n * k * (8 + lp.element_size()), extra_memory=extra)
