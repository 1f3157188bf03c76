"""The public losses: ``kl_loss``, ``kd_loss`` and their ``nn.Module`` wrappers.

Shapes: logits ``(..., C)`` are flattened to rows ``(N, C)``; labels ``(...)``. Per row, with
p_s = softmax(s / T), p_t = softmax(t / T):

    kl:          D = KL(p_t || p_s) = sum p_t (log p_t - log p_s)      (Hinton et al. 2015)
    reverse_kl:  D = KL(p_s || p_t)
    jsd:         D = beta KL(p_t || M) + (1 - beta) KL(p_s || M),  M = beta p_t + (1 - beta) p_s

    kd_loss row  = alpha T^2 D + (1 - alpha) CE(s, label)    (CE at T = 1)
    kl_loss row  = D                                         (no T^2: F.kl_div's value)

Reductions: "batchmean" = sum / rows that count, "sum", "mean" = F.kl_div's (the divergence
also divided by C; the CE part is a mean over rows, as F.cross_entropy's), "none" = per row.
Rows whose label is ``ignore_index`` add nothing and do not count.

Logit transforms (per model, before the temperature; the hard-label CE and the meters see them
too): z' = cap tanh(scale z / cap) with a softcap, else scale z — ``logit_scale`` (Cohere; Granite's
1 / logits_scaling) and Gemma's final-logit softcapping, in TRL's order (scale, softcap, then 1/T).
A -inf logit stays -inf under a softcap (a masked class keeps no mass; the plain formula would give
it -cap), and its gradient is 0; +inf tends to +cap.

The gradient is computed in the forward pass (the loss is almost always the last op); the
backward only scales it by ``grad_output``. Second derivatives are not supported: a backward with
``create_graph=True`` (a gradient penalty, ``gradgradcheck``, a Hessian-vector product) raises a
RuntimeError rather than return a gradient without a graph; write a term you differentiate twice
with plain PyTorch ops.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import backends
from ._dispatch import compiled as _ops
from ._core.spec import DIVERGENCES, KDSpec, count_on_device, inv_count_on_host
from .calibration import CalibrationMeter, _check_labels

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_logits(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32, fp16, bf16), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., C) with C >= 1 classes, got {tuple(x.shape)}")


def _check_pair(s, t):
    """Student and teacher logits: floating point, of one shape (a rank's slice under group=), on one device."""
    _check_logits(s, "student_logits")
    _check_logits(t, "teacher_logits")
    if s.shape != t.shape:
        raise ValueError(f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} "
                         "must have the same shape")
    if s.device != t.device:
        raise ValueError(f"student_logits ({s.device}) and teacher_logits ({t.device}) must be on "
                         "the same device")


