"""The real kernels on a GPU (triton and, when built, the CUDA C++ extension) against float64
references; skipped without CUDA. Run on a lent GPU with bench/gpu_check.sh."""
import pytest
import torch

import fastkd
from reference import kd_objective
from test_calibration import ignore_rows_near_bin_edges
from test_loss import DTYPES, check_against_reference, close, randn, random_labels
from test_training_setups import assert_fp16_gradient_close, reference_grad

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
def _gpu_backend(name):
    """A backend parameter, skipped with the reason when it cannot run on this GPU."""
    why = "" if not torch.cuda.is_available() else \
        {b.name: b.reason for b in fastkd.available_backends("cuda")}[name]
    return pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason=why))


GPU_BACKENDS = [_gpu_backend("triton"), _gpu_backend("cuda")]
SHAPES = [(4096, 10), (1024, 1000), (41, 1271), (64, 32000), (8, 128256)]


def on_gpu(*tensors):
    return [x.cuda() for x in tensors]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,rtol_grad", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_values_and_gradients(backend, dtype, rtol_grad, shape, gen):
    s, t = on_gpu(randn(shape, gen, dtype), randn(shape, gen, dtype))
    (labels,) = on_gpu(random_labels(shape[:-1], shape[-1], gen, ignore_every=7))
    check_against_reference(backend, s, t, labels, rtol_grad, teacher_grad=True, temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_divergences_and_reductions(backend, divergence, reduction, gen):
    s, t = on_gpu(randn((3, 7, 2000), gen), randn((3, 7, 2000), gen))
    s[0, 0, :100] = float("-inf")
    t[0, 0, :100] = float("-inf")
    (labels,) = on_gpu(random_labels((3, 7), 2000, gen, ignore_every=4))
    labels[0, 0] = 500
    check_against_reference(backend, s, t, labels, 1e-5, teacher_grad=True, temperature=3.0, alpha=0.6,
                            divergence=divergence, beta=0.3, reduction=reduction)


@pytest.mark.parametrize("backend", [_gpu_backend("triton")])  # the cuda backend refuses the transforms
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("shape,dtype,rtol_grad", [
    pytest.param((4096, 10), torch.float32, 1e-5, id="4096x10"),
    pytest.param((1024, 1000), torch.float32, 1e-5, id="1024x1000"),
    pytest.param((64, 32000), torch.bfloat16, 1.6e-2, id="64x32000-bf16"),
    pytest.param((8, 128256), torch.bfloat16, 1.6e-2, id="8x128256-bf16")])
def test_logit_transforms_compiled(backend, divergence, shape, dtype, rtol_grad, gen):
    """Logit scales and softcaps of both models in the compiled kernels (ex2/rcp.approx in the tanh):
    one-pass, split-row (KL, reverse KL) and looping (JSD) paths, against the float64 reference."""
    from test_logit_transforms import check
    from test_logit_transforms import randn as wide_randn

    s, t = on_gpu(wide_randn(shape, gen, dtype, 20.0), wide_randn(shape, gen, dtype, 20.0))
    (labels,) = on_gpu(random_labels(shape[:-1], shape[-1], gen, ignore_every=7))
    check(backend, s, t, labels, (1.3, 0.7, 30.0, 20.0), 1e-5, rtol_grad, temperature=2.0, alpha=0.6,
          divergence=divergence)


@pytest.mark.parametrize("backend", [_gpu_backend("triton")])
@pytest.mark.parametrize("shape", [(64, 4000), (16, 32000)], ids=["one-pass", "looping"])
def test_sparse_student_transforms_compiled(backend, shape, gen):
    from reference import sparse_kd_objective
    from test_logit_transforms import transform

    s = randn(shape, gen, scale=10.0).cuda().requires_grad_()
    lp, ids = torch.log_softmax(randn(shape, gen), -1).topk(8, -1)
    labels = random_labels(shape[:1], shape[1], gen, ignore_every=5)
    out = fastkd.sparse_kd_loss(s, ids.cuda(), lp.cuda(), labels.cuda(), temperature=2.0, alpha=0.7,
                                backend=backend, student_logit_scale=0.8, student_softcap=15.0)
    s64 = s.detach().cpu().double().requires_grad_()
    want = sparse_kd_objective(transform(s64, 0.8, 15.0), ids, lp, labels, 2.0, 0.7)
    close(out.cpu(), want, 1e-5)
    close(torch.autograd.grad(out, s)[0].cpu(), torch.autograd.grad(want, s64)[0], 1e-5)


@pytest.mark.parametrize("backend", [_gpu_backend("triton")])
@pytest.mark.parametrize("shape", [(64, 4000), (16, 32000)], ids=["one-pass", "looping"])
@pytest.mark.parametrize("tail,teacher_temperature", [("bucket", 0.5), ("lumped", 1.0), ("lumped", 2.0),
                                                      ("renormalize", 3.0)])
def test_sparse_tails_and_teacher_temperatures_compiled(backend, shape, tail, teacher_temperature, gen):
    """The TAIL constexpr's three codes and the runtime power, compiled (T = 2: r = 0.25 to 1.5)."""
    from reference import sparse_kd_objective

    s = randn(shape, gen).cuda().requires_grad_()
    lp, ids = torch.log_softmax(randn(shape, gen) / teacher_temperature, -1).topk(8, -1)
    labels = random_labels(shape[:1], shape[1], gen, ignore_every=5)
    kw = dict(tail=tail, teacher_temperature=teacher_temperature)
    out = fastkd.sparse_kd_loss(s, ids.cuda(), lp.cuda(), labels.cuda(), temperature=2.0, alpha=0.7,
                                backend=backend, **kw)
    s64 = s.detach().cpu().double().requires_grad_()
    want = sparse_kd_objective(s64, ids, lp, labels, 2.0, 0.7, **kw)
    close(out.cpu(), want, 1e-5)
    close(torch.autograd.grad(out, s)[0].cpu(), torch.autograd.grad(want, s64)[0], 1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_dtypes_noncontiguous_zero_rows_nan(backend, gen):
    s, t = on_gpu(randn((16, 600), gen, torch.bfloat16), randn((600, 16), gen, torch.float32))
    (labels,) = on_gpu(random_labels((16,), 300, gen))
    check_against_reference(backend, s[:, ::2], t.t()[:, 1::2], labels, 1.6e-2, temperature=2.0, alpha=0.8)
    empty = torch.zeros(0, 5, device="cuda", requires_grad=True)
    out = fastkd.kd_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.long, device="cuda"), backend=backend)
    out.backward()
    assert out.item() == 0.0
    x = randn((4, 20), gen).cuda()
    x[1, 3] = float("nan")
    rows = fastkd.kd_loss(x, x + 1, alpha=1.0, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(5000, 10), (300, 3000)], ids=["5000x10", "300x3000"])
