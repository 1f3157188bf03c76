"""Second derivatives are refused, never silently wrong. Every fastkd loss computes its gradient in the
forward pass; a backward with create_graph=True would return that gradient without a graph, so a
gradient penalty through it would add nothing to the second backward and gradgradcheck would report
a Jacobian mismatch. Each loss and backend must raise a RuntimeError that says so, both for
``autograd.grad(loss, s, create_graph=True)`` followed by a penalty's backward and for gradgradcheck;
a plain backward still works. The Triton kernels run under the interpreter, on small fp32 rows
(the triton backend refuses float64)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import BACKENDS
from test_fused_linear import make_side
from test_loss import randn
from test_sparse import top_k_teacher

REFUSED = "second derivatives are not supported"
N, C, H = 3, 7, 4
LOSSES = ["kl_loss", "kd_loss", "kd_loss-jsd-none", "sparse_kd_loss", "fused_linear_kd_loss",
          "fused_linear_sparse_kd_loss"]


def loss_fn(name, backend, gen, dtype):
    """(f, its differentiable input): f(x) is the loss of one fastkd entry point, x the student's
    logits (hidden states for the fused-linear losses)."""
    t = randn((N, C), gen, dtype)
    labels = torch.tensor([1, -100, 6])
    ids, lp, _ = top_k_teacher((N, C), 3, gen, dtype)
    _, w_s, _ = make_side(N, H, C, gen, dtype)
    h_t, w_t, _ = make_side(N, H, C, gen, dtype)
    fns = {
        "kl_loss": lambda s: fastkd.kl_loss(s, t, 2.0, backend=backend),
        "kd_loss": lambda s: fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, backend=backend),
        "kd_loss-jsd-none": lambda s: fastkd.kd_loss(s, t, labels, divergence="jsd", reduction="none",
                                                     backend=backend),
        "sparse_kd_loss": lambda s: fastkd.sparse_kd_loss(s, ids, lp, labels, temperature=2.0, backend=backend),
        "fused_linear_kd_loss": lambda h: fastkd.fused_linear_kd_loss(h, w_s, h_t, w_t, labels, chunk_size=2,
                                                                      backend=backend),
        "fused_linear_sparse_kd_loss": lambda h: fastkd.fused_linear_sparse_kd_loss(h, w_s, ids, lp, labels,
                                                                                    chunk_size=2, backend=backend),
    }
    x = randn((N, H) if name.startswith("fused_linear") else (N, C), gen, dtype).requires_grad_()
    return fns[name], x


def dtype_of(backend):
    return torch.float64 if backend == "torch" else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_gradient_penalty_is_refused(name, backend, gen):
    f, x = loss_fn(name, backend, gen, dtype_of(backend))
    (g,) = torch.autograd.grad(f(x).sum(), x)  # first derivatives work
    assert g.shape == x.shape and not g.requires_grad
    other = (x**2).sum()  # the penalty is added beside another term: its part must not vanish silently
    with pytest.raises(RuntimeError, match=REFUSED):
        (g2,) = torch.autograd.grad(f(x).sum() + other, x, create_graph=True)
        (g2.square().sum()).backward()
    x.grad = None
    f(x).sum().backward()  # and a plain backward still works afterwards
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_gradgradcheck_raises_the_refusal(name, backend, gen):
    f, x = loss_fn(name, backend, gen, dtype_of(backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradcheck warns about fp32 inputs (the triton backend)
        with pytest.raises(RuntimeError, match=REFUSED):
            torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gradient_penalty_is_refused(backend, gen):
    """Online distillation: the teacher's gradient is refused the same way."""
    dtype = dtype_of(backend)
    s, t = randn((N, C), gen, dtype).requires_grad_(), randn((N, C), gen, dtype).requires_grad_()
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(fastkd.kd_loss(s, t, alpha=1.0, backend=backend), t, create_graph=True)


def test_torch_compile_refuses_double_backward(gen, monkeypatch):
    """Under torch.compile the custom op's backward is traced into the compiled backward, which
    torch refuses to run with create_graph=True (its own message: double backward, or donated
    buffers needing create_graph=False); the op's own refusal is the eager one (next test)."""
    monkeypatch.undo()  # the NaN poison's fill_ would hit torch's own requires-grad placeholder first
    s, t = randn((N, C), gen, torch.float64).requires_grad_(), randn((N, C), gen, torch.float64)
    f = torch.compile(lambda a: fastkd.kd_loss(a, t, temperature=2.0, alpha=1.0, backend="torch"),
                      backend="aot_eager", fullgraph=True)
    (g,) = torch.autograd.grad(f(s), s)
    close_to = torch.autograd.grad(F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1),
                                            reduction="batchmean") * 4, s)[0]
    torch.testing.assert_close(g, close_to, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match=f"{REFUSED}|does not currently support double backward|create_graph=False"):
        (g2,) = torch.autograd.grad(f(s), s, create_graph=True)
        g2.square().sum().backward()


def test_custom_op_backward_refuses_when_run_eagerly(gen):
    """The op's registered backward itself (what runs when the op is called outside a compiled graph)."""
    from fastkd._dispatch import compiled as _ops
    from fastkd._core.spec import KDSpec

    s, t = randn((N, C), gen, torch.float64).requires_grad_(), randn((N, C), gen, torch.float64)
    loss = _ops.fused_kd(s, t, None, N, KDSpec(0.5, 1.0, 0.0, 0, 0.5, -100), True, "torch", None, None)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(loss, s, create_graph=True)
