"""The options of one loss call, checked once at the public entry: below it, functions take this
object instead of the public keyword lists."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import checks
from .enums import BACKENDS, REDUCTIONS, Divergence, Tail
from .spec import transform_names

# what a tensor in kl_loss's third or fourth place most often is (its labels are keyword-only)
LABELS_HINT = " (labels go in labels=...)"


@dataclass(frozen=True, eq=False)
class Options:
    temperature: float
    kd_weight: float  # the divergence's weight: alpha (kd_loss and the others), 1 (kl_loss)
    ce_weight: float  # the hard-label cross-entropy's: 1 - alpha (0 for kl_loss)
    t_squared: bool  # the divergence times T^2 (kd_loss and the others; not kl_loss, as F.kl_div)
    divergence: Divergence
    beta: float
    ignore_index: int
    reduction: str
    backend: str | None  # None: FASTKD_BACKEND, else auto (backends.resolve_name)
    validate_labels: bool
    num_items: object  # None, a float > 0 or a one-element tensor (its device is checked with the logits)
    transforms: tuple  # (s_scale, t_scale, s_cap, t_cap) of KDSpec; a cap of 0 means none
    group: object  # a torch.distributed process group (vocabulary-parallel), or None
    tail: Tail  # a sparse teacher's missing mass (its int value is the kernels' TAIL code)
    teacher_temperature: float  # the temperature a sparse teacher's log-probabilities were computed at
    chunk_size: int | None  # the fused-linear losses' rows per chunk (None: about 2^25 logits per side on a GPU, 2^18 on a CPU)
    return_entropy: bool

    @classmethod
    def build(cls, **arguments) -> Options:
        """:meth:`check`, remembered for calls whose arguments are all plain Python values (a training
        loop passes the same keywords every step: checked once, not per step). The key holds each
        value's type (``True`` is not ``1``: it must still be refused where a number is asked for);
        Options are immutable, so one object is shared. A tensor or a process group is not
        remembered (checked every call), nor is anything under torch.compile (Dynamo traces through
        a cache and warns)."""
        if not torch.compiler.is_compiling() and all(type(v) in _PLAIN for v in arguments.values()):
            return _checked(tuple((k, type(v), v) for k, v in arguments.items()))
        return cls.check(**arguments)

    @classmethod
    def check(cls, *, temperature, alpha=None, divergence="kl", beta=0.5, ignore_index=-100,
              reduction="batchmean", reductions=REDUCTIONS, has_labels=None, backend=None, validate_labels=True,
              num_items=None, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
              teacher_softcap=None, group=None, tail="bucket", teacher_temperature=1.0, sparse=False,
              chunk_size=None, return_entropy=False) -> Options:
        """Every scalar argument checked once. ``alpha`` None: kl_loss's objective (the divergence
        alone, without T^2); else alpha T^2 D + (1 - alpha) CE. ``sparse``: a top-K teacher (KL only).
        ``has_labels``: whether the call has labels; None when not known yet (a module's constructor:
        its forward calls ``require_labels``)."""
        if alpha is None:
            kd_weight, ce_weight, t_squared = 1.0, 0.0, False
        else:
            kd_weight = checks.real(alpha, "alpha", 0.0, 1.0, False, False)
            ce_weight, t_squared = 1.0 - kd_weight, True
        temperature = checks.positive(temperature, "temperature", LABELS_HINT)
        checks.choice(reduction, "reduction", reductions, LABELS_HINT)
        if sparse and divergence != "kl":
            raise ValueError(f"divergence must be 'kl' for a sparse teacher (its unlisted classes make reverse KL "
                             f"and JSD undefined), got {divergence!r}")
        divergence = Divergence.parse(divergence)
        beta = checks.real(beta, "beta", 0.0, 1.0, True, True) if divergence == Divergence.JSD else float(beta)
        checks.integer(ignore_index, "ignore_index")
        tail = Tail.parse(tail)
        teacher_temperature = checks.positive(teacher_temperature, "teacher_temperature")
        if backend is not None and (not isinstance(backend, str) or backend.lower() not in BACKENDS):
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")  # (as backends.requested)
        options = cls(temperature, kd_weight, ce_weight, t_squared, divergence, beta, ignore_index, reduction,
                      backend, validate_labels, checks.num_items(num_items, reduction),
                      checks.transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap),
                      group, tail, teacher_temperature, checks.positive_int(chunk_size, "chunk_size", optional=True),
                      checks.flag(return_entropy, "return_entropy"))
        if has_labels is not None:
            options.require_labels(has_labels)
        return options

    def require_labels(self, has_labels: bool) -> None:
        """Labels are needed when the hard-label cross-entropy has a weight (alpha < 1)."""
        if not has_labels and self.ce_weight != 0:
            raise ValueError("labels are required when alpha < 1 (the hard-label cross-entropy term)")

    def with_num_items(self, num_items) -> Options:
        """These options with a call's own ``num_items`` (a module's forward argument), checked."""
        if num_items is None:
            return self
        return dataclasses.replace(self, num_items=checks.num_items(num_items, self.reduction))

    def transforms_set(self) -> list[str]:
        """The public arguments of the logit transforms this call sets (not at their defaults)."""
        return transform_names(*self.transforms)


_PLAIN = (bool, int, float, str, type(None), tuple)  # tuple: the reductions a loss allows (of str)


@functools.lru_cache(maxsize=256)
def _checked(arguments: tuple) -> Options:
    return Options.check(**{name: value for name, _, value in arguments})


class OptionsModule(nn.Module):
    """The base of the public loss modules: the constructor's arguments are checked once, into
    ``self.options``, so a bad one fails at construction and forward checks no scalar again. Each
    argument stays readable as an attribute (``loss.temperature``); assigning one (a temperature
    schedule) checks it and rebuilds the options, and a refused value changes nothing."""

    def __init__(self, fixed: dict, **arguments):
        """``fixed``: Options.build's keywords that are the class's, not the caller's (``sparse=True``)."""
        super().__init__()
        self.__dict__.update(_fixed=fixed, _arguments=arguments, options=Options.build(**fixed, **arguments))

    def __getattr__(self, name):
        arguments = self.__dict__.get("_arguments", {})
        if name in arguments:
            return arguments[name]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        arguments = self.__dict__.get("_arguments", {})
        if name not in arguments:
            return super().__setattr__(name, value)
        changed = {**arguments, name: value}
        options = Options.build(**self._fixed, **changed)  # raises, naming the argument, before anything changes
        self.__dict__.update(_arguments=changed, options=options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._arguments.items())
