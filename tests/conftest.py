"""Test set-up: the Triton kernels run on CPU tensors through the interpreter, which must be
switched on before the kernel module is imported. Outputs are poisoned with NaN so an element a
kernel forgot to write fails the test."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


def _nan_filled(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled tensors while a test runs."""
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per case, reproducible per test."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def force_triton_path(monkeypatch, K, path):
    """Makes small rows take a path of the Triton kernel (K: fastkd.backends.triton.plan, whose knobs
    these are): "one-pass" as is; "looping" (tiles of 32 columns); "split" (parts of 32 columns, its two
    halves as two launches under the interpreter)."""
    if path != "one-pass":
        monkeypatch.setattr(K, "ONE_PASS_MAX", {v: {1: 16, 2: 16, 4: 16} for v in ("light", "heavy")})
        monkeypatch.setattr(K, "LOOP_BLOCK_C", 32)
    if path == "split":
        monkeypatch.setattr(K, "SPLIT_INTERPRETED", True)
        monkeypatch.setattr(K, "SPLIT_WARPS", 1)
        monkeypatch.setattr(K, "SPLIT_VECS", 1)
