"""The real kernels on a GPU (triton and, when built, the CUDA C++ extension) against float64
references; skipped without CUDA. Run on a lent GPU with bench/gpu_check.sh."""
import pytest
import torch

import fastkd
from reference import kd_objective
from test_calibration import ignore_rows_near_bin_edges
from test_loss import DTYPES, check_against_reference, close, randn, random_labels

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
