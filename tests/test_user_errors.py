"""What a user trips on (issue 27, items 4 and 8): a misplaced tensor named, 0-d tensor scalars taken as
numbers, modules that check their arguments when built, KLLoss (KLDivLoss deprecated: it is not
torch.nn.KLDivLoss), labels on another device named before any host read, and no Dynamo or numpy
warnings in the user's script."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd._core.options import Options


def tensors(gen, n=5, c=7):
    s = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    return s.float(), t.float(), torch.randint(0, c, (n,), generator=gen)


def tempered_kl(s, t, temperature, reduction="batchmean"):
    """KL(p_t || p_s) of the tempered softmaxes in float64, reduced as F.kl_div."""
    s, t = s.double() / temperature, t.double() / temperature
    rows = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    return {"batchmean": rows.mean(), "sum": rows.sum(), "mean": rows.sum() / s.numel(), "none": rows}[reduction]


# --- kl_loss's positional arguments ------------------------------------------------------------------

def test_labels_in_the_temperature_place_are_named(gen):
    s, t, labels = tensors(gen)
    with pytest.raises(TypeError, match=r"temperature must be a finite real number, got a Tensor of shape \(5,\) "
                                        r"\(labels go in labels=\.\.\.\)"):
        fastkd.kl_loss(s, t, labels)
    with pytest.raises(TypeError, match=r"reduction must be one of .*, got a Tensor \(labels go in labels=\.\.\.\)"):
        fastkd.kl_loss(s, t, 2.0, labels)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_positional_temperature_and_reduction_as_f_kl_div(reduction, gen):
    s, t, _ = tensors(gen, n=1)  # one row
    s.requires_grad_()
    loss = fastkd.kl_loss(s, t, 3.0, reduction, backend="torch")
    s64 = s.detach().double().requires_grad_()
    ref = tempered_kl(s64, t, 3.0, reduction)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    g = torch.rand(loss.shape, generator=gen)
    loss.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)


# --- 0-d tensors are numbers; other tensors are refused, naming the argument --------------------------

def test_0d_tensor_scalars_are_numbers(gen):
    s, t, labels = tensors(gen)
    assert torch.equal(fastkd.kl_loss(s, t, torch.tensor(2.5)), fastkd.kl_loss(s, t, 2.5))
    assert torch.equal(fastkd.kl_loss(s, t, torch.tensor(2, dtype=torch.int64)), fastkd.kl_loss(s, t, 2.0))
    kw = dict(temperature=3.0, alpha=0.25, divergence="jsd", beta=0.75)
    as_tensors = {k: torch.tensor(v) if isinstance(v, float) else v for k, v in kw.items()}
    assert torch.equal(fastkd.kd_loss(s, t, labels, **as_tensors), fastkd.kd_loss(s, t, labels, **kw))
    assert torch.equal(fastkd.KDLoss(**as_tensors)(s, t, labels), fastkd.kd_loss(s, t, labels, **kw))
    assert fastkd.KLLoss(torch.tensor(2.0)).options.temperature == 2.0


@pytest.mark.parametrize("value, message", [
    pytest.param(torch.tensor([2.0]), r"temperature must be a finite real number, got a Tensor of shape \(1,\)",
                 id="one-element"),
    pytest.param(torch.tensor(2.0, requires_grad=True), "temperature gets no gradient", id="requires-grad"),
    pytest.param(torch.tensor(2.0, device="meta"), r"0-d tensor on meta .*float\(temperature\)",
                 id="off-the-cpu"),  # (meta: any device but the CPU, as a GPU)
    pytest.param(torch.tensor(True), "temperature must be a finite real number, got a torch.bool tensor", id="bool"),
])
def test_other_tensor_scalars_are_refused_naming_them(value, message, gen):
    s, t, labels = tensors(gen)
    for call in (lambda: fastkd.kl_loss(s, t, value), lambda: fastkd.kd_loss(s, t, labels, temperature=value),
                 lambda: fastkd.KDLoss(temperature=value)):
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(ValueError, match="temperature must lie in"):
        fastkd.kl_loss(s, t, torch.tensor(0.0))


# --- modules check at construction ------------------------------------------------------------------

MODULES = {"KLLoss": fastkd.KLLoss, "KDLoss": fastkd.KDLoss, "SparseKDLoss": fastkd.SparseKDLoss,
           "FusedLinearKDLoss": fastkd.FusedLinearKDLoss, "FusedLinearSparseKDLoss": fastkd.FusedLinearSparseKDLoss}
BAD = [("KDLoss", dict(temperature=0), ValueError, "temperature"),
       ("KDLoss", dict(alpha=1.5), ValueError, "alpha"),
       ("KDLoss", dict(divergence="kl2"), ValueError, "divergence"),
       ("KLLoss", dict(reduction="avg"), ValueError, "reduction"),
       ("KLLoss", dict(backend="tpu"), ValueError, "backend"),
       ("SparseKDLoss", dict(tail="drop"), ValueError, "tail"),
       ("FusedLinearKDLoss", dict(chunk_size=0), ValueError, "chunk_size"),
       ("FusedLinearKDLoss", dict(reduction="none"), ValueError, "reduction"),
       ("FusedLinearSparseKDLoss", dict(tail="drop"), ValueError, "tail"),
       ("FusedLinearSparseKDLoss", dict(teacher_temperature=-1.0), ValueError, "teacher_temperature"),
       ("FusedLinearSparseKDLoss", dict(reduction="none"), ValueError, "reduction"),
       ("KDLoss", dict(student_softcap=-1.0), ValueError, "student_softcap")]


@pytest.mark.parametrize("name, kwargs, error, argument", [pytest.param(*b, id=f"{b[0]}-{next(iter(b[1]))}")
                                                           for b in BAD])
def test_modules_refuse_bad_arguments_when_built(name, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        MODULES[name](**kwargs)


def test_module_arguments_are_checked_once_and_again_when_assigned(gen, monkeypatch):
    s, t, labels = tensors(gen)
    before = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, backend="torch")
    module = fastkd.KDLoss(temperature=2.0, alpha=0.5, backend="torch")

    def never(*args, **kwargs):
        raise AssertionError("forward checked the scalars again")

    with monkeypatch.context() as patch:
        patch.setattr(Options, "build", never)
        assert torch.equal(module(s, t, labels), before)  # forward built no Options
    with pytest.raises(ValueError, match="temperature"):
        module.temperature = 0.0
    assert module.temperature == 2.0 and torch.equal(module(s, t, labels), before)  # nothing changed
    module.temperature = 4.0  # a schedule: the next call uses it
    assert module.temperature == 4.0
    assert torch.equal(module(s, t, labels), fastkd.kd_loss(s, t, labels, temperature=4.0, alpha=0.5,
                                                            backend="torch"))
    with pytest.raises(ValueError, match="labels are required"):
        module(s, t)


def test_an_assigned_temperature_reaches_a_compiled_module(gen):
    """The checked options are read by forward: torch.compile guards on them, so a schedule that assigns
    the temperature between steps is not frozen into the graph."""
    s, t, labels = tensors(gen)
    criterion = fastkd.KDLoss(temperature=2.0, alpha=0.5, backend="torch")
    step = torch.compile(lambda a, b, y: criterion(a, b, y), backend="eager", fullgraph=True)
    for temperature in (2.0, 4.0):
        criterion.temperature = temperature
        expected = fastkd.kd_loss(s, t, labels, temperature=temperature, alpha=0.5, backend="torch")
        torch.testing.assert_close(step(s, t, labels), expected, rtol=0, atol=0)


# --- KLLoss, and KLDivLoss deprecated -----------------------------------------------------------------

def test_kldivloss_warns_naming_kl_loss_and_the_input_difference(gen):
    s, t, _ = tensors(gen)
    with pytest.warns(DeprecationWarning, match=r"use fastkd\.KLLoss.*logits.*torch\.nn\.KLDivLoss") as record:
        old = fastkd.KLDivLoss(2.0, "sum", -100, "torch")  # its old positional signature still works
    assert record[0].filename == __file__  # the warning points at the user's line
    assert isinstance(old, fastkd.KLLoss) and "KLLoss" in fastkd.__all__
    assert torch.equal(old(s, t), fastkd.KLLoss(2.0, "sum", backend="torch")(s, t))
    torch.testing.assert_close(old(s, t).double(), tempered_kl(s, t, 2.0, "sum"), rtol=1e-5, atol=1e-6)


def test_kl_loss_is_not_nn_kldivloss(gen):
    """KLLoss takes logits; torch.nn.KLDivLoss log-probabilities and probabilities: the same T = 1 numbers
    from each one's own inputs, so a user can see which one is which."""
    s, t, _ = tensors(gen)
    ours = fastkd.KLLoss(backend="torch")(s, t)
    theirs = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s, -1), F.softmax(t, -1))
    torch.testing.assert_close(ours, theirs)
    assert "torch.nn.KLDivLoss" in fastkd.KLLoss.__doc__


