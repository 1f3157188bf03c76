"""Fused linear distillation: hidden states and output projections in, logits never materialised.

    s = h_s W_s^T + b_s    (N, V_s)        t = h_t W_t^T + b_t    (N, V_t)
    loss = kd_loss(s, t, labels, ...)      (the same objective, reductions and ignore_index)

Rows are processed in chunks of ``chunk_size``: the chunk's logits (one GEMM each, fp32
accumulation inside the GEMM, written in fp32 from fp16/bf16 inputs so that the softmax reads
them unrounded — float64 inputs stay float64), the fused kernel's loss and logit gradients (fp32),
then the gradients of the hidden states (per chunk) and of the weights and biases (accumulated
over chunks in fp32, float64 for float64 inputs, returned in their dtypes); the projection GEMMs
take the chunk's logit gradient in the inputs' dtype. Only one chunk of logits exists at a time.
The teacher's gradients are computed only when its tensors require grad.

Memory per chunk of R rows over V classes, in bytes: at the kernel, the student's and the
teacher's logits (4 R V each, fp32 from 16-bit inputs too) and the kernel's logit gradients (4 R V
for the student, 4 R V more for a learning teacher): 12 R V, 16 R V with a learning teacher. The
logits are then freed, and with 16-bit inputs each gradient is cast once for the projection GEMMs
(2 R V each). The default ``chunk_size`` keeps R V near 2^25 per side (128 MiB of fp32 logits).
fp32 chunk logits from a 16-bit GEMM need ``torch.mm``'s ``out_dtype`` on CUDA (torch >= 2.8);
without it the CUDA GEMM writes the inputs' dtype, widened afterwards (the logits then carry that
rounding). Off CUDA the 16-bit operands are widened to fp32 for the GEMM (exact products).

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
from ._core.spec import DIVERGENCES, KDSpec
from .calibration import CalibrationMeter, _check_labels
from .backends.torch.dense import _transform
from .loss import (_backward_factor, _check_backend_transforms, _check_logits, _check_meters, _check_objective,
                   _check_real, _check_transforms, _refuse_second_derivative, _row_count, _wide)
from .sparse import SPARSE_KERNELS, TAILS, sparse_checks

CHUNK_LOGITS = 1 << 25  # default chunk: about this many logits per side (128 MiB in fp32)


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


LOW_PRECISION = (torch.float16, torch.bfloat16)
_FP32_GEMM: dict = {}  # device type -> whether torch.mm(..., out_dtype=torch.float32) runs there


def _mm_fp32(a, b):
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


def _logits(h, w, b):
    """One chunk's logits h W^T + b: fp32 from fp16/bf16 inputs (see _mm_fp32), else the inputs' dtype."""
    out = _mm_fp32(h, w.t()) if h.dtype in LOW_PRECISION else h @ w.t()
    return out.add_(b) if b is not None else out


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
    """Gradients of one chunk through logits = h W^T + b (those that are asked for). ``d_logits`` is
    the kernel's gradient of the chunk's logits (fp32 from 16-bit inputs): the bias sums it as is,
    the GEMMs take it in the inputs' dtype (one cast of the chunk) and accumulate in fp32."""
    if g_b is not None:
        g_b += d_logits.to(g_b.dtype).sum(0)
    d_logits = d_logits.to(w.dtype)
    if g_h is not None:
        g_h[lo:hi] = d_logits @ w
    if g_w is not None:
        _accumulate(g_w, d_logits.t(), h)


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
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, row_count, spec, impl, chunk, sparse, meters, entropy):
        """``sparse``: None (a dense teacher h_t W_t^T + b_t), or (kernel, bucket) with the teacher's
        top-K ids in ``ht`` and log-probabilities in ``wt`` (no teacher gradient). ``meters``:
        (student meter, teacher meter), each None or a CalibrationMeter fed by every chunk.
        ``entropy``: also return the sum of the student's entropies (else an empty tensor)."""
        need = ctx.needs_input_grad
        grad_s, grad_t = any(need[0:3]), sparse is None and any(need[3:6])
        n, v_s, v_t = hs.shape[0], ws.shape[0], (wt.shape[0] if sparse is None else 0)
        # sums in fp32, float64 where an input is float64 (the loss: where either side is)
        wide = _wide(*(x.dtype for x in (hs, ws, ht, wt) if x.is_floating_point()))
        loss = torch.zeros((), dtype=wide, device=hs.device)
        entropy_sum = torch.zeros((), dtype=torch.float32, device=hs.device) if entropy else hs.new_empty(0)
        deferred = not spec.row_scaled_grad  # fp16: hidden-state gradients kept in fp32 until the end
        g_hs = (torch.empty(hs.shape, dtype=_wide(hs.dtype), device=hs.device) if deferred else torch.empty_like(hs)) \
            if need[0] else None
        g_ws = torch.zeros(ws.shape, dtype=_wide(ws.dtype), device=ws.device) if need[1] else None
        g_bs = torch.zeros(v_s, dtype=_wide(ws.dtype), device=ws.device) if need[2] else None
        g_ht = (torch.empty(ht.shape, dtype=_wide(ht.dtype), device=ht.device) if deferred else torch.empty_like(ht)) \
            if need[3] and grad_t else None
        g_wt = torch.zeros(wt.shape, dtype=_wide(wt.dtype), device=wt.device) if need[4] and grad_t else None
        g_bt = torch.zeros(v_t, dtype=_wide(wt.dtype), device=wt.device) if need[5] and grad_t else None
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h_s, h_t = hs[lo:hi], ht[lo:hi]
            s = _logits(h_s, ws, bs)
            lab = labels[lo:hi] if labels is not None else None
            if sparse is None:
                t = _match_vocab(_logits(h_t, wt, bt), v_s)
                chunk_loss, d_s, d_t = impl.kd_forward(s, t, lab, row_count, spec, grad_s, grad_t, *meters,
                                                       reduce=True)
            else:
                kernel, bucket = sparse
                chunk_loss, d_s = kernel.sparse_kd_forward(s, h_t, wt[lo:hi], lab, row_count, spec, bucket, grad_s,
                                                           meters[0], reduce=True)
            loss += chunk_loss
            if entropy:
                entropy_sum += _entropy(s, spec).sum()
            s = t = None  # the chunk's fp32 logits are not needed by the projections
            if grad_s:
                _project_back(d_s, h_s, ws, g_hs, g_ws, g_bs, lo, hi)
            if grad_t:
                d_t = d_t[:, :v_t] if v_t <= v_s else F.pad(d_t, (0, v_t - v_s))  # dropped classes: 0
                _project_back(d_t, h_t, wt, g_ht, g_wt, g_bt, lo, hi)
        ctx.grads = (g_hs, g_ws, g_bs, g_ht, g_wt, g_bt)
        if deferred:  # the row scale the kernel left out (KDSpec.grad_unit), now in fp32 (float64)
            for g in ctx.grads:
                if g is not None:
                    g.mul_(_backward_factor(row_count, spec, g.dtype))
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype,
                      ht.dtype, wt.dtype, None if bt is None else bt.dtype)
        ctx.mark_non_differentiable(entropy_sum)
        ctx.loss_name = "fused_linear_kd_loss" if sparse is None else "fused_linear_sparse_kd_loss"
        return loss, entropy_sum  # rows come scaled by 1 / row_count

    @staticmethod
    def backward(ctx, grad_output, _):
        _refuse_second_derivative(ctx.loss_name)
        out = [None if g is None else (g.to(_wide(g.dtype)) * grad_output.to(_wide(g.dtype))).to(dt)
               for g, dt in zip(ctx.grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None, None, None)


def _entropy(s, spec: KDSpec):
    """Per row, the entropy (nats) of the student's distribution that the divergence compares,
    softmax(z' / T) of its transformed logits; one extra read of the chunk's logits, only when asked."""
    z = _transform(s.float(), spec.s_scale, spec.s_cap)
    return torch.special.entr((z * spec.inv_temperature).softmax(-1)).sum(-1)


def _full(x):
    """A DTensor (an FSDP2-sharded or tensor-parallel head) as one plain tensor, gathered once per
    call, not per chunk; differentiable (the gradient returns to the shards). Others unchanged."""
    if isinstance(x, torch.Tensor) and torch.distributed.is_available():
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch < 2.5
            from torch.distributed._tensor import DTensor
        if isinstance(x, DTensor):
            return x.full_tensor()
    return x


def _labelled_rows(labels, ignore_index, *rows):
    """Only the rows that count are projected: ``labels`` and the row tensors restricted to the rows
    not labelled ``ignore_index`` (differentiable gathers; their backward puts zeros in the others).
    One host synchronisation; nothing copied when every row counts."""
    if labels is None:
        return labels, rows
    keep = (labels != ignore_index).nonzero().squeeze(1)
    if keep.numel() == labels.numel():
        return labels, rows
    return labels[keep], tuple(x.index_select(0, keep) for x in rows)



def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, labels: Tensor | None = None, *,
                         student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                         temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl",
                         beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
                         chunk_size: int | None = None, backend: str | None = None,
                         num_items: float | Tensor | None = None, meter: CalibrationMeter | None = None,
                         teacher_meter: CalibrationMeter | None = None,
                         return_entropy: bool = False, student_logit_scale: float = 1.0,
                         teacher_logit_scale: float = 1.0, student_softcap: float | None = None,
                         teacher_softcap: float | None = None, group=None) -> Tensor | tuple[Tensor, Tensor]:
    """``kd_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, labels, ...)`` without materialising the logits.

    Hidden states ``(..., H)`` (student and teacher may have different H), weights ``(V, H)``.
    Reductions "batchmean", "sum" and "mean" ("none" would need a weight gradient per row: use
    :func:`fastkd.kd_loss` on materialised logits for that). Under ``torch.autocast`` the inputs are
    cast to its dtype as ``F.linear``'s would be (fp32 weights, bf16 hidden states: fine).

    Only the rows whose label is not ``ignore_index`` are projected. Weights that are DTensors
    (FSDP2, tensor parallel) are gathered once per call. ``num_items``: as in :func:`kd_loss`
    (gradient accumulation). ``meter`` / ``teacher_meter``: the calibration statistics of the
    student's / teacher's logits at T = 1, per labelled row, from the chunks the loss computes
    anyway (the teacher's over the student's classes, as the loss compares them).
    ``return_entropy``: return ``(loss, entropy_sum)``, the second the sum over the rows that
    count of the entropy (nats) of the student's softmax(s / T), detached: a training metric.
    The logit transforms (``*_logit_scale``, ``*_softcap``) are :func:`kd_loss`'s (the entropy is
    of the transformed student). ``group``: column-parallel heads, each rank holding its vocabulary rows of both weights (and
    biases) and the same hidden states (see :mod:`fastkd._dispatch.vocab_parallel`).

    Second derivatives are not supported: a backward with ``create_graph=True`` raises a RuntimeError
    (the gradients are computed in the forward pass and carry no graph); materialise the logits and use
    plain PyTorch ops for a term you differentiate twice.
    """
    transforms = (student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    if group is not None:
        from ._dispatch.vocab_parallel import fused_linear, refuse_unsupported

        refuse_unsupported(**{name: None if value in (1.0, None) else value for name, value in zip(
            ("student_logit_scale", "teacher_logit_scale", "student_softcap", "teacher_softcap"), transforms)})

        return fused_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, group=group,
                            student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature,
                            alpha=alpha, divergence=divergence, beta=beta, ignore_index=ignore_index,
                            reduction=reduction, chunk_size=chunk_size, backend=backend, num_items=num_items,
                            meter=meter, teacher_meter=teacher_meter, return_entropy=return_entropy)
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    args = _follow_autocast(device_type, student_hidden, _full(student_weight), _full(student_bias), teacher_hidden,
                            _full(teacher_weight), _full(teacher_bias))
    with torch.autocast(device_type, enabled=False):
        loss, entropy_sum = _fused_linear(
            *args, labels, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
            ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
            num_items=num_items, meters=(meter, teacher_meter), entropy=return_entropy, transforms=transforms)
    return (loss, entropy_sum) if return_entropy else loss


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