def _check_real(value, name, low, high, low_open, high_open) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {span}, got {value!r}")
    return float(value)


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_objective(temperature, divergence, beta, ignore_index, reduction, labels, ce_weight,
                     reductions=REDUCTIONS):
    """The checks every loss shares; returns (temperature, beta) as floats."""
    temperature = _check_real(temperature, "temperature", 0.0, math.inf, True, True)
    _check_choice(reduction, "reduction", reductions)
    _check_choice(divergence, "divergence", DIVERGENCES)
    if divergence == "jsd":
        beta = _check_real(beta, "beta", 0.0, 1.0, True, True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if labels is None and ce_weight != 0:
        raise ValueError("labels are required when alpha < 1 (the hard-label cross-entropy term)")
    return temperature, float(beta)


def _check_meter(meter, name, device):
    if meter is None:
        return
    if not isinstance(meter, CalibrationMeter):
        raise TypeError(f"{name} must be a fastkd.CalibrationMeter, got {type(meter).__name__}")
    meter._state_on(device)  # raises if it already holds statistics on another device


def _check_meters(meter, teacher_meter, labels, device):
    for m, name in ((meter, "meter"), (teacher_meter, "teacher_meter")):
        _check_meter(m, name, device)
        if m is not None and labels is None:
            raise ValueError(f"{name} needs labels (calibration compares predictions with them)")
    if meter is not None and teacher_meter is not None and meter.num_bins != teacher_meter.num_bins:
        raise ValueError("meter and teacher_meter must have the same num_bins")


def _grad_unit(kd_g, ce_scale, divergence, dtypes, logit_scale=1.0) -> float:
    """KDSpec.grad_unit. fp16 gradients are saved without the row scale, so that the forward does
    not round them before a loss scaler's 2^16 is known, and high in fp16's range: an entry of
    the saved gradient is then at least the final one (no normal fp16 entry flushed to 0) whenever
    grad_output / rows <= 2^14 / bound. For KL the bound holds exactly: |kd_g (p_s - p_t) +
    ce (p - onehot)| <= kd_g + ce, times ``logit_scale`` (the largest of the two models' logit
    scales: d z' / d z <= scale, with or without a softcap). Reverse KL and JSD multiply by a
    log-ratio, unbounded a priori: 2^4 keeps room for log-ratios up to about 2^11 before fp16
    overflows. Other dtypes: saved final."""
    if torch.float16 not in dtypes:
        return 0.0
    return (2.0**14 if divergence == "kl" else 2.0**4) / ((kd_g + ce_scale) * logit_scale)


def _check_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap):
    """(s_scale, t_scale, s_cap, t_cap) of KDSpec: scales finite and > 0, softcaps None (0: none) or
    finite and > 0."""
    scales = [_check_real(v, name, 0.0, math.inf, True, True)
              for v, name in ((student_logit_scale, "student_logit_scale"),
                              (teacher_logit_scale, "teacher_logit_scale"))]
    caps = [0.0 if v is None else _check_real(v, name, 0.0, math.inf, True, True)
            for v, name in ((student_softcap, "student_softcap"), (teacher_softcap, "teacher_softcap"))]
    return (*scales, *caps)


def _check_backend_transforms(backend_name, spec: KDSpec):
    """The cuda backend does not implement the logit transforms: say so, naming the argument."""
    names = spec.transforms_set()
    if backend_name == "cuda" and names:
        raise ValueError(f"{names[0]} needs backend='triton' or 'torch' (the cuda backend does not implement "
                         "the logit transforms)")


def _backward_factor(row_count, spec: KDSpec, dtype=torch.float32):
    """What the backward multiplies the saved gradient by besides grad_output: None when the
    forward applied the row scale, else 1 / (rows that count * grad_unit), a device count taken
    in ``dtype`` (float64 when a gradient is float64)."""
    if spec.row_scaled_grad:
        return None
    if torch.is_tensor(row_count):
        return 1.0 / (count_on_device(row_count, dtype) * spec.grad_unit)
    return inv_count_on_host(row_count) / spec.grad_unit


