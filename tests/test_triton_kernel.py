"""The Triton kernel's own contract, at the launcher (``kd_forward`` / ``scale_grad``) and through the
public losses, against float64 references written here: fp16 gradients saved in grad units, a
captured launch's own reduction state, calibration edge rows, out-of-range labels."""
import math

import pytest
import torch

import fastkd
from conftest import force_triton_path
from fastkd._core.spec import KDSpec

K = pytest.importorskip("fastkd.backends.triton")  # the backend: kd_forward, scale_grad
from fastkd.backends.triton import helpers as H  # noqa: E402  (the meters' packing constants)
from fastkd.backends.triton import launch as L  # noqa: E402  (the launch state)
from fastkd.backends.triton import plan as P  # noqa: E402  (the plans and their knobs)
from fastkd.backends.triton import split as SP  # noqa: E402  (the split-row kernel)

NAN = float("nan")


def randn(shape, gen, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def rows_reference(s, t, labels, T, kd_scale, ce_scale, ignore_index=-100):
    """Per row, float64: (loss row, d row / d s, d row / d t) of kd_scale KL(p_t||p_s) + ce_scale CE,
    unscaled (no 1/count), rows labelled ignore_index zeroed."""
    s64 = s.double().requires_grad_()
    t64 = t.double().requires_grad_()
    ls, lt = torch.log_softmax(s64 / T, -1), torch.log_softmax(t64 / T, -1)
    row = kd_scale * (lt.exp() * (lt - ls)).sum(-1)
    keep = torch.ones(s.shape[0], dtype=torch.bool)
    if labels is not None:
        keep = labels != ignore_index
        if ce_scale:
            lab = torch.where(keep, labels, 0)
            row = row - ce_scale * torch.log_softmax(s64, -1).gather(1, lab[:, None])[:, 0]
    row = torch.where(keep, row, 0.0)
    gs, gt = torch.autograd.grad(row.sum(), (s64, t64))
    return row.detach(), gs, gt


def spec_for(T, kd_scale, ce_scale, grad_unit=0.0, divergence=0, beta=0.5):
    return KDSpec(1.0 / T, kd_scale, ce_scale, divergence, beta, -100, grad_unit)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(64, 10), (37, 300), (5, 3000)], ids=["64x10", "37x300", "5x3000"])
@pytest.mark.parametrize("row_count", ["host", "device"])
def test_fp16_gradients_in_grad_units(shape, row_count, gen):
    """grad_unit > 0: the kernel writes grad_unit * d row / d logits, without the row scale (0 for
    ignored rows); the loss keeps it. scale_grad then applies grad_output * w / grad_unit in fp32."""
    n, c = shape
    s, t = randn(shape, gen, torch.float16), randn(shape, gen, torch.float16)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[::4] = -100
    kept = int((labels != -100).sum())
    count = kept if row_count == "host" else torch.tensor([kept])
    T, kd_scale, ce_scale, unit = 2.0, 0.7 * 4.0, 0.3, 0.5
    row, ref_gs, ref_gt = rows_reference(s, t, labels, T, kd_scale, ce_scale)
    loss, gs, gt = K.kd_forward(s, t, labels, count, spec_for(T, kd_scale, ce_scale, unit), True, True,
                                None, None)
    assert gs.dtype == gt.dtype == torch.float16
    torch.testing.assert_close(loss.double(), row / kept, rtol=1e-5, atol=1e-6)
    assert rel_err(gs, unit * ref_gs) < 2e-3 and rel_err(gt, unit * ref_gt) < 2e-3
    assert (gs[labels == -100] == 0).all() and (gt[labels == -100] == 0).all()

    # the backward of a loss scaler: grad_output 65536 on a batchmean loss
    for go in (65536.0, 1024.0, 2.0**-10):
        g = gs.clone()
        K.scale_grad(g, torch.tensor(go / kept / unit))
        want = ref_gs * go / kept
        # 2e-3, or twice the error of rounding the exact gradient to fp16 (subnormal at 2^-10)
        assert rel_err(g, want) < max(2e-3, 2 * rel_err(want.half(), want)), go
        # a normal fp16 number is never flushed to 0 or inf, unless its value in grad units was
        # below fp16's smallest subnormal (few rows, huge factor: a limit of any fp16 saved gradient)
        normal = (want.abs() >= 2.0**-14) & ((unit * ref_gs).abs() >= 2.0**-24)
        assert (g[normal] != 0).all() and torch.isfinite(g).all()
    # reduction="none": one factor per row
    factor = torch.rand(n, generator=gen) * 1000
    g = gs.clone()
    K.scale_grad(g, (factor / unit).float())
    assert rel_err(g, ref_gs * factor.double()[:, None]) < 2e-3


