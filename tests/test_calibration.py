"""Calibration statistics: torchmetrics as the cross-check, float64 formulas as the reference."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.functional.classification import multiclass_calibration_error

import fastkd
from conftest import BACKENDS


def logits_with_certain_rows(gen, n=300, c=10):
    """Random logits at several sharpness levels, plus rows whose softmax max is exactly 1.0."""
    x = torch.randn(n, c, generator=gen) * torch.rand(n, 1, generator=gen) * 8
    x[:7] = 0.0
    x[:7, 3] = 200.0  # softmax rounds to exactly 1.0 in float32
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[:4] = 3  # some certain rows right, some wrong
    return x, labels


def reference_report(x, labels, num_bins):
    """The report's numbers from the formulas in float64 (confidence binned on fp32 edges)."""
    p32 = x.float().softmax(-1)
    conf32, pred = p32.max(-1)
    edges = torch.linspace(0, 1, num_bins + 1)
    idx = torch.tensor([int((edges <= c).sum()) - 1 for c in conf32.tolist()])
    p = x.double().softmax(-1)
    correct = (pred == labels).double()
    gaps, props = [], []
    for b in range(num_bins + 1):
        sel = idx == b
        props.append(sel.double().mean())
        gaps.append((correct[sel].mean() - conf32[sel].double().mean()).abs() if sel.any() else torch.tensor(0.0))
    gap, prop = torch.stack(gaps), torch.stack(props)
    onehot = torch.nn.functional.one_hot(labels, x.shape[1]).double()
    shown = idx.clamp(max=num_bins - 1)  # the reliability diagram's bins: the last is [1 - 1/B, 1], closed
    bins = [(int((shown == b).sum()), conf32[shown == b].double().mean().nan_to_num().item(),
             correct[shown == b].mean().nan_to_num().item()) for b in range(num_bins)]
    return dict(ece=float((gap * prop).sum()), rms_ce=float(((gap**2) * prop).sum().sqrt()),
                mce=float(gap.max()), accuracy=float(correct.mean()),
                nll=float(-p.log().gather(1, labels[:, None]).mean()),
                brier=float(((p - onehot) ** 2).sum(1).mean()), count=len(labels), bins=bins,
                exactly_one=int((idx == num_bins).sum()))


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("num_bins", [1, 7, 15, 100])
@pytest.mark.parametrize("as_probs", [False, True], ids=["logits", "probs"])
def test_calibration_error_equals_torchmetrics(norm, num_bins, as_probs, gen):
    x, labels = logits_with_certain_rows(gen)
    inp = x.softmax(-1) if as_probs else x
    ours = fastkd.calibration_error(inp, labels, num_bins=num_bins, norm=norm)
    theirs = multiclass_calibration_error(inp, labels, num_classes=10, n_bins=num_bins, norm=norm)
    assert abs(float(ours) - float(theirs)) <= 1e-6


def test_calibration_error_rejects_bad_arguments():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="norm"):
        fastkd.calibration_error(x, y, norm="l3")
    with pytest.raises(ValueError, match="num_bins"):
        fastkd.calibration_error(x, y, num_bins=0)
    with pytest.raises(ValueError, match="labels"):
        fastkd.calibration_error(x, torch.tensor([0, 1, 5, 0]))
    with pytest.raises(TypeError, match="logits_or_probs"):
        fastkd.calibration_error(x.long(), y)


@pytest.mark.parametrize("num_bins", [10, 15])
def test_meter_report_matches_formulas_and_torchmetrics(num_bins, gen):
    x, labels = logits_with_certain_rows(gen, n=500)
    meter = fastkd.CalibrationMeter(num_bins)
    for chunk in range(0, 500, 128):  # several updates accumulate
        meter.update(x[chunk:chunk + 128], labels[chunk:chunk + 128])
    rep, ref = meter.compute(), reference_report(x, labels, num_bins)
    for key in ("ece", "rms_ce", "mce", "accuracy", "nll", "brier"):
        assert getattr(rep, key) == pytest.approx(ref[key], abs=1e-6), key
    assert rep.count == ref["count"]
    # num_bins bins (not one more, [1.0, 1.0]): the rows at confidence exactly 1.0 are in the last
    assert len(rep.bins) == num_bins and ref["exactly_one"] >= 7
    assert [b.lower for b in rep.bins] == pytest.approx([i / num_bins for i in range(num_bins)], abs=1e-15)
    assert [b.upper for b in rep.bins[:-1]] == [b.lower for b in rep.bins[1:]] and rep.bins[-1].upper == 1.0
    for b, (count, conf, acc) in zip(rep.bins, ref["bins"]):
        assert b.count == count and b.confidence == pytest.approx(conf, abs=1e-9)
        assert b.accuracy == pytest.approx(acc, abs=1e-12)
    for norm, key in (("l1", "ece"), ("l2", "rms_ce"), ("max", "mce")):
        tm = multiclass_calibration_error(x, labels, num_classes=10, n_bins=num_bins, norm=norm)
        assert getattr(rep, key) == pytest.approx(float(tm), abs=1e-6)