def _wide(*dtypes):
    """The dtype the backward's factors are taken in: float64 when any tensor is float64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _refuse_second_derivative(loss_name):
    """The backward of every fastkd loss scales a gradient computed in the forward, which carries no
    graph of its own: a backward with create_graph=True (a gradient penalty, gradgradcheck, a
    Hessian-vector product, MAML) would return a first derivative whose own derivative is silently
    0. Refused instead, at that backward. (``once_differentiable`` alone refuses only when the
    upstream gradient requires grad, not for ``autograd.grad(loss, s, create_graph=True)``.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastkd {loss_name}: second derivatives are not supported (backward ran with create_graph=True). "
            "Its gradient is computed in the forward pass and carries no graph, so a gradient penalty or any "
            "double backward through this loss would be silently wrong. Compute the term you differentiate "
            "twice with plain PyTorch ops (e.g. F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1))), or "
            "call backward without create_graph=True.")


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, row_count, spec, reduction, impl, meter, teacher_meter):
        loss, gs, gt = impl.kd_forward(s, t, labels, row_count, spec, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1], meter, teacher_meter,
                                       reduce=reduction != "none")  # rows come scaled by 1/count
        ctx.impl, ctx.grads = impl, (gs, gt)
        ctx.factor = _backward_factor(row_count, spec, _wide(s.dtype, t.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_second_derivative("kl_loss / kd_loss")
        return (*_scaled_grads(ctx, grad_output), None, None, None, None, None, None, None)


def _scaled_grads(ctx, grad_output):
    """The backward of the fused losses: the forward's gradients (ctx.grads) times grad_output
    (and the row scale left to the backward, ctx.factor)."""
    if ctx.grads is None:
        raise RuntimeError("fastkd's triton and cuda backends scale the saved gradient in place, so "
                           "a graph can be back-propagated once per forward; use backend='torch' "
                           "to call backward again on the same graph")
    grads = ctx.grads
    if ctx.impl.INPLACE_BACKWARD:
        ctx.grads = None
    # grad_output is the loss's dtype: fp32, or float64 for float64 logits (kept: float64 in,
    # float64 arithmetic out)
    factor = grad_output.detach().to(_wide(grad_output.dtype))
    if ctx.factor is not None:
        factor = factor * ctx.factor
    return tuple(ctx.impl.scale_grad(g, factor) if g is not None else None for g in grads)


def _fused(s, t, labels, *, temperature, kd_weight, ce_weight, divergence, beta, ignore_index,
           reduction, meter, teacher_meter, backend, validate_labels, t_squared, num_items=None,
           transforms=(1.0, 1.0, None, None), group=None):
    """Validates everything, then runs one fused evaluation on the chosen backend. ``transforms``:
    (student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)."""
    if group is not None or (not torch.compiler.is_compiling() and type(s).__name__ == "DTensor"):
        from ._dispatch import vocab_parallel  # the vocabulary sharded over ranks (DTensors: if Shard(-1))

        if group is not None or vocab_parallel.vocab_sharded_dtensor(s):
            names = ("student_logit_scale", "teacher_logit_scale", "student_softcap", "teacher_softcap")
            vocab_parallel.refuse_unsupported(**{name: None if value in (1.0, None) else value
                                                 for name, value in zip(names, transforms)})
            return vocab_parallel.fused(s, t, labels, group=group, temperature=temperature, kd_weight=kd_weight,
                                        ce_weight=ce_weight, divergence=divergence, beta=beta,
                                        ignore_index=ignore_index, reduction=reduction, meter=meter,
                                        teacher_meter=teacher_meter, backend=backend,
                                        validate_labels=validate_labels, t_squared=t_squared, num_items=num_items)
    _check_pair(s, t)
    temperature, beta = _check_objective(temperature, divergence, beta, ignore_index, reduction, labels,
                                         ce_weight)
    s_scale, t_scale, s_cap, t_cap = _check_transforms(*transforms)
    c = s.shape[-1]
    compiling = torch.compiler.is_compiling()
    if labels is not None:
        # under torch.compile the range check would sync the host: a label out of range gives a
        # NaN loss and NaN gradients for its row instead (as with validate_labels=False)
        _check_labels(labels, s.shape[:-1], c, ignore_index, check_range=validate_labels and not compiling)
        if labels.device != s.device:
            raise ValueError(f"labels ({labels.device}) must be on the logits' device ({s.device})")
    _check_meters(meter, teacher_meter, labels, s.device)
    backend_name = backends.resolve_name(backend, s.device, (s.dtype, t.dtype))
    kd_scale = kd_weight * (temperature**2 if t_squared else 1.0) / (c if reduction == "mean" else 1)
    spec = KDSpec(1.0 / temperature, kd_scale, ce_weight, DIVERGENCES.index(divergence), beta, ignore_index,
                  _grad_unit(kd_scale / temperature, ce_weight, divergence, (s.dtype, t.dtype), max(s_scale, t_scale)),
                  s_scale, t_scale, s_cap, t_cap)
    _check_backend_transforms(backend_name, spec)

    # the Triton kernel reads (B, T, C) views such as logits[:, :-1] in place (two row strides)
    s2, t2 = _rows(s, t, in_place_3d=backend_name == "triton" and not compiling)
    labels2 = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    row_count = _row_count(labels2, ignore_index, reduction, s2.numel() // c, s.device, num_items)
    with torch.autocast(s.device.type, enabled=False):  # the kernels pick their own precision
        if compiling:
            loss = _ops.fused_kd(s2, t2, labels2, row_count, spec, reduction != "none", backend_name, meter,
                                 teacher_meter)
        else:
            loss = _FusedKD.apply(s2, t2, labels2, row_count, spec, reduction, backends.module(backend_name),
                                  meter, teacher_meter)
    return loss.reshape(s.shape[:-1]) if reduction == "none" else loss


def _rows(s, t, in_place_3d: bool):
    """Student and teacher logits as (N, C) rows with unit stride in C, without a copy where a view
    can express them; two (B, T, C) views that no view can flatten stay 3-D when the backend reads
    them in place."""
    c = s.shape[-1]
    rows = []
    for x in (s, t):
        x = x if x.stride(-1) == 1 else x.contiguous()
        try:
            rows.append(x.view(-1, c))
        except RuntimeError:  # not expressible with one row stride
            rows.append(x if in_place_3d and x.dim() == 3 else x.reshape(-1, c))
    if rows[0].dim() != rows[1].dim():  # one of them is 3-D: hand both over as (B, T, C)
        rows = [x if x.dim() == 3 else x.view(s.shape) for x in rows]
    return rows


def _row_count(labels, ignore_index, reduction, n_rows, device, num_items=None):
    """What the rows are divided by: 1 for "sum" / "none", the caller's ``num_items``, else the rows
    that count — summed on the device when labels decide it (no host sync)."""
    if num_items is not None:
        return _check_num_items(num_items, reduction, device)
    if reduction not in ("batchmean", "mean"):
        return 1
    return (labels != ignore_index).sum().reshape(1) if labels is not None else n_rows


def _check_num_items(num_items, reduction, device):
    """What "batchmean" divides by instead of the rows that count: a positive number, or a tensor of
    one element on the logits' device, integer (summed there, e.g. over micro-batches) or floating
    (TRL's ``num_items_in_batch / num_processes``, possibly below 1). A tensor is not read on the
    host: a value > 0 is used as is (<= 0 is clamped at fp32's smallest normal number), NaN gives NaN."""
    if reduction != "batchmean":
        raise ValueError(f"num_items replaces the row count of reduction='batchmean', got reduction={reduction!r}")
    if torch.is_tensor(num_items):
        if num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"num_items must be a number or a one-element integer or floating tensor, got "
                            f"{num_items.dtype} of shape {tuple(num_items.shape)}")
        if num_items.device != device:
            raise ValueError(f"num_items ({num_items.device}) must be on the logits' device ({device})")
        if num_items.is_floating_point():
            return num_items.reshape(1).to(torch.float64 if num_items.dtype == torch.float64 else torch.float32)
        return num_items.reshape(1).to(torch.int64)
    return _check_real(num_items, "num_items", 0.0, math.inf, True, True)


def kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
            reduction: str = "batchmean", *, ignore_index: int = -100, labels: Tensor | None = None,
            backend: str | None = None, validate_labels: bool = True,
            num_items: float | Tensor | None = None, student_logit_scale: float = 1.0,
            teacher_logit_scale: float = 1.0, student_softcap: float | None = None,
            teacher_softcap: float | None = None, group=None) -> Tensor:
    """KL(p_t || p_s) of tempered softmaxes: a drop-in for the PyTorch KD recipe's ``F.kl_div``.

    ``kl_loss(s, t, temperature=T)`` equals
    ``F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")`` for
    ``(N, C)`` logits, in value and gradient (the ``T^2`` factor is the caller's, as there); second
    derivatives are not supported (a backward with ``create_graph=True`` raises: use the recipe itself
    for a term you differentiate twice).
    ``labels`` only masks rows equal to ``ignore_index``. ``validate_labels=False`` skips the
    range check of labels (its one host synchronisation). ``num_items``, the logit transforms
    (``*_logit_scale``, ``*_softcap``) and ``group``: see :func:`kd_loss`.
    """
    return _fused(student_logits, teacher_logits, labels, temperature=temperature, kd_weight=1.0,
                  ce_weight=0.0, divergence="kl", beta=0.5, ignore_index=ignore_index,
                  reduction=reduction, meter=None, teacher_meter=None, backend=backend,
                  validate_labels=validate_labels, t_squared=False, num_items=num_items,
                  transforms=(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap),
                  group=group)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
            temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl", beta: float = 0.5,
            ignore_index: int = -100, reduction: str = "batchmean", meter: CalibrationMeter | None = None,
            teacher_meter: CalibrationMeter | None = None, backend: str | None = None,
            validate_labels: bool = True, num_items: float | Tensor | None = None,
            student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
            student_softcap: float | None = None, teacher_softcap: float | None = None, group=None) -> Tensor:
    """The distillation objective ``alpha T^2 D(p_t, p_s) + (1 - alpha) CE(s, labels)`` in one pass.

    ``meter`` / ``teacher_meter`` (:class:`CalibrationMeter`) collect the calibration statistics
    of the student's / teacher's logits at T = 1 inside the same pass. See the module docstring
    for the divergences and reductions. ``num_items`` (with "batchmean"): divide the sum by this
    instead of the rows that count — the global count under gradient accumulation or DDP (a
    positive number, or a one-element integer or floating tensor, used as is when > 0, e.g. TRL's
    ``num_items_in_batch / num_processes``); the scale is folded into the kernel, so the backward
    still moves no data.

    Logit transforms, each model's own, applied before the temperature: with a softcap
    ``z' = softcap tanh(logit_scale z / softcap)``, else ``z' = logit_scale z`` (``logit_scale``:
    Cohere's, Granite's ``1 / logits_scaling``; ``softcap``: Gemma's final-logit softcapping;
    TRL's order). The divergence compares softmax(z'_s / T) with softmax(z'_t / T); the CE and the
    meters see z' at T = 1. A -inf logit stays -inf (a masked class keeps no mass). Triton and
    torch backends only.

    ``group`` (a ``torch.distributed`` process group): the vocabulary is split over its ranks, each
    holding the same rows and its slice ``(..., V_r)`` of both logits (in rank order; labels are
    global class ids); DTensors sharded on the last dimension are recognised without it. The loss,
    each slice's gradient and the meters equal the one-process result, for O(N) floats of
    communication: see :mod:`fastkd._dispatch.vocab_parallel`.

    First derivatives only: second derivatives are not supported (a backward with
    ``create_graph=True`` raises a RuntimeError; use plain PyTorch ops for a term you differentiate
    twice, e.g. a gradient penalty).
    """
    alpha = _check_real(alpha, "alpha", 0.0, 1.0, False, False)
    return _fused(student_logits, teacher_logits, labels, temperature=temperature, kd_weight=alpha,
                  ce_weight=1.0 - alpha, divergence=divergence, beta=beta, ignore_index=ignore_index,
                  reduction=reduction, meter=meter, teacher_meter=teacher_meter, backend=backend,
                  validate_labels=validate_labels, t_squared=True, num_items=num_items,
                  transforms=(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap),
                  group=group)


