"""The fused-linear losses' projections: one chunk's logits h W^T + b and the gradients back through
them, the teacher's classes matched to the student's, weights gathered, autocast followed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._core.spec import KDSpec
from ..backends.torch.math import transform

CHUNK_LOGITS = 1 << 25  # default chunk on a GPU: about this many logits per side (128 MiB in fp32)
# default chunk on a CPU: 1 MiB of fp32 logits per side, both sides within one core's L2 on a recent
# Xeon (2 MiB). A CPU chunk holds about five fp32 copies of its logits at once (both sides' logits
# and the torch backend's temporaries) on top of the fp32 weights and their gradient: at 2^18 the bench
# case (256 x 128 x 8000 bf16) peaks at about a quarter of the materialised recipe's resident memory
# (the allocator's reuse moves it by +-5 MiB), so 2^18 keeps the promise. Fewer, larger chunks are faster
# on a busy machine, where each parallel op waits for a core (bench/RESULTS.md, CPU section).
CPU_CHUNK_LOGITS = 1 << 18


# ... but at least this many rows on a CPU: every chunk's GEMMs read the whole weight, so a chunk
# of a couple of rows (2^18 logits at a 128k vocabulary) would re-read it for almost no work
CPU_MIN_ROWS = 32


def default_chunk(device, n_classes):
    """Rows per chunk when chunk_size is not given: CHUNK_LOGITS logits per side, CPU_CHUNK_LOGITS
    (and at least CPU_MIN_ROWS rows) on a CPU."""
    if device.type == "cpu":
        return max(CPU_MIN_ROWS, CPU_CHUNK_LOGITS // max(n_classes, 1))
    return max(1, CHUNK_LOGITS // max(n_classes, 1))


LOW_PRECISION = (torch.float16, torch.bfloat16)
_FP32_GEMM: dict = {}  # device type -> whether torch.mm(..., out_dtype=torch.float32) runs there


def mm_fp32(a, b):
    """a @ b written in fp32 from fp16/bf16 operands. On CUDA one GEMM that writes fp32 (``out_dtype``,
    torch >= 2.8): its fp32 accumulator is stored as is; elsewhere the operands widened to fp32 (the
    products of 16-bit numbers are exact in fp32) — or, on a CUDA torch without ``out_dtype``, the
    product in the inputs' dtype widened after the GEMM (rounded, as before)."""
    if a.is_cuda:
        if _FP32_GEMM.get(a.device.type, True):
            try:
                out = torch.mm(a, b, out_dtype=torch.float32)
                _FP32_GEMM[a.device.type] = True
                return out
            except torch.cuda.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, NotImplementedError):  # this torch or device has no such GEMM
                _FP32_GEMM[a.device.type] = False
        return (a @ b).float()
    return a.float() @ b.float()


def logits(h, w, b):
    """One chunk's logits h W^T + b: fp32 from fp16/bf16 inputs (see mm_fp32; off CUDA ``w`` is the
    weight widened once per call, see widened), else the inputs' dtype."""
    out = mm_fp32(h, w.t()) if h.dtype in LOW_PRECISION else h @ w.t()
    return out.add_(b) if b is not None else out


def accumulate(acc, a, b):
    """acc (fp32) += a @ b on CUDA: one GEMM that writes fp32 (``out_dtype``, where this torch has
    it); else the product in the inputs' dtype (fp32 accumulation inside the GEMM) is added into
    the fp32 accumulator: one temporary of acc's shape in the inputs' dtype. (Off CUDA see
    project_back.)"""
    if acc.is_cuda and a.dtype != acc.dtype:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.add_(a @ b)


def widened(w):
    """The weight as the chunks' GEMMs take it. Off CUDA, an fp16/bf16 weight widened to fp32 once per
    call (a CPU has no GEMM that writes fp32 from 16-bit operands: widened per chunk, the whole
    matrix was copied twice per chunk); on CUDA, or already fp32 / float64, the weight itself."""
    if w is not None and not w.is_cuda and w.dtype in LOW_PRECISION:
        return w.float()
    return w


def project_back(d_logits, h, w, g_h, g_w, g_b, lo, hi):
    """Gradients of one chunk through logits = h W^T + b (those that are asked for). ``d_logits`` is
    the kernel's gradient of the chunk's logits (fp32 from 16-bit inputs): the bias sums it as is.
    On CUDA the GEMMs take it in the inputs' dtype (one cast of the chunk) and accumulate in fp32;
    elsewhere ``w`` is the widened weight (see widened) and the GEMMs run in the gradient's dtype,
    the weight's gradient accumulated in place (addmm_: no temporary of the weight's shape)."""
    if g_b is not None:
        g_b += d_logits.to(g_b.dtype).sum(0)
    if not d_logits.is_cuda:
        if g_h is not None:
            g_h[lo:hi] = d_logits @ w.to(d_logits.dtype)
        if g_w is not None:
            g_w.addmm_(d_logits.t().to(g_w.dtype), h.to(g_w.dtype))
        return
    d_logits = d_logits.to(w.dtype)
    if g_h is not None:
        g_h[lo:hi] = d_logits @ w
    if g_w is not None:
        accumulate(g_w, d_logits.t(), h)


def match_vocab(t, v_s):
    """Teacher logits over the student's classes: extra teacher classes dropped, missing ones -inf."""
    v_t = t.shape[1]
    if v_t > v_s:
        return t[:, :v_s]
    if v_t < v_s:
        return F.pad(t, (0, v_s - v_t), value=float("-inf"))
    return t


def entropy(s, spec: KDSpec):
    """Per row, the entropy (nats) of the student's distribution that the divergence compares,
    softmax(z' / T) of its transformed logits; one extra read of the chunk's logits, only when asked."""
    z = transform(s.float(), spec.s_scale, spec.s_cap)
    return torch.special.entr((z * spec.inv_temperature).softmax(-1)).sum(-1)


def dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def full(x):
    """A DTensor (an FSDP2-sharded or tensor-parallel head) as one plain tensor, gathered once per
    call, not per chunk; differentiable (the gradient returns to the shards). Others unchanged."""
    if isinstance(x, torch.Tensor) and torch.distributed.is_available() and isinstance(x, dtensor_type()):
        return x.full_tensor()
    return x


def follow_autocast(device_type, *tensors):
    """Under autocast, the tensors cast to its dtype as F.linear's would be (fp32 weights with bf16
    hidden states, as a Hugging Face model under autocast has them); unchanged otherwise."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                 else x for x in tensors)