def _check_labels_device(labels, device):
    if isinstance(labels, torch.Tensor) and labels.device != device:
        raise ValueError(f"labels ({labels.device}) must be on the hidden states' device ({device})")


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _linear_spec(temperature, alpha, divergence, beta, ignore_index, reduction, v_s, dtypes,
                 transforms=(1.0, 1.0, None, None)) -> KDSpec:
    s_scale, t_scale, s_cap, t_cap = _check_transforms(*transforms)
    kd_scale = alpha * temperature**2 / (v_s if reduction == "mean" else 1)
    # fp16: the kernel's gradient is kept unit-scaled (<= 1) for the GEMMs, the row scale applied in
    # fp32; a logit scale multiplies the bound (d z' / d z <= scale)
    bound = (kd_scale / temperature + 1.0 - alpha) * max(s_scale, t_scale)
    grad_unit = 1.0 / bound if torch.float16 in dtypes else 0.0
    return KDSpec(1.0 / temperature, kd_scale, 1.0 - alpha, DIVERGENCES.index(divergence), beta, ignore_index,
                  grad_unit, s_scale, t_scale, s_cap, t_cap)


def _counted_rows(labels, ignore_index, reduction, num_items, *tensors):
    """(labels, row tensors, row_count): the tensors flattened to rows (N, ·) and restricted to the
    rows that count (only those are projected), and what the loss divides by."""
    lab = labels.reshape(-1).to(torch.int64) if labels is not None else None
    lab, rows = _labelled_rows(lab, ignore_index, *(x.reshape(-1, x.shape[-1]) for x in tensors))
    rows = tuple(x.contiguous() for x in rows)
    row_count = _row_count(None, ignore_index, reduction, rows[0].shape[0], rows[0].device, num_items)
    return (lab.contiguous() if lab is not None else None), rows, row_count