class KLDivLoss(nn.Module):
    """Module form of :func:`kl_loss`."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                 backend: str | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, group=None):
        super().__init__()
        self.temperature, self.reduction = temperature, reduction
        self.ignore_index, self.backend, self.group = ignore_index, backend, group
        self.student_logit_scale, self.teacher_logit_scale = student_logit_scale, teacher_logit_scale
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return kl_loss(student_logits, teacher_logits, self.temperature, self.reduction,
                       ignore_index=self.ignore_index, labels=labels, backend=self.backend,
                       student_logit_scale=self.student_logit_scale, teacher_logit_scale=self.teacher_logit_scale,
                       student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap, group=self.group)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; ``forward(s, t, labels, meter=None, teacher_meter=None)``."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, divergence: str = "kl", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "batchmean", backend: str | None = None,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, group=None):
        super().__init__()
        self.temperature, self.alpha, self.divergence, self.beta = temperature, alpha, divergence, beta
        self.ignore_index, self.reduction, self.backend, self.group = ignore_index, reduction, backend, group
        self.student_logit_scale, self.teacher_logit_scale = student_logit_scale, teacher_logit_scale
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                meter: CalibrationMeter | None = None, teacher_meter: CalibrationMeter | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                       alpha=self.alpha, divergence=self.divergence, beta=self.beta,
                       ignore_index=self.ignore_index, reduction=self.reduction, meter=meter,
                       teacher_meter=teacher_meter, backend=self.backend,
                       student_logit_scale=self.student_logit_scale, teacher_logit_scale=self.teacher_logit_scale,
                       student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap, group=self.group)