def test_meters_inside_the_kernel_equal_update(backend, shape, gen):
    s, t = on_gpu(randn(shape, gen), randn(shape, gen))
    (labels,) = on_gpu(ignore_rows_near_bin_edges(random_labels(shape[:1], shape[1], gen, ignore_every=9),
                                                  s.cpu(), t.cpu()))
    inside, teacher_inside = fastkd.CalibrationMeter(), fastkd.CalibrationMeter()
    fastkd.kd_loss(s, t, labels, meter=inside, teacher_meter=teacher_inside, backend=backend)
    for meter, logits in ((inside, s), (teacher_inside, t)):
        a, b = meter.compute(), fastkd.CalibrationMeter().update(logits, labels).compute()
        assert [x.count for x in a.bins] == [x.count for x in b.bins]
        for key in ("ece", "mce", "accuracy", "nll", "brier"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_scales_by_grad_output_without_sync(backend, gen):
    s = randn((64, 500), gen).cuda().requires_grad_()
    t = randn((64, 500), gen).cuda()
    out = fastkd.kd_loss(s, t, alpha=1.0, backend=backend)
    out.backward(torch.tensor(3.0, device="cuda"))
    s64 = s.detach().double().requires_grad_()
    (kd_objective(s64, t.double(), None, 4.0, 1.0) * 3).backward()
    close(s.grad, s64.grad, 1e-5)


# --- the training set-ups of issue 18, on the device (CPU versions in tests/test_training_setups.py) ---

@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("upstream", [65536.0, 1024.0, 2.0**-10], ids=["2^16", "2^10", "2^-10"])
@pytest.mark.parametrize("shape", [(2048, 4000), (64, 128256)], ids=["2048x4000", "64x128256"])
def test_fp16_gradient_survives_a_loss_scale(backend, upstream, shape, gen):
    s, t = on_gpu(randn(shape, gen, torch.float16), randn(shape, gen, torch.float16))
    (labels,) = on_gpu(random_labels(shape[:1], shape[1], gen, ignore_every=4))
    s.requires_grad_()
    kw = dict(temperature=2.0, alpha=0.5)
    fastkd.kd_loss(s, t, labels, backend=backend, **kw).backward(torch.tensor(upstream, device="cuda"))
    want = reference_grad(s.cpu(), t.cpu(), labels.cpu(), upstream, **kw)
    assert_fp16_gradient_close(s.grad.cpu(), want)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grad_scaler_and_fp16_autocast(backend, gen):
    x, t = on_gpu(randn((512, 64), gen, scale=1.0), randn((512, 3000), gen, torch.float16))
    (labels,) = on_gpu(random_labels((512,), 3000, gen, ignore_every=5))
    weight = torch.nn.Parameter(randn((3000, 64), gen, scale=0.5).cuda())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    opt = torch.optim.SGD([weight], lr=0.1)
    with torch.autocast("cuda", dtype=torch.float16):
        logits = torch.nn.functional.linear(x, weight)
        loss = fastkd.kd_loss(logits, t, labels, temperature=2.0, alpha=0.7, backend=backend)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    assert torch.isfinite(weight.grad).all()
    g_logits = reference_grad(logits.detach().cpu(), t.cpu(), labels.cpu(), 1.0, temperature=2.0, alpha=0.7)
    want = g_logits.t() @ x.cpu().half().double()
    assert (weight.grad.cpu().double() - want).norm() / want.norm() <= 2e-3


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_linear_follows_autocast(backend, dtype, gen):
    h_s, h_t = on_gpu(randn((4, 33, 64), gen, dtype, 1.0), randn((4, 33, 96), gen, dtype, 1.0))
    w_s = randn((5000, 64), gen, scale=0.2).cuda().requires_grad_()
    (w_t,) = on_gpu(randn((5000, 96), gen, scale=0.2))
    (labels,) = on_gpu(random_labels((4, 33), 5000, gen, ignore_every=4))
    with torch.autocast("cuda", dtype=dtype):
        out = fastkd.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0, alpha=0.5, backend=backend)
    out.backward()
    cast_w = w_s.detach().to(dtype).requires_grad_()
    want = fastkd.fused_linear_kd_loss(h_s, cast_w, h_t, w_t.to(dtype), labels, temperature=2.0, alpha=0.5,
                                       backend=backend)
    want.backward()
    assert w_s.grad.dtype == torch.float32
    close(out, want, 1e-6)
    close(w_s.grad, cast_w.grad.float(), 1e-6)