# --- labels on another device -------------------------------------------------------------------------

def test_labels_on_another_device_are_named_before_they_are_read(gen):
    """meta stands for another device: reading a meta tensor on the host raises, as the range check did."""
    s, t, labels = tensors(gen)
    far = labels.to("meta")
    ids, lp = t.log_softmax(-1).topk(3)[1], t.log_softmax(-1).topk(3)[0]
    h, w = torch.randn(5, 4, generator=gen), torch.randn(7, 4, generator=gen)
    calls = [lambda: fastkd.kd_loss(s, t, far), lambda: fastkd.kl_loss(s, t, labels=far),
             lambda: fastkd.KDLoss()(s, t, far), lambda: fastkd.sparse_kd_loss(s, ids, lp, far),
             lambda: fastkd.fused_linear_kd_loss(h, w, h, w, far)]
    for call in calls:
        with pytest.raises(ValueError, match=r"labels \(meta\) must be on the .* device \(cpu\)"):
            call()


# --- no warnings in the user's script -----------------------------------------------------------------

def test_torch_compile_gives_no_lru_cache_warning(gen):
    s, t, labels = tensors(gen)
    s.requires_grad_()
    compiled = torch.compile(lambda a, b, y: fastkd.kd_loss(a, b, y, temperature=2.0), backend="eager",
                             fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = compiled(s, t, labels)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(loss, fastkd.kd_loss(s, t, labels, temperature=2.0))


def test_interpreted_kernels_give_no_numpy_warnings(gen):
    """Padding lanes (a row of 7 classes in a tile of 8, a one-row batch) compute on -inf under the
    interpreter; its numpy warnings stay inside the launch (the suite's filter is not the user's)."""
    s, t, labels = tensors(gen, n=1)
    s.requires_grad_()
    meter = fastkd.CalibrationMeter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastkd.kd_loss(s, t, labels, backend="triton", meter=meter).backward(torch.tensor(0.5))
        fastkd.kl_loss(s, t, 2.0, backend="triton")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
