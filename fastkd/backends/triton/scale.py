"""The backward's in-place scale of a saved gradient (``scale_grad``)."""
# No `from __future__ import annotations`: Triton 3.0's interpreter spots constexpr parameters
# only by the annotation object, not by the string "tl.constexpr".

import torch
import triton
import triton.language as tl

from .launch import _launch, _on
from .plan import _vector_width

INPLACE_BACKWARD = True  # scale_grad reuses the saved gradient


@triton.jit
def _scale_grad_kernel(grad_ptr, factor_ptr, n_rows, n_cols, FACTOR_PER_ROW: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """grad *= factor in place, in fp32, on a contiguous (N, C) gradient. One factor: flat blocks of
    BLOCK_R * BLOCK_C elements. A factor per row: tiles of BLOCK_R rows x BLOCK_C columns (grid:
    row tiles x column tiles), so it is read once per row, not found by a division per element.
    Where the factor is 1 (the usual loss.backward()) the masked loads and stores move no data: no
    host sync, no traffic."""
    if FACTOR_PER_ROW:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        f = tl.load(factor_ptr + rows, mask=rows < n_rows, other=1.0)
        todo = ((rows < n_rows) & (f != 1.0))[:, None] & (cols < n_cols)[None, :]
        offs = tl.multiple_of(rows.to(tl.int64) * n_cols, VEC)[:, None] + cols[None, :]
        f = f[:, None]
    else:
        offs = tl.program_id(0).to(tl.int64) * (BLOCK_R * BLOCK_C) + tl.arange(0, BLOCK_R * BLOCK_C)
        f = tl.load(factor_ptr) + tl.zeros([BLOCK_R * BLOCK_C], dtype=tl.float32)
        # tl.cast, not .to(): an integer argument equal to 1 (a one-row batch) arrives as a Python int
        todo = (offs < tl.cast(n_rows, tl.int64) * n_cols) & (f != 1.0)
    g = tl.load(grad_ptr + offs, mask=todo, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offs, (g * f).to(grad_ptr.dtype.element_ty), mask=todo)


SCALE_BLOCK = 4096  # elements per program of scale_grad


def scale_grad(grad, factor):
    """The backward: grad *= factor in place, in fp32; factor is a float32 tensor, 0-d or one per row
    (grad_output times the row scale over grad_unit, from loss.py). Where it is 1 no data moves
    (a device-side check, no host sync)."""
    factor = factor.detach().to(device=grad.device, dtype=torch.float32).contiguous()
    n_cols = grad.shape[-1] if grad.dim() else 1
    n_rows = grad.numel() // max(n_cols, 1)
    if grad.numel():
        per_row = factor.dim() > 0
        block_c = min(triton.next_power_of_2(n_cols), SCALE_BLOCK) if per_row else SCALE_BLOCK
        block_r = max(1, SCALE_BLOCK // block_c)
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c)) if per_row else \
            (triton.cdiv(grad.numel(), SCALE_BLOCK),)
        vec = _vector_width(n_cols, (), grad.element_size(), (grad.data_ptr(),))
        with _on(grad.device):
            _launch(_scale_grad_kernel, grid, grad, factor, n_rows, n_cols, FACTOR_PER_ROW=per_row,
                    BLOCK_R=block_r, BLOCK_C=block_c, VEC=vec, num_warps=8)
    return grad
