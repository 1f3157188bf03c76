"""Fused linear distillation: hidden states and output projections in, logits never materialised.

    s = h_s W_s^T + b_s    (N, V_s)        t = h_t W_t^T + b_t    (N, V_t)
    loss = kd_loss(s, t, labels, ...)      (the same objective, reductions and ignore_index)

Rows are processed in chunks of ``chunk_size``: the chunk's logits (one GEMM each, fp32
accumulation inside the GEMM, stored in the hidden states' dtype as a model's own head would
produce them), the fused kernel's loss and logit gradients, then the gradients of the hidden
states (per chunk) and of the weights and biases (accumulated over chunks in fp32, returned in
their dtypes). Only one chunk of logits exists at a time. The teacher's gradients are computed
only when its tensors require grad.

Vocabularies of different sizes: the distributions are compared over the student's classes.
Teacher classes beyond the student's vocabulary are dropped (the teacher's softmax is taken over
the shared classes); student classes beyond the teacher's get teacher probability 0 (logit -inf,
never 0), so the student is taught to put no mass there.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from ._spec import DIVERGENCES, KDSpec
from .calibration import _check_labels
from .loss import _backward_factor, _check_logits, _check_objective, _check_real, _row_count
from .sparse import SPARSE_KERNELS, TAILS, sparse_checks

CHUNK_LOGITS = 1 << 25  # default chunk: about this many logits per side (64 MiB in bf16)


def _check_linear(h, w, b, side):
    _check_logits(h, f"{side}_hidden")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"{side}_weight must be a floating-point (V, H) tensor")
    if w.shape[1] != h.shape[-1]:
        raise ValueError(f"{side}_weight is {tuple(w.shape)} but {side}_hidden has H = {h.shape[-1]}")
    if w.dtype != h.dtype:
        raise TypeError(f"{side}_weight ({w.dtype}) and {side}_hidden ({h.dtype}) must share a dtype")
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"{side}_bias must be a tensor of shape ({w.shape[0]},)")


def _logits(h, w, b):
    out = h @ w.t()
    return out + b if b is not None else out


def _accumulate(acc, a, b):
    """acc (fp32) += a @ b. On CUDA one GEMM that writes fp32 (``out_dtype``, where this torch has
    it); elsewhere the product in the inputs' dtype (fp32 accumulation inside the GEMM) is added
    into the fp32 accumulator: one temporary of acc's shape in the inputs' dtype."""
    if acc.is_cuda and a.dtype != acc.dtype:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.add_(a @ b)


def _project_back(d_logits, h, w, g_h, g_w, g_b, lo, hi):
    """Gradients of one chunk through logits = h W^T + b (those that are asked for)."""
    if g_h is not None:
        g_h[lo:hi] = d_logits @ w
    if g_w is not None:
        _accumulate(g_w, d_logits.t(), h)
    if g_b is not None:
        g_b += d_logits.float().sum(0)


def _match_vocab(t, v_s):
    """Teacher logits over the student's classes: extra teacher classes dropped, missing ones -inf."""
    v_t = t.shape[1]
    if v_t > v_s:
        return t[:, :v_s]
    if v_t < v_s:
        return F.pad(t, (0, v_s - v_t), value=float("-inf"))
    return t


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, row_count, spec, impl, chunk, sparse=None):
        """``sparse``: None (a dense teacher h_t W_t^T + b_t), or (kernel, bucket) with the teacher's
        top-K ids in ``ht`` and log-probabilities in ``wt`` (no teacher gradient)."""
        need = ctx.needs_input_grad
        grad_s, grad_t = any(need[0:3]), sparse is None and any(need[3:6])
        n, v_s, v_t = hs.shape[0], ws.shape[0], (wt.shape[0] if sparse is None else 0)
        loss = torch.zeros((), dtype=torch.float32, device=hs.device)
        deferred = not spec.row_scaled_grad  # fp16: hidden-state gradients kept in fp32 until the end
        g_hs = (torch.empty(hs.shape, dtype=torch.float32, device=hs.device) if deferred else torch.empty_like(hs)) \
            if need[0] else None
        g_ws = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need[1] else None
        g_bs = torch.zeros(v_s, dtype=torch.float32, device=ws.device) if need[2] else None
        g_ht = (torch.empty(ht.shape, dtype=torch.float32, device=ht.device) if deferred else torch.empty_like(ht)) \
            if need[3] and grad_t else None
        g_wt = torch.zeros(wt.shape, dtype=torch.float32, device=wt.device) if need[4] and grad_t else None
        g_bt = torch.zeros(v_t, dtype=torch.float32, device=wt.device) if need[5] and grad_t else None
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h_s, h_t = hs[lo:hi], ht[lo:hi]
            s = _logits(h_s, ws, bs)
            lab = labels[lo:hi] if labels is not None else None
            if sparse is None:
                t = _match_vocab(_logits(h_t, wt, bt), v_s)
                chunk_loss, d_s, d_t = impl.kd_forward(s, t, lab, row_count, spec, grad_s, grad_t, None, None,
                                                       reduce=True)
            else:
                kernel, bucket = sparse
                chunk_loss, d_s = kernel.sparse_kd_forward(s, h_t, wt[lo:hi], lab, row_count, spec, bucket, grad_s,
                                                           None, reduce=True)
            loss += chunk_loss
            if grad_s:
                _project_back(d_s, h_s, ws, g_hs, g_ws, g_bs, lo, hi)
            if grad_t:
                d_t = d_t[:, :v_t] if v_t <= v_s else F.pad(d_t, (0, v_t - v_s))  # dropped classes: 0
                _project_back(d_t, h_t, wt, g_ht, g_wt, g_bt, lo, hi)
        ctx.grads = (g_hs, g_ws, g_bs, g_ht, g_wt, g_bt)
        if deferred:  # the row scale the kernel left out (KDSpec.grad_unit), now in fp32
            factor = _backward_factor(row_count, spec)
            for g in ctx.grads:
                if g is not None:
                    g.mul_(factor)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype,
                      ht.dtype, wt.dtype, None if bt is None else bt.dtype)
        return loss  # rows come scaled by 1 / row_count

    @staticmethod
    def backward(ctx, grad_output):
        go = grad_output.float()
        out = [None if g is None else (g.float() * go).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None)


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, labels: Tensor | None = None, *,
                         student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                         temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl",
                         beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
                         chunk_size: int | None = None, backend: str | None = None) -> Tensor:
    """``kd_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, labels, ...)`` without materialising the logits.

    Hidden states ``(..., H)`` (student and teacher may have different H), weights ``(V, H)``.
    Reductions "batchmean", "sum" and "mean" ("none" would need a weight gradient per row: use
    :func:`fastkd.kd_loss` on materialised logits for that). Under ``torch.autocast`` the inputs are
    cast to its dtype as ``F.linear``'s would be (fp32 weights, bf16 hidden states: fine).
    """
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    args = _follow_autocast(device_type, student_hidden, student_weight, student_bias, teacher_hidden,
                            teacher_weight, teacher_bias)
    with torch.autocast(device_type, enabled=False):
        return _fused_linear(*args, labels, temperature=temperature, alpha=alpha, divergence=divergence,
                             beta=beta, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                             backend=backend)


