"""The fused-linear loss on a CPU does per call, not per chunk, whatever has the weight's shape
(issue 29): the 16-bit weights are widened to fp32 once, and the weight gradient is accumulated
in place in one fp32 buffer. Counted with a dispatch mode that records every aten op's outputs,
so no timing is involved. The numbers themselves are checked by tests/test_fused_linear.py."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastkd
from fastkd._dispatch import gemm


def _storages(tree):
    return {x.untyped_storage().data_ptr() for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)}


class WeightSized(TorchDispatchMode):
    """Counts the new tensors (not views, not in-place or out= results) of at least ``numel``
    elements that aten ops return."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = _storages((args, kwargs))
        out = func(*args, **kwargs)
        self.count += sum(isinstance(x, torch.Tensor) and x.numel() >= self.numel
                          and x.untyped_storage().data_ptr() not in seen for x in tree_flatten(out)[0])
        return out


def weight_sized_outputs(chunk_size, learning_teacher, gen):
    n, h, v = 29, 40, 300  # a chunk's logits (at most 29 x 300) are smaller than a weight (300 x 40)
    hs, ht = (torch.randn(n, h, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    ws, wt = ((torch.randn(v, h, generator=gen) / h**0.5).bfloat16().requires_grad_() for _ in range(2))
    ht.requires_grad_(learning_teacher)
    wt.requires_grad_(learning_teacher)
    labels = torch.randint(0, v, (n,), generator=gen)
    with WeightSized(v * h) as mode:
        loss = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=2.0, alpha=0.5,
                                           chunk_size=chunk_size, backend="torch")
        loss.backward(torch.tensor(1.3))
    return mode.count


@pytest.mark.parametrize("learning_teacher", [False, True], ids=["frozen-teacher", "learning-teacher"])
def test_weight_sized_work_once_per_call(learning_teacher, gen):
    one = weight_sized_outputs(29, learning_teacher, gen)
    many = weight_sized_outputs(4, learning_teacher, gen)  # 8 chunks, the last of one row
    assert many == one, f"{many} weight-sized tensors with 8 chunks, {one} with one chunk"


def test_cpu_default_chunk():
    """The CPU's default chunk: about CPU_CHUNK_LOGITS logits per side, at least CPU_MIN_ROWS rows; a GPU's
    stays CHUNK_LOGITS."""
    cpu = torch.device("cpu")
    assert gemm.default_chunk(cpu, 8000) * 8000 <= gemm.CPU_CHUNK_LOGITS < (gemm.default_chunk(cpu, 8000) + 1) * 8000
    assert gemm.default_chunk(cpu, 1 << 24) == gemm.CPU_MIN_ROWS == 32
    assert gemm.default_chunk(cpu, 131072) == 32  # 2^18 logits would be 2 rows
    assert gemm.default_chunk(torch.device("cuda"), 1 << 26) == 1
    assert gemm.default_chunk(torch.device("cuda"), 1000) == gemm.CHUNK_LOGITS // 1000