def test_meter_skips_ignored_rows_and_memory_is_constant(gen):
    x, labels = logits_with_certain_rows(gen, n=200)
    masked = labels.clone()
    masked[::3] = -100
    meter = fastkd.CalibrationMeter()
    meter.update(x, masked)
    size = meter.state.numel()
    for _ in range(5):
        meter.update(x, masked)
    assert meter.state.numel() == size
    kept = masked != -100
    ref = fastkd.CalibrationMeter().update(x[kept], labels[kept]).compute()
    rep = meter.compute()
    assert rep.count == 6 * int(kept.sum())
    assert rep.ece == pytest.approx(ref.ece, abs=1e-9) and rep.nll == pytest.approx(ref.nll, abs=1e-9)


def test_meter_state_dict_round_trip_and_reset(gen):
    x, labels = logits_with_certain_rows(gen)
    meter = fastkd.CalibrationMeter(12).update(x, labels)
    clone = fastkd.CalibrationMeter()
    clone.load_state_dict(meter.state_dict())
    assert clone.num_bins == 12 and clone.compute() == meter.compute()
    meter.reset()
    assert meter.compute().count == 0


def test_meter_counts_are_exact_over_many_rows():
    meter = fastkd.CalibrationMeter(4)
    x = torch.zeros(1_000_003, 2)
    x[:, 0] = 1.0  # every row: confidence sigmoid(1) = 0.731 -> bin 2, prediction 0
    labels = torch.zeros(1_000_003, dtype=torch.long)
    labels[::2] = 1
    for _ in range(3):
        meter.update(x, labels)
    rep = meter.compute()
    assert rep.count == 3_000_009 and rep.bins[2].count == 3_000_009
    assert rep.accuracy == pytest.approx(500_001 / 1_000_003, abs=1e-12)


def ignore_rows_near_bin_edges(labels, *logits, num_bins=15, margin=1e-5):
    """Labels with rows whose confidence lies within ``margin`` of an inner bin edge ignored.

    Two fp32 softmax implementations differ by a few ulp, so such a row may land on either side
    of the edge; every other row must land in the same bin, exactly (and every labelled row counts).
    """
    labels = labels.clone()
    for x in logits:
        conf = x.double().softmax(-1).amax(-1)
        dist = (conf * num_bins - (conf * num_bins).round()).abs() / num_bins
        labels[(dist < margin) & (conf < 1 - margin)] = -100
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [pytest.param((300, 10), id="300x10"), pytest.param((23, 1100), id="23x1100")])
def test_meters_inside_kd_loss_equal_update(backend, shape, gen):
    s = torch.randn(shape, generator=gen) * 4
    t = torch.randn(shape, generator=gen) * 4
    s[:3] = 0.0
    s[:3, 1] = 300.0  # certain rows: confidence exactly 1.0
    labels = torch.randint(0, shape[1], shape[:1], generator=gen)
    labels[5::7] = -100
    labels = ignore_rows_near_bin_edges(labels, s, t)
    inside, teacher_inside = fastkd.CalibrationMeter(), fastkd.CalibrationMeter()
    fastkd.kd_loss(s.requires_grad_(), t, labels, meter=inside, teacher_meter=teacher_inside,
                   backend=backend).backward()
    outside = fastkd.CalibrationMeter().update(s.detach(), labels)
    teacher_outside = fastkd.CalibrationMeter().update(t, labels)
    for a, b in ((inside, outside), (teacher_inside, teacher_outside)):
        ra, rb = a.compute(), b.compute()
        assert [x.count for x in ra.bins] == [x.count for x in rb.bins]
        for key in ("ece", "rms_ce", "mce", "accuracy", "nll", "brier"):
            assert getattr(ra, key) == pytest.approx(getattr(rb, key), rel=1e-5, abs=1e-6), key