def test_scale_grad_with_factor_one_moves_nothing(gen):
    g = randn((7, 33), gen, torch.float16)
    before = g.clone()
    K.scale_grad(g, torch.tensor(1.0))
    assert torch.equal(g, before)
    K.scale_grad(g, torch.tensor([1.0] * 3 + [2.0] + [1.0] * 3))
    assert torch.equal(g[3], (before[3].float() * 2).half()) and torch.equal(g[:3], before[:3])


@pytest.mark.parametrize("shape", [(2, 3, 5000), (37, 10)], ids=["BxTxC-two-column-tiles", "37x10"])
def test_scale_grad_per_row_factor(shape, gen):
    """A per-row factor (reduction="none") is read per row of a tile; (B, T, C) gradients with a
    (B, T) factor; rows whose factor is 1 are left as they are."""
    g = randn(shape, gen, torch.bfloat16)
    factor = torch.rand(shape[:-1], generator=gen) * 100
    factor.view(-1)[::3] = 1.0
    before = g.clone()
    K.scale_grad(g, factor)
    torch.testing.assert_close(g.double(), before.double() * factor.double()[..., None], rtol=2**-7, atol=0)
    ones = factor == 1.0
    assert torch.equal(g[ones], before[ones])


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "captured"])
def test_captured_launch_owns_its_reduction_state(monkeypatch, capturing, gen):
    """Under CUDA-graph capture (mocked here) the launch takes a zeroed counter of its own, tied to
    the returned loss; eagerly it shares the per-(device, stream) counter, left at 0 after each call."""
    monkeypatch.setattr(L, "_capturing", lambda device: capturing)
    monkeypatch.setattr(L, "_TICKETS", {})
    seen, make = [], L._reduction_state
    monkeypatch.setattr(L, "_reduction_state", lambda device: seen.append(make(device)) or seen[-1])
    for n in (3000, 17, 1):
        s, t = randn((n, 10), gen), randn((n, 10), gen)
        row, _, _ = rows_reference(s, t, None, 3.0, 1.0, 0.0)
        total, _, _ = K.kd_forward(s, t, None, n, spec_for(3.0, 1.0, 0.0), False, False, None, None,
                                   reduce=True)
        assert total.shape == () and total.dtype == torch.float32
        assert math.isclose(total.item(), row.sum().item() / n, rel_tol=1e-5)
        counter, _ = seen[-1]
        assert counter.item() == 0
        if capturing:  # a counter per launch, in one allocation with the total it returns
            assert L._TICKETS == {} and len({c.data_ptr() for c, _ in seen}) == len(seen)
            assert counter.untyped_storage().data_ptr() == total.untyped_storage().data_ptr()
        else:
            (counter,) = L._TICKETS.values()
            assert counter.item() == 0


def _meter_reference(x, labels, num_bins, ignore_index=-100):
    """Per bin counts / confidence sums / correct sums, NLL and Brier sums, float64, written plainly:
    confidence 1/sum exp(x - max) when that is finite and positive, else NaN (last bin); a label
    outside [0, C) is wrong and makes NLL and Brier NaN."""
    nb = num_bins + 1
    count, conf_sum, correct_sum = [0] * nb, [0.0] * nb, [0.0] * nb
    nll = brier = 0.0
    edges = torch.linspace(0, 1, num_bins + 1).tolist()  # fp32 edges, as the kernels'
    c = x.shape[1]
    for row, label in zip(x.double(), labels.tolist()):
        if label == ignore_index:
            continue
        m = row.max()
        z = float(torch.exp(row - m).sum()) if math.isfinite(m) else (0.0 if m == -math.inf else NAN)
        conf = 1.0 / z if 0 < z < math.inf else NAN
        if math.isnan(conf):
            b = num_bins
        else:
            conf32 = float(torch.tensor(conf, dtype=torch.float32))
            b = min(max(sum(e <= conf32 for e in edges) - 1, 0), num_bins)
        ok = 0 <= label < c
        p = torch.softmax(row, 0)
        correct = ok and not math.isnan(conf) and int(row.argmax()) == label
        count[b] += 1
        conf_sum[b] += conf
        correct_sum[b] += float(correct)
        nll += float(-torch.log_softmax(row, 0)[label]) if ok else NAN
        brier += float(((p - torch.nn.functional.one_hot(torch.tensor(label), c)) ** 2).sum()) if ok else NAN
    return count, conf_sum, correct_sum, nll, brier