def _compiled_step(model, x, t, labels, meter, backend):
    s = model(x)
    return fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.7, meter=meter, backend=backend) \
        + fastkd.kl_loss(s, t, temperature=3.0, backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_equals_eager(backend, gen):
    torch._dynamo.reset()
    x, t = on_gpu(randn((256, 32), gen), randn((256, 1000), gen))
    (labels,) = on_gpu(random_labels((256,), 1000, gen, ignore_every=5))
    models = [torch.nn.Linear(32, 1000).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    step = torch.compile(_compiled_step, fullgraph=True)
    results = []
    for model, fn in zip(models, (_compiled_step, step)):
        meter = fastkd.CalibrationMeter()
        loss = fn(model, x, t, labels, meter, backend)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()], meter.state))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m1, m0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graphs_replayed_concurrently_on_two_streams(backend, gen):
    """Two captured steps (reduction="sum", forward and backward) replayed 1000 times on two
    streams at once: each owns its reduction state, so every replay equals eager."""
    inputs = [on_gpu(randn((512, 1000), gen), randn((512, 1000), gen)) for _ in range(2)]
    eager = []
    for s, t in inputs:
        s_ = s.clone().requires_grad_()
        out = fastkd.kl_loss(s_, t, temperature=2.0, reduction="sum", backend=backend)
        out.backward()
        eager.append((out.detach(), s_.grad))
    graphs, outs, statics = [], [], []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) outside capture
        for s, t in inputs:
            fastkd.kl_loss(s.clone().requires_grad_(), t, temperature=2.0, reduction="sum", backend=backend).backward()
    torch.cuda.current_stream().wait_stream(side)
    for s, t in inputs:
        s_ = s.clone().requires_grad_()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fastkd.kl_loss(s_, t, temperature=2.0, reduction="sum", backend=backend)
            out.backward()
        graphs.append(g)
        outs.append(out)
        statics.append(s_)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    record = torch.empty(2, 1000, device="cuda")
    for st in streams:
        st.wait_stream(torch.cuda.current_stream())
    for i in range(1000):
        for k, st in enumerate(streams):
            with torch.cuda.stream(st):
                graphs[k].replay()
                record[k, i].copy_(outs[k])
    for st in streams:
        torch.cuda.current_stream().wait_stream(st)
    torch.cuda.synchronize()
    for k in range(2):
        assert (record[k] == eager[k][0]).all(), f"graph {k}: {record[k].unique()} vs {eager[k][0]}"
        torch.testing.assert_close(statics[k].grad, eager[k][1])
    # and eager calls after the graphs still sum right (the shared counter was not left dirty)
    s, t = inputs[0]
    assert fastkd.kl_loss(s, t, temperature=2.0, reduction="sum", backend=backend) == eager[0][0]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensors_on_another_device_than_the_current_one(backend, gen):
    s, t = randn((300, 1000), gen).to("cuda:1").requires_grad_(), randn((300, 1000), gen).to("cuda:1")
    labels = random_labels((300,), 1000, gen, ignore_every=7).to("cuda:1")
    meter = fastkd.CalibrationMeter()
    with torch.cuda.device(0):
        out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, meter=meter, backend=backend)
        out.backward(torch.tensor(2.0, device="cuda:1"))
    torch.cuda.synchronize(1)
    assert meter.state.device == torch.device("cuda:1")
    close(out, kd_objective(s.detach().cpu().double(), t.cpu().double(), labels.cpu(), 2.0, 0.5), 1e-5)
    close(s.grad.cpu(), reference_grad(s.detach().cpu(), t.cpu(), labels.cpu(), 2.0, temperature=2.0, alpha=0.5),
          1e-5)
    assert meter.compute().count == int((labels != -100).sum())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_edge_rows_and_unchecked_bad_labels(backend, gen):
    s, t = on_gpu(randn((9, 3000), gen), randn((9, 3000), gen))
    s[1] = float("-inf")
    t[2] = float("-inf")
    s[4, 5] = float("nan")
    labels = torch.tensor([3, 4, 5, 6, 7, -100, 3000, -3, 10**12], device="cuda")
    inside, teacher_inside = fastkd.CalibrationMeter(), fastkd.CalibrationMeter()
    s.requires_grad_()
    rows = fastkd.kd_loss(s, t, labels, alpha=0.5, reduction="none", meter=inside, teacher_meter=teacher_inside,
                          backend=backend, validate_labels=False)
    rows.sum().backward()
    torch.cuda.synchronize()
    assert rows[6:].isnan().all() and s.grad[6:].isnan().all() and rows[5] == 0
    in_range = labels.clone()
    in_range[6:] = 0  # a row's bin depends on its confidence only
    for meter, logits in ((inside, s), (teacher_inside, t)):
        got = meter.compute()
        want = fastkd.CalibrationMeter().update(logits.detach(), in_range).compute()
        assert got.count == want.count == 8  # every labelled row, the -inf and NaN rows in the last bin
        assert [b.count for b in got.bins] == [b.count for b in want.bins]
        assert got.nll != got.nll  # the bad rows' NaN shows


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_bins_launch_or_are_refused_clearly(backend, gen):
    s, t = on_gpu(randn((2000, 100), gen), randn((2000, 100), gen))
    (labels,) = on_gpu(random_labels((2000,), 100, gen))
    inside, teacher_inside = fastkd.CalibrationMeter(2000), fastkd.CalibrationMeter(2000)
    try:
        fastkd.kd_loss(s, t, labels, meter=inside, teacher_meter=teacher_inside, backend=backend)
    except ValueError as e:
        assert "num_bins" in str(e)
        return
    for meter, logits in ((inside, s), (teacher_inside, t)):
        want = fastkd.CalibrationMeter(2000).update(logits, labels).compute()
        assert meter.compute().count == want.count == 2000
        assert meter.compute().ece == pytest.approx(want.ece, rel=1e-4, abs=1e-6)


