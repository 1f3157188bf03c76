"""Every argument check, one per concept. Each raises a TypeError or ValueError naming the argument.

Scalars are checked once, when a public function builds its ``Options``; tensors where the
dispatch first holds them (a shape needs the other tensors, a device the logits')."""
from __future__ import annotations

import math
import numbers

import torch

SUM_TOLERANCE = 1e-2  # a sparse teacher's probabilities may sum above 1 by this much (fp16/bf16 rounding)


# --- scalars --------------------------------------------------------------------------------------

def _tensor_scalar(value, name, hint=""):
    """A 0-d real tensor on the CPU that does not require grad, read as a Python number: it is a
    number in all but type (``torch.tensor(4.0)``, a schedule's output). Any other tensor raises,
    naming the argument: several elements (often a tensor passed in the wrong place), one on a GPU
    (reading it would synchronise the host in every call: pass ``float()`` of it once), or one that
    requires grad (the losses give no gradient to their scalar arguments)."""
    if value.dim() != 0:
        raise TypeError(f"{name} must be a finite real number, got a Tensor of shape {tuple(value.shape)}{hint}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a finite real number, got a {value.dtype} tensor")
    if value.device.type != "cpu":
        raise TypeError(f"{name} must be a finite real number or a 0-d CPU tensor, got a 0-d tensor on "
                        f"{value.device} (reading it would synchronise the host in every call: pass float({name}))")
    if value.requires_grad:
        raise TypeError(f"{name} gets no gradient from the loss, got a tensor that requires grad (pass "
                        f"float({name}) or {name}.detach())")
    return value.item()


def real(value, name, low, high, low_open, high_open, hint="") -> float:
    """A finite real number in the interval, as a float (a 0-d CPU tensor counts as a number).
    ``hint``: added to the error when the value is a tensor of several elements."""
    if isinstance(value, torch.Tensor):
        value = _tensor_scalar(value, name, hint)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {span}, got {value!r}")
    return float(value)


def positive(value, name, hint="") -> float:
    """A finite real number > 0."""
    return real(value, name, 0.0, math.inf, True, True, hint)


def choice(value, name, choices, hint=""):
    if isinstance(value, torch.Tensor):  # (`tensor in choices` would just be False)
        raise TypeError(f"{name} must be one of {choices}, got a Tensor{hint}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def integer(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def positive_int(value, name, optional=False):
    """An int >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def flag(value, name) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap):
    """(s_scale, t_scale, s_cap, t_cap) of KDSpec: scales finite and > 0, softcaps None (0: none) or
    finite and > 0."""
    scales = [positive(v, name) for v, name in ((student_logit_scale, "student_logit_scale"),
                                                 (teacher_logit_scale, "teacher_logit_scale"))]
    caps = [0.0 if v is None else positive(v, name)
            for v, name in ((student_softcap, "student_softcap"), (teacher_softcap, "teacher_softcap"))]
    return (*scales, *caps)


def num_items(value, reduction):
    """What "batchmean" divides by instead of the rows that count: a positive number, or a tensor of
    one element, integer (summed on the device, e.g. over micro-batches; as int64) or floating
    (TRL's ``num_items_in_batch / num_processes``, possibly below 1; fp32, or float64). A tensor is
    not read on the host: a value > 0 is used as is (<= 0 is clamped at fp32's smallest normal
    number), NaN gives NaN. Its device is checked against the logits' by ``on_device``."""
    if value is None:
        return None
    if reduction != "batchmean":
        raise ValueError(f"num_items replaces the row count of reduction='batchmean', got reduction={reduction!r}")
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"num_items must be a number or a one-element integer or floating tensor, got "
                            f"{value.dtype} of shape {tuple(value.shape)}")
        if value.is_floating_point():
            return value.reshape(1).to(torch.float64 if value.dtype == torch.float64 else torch.float32)
        return value.reshape(1).to(torch.int64)
    return positive(value, "num_items")


# --- tensors --------------------------------------------------------------------------------------

def logits(x, name):
    """A floating-point tensor (..., C) with C >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32, fp16, bf16), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., C) with C >= 1 classes, got {tuple(x.shape)}")


def pair(s, t):
    """Student and teacher logits: floating point, of one shape (a rank's slice under group=), on one device."""
    logits(s, "student_logits")
    logits(t, "teacher_logits")
    if s.shape != t.shape:
        raise ValueError(f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} "
                         "must have the same shape")
    if s.device != t.device:
        raise ValueError(f"student_logits ({s.device}) and teacher_logits ({t.device}) must be on "
                         "the same device")


def on_device(x, name, device, whose="the logits'"):
    """A tensor argument on the device of the tensors it goes with (numbers pass)."""
    if isinstance(x, torch.Tensor) and x.device != device:
        raise ValueError(f"{name} ({x.device}) must be on {whose} device ({device})")


def labels(value, shape, num_classes, ignore_index, name="labels", check_range=True, device=None,
           whose="the logits'"):
    """Class indices: an integer tensor of ``shape`` (the logits without the class dimension), on
    ``device`` when given (checked before the range is read), with ``check_range`` in
    [0, num_classes) or ``ignore_index`` (one host synchronisation)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got {value.dtype}")
    if device is not None:
        on_device(value, name, device, whose)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the logits without the class "
                         f"dimension), got {tuple(value.shape)}")
    if check_range and value.numel():
        bad = (value < 0) | (value >= num_classes)
        if ignore_index is not None:
            bad &= value != ignore_index
        if bool(bad.any()):
            first = value[bad][0].item()
            allowed = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
            raise ValueError(f"{name} must lie in [0, {num_classes}){allowed}; found {first}")


def linear(h, w, b, side):
    """One side's hidden states (..., H), output weight (V, H) of their dtype and optional bias (V,)."""
    logits(h, f"{side}_hidden")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"{side}_weight must be a floating-point (V, H) tensor")
    if w.shape[1] != h.shape[-1]:
        raise ValueError(f"{side}_weight is {tuple(w.shape)} but {side}_hidden has H = {h.shape[-1]}")
    if w.dtype != h.dtype:
        raise TypeError(f"{side}_weight ({w.dtype}) and {side}_hidden ({h.dtype}) must share a dtype")
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"{side}_bias must be a tensor of shape ({w.shape[0]},)")