def _fused_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  labels, *, temperature, alpha, divergence, beta, ignore_index, reduction, chunk_size, backend,
                  num_items, meters, entropy, transforms):
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
        _check_labels_device(labels, student_hidden.device)
        _check_labels(labels, student_hidden.shape[:-1], v_s, ignore_index)
    _check_chunk(chunk_size)
    _check_meters(*meters, labels, student_hidden.device)
    _check_flag(entropy, "return_entropy")
    dtypes = (student_hidden.dtype, teacher_hidden.dtype)
    spec = _linear_spec(temperature, alpha, divergence, beta, ignore_index, reduction, v_s, dtypes, transforms)
    name = backends.resolve_name(backend, student_hidden.device, dtypes)
    _check_backend_transforms(name, spec)
    impl = backends.module(name)

    lab, (hs, ht), row_count = _counted_rows(labels, ignore_index, reduction, num_items, student_hidden,
                                              teacher_hidden)
    chunk = chunk_size or max(1, CHUNK_LOGITS // max(v_s, teacher_weight.shape[0]))
    return _FusedLinearKD.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, lab,
                                row_count, spec, impl, chunk, None, meters, entropy)


def fused_linear_sparse_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor,
                                teacher_logprobs: Tensor, labels: Tensor | None = None, *,
                                student_bias: Tensor | None = None, temperature: float = 4.0, alpha: float = 0.9,
                                tail: str = "bucket", ignore_index: int = -100, reduction: str = "batchmean",
                                chunk_size: int | None = None, backend: str | None = None,
                                validate_labels: bool = True, num_items: float | Tensor | None = None,
                                meter: CalibrationMeter | None = None, return_entropy: bool = False,
                                student_logit_scale: float = 1.0,
                                student_softcap: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``sparse_kd_loss(h_s W_s^T + b_s, teacher_ids, teacher_logprobs, labels, ...)`` without
    materialising the student's logits (and with no teacher forward at all: its top-K come from a
    cache or a serving engine). Peak memory: one chunk of student logits and its gradient (fp32,
    4 bytes per logit each; 16-bit inputs add the gradient cast for the GEMMs, 2 bytes) plus the
    gradients (fp32 for the weights).
    ``num_items``, ``meter``, ``return_entropy``, the student's logit transforms, the projected
    rows and second derivatives (not supported: a backward with ``create_graph=True`` raises): as in
    :func:`fused_linear_kd_loss`."""
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    hidden, weight, bias = _follow_autocast(device_type, student_hidden, _full(student_weight), _full(student_bias))
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
            _check_labels_device(labels, hidden.device)
            _check_labels(labels, hidden.shape[:-1], v, ignore_index, check_range=validate_labels)
        chunk = _check_chunk(chunk_size) or max(1, CHUNK_LOGITS // v)
        _check_meters(meter, None, labels, hidden.device)
        _check_flag(return_entropy, "return_entropy")
        name = backends.resolve_name(backend, hidden.device, (hidden.dtype,))
        impl = backends.module(name)
        if impl.__name__ not in SPARSE_KERNELS:
            raise ValueError(f"backend {name!r} has no sparse-teacher kernel; use backend='triton' or 'torch'")
        lab, (hs, ids, lp), row_count = _counted_rows(labels, ignore_index, reduction, num_items, hidden,
                                                       teacher_ids.to(torch.int64), teacher_logprobs)
        spec = _linear_spec(temperature, alpha, "kl", 0.5, ignore_index, reduction, v, (hidden.dtype,),
                            (student_logit_scale, 1.0, student_softcap, None))
        sparse = (importlib.import_module(SPARSE_KERNELS[impl.__name__]), tail == "bucket")
        loss, entropy_sum = _FusedLinearKD.apply(hs, weight, bias, ids, lp, None, lab, row_count, spec, impl, chunk,
                                                 sparse, (meter, None), return_entropy)
    return (loss, entropy_sum) if return_entropy else loss


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss`."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "batchmean", chunk_size: int | None = None,
                 backend: str | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, group=None):
        super().__init__()
        self.kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                       ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                       backend=backend, student_logit_scale=student_logit_scale,
                       teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                       teacher_softcap=teacher_softcap, group=group)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Tensor | None = None, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None, *, num_items: float | Tensor | None = None,
                meter: CalibrationMeter | None = None, teacher_meter: CalibrationMeter | None = None) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, num_items=num_items,
                                    meter=meter, teacher_meter=teacher_meter, **self.kw)
