"""Calibration statistics of a classifier: ECE / RMS-CE / MCE, NLL, Brier, reliability bins.

Confidence is the largest softmax probability of a row at T = 1, the prediction its argmax.
Bins are equal-width over [0, 1] with torchmetrics' edge convention: ``bucketize(conf,
linspace(0, 1, B + 1), right=True) - 1``, so bins are closed on the left and a confidence of
exactly 1.0 (a saturated softmax, common in fp32) falls into a slot ``B`` of its own, which
torchmetrics' ECE, RMS-CE and MCE weigh as one more bin; ours do the same, so they equal
torchmetrics'. A report's ``bins`` are the B bins of a reliability diagram: that slot is folded
into the last, [1 - 1/B, 1]. The meter keeps the histogram (count, sum of confidence, sum of
correct per slot, plus NLL and Brier totals) in one float64 tensor: counts are exact integers below
2**53, sums keep their precision over millions of rows, and memory does not grow with the rows seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ._core import checks

NORMS = ("l1", "l2", "max")


def bin_edges(num_bins: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``num_bins + 1`` edges torchmetrics uses, plus a trailing +inf (for the kernels' search)."""
    edges = torch.linspace(0, 1, num_bins + 1, dtype=dtype, device=device)
    return torch.cat([edges, edges.new_full((1,), math.inf)])


@dataclass
class Bin:
    lower: float  # the bin is [lower, upper); the last one [lower, 1.0], closed
    upper: float
    count: int
    confidence: float  # mean confidence of the rows in the bin (0 when empty)
    accuracy: float  # fraction correct (0 when empty)


@dataclass
class CalibrationReport:
    ece: float  # expected calibration error (l1)
    rms_ce: float  # root-mean-square calibration error (l2)
    mce: float  # maximum calibration error (max)
    accuracy: float
    confidence: float  # mean top-1 confidence (above accuracy: over-confident)
    nll: float  # mean negative log-likelihood at T = 1
    brier: float  # mean of sum_c (p_c - onehot_c)^2
    count: int
    bins: list[Bin] = field(default_factory=list)  # num_bins of them (none when count is 0)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "bins"} | {
            "bins": [b.__dict__ for b in self.bins]
        }


def _bin_errors(count: torch.Tensor, conf_sum: torch.Tensor, correct_sum: torch.Tensor):
    """(|acc - conf| per bin, bin proportions): the quantities every norm is built from."""
    safe = count.clamp(min=1)
    gap = (correct_sum / safe - conf_sum / safe).abs()
    return gap, count / count.sum()