def same_rows(hs, ht):
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} must have the "
                         "same leading (row) shape")


def teacher(ids, logprobs, rows_shape, n_cols, device, validate):
    """A sparse teacher's top-K ``teacher_ids`` and ``teacher_logprobs``: shapes, dtypes and devices;
    with ``validate`` its values too (one host synchronisation)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError("teacher_logprobs must be a floating-point tensor (fp32, fp16, bf16) of log-probabilities")
    if ids.dim() == 0 or tuple(ids.shape[:-1]) != tuple(rows_shape) or ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids must have shape {tuple(rows_shape)} + (K,) with K >= 1, got {tuple(ids.shape)}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs {tuple(logprobs.shape)} must have teacher_ids' shape {tuple(ids.shape)}")
    for x, name in ((ids, "teacher_ids"), (logprobs, "teacher_logprobs")):
        on_device(x, name, device, "the student logits'")
    if validate and ids.numel():
        bad = _first_bad_teacher_row(ids, logprobs, n_cols)
        if bad is not None:
            raise ValueError(f"teacher_ids / teacher_logprobs row {bad[0]}: {bad[1]}")


def _first_bad_teacher_row(ids, logprobs, n_cols):
    """(row, what is wrong) of the first invalid teacher row, or None."""
    ids2, lp2 = ids.reshape(-1, ids.shape[-1]), logprobs.reshape(-1, ids.shape[-1]).float()
    listed = ids2 >= 0
    out_of_range = (ids2 < -1) | (ids2 >= n_cols)
    ordered = torch.where(listed, ids2, -1 - torch.arange(ids2.shape[-1], device=ids2.device)).sort(-1).values
    duplicate = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    mass = torch.where(listed, lp2.exp(), 0.0).sum(-1)
    problems = [(out_of_range.any(-1), f"ids outside [-1, {n_cols}) (-1 pads)"),
                (duplicate.any(-1), "a class listed twice"),
                (torch.where(listed, lp2.isnan() | (lp2 > SUM_TOLERANCE), False).any(-1) | (mass > 1 + SUM_TOLERANCE),
                 "log-probabilities above 0 or summing above 1 (pass log_softmax of the teacher's logits)")]
    flags = torch.stack([p for p, _ in problems])
    if not bool(flags.any()):
        return None
    row = int(flags.any(0).nonzero()[0])
    return row, problems[int(flags[:, row].nonzero()[0])][1]


# --- what a backend implements ------------------------------------------------------------------------

def transforms_on_backend(backend_name, spec):
    """The cuda backend does not implement the logit transforms: say so, naming the argument."""
    names = spec.transforms_set()
    if backend_name == "cuda" and names:
        raise ValueError(f"{names[0]} needs backend='triton' or 'torch' (the cuda backend does not implement "
                         "the logit transforms)")


def group(value):
    """A torch.distributed process group this process belongs to (group=, vocabulary-parallel)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group= needs an initialised torch.distributed process group (init_process_group)")
    if not isinstance(value, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(value).__name__}")
    if dist.get_rank(value) < 0:
        raise ValueError("this process is not a member of group")