# issue 24, CUDA backend

def _num_bins_for_smem(smem_bytes, n_meters):
    """The most bins whose meters fit in smem_bytes of the cuda backend's dynamic shared memory
    (kernels/launch_limits.h, meter_smem_bytes: n_meters * 4 bytes * (3 * (num_bins + 1) + 2))."""
    return (smem_bytes // (4 * n_meters) - 2) // 3 - 1


@pytest.mark.parametrize("backend", [_gpu_backend("cuda")])
@pytest.mark.parametrize("n_meters", [1, 2], ids=["student-meter", "both-meters"])  # the light and the heavy kernel
def test_mixed_dynamic_shared_memory_sizes_in_one_process(backend, n_meters, gen):
    """Item 4: one kernel launched with 60 KB, then 50 KB, then 60 KB of histograms (above the
    default 48 KB: each needs the opt-in attribute, one value per kernel). Remembered per size, the
    50 KB call lowered it and the second 60 KB call failed to launch."""
    shape = (300, 3000)
    s, t = on_gpu(randn(shape, gen), randn(shape, gen))
    for kb in (60, 50, 60):
        num_bins = _num_bins_for_smem(kb * 1024, n_meters)
        assert 48 * 1024 < 4 * n_meters * (3 * (num_bins + 1) + 2) <= kb * 1024
        labels = ignore_rows_near_bin_edges(random_labels(shape[:1], shape[1], gen, ignore_every=9), s.cpu(),
                                            t.cpu(), num_bins=num_bins).cuda()
        meters = [fastkd.CalibrationMeter(num_bins) for _ in range(n_meters)]
        out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, meter=meters[0],
                             teacher_meter=meters[1] if n_meters == 2 else None, backend=backend)
        close(out, kd_objective(s.double(), t.double(), labels, 2.0, 0.5), 1e-5, msg=f"{kb} KB")
        for meter, logits in zip(meters, (s, t)):
            want = fastkd.CalibrationMeter(num_bins).update(logits, labels).compute()
            got = meter.compute()
            assert [b.count for b in got.bins] == [b.count for b in want.bins], f"{kb} KB"
            assert got.ece == pytest.approx(want.ece, rel=1e-4, abs=1e-6), f"{kb} KB"
    torch.cuda.synchronize()


