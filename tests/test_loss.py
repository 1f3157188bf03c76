"""kl_loss / kd_loss on both backends against float64 references written in tests/reference.py."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import BACKENDS
from reference import kd_objective

# dtype, (rtol, atol) of the gradients: the kernels compute in fp32, so the loss is fp32-exact for
# every input dtype; a gradient is written in the logits' dtype, so it carries that rounding.
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16"),
]
SHAPES = [
    pytest.param((1, 1), id="1x1"),
    pytest.param((3, 2), id="3x2"),
    pytest.param((41, 1271), id="41x1271"),
    pytest.param((2, 3, 37), id="BxTxV"),
    pytest.param((3, 9000), id="C-above-one-block"),
]


def randn(shape, gen, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def random_labels(shape, c, gen, ignore_every=None, ignore_index=-100):
    labels = torch.randint(0, c, shape, generator=gen)
    if ignore_every:
        labels.view(-1)[::ignore_every] = ignore_index
    return labels


def close(actual, expected, rtol, atol_scale=None, msg=""):
    """|a - e| <= rtol |e| + atol, atol relative to the largest magnitude of the reference."""
    expected = expected.detach().double()
    atol = (atol_scale if atol_scale is not None else rtol) * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol, msg=msg)


def grads_of(loss, inputs, upstream):
    return torch.autograd.grad(loss, inputs, upstream)


def check_against_reference(backend, s, t, labels, rtol_grad, teacher_grad=False, **kw):
    """Runs kd_loss and the float64 reference with one random upstream gradient; compares all."""
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_(teacher_grad)
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(teacher_grad)
    ref_kw = {k: v for k, v in kw.items() if k != "divergence"}
    ref = kd_objective(s64, t64, labels, kind=kw.get("divergence", "kl"), **ref_kw)
    out = fastkd.kd_loss(s, t, labels, backend=backend, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    close(out, ref, 1e-5, msg="loss")
    upstream = torch.rand(ref.shape, dtype=torch.float64, device=ref.device) + 0.5
    inputs = (s, t) if teacher_grad else (s,)
    got = grads_of(out, inputs, upstream.float())
    want = grads_of(ref, (s64, t64) if teacher_grad else (s64,), upstream)
    for g, w, name in zip(got, want, ("student", "teacher")):
        assert g.dtype == s.dtype and g.shape == s.shape
        close(g, w, rtol_grad, msg=f"{name} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_loss_equals_pytorch_recipe(backend, shape, gen):
    s, t = randn(shape, gen), randn(shape, gen)
    T = 2.5
    s_ = s.double().requires_grad_()
    c = shape[-1]
    ref = F.kl_div(F.log_softmax(s_.reshape(-1, c) / T, -1), F.softmax(t.double().reshape(-1, c) / T, -1),
                   reduction="batchmean")
    s.requires_grad_()
    out = fastkd.kl_loss(s, t, temperature=T, backend=backend)
    close(out, ref, 1e-5)
    close(torch.autograd.grad(out, s)[0], torch.autograd.grad(ref, s_)[0], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol_grad", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param((41, 1271), id="41x1271"), pytest.param((64, 10), id="64x10")])
def test_dtypes_with_ignore_index_and_teacher_grad(backend, dtype, rtol_grad, shape, gen):
    s, t = randn(shape, gen, dtype), randn(shape, gen, dtype)
    labels = random_labels(shape[:-1], shape[-1], gen, ignore_every=5)
    check_against_reference(backend, s, t, labels, rtol_grad, teacher_grad=True, temperature=4.0,
                            alpha=0.7)


@pytest.mark.parametrize("c", [1, 2, 10, 15, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_log_softmax_of_few_classes(c, dtype, gen):
    """Rows of fewer than 16 classes take max, exp, sum and log as separate ops on a CPU (the
    kernel's scalar path is slower): equal to float64 log_softmax, -inf kept, NaN where it is NaN."""
    from fastkd.backends.torch.math import log_softmax

    x = randn((7, c), gen, torch.float64)
    x[1, 0] = -torch.inf  # a masked class
    x[2] = -torch.inf  # every class masked: NaN, as torch's log_softmax
    x[3, -1] = torch.inf
    x[4, 0] = torch.nan
    want = x.log_softmax(-1)
    got = log_softmax(x.to(dtype)).double()
    torch.testing.assert_close(got, want, rtol=0, atol=4e-6 if dtype == torch.float32 else 1e-14, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got == -torch.inf, want == -torch.inf)


@pytest.mark.parametrize("ignore_index", [-100, 2, 6])
def test_rows_that_all_count_and_an_ignore_index_among_the_classes(ignore_index, gen):
    """The torch backend skips its per-row masks on a CPU when every row counts; an ignore_index
    that is also a class id (2), present in the labels or not (6 of 6 classes: never), must still
    drop its rows. Against the float64 reference, with the teacher's gradient and a meter."""
    s, t = randn((33, 6), gen), randn((33, 6), gen)
    labels = torch.randint(0, 6, (33,), generator=gen)
    labels[[0, 5, 32]] = 2
    check_against_reference("torch", s, t, labels, 1e-5, teacher_grad=True, temperature=2.0, alpha=0.6,
                            ignore_index=ignore_index)
    meter, reference = fastkd.CalibrationMeter(), fastkd.CalibrationMeter()
    fastkd.kd_loss(s, t, labels, alpha=0.6, ignore_index=ignore_index, meter=meter, backend="torch")
    reference.update(s, labels, ignore_index=ignore_index)
    assert meter.compute().count == reference.compute().count == int((labels != ignore_index).sum())
    torch.testing.assert_close(meter.state, reference.state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_divergences_and_reductions(backend, divergence, reduction, gen):
    shape = (2, 7, 33)
    s, t = randn(shape, gen), randn(shape, gen)
    labels = random_labels(shape[:-1], shape[-1], gen, ignore_every=4)
    check_against_reference(backend, s, t, labels, 1e-5, teacher_grad=True, temperature=3.0,
                            alpha=0.6, divergence=divergence, beta=0.3, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_temperatures(backend, temperature, gen):
    s, t = randn((9, 130), gen), randn((9, 130), gen)
    labels = random_labels((9,), 130, gen)
    check_against_reference(backend, s, t, labels, 1e-5, temperature=temperature, alpha=0.9)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
def test_triton_looping_path(monkeypatch, divergence, teacher_grad, gen):
    """Rows longer than the one-pass limit take the 2-3 sweep path; shrink the limit to test it
    on a row of several tiles with a ragged last tile."""
    from fastkd.backends.triton import plan

    monkeypatch.setattr(plan, "ONE_PASS_MAX", {v: {1: 64, 2: 64, 4: 64} for v in ("light", "heavy")})
    monkeypatch.setattr(plan, "LOOP_BLOCK_C", 32)
    shape = (5, 203)
    s, t = randn(shape, gen), randn(shape, gen)
    s[1, :40] = float("-inf")  # a first tile entirely masked: the online max starts at -inf
    t[1, :40] = float("-inf")
    labels = random_labels((5,), 203, gen)
    labels[1] = 100
    labels[3] = -100
    check_against_reference("triton", s, t, labels, 1e-5, teacher_grad=teacher_grad,
                            temperature=2.0, alpha=0.5, divergence=divergence, beta=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary_bf16(backend, gen):
    """A 128k vocabulary: the triton backend's looping path at its real tile size."""
    s, t = randn((3, 128256), gen, torch.bfloat16), randn((3, 128256), gen, torch.bfloat16)
    labels = torch.tensor([5, -100, 128255])
    check_against_reference(backend, s, t, labels, 1.6e-2, temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_minus_inf_is_finite(backend, gen):
    labels = random_labels((6,), 40, gen)
    for divergence in ("kl", "reverse_kl", "jsd"):
        s, t = randn((6, 50), gen), randn((6, 50), gen)
        s[:, 40:] = float("-inf")  # padded vocabulary, masked in both
        t[:, 40:] = float("-inf")
        # the reference side of the divergence may put zero mass where the other has some
        (s if divergence == "reverse_kl" else t)[2, :10] = float("-inf")
        labels[2] = 20
        check_against_reference(backend, s, t, labels, 1e-5, teacher_grad=True, temperature=2.0,
                                alpha=0.5, divergence=divergence)
        s.requires_grad_()
        out = fastkd.kd_loss(s, t, labels, divergence=divergence, backend=backend)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out(backend, gen):
    s, t = randn((4, 20), gen), randn((4, 20), gen)
    s[1, 3] = float("nan")
    out = fastkd.kd_loss(s, t, random_labels((4,), 20, gen), reduction="none", backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero(backend, gen):
    s, t = randn((5, 12), gen).requires_grad_(), randn((5, 12), gen)
    labels = torch.full((5,), -100)
    for reduction in ("batchmean", "mean", "sum"):
        out = fastkd.kd_loss(s, t, labels, reduction=reduction, backend=backend)
        (g,) = torch.autograd.grad(out, s)
        assert out.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    s = torch.zeros(0, 7, requires_grad=True)
    t = torch.zeros(0, 7)
    labels = torch.zeros(0, dtype=torch.long)
    out = fastkd.kd_loss(s, t, labels, backend=backend)
    assert out.item() == 0.0
    out.backward()
    assert s.grad.shape == (0, 7)
    assert fastkd.kd_loss(s, t, labels, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, gen):
    base_s, base_t = randn((12, 40), gen), randn((40, 12), gen)
    s, t = base_s[::2, ::2], base_t.t()[1::2, :20]  # strided rows and columns, transposed
    labels = random_labels((12,), 20, gen)[::2]  # strided labels too
    check_against_reference(backend, s, t, labels, 1e-5, teacher_grad=True, temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_and_teacher_dtypes_may_differ(backend, gen):
    s, t = randn((8, 100), gen, torch.bfloat16), randn((8, 100), gen, torch.float32)
    check_against_reference(backend, s, t, random_labels((8,), 100, gen), 1.6e-2, temperature=2.0,
                            alpha=0.8)


def test_gradcheck_float64_on_fallback(gen):
    s = randn((4, 9), gen, torch.float64, 1.0).requires_grad_()
    t = randn((4, 9), gen, torch.float64, 1.0).requires_grad_()
    labels = torch.tensor([1, -100, 8, 0])
    for divergence in ("kl", "reverse_kl", "jsd"):
        for reduction in ("batchmean", "none"):
            def f(a, b):
                return fastkd.kd_loss(a, b, labels, temperature=2.0, alpha=0.6, divergence=divergence,
                                      reduction=reduction, backend="torch")

            assert torch.autograd.gradcheck(f, (s, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_without_grad_and_no_labels(backend, gen):
    s, t = randn((7, 30), gen), randn((7, 30), gen)
    with torch.no_grad():
        out = fastkd.kd_loss(s, t, alpha=1.0, temperature=3.0, backend=backend)
    close(out, kd_objective(s, t, None, 3.0, 1.0), 1e-5)


def test_triton_backward_runs_once_fallback_runs_again(gen):
    s, t = randn((3, 5), gen).requires_grad_(), randn((3, 5), gen)
    out = fastkd.kl_loss(s, t, backend="torch")
    out.backward(retain_graph=True)
    first = s.grad.clone()
    out.backward()
    close(s.grad, 2 * first, 1e-6)
    out = fastkd.kl_loss(s, t, backend="triton")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        out.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_wrap_the_functions(backend, gen):
    s, t = randn((6, 11), gen), randn((6, 11), gen)
    labels = random_labels((6,), 11, gen)
    kd = fastkd.KDLoss(temperature=2.0, alpha=0.3, divergence="jsd", backend=backend)
    kl = fastkd.KLLoss(temperature=2.0, backend=backend)
    close(kd(s, t, labels), kd_objective(s, t, labels, 2.0, 0.3, "jsd"), 1e-5)
    close(kl(s, t), kd_objective(s, t, None, 2.0, 1.0, t_squared=False), 1e-5)


BAD_INPUTS = [
    pytest.param(dict(student_logits=[[1.0]]), TypeError, "student_logits", id="not-a-tensor"),
    pytest.param(dict(student_logits=torch.ones(2, 3, dtype=torch.long)), TypeError, "student_logits",
                 id="integer-logits"),
    pytest.param(dict(teacher_logits=torch.zeros(2, 4)), ValueError, "same shape", id="shape-mismatch"),
    pytest.param(dict(student_logits=torch.zeros(2, 0), teacher_logits=torch.zeros(2, 0)), ValueError,
                 "C >= 1", id="no-classes"),
    pytest.param(dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels must have shape",
                 id="labels-shape"),
    pytest.param(dict(labels=torch.zeros(2)), TypeError, "labels", id="labels-float"),
    pytest.param(dict(labels=torch.tensor([0, 3])), ValueError, r"labels must lie in \[0, 3\)",
                 id="label-too-large"),
    pytest.param(dict(labels=torch.tensor([0, -1])), ValueError, "labels must lie", id="label-negative"),
    pytest.param(dict(temperature=0.0), ValueError, "temperature", id="temperature-zero"),
    pytest.param(dict(temperature=-2.0), ValueError, "temperature", id="temperature-negative"),
    pytest.param(dict(temperature="4"), TypeError, "temperature", id="temperature-str"),
    pytest.param(dict(temperature=float("nan")), TypeError, "temperature", id="temperature-nan"),
    pytest.param(dict(alpha=1.5), ValueError, "alpha", id="alpha-above-1"),
    pytest.param(dict(alpha=-0.1), ValueError, "alpha", id="alpha-negative"),
    pytest.param(dict(reduction="avg"), ValueError, "reduction", id="reduction"),
    pytest.param(dict(divergence="tvd"), ValueError, "divergence", id="divergence"),
    pytest.param(dict(divergence="jsd", beta=1.0), ValueError, "beta", id="jsd-beta-1"),
    pytest.param(dict(backend="cuda-please"), ValueError, "backend", id="unknown-backend"),
    pytest.param(dict(labels=None), ValueError, "labels are required", id="alpha<1-without-labels"),
    pytest.param(dict(meter="yes"), TypeError, "meter", id="meter-type"),
    pytest.param(dict(labels=None, alpha=1.0, meter=fastkd.CalibrationMeter()), ValueError, "meter needs labels",
                 id="meter-without-labels"),
    pytest.param(dict(meter=fastkd.CalibrationMeter(10), teacher_meter=fastkd.CalibrationMeter(15)),
                 ValueError, "num_bins", id="meters-bins-differ"),
    pytest.param(dict(ignore_index=1.5), TypeError, "ignore_index", id="ignore-index-float"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("override,error,match", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(backend, override, error, match, monkeypatch):
    import fastkd.backends.torch as _torch_kd

    def never(*a, **k):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(_torch_kd, "kd_forward", never)
    if backend == "triton":
        import fastkd.backends.triton as _triton_kd

        monkeypatch.setattr(_triton_kd, "kd_forward", never)
    kw = dict(student_logits=torch.zeros(2, 3), teacher_logits=torch.zeros(2, 3),
              labels=torch.tensor([0, 2]), backend=backend)
    kw.update(override)
    with pytest.raises(error, match=match):
        fastkd.kd_loss(**kw)


def test_kl_loss_rejects_bad_temperature_and_reduction():
    with pytest.raises(ValueError, match="temperature"):
        fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="elementwise")


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CPU"):
        fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), backend="triton")
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    with pytest.raises(ValueError, match="FASTKD_BACKEND='triton' cannot run"):
        fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    monkeypatch.setenv("FASTKD_BACKEND", "auto")  # auto falls back to torch, which runs
    assert fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    monkeypatch.setenv("FASTKD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTKD_BACKEND must be one of"):
        fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_float64_needs_the_torch_backend():
    with pytest.raises(ValueError, match="float64"):
        fastkd.kl_loss(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
                       backend="triton")
    assert fastkd.kl_loss(torch.zeros(2, 3, dtype=torch.float64),
                          torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_available_backends_reports_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    info = {b.name: b for b in fastkd.available_backends("cpu")}
    assert info["torch"].available and not info["triton"].available and "CPU" in info["triton"].reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert {b.name: b for b in fastkd.available_backends("cpu")}["triton"].available


@pytest.mark.parametrize("version, usable", [("3.0.0", False), ("3.3.1", False), ("3.4.0", True),
                                             ("3.10.0+git1a2b", True)])
def test_triton_too_old_to_compile_the_kernels_is_not_used_on_cuda(monkeypatch, version, usable):
    """On CUDA a Triton older than 3.4 cannot compile the kernels (torch 2.4-2.7 pin 3.0-3.3): auto takes
    the torch backend, backend='triton' names the version; the interpreter (CPU) compiles nothing."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    cuda = torch.device("cuda")  # no GPU needed: only the dispatch is asked
    info = {b.name: b for b in fastkd.available_backends(cuda)}["triton"]
    assert info.available == usable
    assert fastkd.backends.resolve_name(None, cuda, (torch.float32,)) == ("triton" if usable else "torch")
    if not usable:
        assert info.reason == (f"triton {version} cannot compile the kernels (they need Triton >= 3.4, "
                               "as torch >= 2.8 has)")
        with pytest.raises(ValueError, match=rf"backend='triton' cannot run: triton {re.escape(version)} cannot"):
            fastkd.backends.resolve_name("triton", cuda, (torch.float32,))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastkd.backends.resolve_name(None, torch.device("cpu"), (torch.float32,)) == "triton"

def test_import_touches_no_gpu_and_not_triton():
    code = ("import sys, fastkd; assert 'triton' not in sys.modules, 'triton imported';"
            "import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_measured_launch_configurations_take_precedence(tmp_path, monkeypatch, gen):
    """bench/tools/tune_triton.py stores per-card configurations; the launcher uses them (and stays right)."""
    import json

    from fastkd.backends.triton import plan

    table = tmp_path / "configs.json"
    table.write_text(json.dumps({"": {"4:256:heavy": {"block_n": 1, "block_c": 64, "one_pass": False, "num_warps": 4}}}))
    monkeypatch.setattr(plan, "TUNED_CONFIGS", table)
    plan._tuned_configs.cache_clear()
    try:
        assert plan._launch_config(203, 4, "", heavy=True) == (1, 64, False, 4)
        assert plan._launch_config(203, 4, "", heavy=False)[2]  # the light variant: defaults
        s, t = randn((5, 203), gen), randn((5, 203), gen)
        check_against_reference("triton", s, t, random_labels((5,), 203, gen), 1e-5, teacher_grad=True,
                                temperature=2.0, alpha=0.5, divergence="jsd")
    finally:
        plan._tuned_configs.cache_clear()


def test_scalar_loss_is_summed_in_the_same_launch_across_calls(gen):
    """The triton backend adds the programs' partial sums in its last program and resets its
    ticket counter: successive calls with different numbers of programs all sum right."""
    for n in (1000, 37, 5000, 1):
        s, t = randn((n, 10), gen), randn((n, 10), gen)
        labels = random_labels((n,), 10, gen, ignore_every=3)
        for reduction in ("sum", "batchmean"):
            out = fastkd.kd_loss(s, t, labels, reduction=reduction, backend="triton")
            close(out, kd_objective(s, t, labels, 4.0, 0.9, reduction=reduction), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True, "float"], ids=["number", "tensor", "float-tensor-below-1"])
def test_num_items_divides_the_sum_inside_the_kernel(backend, as_tensor, gen, monkeypatch):
    """Gradient accumulation / DDP: the sum over rows divided by a caller's count, folded into the
    fused call, so that a plain backward() scales nothing (factor 1: no data moved). A floating tensor
    (TRL's num_items_in_batch / num_processes) below 1 is used as is."""
    s, t = randn((3, 5, 70), gen).requires_grad_(), randn((3, 5, 70), gen)
    labels = random_labels((3, 5), 70, gen, ignore_every=4)
    num_items = torch.tensor(0.5) if as_tensor == "float" else torch.tensor([37]) if as_tensor else 18.5
    factors = []
    impl = fastkd.backends.resolve(backend, s.device, (s.dtype,))
    real = impl.scale_grad
    monkeypatch.setattr(impl, "scale_grad", lambda g, f: factors.append(f.clone()) or real(g, f))
    out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.6, num_items=num_items, backend=backend)
    out.backward()
    n = float(num_items.item() if as_tensor else num_items)
    s64 = s.detach().double().requires_grad_()
    want = kd_objective(s64, t.double(), labels, 2.0, 0.6, reduction="sum") / n
    want.backward()
    close(out, want, 1e-5)
    close(s.grad, s64.grad, 1e-5)
    assert [float(f) for f in factors] == [1.0]


def test_num_items_bad_values_are_named():
    s = torch.randn(4, 5)
    for bad, error in ((0, ValueError), (-2.0, ValueError), (float("nan"), TypeError), ("4", TypeError),
                       (torch.tensor([True]), TypeError), (torch.tensor([1 + 1j]), TypeError),
                       (torch.tensor([1, 2]), TypeError), (torch.tensor([1.5, 2.0]), TypeError)):
        with pytest.raises(error, match="num_items"):
            fastkd.kd_loss(s, s, alpha=1.0, num_items=bad, backend="torch")
    with pytest.raises(ValueError, match="num_items"):
        fastkd.kl_loss(s, s, reduction="sum", num_items=3, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_token_views_are_read_in_place(backend, gen, monkeypatch):
    """logits[:, :-1] (a (B, T, V) view no reshape can flatten) reaches the Triton kernel without a
    copy; every backend gives the reference's numbers."""
    s_full, t_full = randn((3, 9, 130), gen), randn((3, 9, 130), gen)
    s = s_full.requires_grad_()[:, :-1]
    t = t_full[:, 1:]
    labels = random_labels((3, 8), 130, gen, ignore_every=5)
    seen = []
    impl = fastkd.backends.module(backend)
    real = impl.kd_forward
    monkeypatch.setattr(impl, "kd_forward", lambda x, y, *a, **k: seen.append((x, y)) or real(x, y, *a, **k))
    out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.6, backend=backend, validate_labels=False)
    out.backward()
    if backend == "triton":  # the very storage of the slices, no copy
        (x, y), = seen
        assert x.data_ptr() == s.data_ptr() and y.data_ptr() == t.data_ptr() and x.shape == s.shape
    s64 = s_full.detach().double().requires_grad_()
    kd_objective(s64[:, :-1], t.double(), labels, 2.0, 0.6).backward()
    close(out, kd_objective(s.detach().double(), t.double(), labels, 2.0, 0.6), 1e-5)
    close(s_full.grad, s64.grad, 1e-5)


def test_sliced_token_views_without_labels_divide_by_every_token(gen):
    """batchmean over a (B, T, V) view read in place divides by B·T rows, not B."""
    s, t = randn((3, 9, 40), gen)[:, :-1], randn((3, 9, 40), gen)[:, 1:]
    out = fastkd.kl_loss(s, t, temperature=2.0, backend="triton")
    close(out, kd_objective(s.double(), t.double(), None, 2.0, 1.0, t_squared=False), 1e-5)