def _norm(gap: torch.Tensor, prop: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l1":
        return (gap * prop).sum()
    if norm == "l2":
        return ((gap**2) * prop).sum().sqrt()
    return gap.max()


# device constants, built once per (num_bins, device[, dtype]): a few small tensors (a small-batch
# CPU call is bound by the number of ops, and linspace + cat every call were two of them)
_CACHE: dict = {}


def _bin_index(conf: torch.Tensor, num_bins: int) -> torch.Tensor:
    """torchmetrics' slot of each confidence, ``bucketize(conf, linspace(0, 1, B + 1), right=True) - 1``
    with the edges in conf's dtype (fp64 confidences keep fp64 edges): searching only the edges above 0
    gives that index without the - 1, and puts a confidence of exactly 1.0 in slot B, a NaN one (NaN
    logits, a row of -inf) there too as the kernels do, so every labelled row is counted."""
    key = ("edges", num_bins, conf.device, conf.dtype)
    if key not in _CACHE:
        _CACHE[key] = bin_edges(num_bins, conf.device, conf.dtype)[1:-1]  # the edges above 0, no +inf
    return torch.bucketize(conf, _CACHE[key], right=True)


def _layout(num_bins: int, device) -> tuple:
    """The constants that send a (5, N) stack of (count, confidence, correct, NLL, Brier) rows into
    ``CalibrationMeter.state`` in one index_add_: the flat index offset + per_slot * slot (slot's entry in
    the first three blocks of B + 1, fixed entries for the NLL and Brier sums), the rows a ``bad`` row
    replaces and with what (wrong, NaN NLL and Brier), and a float64 zero (where(keep, v, 0.0) would
    build a scalar tensor every call)."""
    key = ("layout", num_bins, device)
    if key not in _CACHE:
        nb = num_bins + 1
        col = dict(device=device)
        _CACHE[key] = (torch.tensor([[0], [nb], [2 * nb], [3 * nb], [3 * nb + 1]], **col),
                       torch.tensor([[1], [1], [1], [0], [0]], **col),
                       torch.tensor([[False], [False], [True], [True], [True]], **col),
                       torch.tensor([[0.0], [0.0], [0.0], [math.nan], [math.nan]], dtype=torch.float64, **col),
                       torch.zeros((), dtype=torch.float64, **col))
    return _CACHE[key]


def calibration_error(logits_or_probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15,
                      norm: str = "l1") -> torch.Tensor:
    """Top-label calibration error of ``(N, C)`` logits or probabilities against ``labels``.

    Equals ``torchmetrics.functional.classification.multiclass_calibration_error`` (same bins,
    same rule: the input is taken as probabilities when every value lies in [0, 1], else softmax
    is applied). ``norm``: "l1" (ECE), "l2" (RMS calibration error) or "max" (MCE).
    """
    checks.positive_int(num_bins, "num_bins")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(logits_or_probs, torch.Tensor) or not logits_or_probs.is_floating_point():
        raise TypeError("logits_or_probs must be a floating-point tensor")
    if logits_or_probs.dim() != 2:
        raise ValueError(f"logits_or_probs must be (N, C), got shape {tuple(logits_or_probs.shape)}")
    checks.labels(labels, logits_or_probs.shape[:1], logits_or_probs.shape[1], None)
    p = logits_or_probs.detach()
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    if not bool(((p >= 0) & (p <= 1)).all()):
        p = p.softmax(dim=1)
    conf, pred = p.max(dim=1)
    meter = CalibrationMeter(num_bins)
    meter._add_statistics(conf, pred == labels, conf, conf)  # the meter's bins (its NLL and Brier sums unused)
    gap, prop = _bin_errors(*meter.state[: 3 * (num_bins + 1)].view(3, -1))
    return _norm(gap, prop, norm).to(p.dtype)


def row_statistics(x: torch.Tensor, labels: torch.Tensor):
    """Per-row (confidence, correct, NLL, Brier) of ``(N, C)`` logits at T = 1, in x's dtype."""
    p = x.softmax(dim=-1)
    conf, pred = p.max(dim=-1)
    lab = labels.unsqueeze(-1)
    nll = -x.log_softmax(dim=-1).gather(-1, lab).squeeze(-1)
    brier = (p * p).sum(-1) - 2 * p.gather(-1, lab).squeeze(-1) + 1
    return conf, pred == labels, nll, brier


class CalibrationMeter:
    """Accumulates calibration statistics over batches in constant memory.

    ``update(logits, labels)`` adds a batch; ``kd_loss(..., meter=m)`` adds the student's rows from
    inside the fused loss with the same statistics. ``compute()`` returns a
    :class:`CalibrationReport`; ``all_reduce()`` sums the state over ``torch.distributed`` ranks.
    """

    def __init__(self, num_bins: int = 15):
        self.num_bins = checks.positive_int(num_bins, "num_bins")
        self.state: torch.Tensor | None = None  # float64 [3 * (B + 1) + 2], lazily on the data's device
        self._edges: torch.Tensor | None = None  # the bin edges the kernels search, on that device

    # layout of ``state``: counts, confidence sums, correct sums (B + 1 each: the B bins, then the slot of
    # confidence exactly 1.0, as torchmetrics bins it), NLL sum, Brier sum
    def _state_on(self, device) -> torch.Tensor:
        size = 3 * (self.num_bins + 1) + 2
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" means the current device
            device = torch.device("cuda", torch.cuda.current_device())
        if self.state is None:
            self.state = torch.zeros(size, dtype=torch.float64, device=device)
        elif self.state.device != device:
            raise ValueError(f"this meter holds statistics on {self.state.device}; got logits on {device}")
        return self.state

    def _edges_on(self, device) -> torch.Tensor:
        state = self._state_on(device)
        if self._edges is None or self._edges.device != state.device:
            self._edges = bin_edges(self.num_bins, state.device)
        return self._edges

    def _add_rows(self, x, labels, keep, bad=None):
        """Adds rows of fp32/fp64 logits ``x``; rows where ``keep`` is False add nothing. Rows
        flagged ``bad`` (a label out of range, unchecked) count, as wrong, with NaN NLL and Brier."""
        self._add_statistics(*row_statistics(x, labels.clamp(min=0)), keep, bad)

    def _add_statistics(self, conf, correct, nll, brier, keep=None, bad=None):
        """Adds per-row top-1 confidence, correctness, NLL and Brier (however computed); rows where
        ``keep`` is False add nothing (None: every row counts), rows flagged ``bad`` count as wrong with
        NaN NLL and Brier."""
        state = self._state_on(conf.device)
        offset, per_slot, bad_rows, bad_values, zero = _layout(self.num_bins, state.device)
        # one row per quantity, the count's ones first: the stack is float64, as the state
        v = torch.stack((torch.ones_like(conf, dtype=torch.float64), conf, correct, nll, brier))
        if bad is not None:
            v = torch.where(bad_rows & bad, bad_values, v)
        if keep is not None:  # where, not a product: an ignored row's NaN or inf must add nothing
            v = torch.where(keep, v, zero)
        flat = torch.addcmul(offset, per_slot, _bin_index(conf, self.num_bins))
        state.index_add_(0, flat.view(-1), v.view(-1))  # index_add_ is deterministic on CUDA, put_ is not

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
        """Adds ``(..., C)`` logits with their labels; rows labelled ``ignore_index`` are skipped."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError("logits must be a floating-point tensor")
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"logits must be (..., C) with C >= 1, got {tuple(logits.shape)}")
        checks.labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
        x = logits.detach().reshape(-1, logits.shape[-1])
        x = x.double() if x.dtype == torch.float64 else x.float()
        lab = labels.reshape(-1).to(x.device)
        keep = lab != ignore_index
        self._add_rows(x, torch.where(keep, lab, 0), keep)
        return self

    def reset(self) -> None:
        if self.state is not None:
            self.state.zero_()

    def state_dict(self) -> dict:
        return {"num_bins": self.num_bins, "state": None if self.state is None else self.state.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.num_bins = checks.positive_int(sd["num_bins"], "num_bins")
        self.state = None if sd["state"] is None else sd["state"].to(torch.float64).clone()

    def all_reduce(self, group=None, device: torch.device | str | None = None) -> CalibrationMeter:
        """Sums the statistics of every rank. ``device``: where a meter that saw no rows on this rank
        keeps its zeros (the collective's device, CUDA under NCCL); default: its own, else CPU."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            here = device if device is not None else (self.state.device if self.state is not None else "cpu")
            dist.all_reduce(self._state_on(here), group=group)
        return self

    def compute(self) -> CalibrationReport:
        nb = self.num_bins + 1
        state = (self.state if self.state is not None else torch.zeros(3 * nb + 2, dtype=torch.float64)).cpu()
        count, conf_sum, correct_sum = state[: 3 * nb].reshape(3, nb)
        total = int(count.sum().item())
        if total == 0:
            nan = float("nan")
            return CalibrationReport(nan, nan, nan, nan, nan, nan, nan, 0, [])
        gap, prop = _bin_errors(count, conf_sum, correct_sum)  # the exactly-1.0 slot apart, as torchmetrics
        edges = bin_edges(self.num_bins, dtype=torch.float64)[:nb].tolist()
        folded = state[: 3 * nb].reshape(3, nb)[:, :-1].clone()
        folded[:, -1] += state[: 3 * nb].reshape(3, nb)[:, -1]  # that slot shown in the top bin, [1 - 1/B, 1]
        bins = [Bin(edges[i], edges[i + 1], int(c), float(cs / max(c, 1)), float(ks / max(c, 1)))
                for i, (c, cs, ks) in enumerate(folded.T.tolist())]
        return CalibrationReport(
            ece=float(_norm(gap, prop, "l1")), rms_ce=float(_norm(gap, prop, "l2")),
            mce=float(_norm(gap, prop, "max")), accuracy=float(correct_sum.sum() / total),
            confidence=float(conf_sum.sum() / total),
            nll=float(state[3 * nb] / total), brier=float(state[3 * nb + 1] / total),
            count=total, bins=bins)


def check_meters(meter, teacher_meter, has_labels: bool, device):
    """``meter`` / ``teacher_meter`` of a loss call: CalibrationMeters (or None) that hold no statistics
    on another device, given labels, with one num_bins."""
    for m, name in ((meter, "meter"), (teacher_meter, "teacher_meter")):
        if m is None:
            continue
        if not isinstance(m, CalibrationMeter):
            raise TypeError(f"{name} must be a fastkd.CalibrationMeter, got {type(m).__name__}")
        m._state_on(device)  # raises if it already holds statistics on another device
        if not has_labels:
            raise ValueError(f"{name} needs labels (calibration compares predictions with them)")
    if meter is not None and teacher_meter is not None and meter.num_bins != teacher_meter.num_bins:
        raise ValueError("meter and teacher_meter must have the same num_bins")