SM80_BUILD_ON_A_CLUSTER_GPU = r"""
import sys

sys.modules["fastkd._C"] = None  # this checkout's JIT build for the arch list, never an installed one
import torch

import fastkd
from fastkd.backends.cuda import build as _cuda_build
from test_loss import check_against_reference, close, randn, random_labels

_cuda_build.load()
gen = torch.Generator().manual_seed(24)
if sys.argv[1] == "8.0":  # sm_80 SASS only: no code an sm_90 can run
    s = randn((4, 32000), gen).cuda()
    try:
        fastkd.kl_loss(s, s + 1, backend="cuda")
        raise AssertionError("an sm_80-only build ran on " + torch.cuda.get_device_name())
    except RuntimeError as e:
        assert "no kernel image" in str(e), e
    assert torch.ones(8, device="cuda").add(1).sum().item() == 16  # the context still works
else:  # sm_80 SASS and compute_80 PTX, which the driver compiles for this GPU: no cluster code in it
    for shape, dtype, rtol in (((64, 32000), torch.float32, 1e-5), ((1, 128256), torch.bfloat16, 1.6e-2),
                               ((8, 128256), torch.bfloat16, 1.6e-2)):  # rows an sm_90 build runs as clusters
        s, t = randn(shape, gen, dtype).cuda(), randn(shape, gen, dtype).cuda()
        labels = random_labels(shape[:1], shape[1], gen, ignore_every=5).cuda()
        # the heavy build (teacher gradient) and the light one (kl_loss, student gradient)
        check_against_reference("cuda", s, t, labels, rtol, teacher_grad=True, temperature=2.0, alpha=0.5)
        check_against_reference("cuda", s, t, None, rtol, temperature=1.0, alpha=1.0)
        for kw in (dict(temperature=2.0, alpha=0.5), dict(temperature=1.0, alpha=1.0)):
            got, want = (fastkd.kd_loss(s, t, labels, backend=b, **kw) for b in ("cuda", "torch"))
            close(got, want, 1e-5, msg=f"{shape} {kw} against the torch backend")
    torch.cuda.synchronize()  # a trapped cluster barrier would surface here
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a GPU with thread-block clusters (sm_90 or later)")
@pytest.mark.parametrize("arch_list", ["8.0+PTX", "8.0"])
def test_sm80_build_on_a_cluster_gpu(arch_list, tmp_path):
    """Item 3: the extension built for sm_80 only (TORCH_CUDA_ARCH_LIST, JIT-built into a temporary
    directory, one build per case: a minute or two) on an sm_90 GPU, in a subprocess (a trapped
    kernel leaves its context unusable). With +PTX the driver compiles compute_80 PTX, whose
    cluster code is compiled out: rows that an sm_90 build runs as clusters must take the looping
    kernel, and match float64 and the torch backend; the launcher used to pick clusters from the
    device and trap. Without PTX, no code can run here: a clear error, and the context still works."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import is_ninja_available

    from fastkd.backends.cuda import build as _cuda_build

    if _cuda_build.toolkit_root() is None or not is_ninja_available():
        pytest.skip("needs a CUDA toolkit and ninja to build the extension")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch_list, TORCH_EXTENSIONS_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")]))
    done = subprocess.run([sys.executable, "-c", SM80_BUILD_ON_A_CLUSTER_GPU, arch_list], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-5000:]
    build = next(tmp_path.rglob("build.ninja")).read_text()
    assert "arch=compute_80,code=sm_80" in build and "sm_90" not in build and "compute_90" not in build