def _check_meter(meter, ref):
    nb = meter.num_bins + 1
    state = meter.state.double()
    count, conf_sum, correct_sum, nll, brier = ref
    assert state[:nb].tolist() == count
    torch.testing.assert_close(state[nb:2 * nb], torch.tensor(conf_sum, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6, equal_nan=True)
    assert state[2 * nb:3 * nb].tolist() == correct_sum
    torch.testing.assert_close(state[3 * nb:], torch.tensor([nll, brier], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("path", ["one-pass", "looping"])
def test_calibration_edge_rows_land_in_the_last_bin(monkeypatch, path, gen):
    """A labelled row of all -inf (confidence inf before) or with a NaN has a NaN confidence: it
    counts in bin NUM_BINS, as CalibrationMeter.update puts it; the count equals the labelled rows."""
    if path == "looping":
        monkeypatch.setattr(P, "ONE_PASS_MAX", {v: {1: 16, 2: 16, 4: 16} for v in ("light", "heavy")})
        monkeypatch.setattr(P, "LOOP_BLOCK_C", 16)
    n, c = 12, 40
    s, t = randn((n, c), gen), randn((n, c), gen)
    s[1] = float("-inf")
    t[2] = float("-inf")
    s[3, 5] = NAN
    t[4, 7] = NAN
    s[5, :30] = float("-inf")
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[6] = -100
    labels[0] = int(s[0].argmax())  # one certainly right
    meter, teacher_meter = fastkd.CalibrationMeter(10), fastkd.CalibrationMeter(10)
    fastkd.kd_loss(s, t, labels, alpha=0.5, meter=meter, teacher_meter=teacher_meter, reduction="none",
                   backend="triton")
    _check_meter(meter, _meter_reference(s, labels, 10))
    _check_meter(teacher_meter, _meter_reference(t, labels, 10))
    assert meter.compute().count == teacher_meter.compute().count == n - 1
    update = fastkd.CalibrationMeter(10).update(s, labels)
    assert meter.state[:11].tolist() == update.state[:11].tolist()


@pytest.mark.parametrize("path", ["one-pass", "looping"])
@pytest.mark.parametrize("objective", ["kl_loss", "kd_loss"])
def test_out_of_range_labels_give_nan_rows_and_read_nothing(monkeypatch, path, objective, gen):
    """validate_labels=False: a label outside [0, C) that is not ignore_index counts as a row, makes
    its loss and gradient rows NaN (so a GradScaler skips the step), counts as wrong in the meter
    with NaN NLL / Brier; the other rows are exact. The logits are a window of a larger buffer whose
    other elements would be finite if read."""
    if path == "looping":
        monkeypatch.setattr(P, "ONE_PASS_MAX", {v: {1: 16, 2: 16, 4: 16} for v in ("light", "heavy")})
        monkeypatch.setattr(P, "LOOP_BLOCK_C", 16)
    n, c = 9, 37
    big_s, big_t = randn((n + 2, c + 8), gen), randn((n + 2, c + 8), gen)
    s, t = big_s[1:-1, 4:4 + c].contiguous(), big_t[1:-1, 4:4 + c].contiguous()
    labels = torch.randint(0, c, (n,), generator=gen)
    bad = torch.zeros(n, dtype=torch.bool)
    labels[2], labels[5], labels[7] = c, -1, 2**40
    bad[[2, 5, 7]] = True
    labels[4] = -100
    kept = int((labels != -100).sum())
    s.requires_grad_()
    t.requires_grad_()
    if objective == "kl_loss":
        loss = fastkd.kl_loss(s, t, temperature=2.0, labels=labels, reduction="none", backend="triton",
                              validate_labels=False)
        kd_scale, ce_scale, meter = 1.0, 0.0, None
    else:
        meter = fastkd.CalibrationMeter(8)
        loss = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.6, reduction="none", meter=meter,
                              backend="triton", validate_labels=False)
        kd_scale, ce_scale = 0.6 * 4.0, 0.4
    gs, gt = torch.autograd.grad(loss, (s, t), torch.ones(n))
    row, ref_gs, ref_gt = rows_reference(s.detach(), t.detach(), torch.where(bad, -100, labels), 2.0,
                                         kd_scale, ce_scale)
    assert torch.isnan(loss[bad]).all() and torch.isnan(gs[bad]).all() and torch.isnan(gt[bad]).all()
    torch.testing.assert_close(loss[~bad].double(), row[~bad], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs[~bad].double(), ref_gs[~bad], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt[~bad].double(), ref_gt[~bad], rtol=1e-5, atol=1e-6)
    if meter is not None:
        _check_meter(meter, _meter_reference(s.detach(), labels, 8))
        assert int(meter.state[:9].sum()) == kept
    # batchmean: the bad rows count, and the loss is NaN
    total = fastkd.kl_loss(s, t, labels=labels, backend="triton", validate_labels=False)
    assert torch.isnan(total)
    # directly at the launcher, the rows that count include the bad ones (row_count on the device)
    spec = spec_for(2.0, kd_scale, ce_scale)
    rows, g1, _ = K.kd_forward(s.detach(), t.detach(), labels, torch.tensor([kept]), spec, True, False,
                               None, None)
    torch.testing.assert_close(rows[~bad].double(), row[~bad] / kept, rtol=1e-5, atol=1e-6)
    assert torch.isnan(rows[bad]).all() and torch.isnan(g1[bad]).all() and not torch.isnan(g1[~bad]).any()


def _reference_rows(s, t, labels, T, kd_scale, ce_scale):
    """rows_reference on flattened (..., C) inputs."""
    c = s.shape[-1]
    return rows_reference(s.reshape(-1, c), t.reshape(-1, c), labels, T, kd_scale, ce_scale)


@pytest.mark.parametrize("path", ["one-pass", "looping"])
def test_three_dim_views_are_read_in_place(monkeypatch, path, gen):
    """(B, T, C) views such as logits[:, :-1] (no single row stride) go to the kernel as they are:
    rows r -> (r // T, r % T) with two strides; the gradients come back contiguous, of the same shape."""
    if path == "looping":
        monkeypatch.setattr(P, "ONE_PASS_MAX", {v: {1: 16, 2: 16, 4: 16} for v in ("light", "heavy")})
        monkeypatch.setattr(P, "LOOP_BLOCK_C", 16)
    b, t_len, c = 3, 6, 40
    s_full, t_full = randn((b, t_len + 1, c), gen), randn((b, t_len + 1, c + 4), gen)
    s, t = s_full[:, :-1], t_full[:, 1:, 2:2 + c]  # two views, neither a (N, C) matrix
    labels = torch.randint(0, c, (b * t_len,), generator=gen)
    labels[::5] = -100
    kept = int((labels != -100).sum())
    T, kd_scale, ce_scale = 2.0, 0.6 * 4.0, 0.4

    def no_copies(*a, **k):
        raise AssertionError("the launcher copied its input")

    monkeypatch.setattr(torch.Tensor, "contiguous", no_copies)
    loss, gs, gt = K.kd_forward(s, t, labels, torch.tensor([kept]), spec_for(T, kd_scale, ce_scale), True, True,
                                None, None)
    monkeypatch.undo()
    row, ref_gs, ref_gt = _reference_rows(s.contiguous(), t.contiguous(), labels, T, kd_scale, ce_scale)
    assert gs.shape == s.shape and gt.shape == t.shape and gs.is_contiguous() and gt.is_contiguous()
    torch.testing.assert_close(loss.double(), row / kept, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs.reshape(-1, c).double(), ref_gs / kept, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt.reshape(-1, c).double(), ref_gt / kept, rtol=1e-5, atol=1e-7)


def test_misaligned_views_and_mixed_dtypes(gen):
    """A view starting one element in (no 16-byte alignment) with an odd C, bf16 against fp32."""
    s_full, t_full = randn((9, 38), gen, torch.bfloat16), randn((9, 38), gen)
    s, t = s_full[:, 1:], t_full[:, :-1]
    row, ref_gs, _ = rows_reference(s.float(), t, None, 1.0, 1.0, 0.0)
    loss, gs, _ = K.kd_forward(s, t, None, 9, spec_for(1.0, 1.0, 0.0), True, False, None, None)
    torch.testing.assert_close(loss.double(), row / 9, rtol=1e-5, atol=1e-6)
    assert rel_err(gs, ref_gs / 9) < 1e-2


@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_several_row_blocks_per_program(monkeypatch, divergence, gen):
    """A program reads several blocks of rows when blocks are small (its loss partial and meter
    atomics shared): forced here on a small input, with a ragged last block, ignored rows, meters."""
    monkeypatch.setattr(P, "MIN_PROGRAMS", 4)
    monkeypatch.setattr(P, "PROGRAM_ELEMENTS_PER_THREAD", 1 << 12)
    n, c = 1001, 7
    s, t = randn((n, c), gen), randn((n, c), gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[::7] = -100
    kept = int((labels != -100).sum())
    spec = spec_for(2.0, 0.5, 0.5, divergence=divergence)  # = kd_objective(alpha=0.5, no T^2)
    plan = P._plan(n, c, s.dtype, t.dtype, spec, True, False, True, True, True, True)
    assert plan["ints"]["blocks_per_program"] > 1 and plan["programs"] > 1
    meter, teacher_meter = fastkd.CalibrationMeter(6), fastkd.CalibrationMeter(6)
    for m in (meter, teacher_meter):  # loss.py does this before a kernel sees a fresh meter
        m._state_on(s.device)
    total, gs, _ = K.kd_forward(s, t, labels, torch.tensor([kept]), spec, True, False, meter, teacher_meter,
                                reduce=True)
    kind = ("kl", "reverse_kl", "jsd")[divergence]
    from reference import kd_objective

    s64 = s.double().requires_grad_()
    ref = kd_objective(s64, t.double(), labels, 2.0, 0.5, kind=kind, t_squared=False)
    ref.backward()
    assert math.isclose(total.item(), ref.item(), rel_tol=1e-5)
    torch.testing.assert_close(gs.double(), s64.grad, rtol=1e-5, atol=1e-7)
    _check_meter(meter, _meter_reference(s, labels, 6))
    _check_meter(teacher_meter, _meter_reference(t, labels, 6))


@pytest.fixture
def split_rows(monkeypatch):
    """Rows beyond one pass take the split-row path, here as the interpreter runs it (its two halves
    as two launches), in parts of 32 * VEC columns."""
    monkeypatch.setattr(P, "ONE_PASS_MAX", {v: {1: 16, 2: 16, 4: 16} for v in ("light", "heavy")})
    monkeypatch.setattr(P, "SPLIT_INTERPRETED", True)
    monkeypatch.setattr(P, "SPLIT_WARPS", 1)
    monkeypatch.setattr(P, "SPLIT_VECS", 1)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_split_rows_equal_the_reference(split_rows, divergence, temperature, gen):
    """A row split over parts: the parts' statistics merged in order; chunks of -inf (a masked
    vocabulary) and a ragged last part; student and teacher gradients, CE, the meter, ignored rows."""
    from reference import kd_objective

    n, c = 6, 203
    s, t = randn((n, c), gen), randn((n, c), gen)
    s[2, :70] = float("-inf")  # whole parts of zero mass
    t[2, :70] = float("-inf")
    labels = torch.randint(70, c, (n,), generator=gen)
    labels[4] = -100
    plan = P._plan(n, c, s.dtype, t.dtype, spec_for(temperature, 1.0, 0.5), True, True, True, True, False, True,
                   split_ok=True, sms=1)
    assert plan["path"] == "split-row" and plan["consts"]["PARTS"] == 7
    s.requires_grad_()
    t.requires_grad_()
    meter = fastkd.CalibrationMeter(8)
    out = fastkd.kd_loss(s, t, labels, temperature=temperature, alpha=0.6, divergence=divergence, meter=meter,
                         backend="triton")
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = kd_objective(s64, t64, labels, temperature, 0.6, kind=divergence)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out, (s, t))
    want = torch.autograd.grad(ref, (s64, t64))
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g.double(), w_, rtol=1e-5, atol=1e-5 * w_.abs().max().item())
    _check_meter(meter, _meter_reference(s.detach(), labels, 8))


def test_split_rows_three_dim_views_bad_labels_and_fp16_units(split_rows, gen):
    """(B, T, C) views read in place, an out-of-range label (NaN row), fp16 gradients in grad units,
    the per-row loss (reduction "none")."""
    b, t_len, c = 2, 4, 200
    s_full, t_full = randn((b, t_len + 1, c), gen, torch.float16), randn((b, t_len + 1, c), gen, torch.float16)
    s, t = s_full[:, 1:], t_full[:, :-1]
    labels = torch.randint(0, c, (b * t_len,), generator=gen)
    labels[3] = c + 5
    labels[5] = -100
    kept = int((labels != -100).sum())
    unit = 64.0
    loss, gs, gt = K.kd_forward(s, t, labels, torch.tensor([kept]), spec_for(2.0, 1.0, 0.5, grad_unit=unit), True,
                                True, None, None)
    bad = torch.zeros(b * t_len, dtype=torch.bool)
    bad[3] = True
    ok_labels = torch.where(bad, -100, labels)
    row, ref_gs, ref_gt = rows_reference(s.reshape(-1, c).float(), t.reshape(-1, c).float(), ok_labels, 2.0, 1.0,
                                         0.5)
    assert torch.isnan(loss[bad]).all() and torch.isnan(gs.reshape(-1, c)[bad]).all()
    torch.testing.assert_close(loss[~bad].double(), row[~bad] / kept, rtol=1e-5, atol=1e-6)
    assert rel_err(gs.reshape(-1, c)[~bad], unit * ref_gs[~bad]) < 2e-3
    assert rel_err(gt.reshape(-1, c)[~bad], unit * ref_gt[~bad]) < 2e-3
    assert (gs.reshape(-1, c)[5] == 0).all() and gs.shape == s.shape and gs.is_contiguous()


def test_split_rows_path_is_chosen_where_it_applies():
    """The launcher's choice for long rows: split where it applies (KL or reverse KL with a
    gradient, no teacher meter), else the looping path; it says which."""
    spec = spec_for(2.0, 1.0, 0.0)
    bf16 = torch.bfloat16
    split = P._plan(4096, 128256, bf16, bf16, spec, True, False, False, False, False, True, split_ok=True)
    assert split["path"] == "split-row" and split["consts"]["PARTS"] == 32
    assert split["programs"] % 32 == 0 and split["programs"] <= 132 * P.SPLIT_PROGRAMS_PER_SM
    jsd = P._plan(4096, 128256, bf16, bf16, spec_for(2.0, 1.0, 0.0, divergence=2), True, False, False, False,
                  False, True, split_ok=True)
    assert jsd["path"] == "3-sweep"
    assert P._plan(4096, 128256, bf16, bf16, spec, True, False, False, False, False, True,
                   split_ok=False)["path"] == "2-sweep"
    assert P._plan(4096, 128256, bf16, bf16, spec, False, False, False, False, False, True,
                   split_ok=True)["path"] == "1-sweep"  # no gradient: one read anyway
    assert P._plan(4096, 1000, torch.float32, torch.float32, spec, True, False, False, False, False, True,
                   split_ok=True)["path"] == "one-pass"


def scaled_packing(monkeypatch, rows):
    """The meters' packed counts (count + PACK * correct, exact up to PACK_ROWS rows a program) with
    a PACK_ROWS of ``rows``: the packing limit met by a few rows, which the interpreter runs in
    seconds (4096 rows of one program take it minutes); the arithmetic is the same at 4095."""
    import triton.language as tl

    for module in (H, SP, P):  # the meters read it, and the split kernel and the plans
        monkeypatch.setattr(module, "PACK_ROWS", tl.constexpr(rows))
    monkeypatch.setattr(H, "PACK", tl.constexpr(float(rows + 1)))


def test_split_rows_meter_flushes_its_packed_counts(split_rows, monkeypatch, gen):
    """Issue 24: a group of the split path takes any number of rows (4096 at 32768 x 128256 fp32 on
    132 SMs), past what a program's packed counts hold: the kernel flushes them every PACK_ROWS rows.
    One group of 17 rows against PACK_ROWS = 3 (before the fix, a bin of 7 rows read 3): counts,
    correct and sums equal the float64 reference and CalibrationMeter.update on the float64 logits,
    the counts exactly; loss and gradient too."""
    from reference import kd_objective

    scaled_packing(monkeypatch, 3)
    monkeypatch.setattr(L, "_sm_count", lambda device: 1)  # one group of programs takes every row
    monkeypatch.setattr(P, "SPLIT_PROGRAMS_PER_SM", 1)
    n, c = 17, 45
    s, t = randn((n, c), gen, scale=1.0), randn((n, c), gen, scale=1.0)
    s[::2, 3] += 6.0  # confident rows, most of them right: many rows and correct ones in few bins
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[::2] = 3
    labels[7] = -100
    plan = P._plan(n, c, s.dtype, t.dtype, spec_for(2.0, 1.0, 0.5), True, False, True, True, False, True,
                   split_ok=True, sms=L._sm_count(s.device))
    assert plan["path"] == "split-row" and plan["ints"]["n_groups"] == 1 and plan["ints"]["rows_per_group"] == n
    assert plan["meter_rows"] == 3
    meter = fastkd.CalibrationMeter(4)
    out = fastkd.kd_loss(s.requires_grad_(), t, labels, temperature=2.0, alpha=0.5, meter=meter, backend="triton")
    s64 = s.detach().double().requires_grad_()
    ref = kd_objective(s64, t.double(), labels, 2.0, 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    got, want = torch.autograd.grad(out, s)[0], torch.autograd.grad(ref, s64)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    _check_meter(meter, _meter_reference(s.detach(), labels, 4))
    update = fastkd.CalibrationMeter(4).update(s.detach().double(), labels)
    assert meter.state[:5].tolist() == update.state[:5].tolist()  # counts per bin
    assert meter.state[10:15].tolist() == update.state[10:15].tolist()  # correct per bin
    assert max(update.state[:5].tolist()) > 3  # the limit was met


@pytest.mark.parametrize("divergence,pack_rows", [(0, None), (2, 3)], ids=["kl", "jsd-3-sweep-PACK_ROWS-3"])
def test_looping_path_meters_share_a_program_over_rows(monkeypatch, divergence, pack_rows, gen):
    """Issue 24: the looping path with meters takes several rows per program (one flush of ~50 float64
    atomics for all of them), within PACK_ROWS (scaled down in one case, so that the cap decides):
    loss, gradients and both meters equal the float64 references, counts exactly; a ragged last
    program, ignored rows, two column tiles with a ragged one."""
    from reference import kd_objective

    force_triton_path(monkeypatch, P, "looping")
    monkeypatch.setattr(P, "LOOP_METER_PROGRAMS", 3)
    if pack_rows:
        scaled_packing(monkeypatch, pack_rows)
    n, c = 17, 45
    s, t = randn((n, c), gen), randn((n, c), gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[::6] = -100
    kept = int((labels != -100).sum())
    spec = spec_for(2.0, 0.5, 0.5, divergence=divergence)
    plan = P._plan(n, c, s.dtype, t.dtype, spec, True, False, True, True, True, True)
    per_program = pack_rows or n // 3
    assert plan["path"].endswith("-sweep") and plan["ints"]["blocks_per_program"] == per_program > 1
    assert plan["programs"] == -(-n // per_program)
    meter, teacher_meter = fastkd.CalibrationMeter(5), fastkd.CalibrationMeter(5)
    for m in (meter, teacher_meter):
        m._state_on(s.device)
    total, gs, _ = K.kd_forward(s, t, labels, torch.tensor([kept]), spec, True, False, meter, teacher_meter,
                                reduce=True)
    s64 = s.double().requires_grad_()
    ref = kd_objective(s64, t.double(), labels, 2.0, 0.5, kind=("kl", "reverse_kl", "jsd")[divergence],
                       t_squared=False)
    ref.backward()
    assert math.isclose(total.item(), ref.item(), rel_tol=1e-5)
    torch.testing.assert_close(gs.double(), s64.grad, rtol=1e-5, atol=1e-7)
    _check_meter(meter, _meter_reference(s, labels, 5))
    _check_meter(teacher_meter, _meter_reference(t, labels, 5))


class _RefusedLaunch:
    """Stands in for the split kernel: its launch raises ``error`` as Triton's launcher would."""

    def __init__(self, error):
        self.error = error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise self.error
        return launch


def _split_call(gen):
    n, c = 5, 60
    s, t = randn((n, c), gen), randn((n, c), gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    meter = fastkd.CalibrationMeter(6)
    meter._state_on(s.device)
    return s, t, labels, meter


def test_a_refused_cooperative_launch_falls_back(split_rows, monkeypatch, gen):
    """The driver refusing the split path's cooperative launch (too many blocks) sends the call, and
    later ones on that device, to the looping path: the same numbers, the meter counted once."""
    monkeypatch.setattr(L, "_SPLIT_REFUSED", set())
    monkeypatch.setattr(L, "_kd_split_kernel",
                        _RefusedLaunch(RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")))
    s, t, labels, meter = _split_call(gen)
    loss, gs, _ = K.kd_forward(s, t, labels, 5, spec_for(2.0, 1.0, 0.5), True, False, meter, None)
    row, ref_gs, _ = rows_reference(s, t, labels, 2.0, 1.0, 0.5)
    torch.testing.assert_close(loss.double(), row / 5, rtol=1e-5, atol=1e-6)
    assert rel_err(gs, ref_gs / 5) < 1e-5
    _check_meter(meter, _meter_reference(s, labels, 6))
    assert L._SPLIT_REFUSED == {s.device}


@pytest.mark.parametrize("failure", ["out-of-memory", "launch-error"])
def test_other_errors_of_the_split_path_propagate(split_rows, monkeypatch, failure, gen):
    """Issue 24: an out-of-memory error of the statistics buffer, or a launch failing for another reason
    than the cooperative grid, is the caller's error: raised, not taken for a refused launch (before,
    any RuntimeError sent the device to the looping path for the process, silently)."""
    monkeypatch.setattr(L, "_SPLIT_REFUSED", set())
    if failure == "out-of-memory":
        empty = torch.empty

        def failing_empty(*args, **kwargs):
            shape = args[0] if args else kwargs.get("size")
            if isinstance(shape, tuple) and len(shape) == 3 and shape[-1] == SP.NSTAT.value:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return empty(*args, **kwargs)

        monkeypatch.setattr(torch, "empty", failing_empty)
        expected = torch.OutOfMemoryError
    else:
        monkeypatch.setattr(L, "_kd_split_kernel",
                            _RefusedLaunch(RuntimeError("Triton Error [CUDA]: an illegal memory access was "
                                                        "encountered")))
        expected = RuntimeError
    s, t, labels, meter = _split_call(gen)
    with pytest.raises(expected) as raised:
        K.kd_forward(s, t, labels, 5, spec_for(2.0, 1.0, 0.5), True, False, meter, None)
    assert not isinstance(raised.value, L._SplitRefused)
    assert L._SPLIT_REFUSED == set()


@pytest.mark.parametrize("path", ["one-pass", "looping", "split"])
def test_large_logits_keep_their_digits(monkeypatch, path, gen):
    """Logits near 80 (at T = 1 the exponent offset m log2(e) is near 115): log-sum-exps,
    confidences and rescales are taken against the same rounded offset as the exponentials, so the
    loss keeps fp32's relative accuracy (an FMA-formed exponent leaves the top term off 1 by the
    offset's rounding; the interpreter has no FMA, a GPU does)."""
    from reference import kd_objective

    force_triton_path(monkeypatch, P, path)
    s, t = randn((5, 100), gen) + 80.0, randn((5, 100), gen) + 80.0
    labels = torch.randint(0, 100, (5,), generator=gen)
    meter = fastkd.CalibrationMeter(10)
    out = fastkd.kd_loss(s, t, labels, temperature=1.0, alpha=0.5, meter=meter, backend="triton")
    torch.testing.assert_close(out.double(), kd_objective(s.double(), t.double(), labels, 1.0, 0.5), rtol=1e-5,
                               atol=0)
    _check_meter(meter, _meter_reference(s, labels, 10))