def _follow_autocast(device_type, *tensors):
    """Under autocast, the tensors cast to its dtype as F.linear's would be (fp32 weights with bf16
    hidden states, as a Hugging Face model under autocast has them); unchanged otherwise."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                 else x for x in tensors)


def _check_chunk(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _linear_spec(temperature, alpha, divergence, beta, ignore_index, reduction, v_s, dtypes) -> KDSpec:
    kd_scale = alpha * temperature**2 / (v_s if reduction == "mean" else 1)
    # fp16: the kernel's gradient is kept unit-scaled (<= 1) for the GEMMs, the row scale applied in fp32
    grad_unit = 1.0 / (kd_scale / temperature + 1.0 - alpha) if torch.float16 in dtypes else 0.0
    return KDSpec(1.0 / temperature, kd_scale, 1.0 - alpha, DIVERGENCES.index(divergence), beta, ignore_index,
                  grad_unit)


def _fused_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  labels, *, temperature, alpha, divergence, beta, ignore_index, reduction, chunk_size, backend):
    _check_linear(student_hidden, student_weight, student_bias, "student")
    _check_linear(teacher_hidden, teacher_weight, teacher_bias, "teacher")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same leading (row) shape")
    alpha = _check_real(alpha, "alpha", 0.0, 1.0, False, False)
    temperature, beta = _check_objective(temperature, divergence, beta, ignore_index, reduction, labels,
                                         1.0 - alpha, reductions=("batchmean", "sum", "mean"))
    v_s = student_weight.shape[0]
    if labels is not None:
        _check_labels(labels, student_hidden.shape[:-1], v_s, ignore_index)
    _check_chunk(chunk_size)
    dtypes = (student_hidden.dtype, teacher_hidden.dtype)
    impl = backends.resolve(backend, student_hidden.device, dtypes)

    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous()
    n = hs.shape[0]
    lab = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    row_count = _row_count(lab, ignore_index, reduction, n, hs.device)
    chunk = chunk_size or max(1, CHUNK_LOGITS // max(v_s, teacher_weight.shape[0]))
    spec = _linear_spec(temperature, alpha, divergence, beta, ignore_index, reduction, v_s, dtypes)
    return _FusedLinearKD.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, lab,
                                row_count, spec, impl, chunk)


def fused_linear_sparse_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor,
                                teacher_logprobs: Tensor, labels: Tensor | None = None, *,
                                student_bias: Tensor | None = None, temperature: float = 4.0, alpha: float = 0.9,
                                tail: str = "bucket", ignore_index: int = -100, reduction: str = "batchmean",
                                chunk_size: int | None = None, backend: str | None = None,
                                validate_labels: bool = True) -> Tensor:
    """``sparse_kd_loss(h_s W_s^T + b_s, teacher_ids, teacher_logprobs, labels, ...)`` without
    materialising the student's logits (and with no teacher forward at all: its top-K come from a
    cache or a serving engine). Peak memory: one chunk of student logits and its gradient
    (2 x chunk x V in the hidden states' dtype) plus the gradients (fp32 for the weights)."""
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    hidden, weight, bias = _follow_autocast(device_type, student_hidden, student_weight, student_bias)
    with torch.autocast(device_type, enabled=False):
        _check_linear(hidden, weight, bias, "student")
        v = weight.shape[0]
        sparse_checks(teacher_ids, teacher_logprobs, hidden.shape[:-1], v, hidden.device, validate_labels)
        alpha = _check_real(alpha, "alpha", 0.0, 1.0, False, False)
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        temperature, _ = _check_objective(temperature, "kl", 0.5, ignore_index, reduction, labels, 1.0 - alpha,
                                          reductions=("batchmean", "sum", "mean"))
        if labels is not None:
            _check_labels(labels, hidden.shape[:-1], v, ignore_index, check_range=validate_labels)
        chunk = _check_chunk(chunk_size) or max(1, CHUNK_LOGITS // v)
        name = backends.resolve_name(backend, hidden.device, (hidden.dtype,))
        impl = backends.module(name)
        if impl.__name__ not in SPARSE_KERNELS:
            raise ValueError(f"backend {name!r} has no sparse-teacher kernel; use backend='triton' or 'torch'")
        k = teacher_ids.shape[-1]
        hs = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        ids = teacher_ids.reshape(-1, k).to(torch.int64).contiguous()
        lp = teacher_logprobs.reshape(-1, k).contiguous()
        lab = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
        row_count = _row_count(lab, ignore_index, reduction, hs.shape[0], hs.device)
        spec = _linear_spec(temperature, alpha, "kl", 0.5, ignore_index, reduction, v, (hidden.dtype,))
        sparse = (importlib.import_module(SPARSE_KERNELS[impl.__name__]), tail == "bucket")
        return _FusedLinearKD.apply(hs, weight, bias, ids, lp, None, lab, row_count, spec, impl, chunk, sparse)


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss`."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "batchmean", chunk_size: int | None = None,
                 backend: str | None = None):
        super().__init__()
        self.kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                       ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                       backend=backend)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Tensor | None = None, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self.kw)