# issue 24, numerics

def _f64_grads(fn, inputs, upstream):
    """Loss and gradients of ``fn`` in float64 on the CPU: the reference the CUDA results are held to."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, upstream.cpu().double())


def test_float64_on_cuda_torch_backend_with_random_grad_output(gen):
    """float64 in, float64 arithmetic out on CUDA tensors (the torch backend): the loss and the
    gradients with a random upstream (scalar and per row) at rtol 1e-12 against the CPU's float64
    autograd; gradcheck at its default tolerances behind a factor != 1."""
    s, t = (randn((9, 301), gen, torch.float64).cuda().requires_grad_() for _ in range(2))
    labels = random_labels((9,), 301, gen, ignore_every=4).cuda()
    for reduction in ("batchmean", "none"):
        upstream = (torch.rand(9 if reduction == "none" else (), generator=gen, dtype=torch.float64) + 0.5).cuda()
        out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, reduction=reduction, backend="torch")
        got = torch.autograd.grad(out, (s, t), upstream)
        ref, want = _f64_grads(lambda a, b: kd_objective(a, b, labels.cpu(), 2.0, 0.3, reduction=reduction),
                               (s, t), upstream)
        assert out.dtype == torch.float64 and all(g.dtype == torch.float64 for g in got)
        close(out.cpu(), ref, 1e-12)
        for g, w in zip(got, want):
            close(g.cpu(), w, 1e-12)
    small_s, small_t = (randn((3, 6), gen, torch.float64, 1.0).cuda().requires_grad_() for _ in range(2))
    small_labels = torch.tensor([1, -100, 5], device="cuda")
    factor = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).cuda()
    assert torch.autograd.gradcheck(lambda a, b: factor @ fastkd.kd_loss(
        a, b, small_labels, temperature=2.0, alpha=0.3, divergence="jsd", reduction="none", backend="torch"),
        (small_s, small_t))
    assert torch.autograd.gradcheck(lambda a, b: 1.37 * fastkd.kl_loss(a, b, 2.0, backend="torch"),
                                    (small_s, small_t))


@pytest.mark.parametrize("loss", ["kl_loss", "kd_loss"])
@pytest.mark.parametrize("shape,dtype", [((1, 1000), torch.float32), ((1, 1, 32000), torch.float32),
                                         ((1, 1, 32000), torch.bfloat16)], ids=["1x1000", "1x1x32000", "1x1x32000-bf16"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_one_row_backward_on_triton(loss, shape, dtype, reduction, gen):
    """A batch of one row (the last batch of an epoch, a (1, 1, V) LM batch): the compiled backward
    (scale_grad with n_rows == 1, specialised to a constant by Triton), against float64."""
    if not any(b.name == "triton" and b.available for b in fastkd.available_backends("cuda")):
        pytest.skip("triton cannot run here")
    s, t = randn(shape, gen, dtype).cuda().requires_grad_(), randn(shape, gen, dtype).cuda()
    labels = random_labels(shape[:-1], shape[-1], gen).cuda()
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    if loss == "kl_loss":
        out = fastkd.kl_loss(s, t, 2.0, reduction, backend="triton")
        ref, (want,) = _f64_grads(lambda a: kd_objective(a, t.cpu().double(), None, 2.0, 1.0, reduction=reduction,
                                                         t_squared=False), (s,), upstream)
    else:
        out = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.6, reduction=reduction, backend="triton")
        ref, (want,) = _f64_grads(lambda a: kd_objective(a, t.cpu().double(), labels.cpu(), 2.0, 0.6,
                                                         reduction=reduction), (s,), upstream)
    (got,) = torch.autograd.grad(out, s, upstream.float().cuda())
    torch.cuda.synchronize()
    close(out.cpu(), ref, 1e-5)
    assert got.dtype == dtype
    close(got.cpu(), want, 1e-5 if dtype == torch.float32 else 1.6e-2)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_double_backward_is_refused_on_the_device(backend, gen):
    """The compiled kernels' losses refuse a second derivative (a gradient penalty, gradgradcheck)
    with the clear RuntimeError, instead of returning a gradient without a graph."""
    import warnings

    s, t = randn((4, 300), gen).cuda().requires_grad_(), randn((4, 300), gen).cuda()
    labels = torch.tensor([1, -100, 7, 299], device="cuda")
    ids = t.log_softmax(-1).topk(5, -1).indices
    lp = t.log_softmax(-1).gather(-1, ids)
    h_s, w_s, h_t, w_t = (randn(shape, gen).cuda() for shape in ((4, 16), (300, 16), (4, 16), (300, 16)))
    h_s.requires_grad_()
    fns = {"kl_loss": (lambda x: fastkd.kl_loss(x, t, 2.0, backend=backend), s),
           "kd_loss": (lambda x: fastkd.kd_loss(x, t, labels, backend=backend), s)}
    if backend == "triton":  # the cuda backend has no sparse kernel
        fns["sparse_kd_loss"] = (lambda x: fastkd.sparse_kd_loss(x, ids, lp, labels, backend=backend), s)
    fns["fused_linear_kd_loss"] = (lambda x: fastkd.fused_linear_kd_loss(x, w_s, h_t, w_t, labels, backend=backend),
                                   h_s)
    for name, (f, x) in fns.items():
        with pytest.raises(RuntimeError, match="second derivatives are not supported"):
            (g,) = torch.autograd.grad(f(x), x, create_graph=True)
            g.square().sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gradcheck's warning about fp32 inputs
            with pytest.raises(RuntimeError, match="second derivatives are not supported"):
                torch.autograd.gradgradcheck(f, (x,))
        (g,) = torch.autograd.grad(f(x), x)  # first derivatives still work
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("pair", ["close", "random"])
def test_bf16_fused_linear_logits_in_fp32_on_the_device(backend, pair, gen):
    """64 x 256 x 4000 bf16 (alpha = 1, T = 1): each chunk's logits written in fp32 by the GEMM
    (torch.mm's out_dtype), so the loss is fp32-exact against float64 on the same bf16 operands
    (3e-3 with the logits rounded to bf16 when the student is close to its teacher); the gradients
    through bf16 GEMMs, returned in bf16."""
    from fastkd._dispatch import gemm as fused_linear

    if not hasattr(torch.ops.aten.mm, "dtype"):
        pytest.skip("torch.mm has no out_dtype in this torch (< 2.8): the chunk's logits are rounded")
    from test_fused_linear import bf16_linear_pair

    n, h, v = 64, 256, 4000
    h_s, w_s, h_t, w_t, labels = (x.cuda() for x in bf16_linear_pair(pair, gen, n, h, v))
    leaves = [x.requires_grad_() for x in (h_s, w_s)]
    out = fastkd.fused_linear_kd_loss(*leaves, h_t, w_t, labels, temperature=1.0, alpha=1.0, chunk_size=24,
                                      backend=backend)
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    got = torch.autograd.grad(out, leaves, upstream.float().cuda())
    t64 = h_t.cpu().double() @ w_t.cpu().double().t()
    ref, want = _f64_grads(lambda a, b: kd_objective(a @ b.t(), t64, labels.cpu(), 1.0, 1.0), leaves, upstream)
    assert fused_linear._FP32_GEMM.get("cuda") is True  # the fp32-output GEMM ran, not the fallback
    close(out.cpu(), ref, 1e-6)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        close(g.cpu(), w, 6e-3)


# issue 24, Triton launcher

def test_split_rows_with_a_meter_beyond_the_packing_limit(monkeypatch, gen):
    """The split-row path with a student meter and more rows per group than a program's packed counters
    hold (item 2): one SM's worth of groups, so 4100 rows of 16384 bf16 columns (4 parts a row) are
    4100 rows per group; loss, gradient and every bin count equal the torch backend's."""
    from fastkd._core.spec import KDSpec
    from fastkd.backends.triton import launch as K, plan as P

    monkeypatch.setattr(K, "_sm_count", lambda device: 1)
    shape = (4100, 16384)
    s, t = on_gpu(randn(shape, gen, torch.bfloat16), randn(shape, gen, torch.bfloat16))
    (labels,) = on_gpu(random_labels(shape[:1], shape[1], gen, ignore_every=9))
    plan = P._plan(shape[0], shape[1], s.dtype, t.dtype, KDSpec(0.5, 4.0, 0.5, 0, 0.5, -100), True, False, True,
                   True, False, True, sms=1)
    assert plan["path"] == "split-row" and plan["ints"]["rows_per_group"] >= 4096
    results = {}
    for backend in ("triton", "torch"):
        x = s.detach().clone().requires_grad_()
        meter = fastkd.CalibrationMeter()
        loss = fastkd.kd_loss(x, t, labels, temperature=2.0, alpha=0.5, meter=meter, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), x.grad.float(), meter.compute())
    (l_tr, g_tr, m_tr), (l_to, g_to, m_to) = results["triton"], results["torch"]
    close(l_tr, l_to, 1e-5)
    close(g_tr, g_to, 1.6e-2)
    assert [b.count for b in m_tr.bins] == [b.count for b in m_to.bins]
    assert m_tr.accuracy == pytest.approx(m_to.accuracy, abs=1e-12)