def test_meter_inside_kd_loss_works_without_gradients(gen):
    s, t = torch.randn(50, 10, generator=gen), torch.randn(50, 10, generator=gen)
    labels = torch.randint(0, 10, (50,), generator=gen)
    for backend in ("torch", "triton"):
        m = fastkd.CalibrationMeter()
        with torch.inference_mode():
            fastkd.kd_loss(s, t, labels, meter=m, backend=backend)
        assert m.compute().count == 50


def _all_reduce_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    meter = fastkd.CalibrationMeter().update(torch.randn(100 + rank, 5, generator=g),
                                             torch.randint(0, 5, (100 + rank,), generator=g))
    results[rank] = meter.state.clone()
    meter.all_reduce()
    results[f"reduced{rank}"] = meter.state.clone()
    dist.destroy_process_group()


def test_all_reduce_sums_exactly_across_ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_all_reduce_worker, args=(2, port, results), nprocs=2)
    total = results[0] + results[1]
    assert torch.equal(results["reduced0"], total) and torch.equal(results["reduced1"], total)
    assert int(total[:16].sum()) == 201


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_meter_keep_none_counts_every_row_and_ignored_rows_add_nothing(dtype, gen):
    """keep=None equals keep=all-True bit for bit; ignored rows with NaN / inf statistics add nothing;
    the state equals sums written plainly, binned on edges in the confidences' dtype."""
    num_bins, n = 3, 41
    edges = torch.linspace(0, 1, num_bins + 1, dtype=dtype)
    conf = torch.rand(n, generator=gen, dtype=dtype)
    # exactly 1.0 (slot B), 0, NaN (slot B), on an edge (in fp64 below fp32's 1/3), just below it
    conf[:5] = torch.tensor([1.0, 0.0, math.nan, 2 / 3, 1 / 3], dtype=dtype)
    conf[5] = torch.nextafter(conf[4], torch.tensor(0.0, dtype=dtype))
    rows = (conf, torch.rand(n, generator=gen) < 0.5, torch.rand(n, generator=gen, dtype=dtype) * 3,
            torch.rand(n, generator=gen, dtype=dtype) * 2)
    every, all_true, masked = (fastkd.CalibrationMeter(num_bins) for _ in range(3))
    every._add_statistics(*rows)
    all_true._add_statistics(*rows, keep=torch.ones(n, dtype=torch.bool))
    torch.testing.assert_close(every.state, all_true.state, rtol=0, atol=0, equal_nan=True)
    junk = (torch.tensor([math.nan, math.inf, 0.5], dtype=dtype), torch.tensor([True, False, True]),
            torch.tensor([math.inf, math.nan, -math.inf], dtype=dtype),
            torch.tensor([math.nan, -math.inf, math.inf], dtype=dtype))
    keep = torch.ones(n + 3, dtype=torch.bool)
    keep[torch.randperm(n + 3, generator=gen)[:3]] = False  # the ignored rows in between, the others in order
    mixed = [torch.cat([r, j]) for r, j in zip(rows, junk)]
    for m, r, j in zip(mixed, rows, junk):
        m[keep], m[~keep] = r, j
    masked._add_statistics(*mixed, keep=keep)
    torch.testing.assert_close(masked.state, every.state, rtol=0, atol=0, equal_nan=True)
    want = torch.zeros(3 * (num_bins + 1) + 2, dtype=torch.float64)
    for c, ok, nll, brier in zip(*(r.tolist() for r in rows)):
        slot = num_bins if math.isnan(c) else max(sum(e <= c for e in edges.tolist()) - 1, 0)
        for block, v in enumerate((1.0, c, float(ok))):
            want[block * (num_bins + 1) + slot] += v
        want[-2] += nll
        want[-1] += brier
    torch.testing.assert_close(every.state, want, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_meter_adds_few_ops_to_a_small_cpu_batch():
    """A CPU batch of 128 x 10 is bound by the number of ops (a few us each), not by bytes: the meter
    adds at most 22 to kd_loss's forward (64 before it was trimmed)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    s, t = torch.randn(128, 10), torch.randn(128, 10)
    labels = torch.randint(0, 10, (128,))
    counts = []
    for meter in (None, fastkd.CalibrationMeter()):
        kw = dict(temperature=4.0, alpha=0.9, meter=meter, backend="torch")
        fastkd.kd_loss(s, t, labels, **kw)  # the first call builds the meter's device constants
        with Count() as mode:
            fastkd.kd_loss(s, t, labels, **kw)
        counts.append(mode.ops)
    extra = sum(counts[1].values()) - sum(counts[0].values())
    assert extra <= 22, (extra, counts[1] - counts[0])
