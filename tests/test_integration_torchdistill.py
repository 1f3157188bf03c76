"""fastkd in torchdistill: ``FastKDLoss`` equals torchdistill's own ``KDLoss`` (its alpha = the CE weight,
beta = the KL weight, T^2 only with the CE term), and a criterion built by torchdistill from a YAML
config selects it by name and runs it. (That ``import fastkd`` does not import torchdistill is
checked in test_integration_trl.py, with TRL.)"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchdistill")

from torchdistill.common.main_util import import_dependencies  # noqa: E402
from torchdistill.common.yaml_util import load_yaml_file  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.losses.mid_level import KDLoss  # noqa: E402
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations.torchdistill import FastKDLoss  # noqa: E402

PATHS = dict(student_module_path=".", student_module_io="output", teacher_module_path=".", teacher_module_io="output")


def io(x):
    return {".": {"output": x}}


def test_registered_as_a_mid_level_loss_like_kdloss():
    assert MIDDLE_LEVEL_LOSS_DICT["FastKDLoss"] is FastKDLoss
    assert MIDDLE_LEVEL_LOSS_DICT["KDLoss"] is KDLoss


CASES = [  # temperature, alpha (CE weight), beta (KL weight), reduction, with targets
    pytest.param(4.0, 0.1, None, "batchmean", True, id="hinton-T4"),
    pytest.param(2.0, 0.3, 0.9, "sum", True, id="beta-given-sum"),
    pytest.param(3.0, 0.5, None, "mean", True, id="mean"),
    pytest.param(1.0, 1.0, None, "batchmean", True, id="ce-only"),
    pytest.param(4.0, 0.0, None, "batchmean", True, id="alpha0-kl-alone"),
    pytest.param(2.0, None, 1.0, "sum", True, id="alpha-none-kl-alone"),
    pytest.param(4.0, 0.5, None, "batchmean", False, id="no-targets-kl-alone"),
]


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # KLDivLoss's, about "mean"
@pytest.mark.parametrize("temperature, alpha, beta, reduction, with_targets", CASES)
@pytest.mark.parametrize("bins", [None, 15], ids=["plain", "meter"])
def test_equals_torchdistill_kdloss(gen, temperature, alpha, beta, reduction, with_targets, bins):
    n, c = 37, 101
    s = (2 * torch.randn(n, c, generator=gen)).requires_grad_()
    t = (2 * torch.randn(n, c, generator=gen)).requires_grad_()  # online distillation: the teacher learns too
    y = torch.randint(0, c, (n,), generator=gen) if with_targets else None
    g = torch.rand((), generator=gen) + 0.5
    kwargs = dict(PATHS, temperature=temperature, alpha=alpha, beta=beta, reduction=reduction)
    ref = KDLoss(**kwargs)(io(s), io(t), y)
    (ref_gs, ref_gt) = torch.autograd.grad(ref, (s, t), g)
    ours_module = FastKDLoss(**kwargs, calibration_bins=bins, backend="torch")
    ours = ours_module(io(s), io(t), y)
    gs, gt = torch.autograd.grad(ours, (s, t), g)
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-7)
    for ours_g, ref_g in ((gs, ref_gs), (gt, ref_gt)):  # fp32 rounding: relative to the largest entry
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-5, atol=1e-6 * ref_g.abs().max().item())
    if bins is not None and with_targets:
        assert ours_module.meter.compute().count == n and ours_module.teacher_meter.compute().count == n
        assert ours_module.meter.compute().ece == pytest.approx(
            fastkd.calibration_error(s.detach(), y, num_bins=bins).item(), abs=1e-6)


def test_refuses_what_it_would_compute_differently():
    with pytest.raises(ValueError, match="reduction"):
        FastKDLoss(**PATHS, temperature=2.0, alpha=0.5, reduction="none")
    with pytest.raises(TypeError, match="label_smoothing"):
        FastKDLoss(**PATHS, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        FastKDLoss(**PATHS, temperature=2.0, alpha=0.5, beta=-1.0)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        FastKDLoss(**PATHS, temperature=2.0, alpha=0.5)(io(x), io(x), torch.zeros(2, 3, dtype=torch.long))


CONFIG = """
dependencies:
  - name: fastkd.integrations.torchdistill
train:
  num_epochs: 1
  teacher:
    forward_proc: forward_batch_only
    requires_grad: False
  student:
    forward_proc: forward_batch_only
  optimizer:
    key: SGD
    kwargs: {{lr: 0.5}}
  criterion:
    key: WeightedSumLoss
    kwargs:
      sub_terms:
        kd:
          criterion:
            key: {key}
            kwargs:
              student_module_path: '.'
              student_module_io: output
              teacher_module_path: '.'
              teacher_module_io: output
              temperature: 4.0
              alpha: 0.5
              reduction: batchmean{extra}
          weight: 1.0
"""


def build_box(tmp_path, key, extra, teacher, student):
    """A DistillationBox as torchdistill's example scripts build it: YAML file, dependencies, box."""
    path = tmp_path / f"{key}.yaml"
    path.write_text(CONFIG.format(key=key, extra=extra))
    config = load_yaml_file(str(path))
    import_dependencies(config.get("dependencies"))
    return get_distillation_box(teacher, student, {}, config["train"], torch.device("cpu"), None, False, 1)


def test_yaml_config_selects_fastkd_and_trains_as_kdloss(tmp_path):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    x, y = torch.randn(24, 8), torch.randint(0, 10, (24,))
    ours = build_box(tmp_path, "FastKDLoss", "\n              calibration_bins: 10",
                     copy.deepcopy(teacher), copy.deepcopy(student))
    ref = build_box(tmp_path, "KDLoss", "", copy.deepcopy(teacher), copy.deepcopy(student))
    criterion, weight = ours.criterion.term_dict["kd"]
    assert isinstance(criterion, FastKDLoss) and weight == 1.0
    assert isinstance(ref.criterion.term_dict["kd"][0], KDLoss)
    with torch.no_grad():
        logits = student(x)
    expected = fastkd.CalibrationMeter(10)
    expected.update(logits, y)
    for step in range(2):  # torchdistill's own loop body: forward_process, then backward + SGD step
        losses = []
        for box in (ours, ref):
            box.pre_epoch_process(epoch=0)
            loss = box.forward_process(x, y)
            box.post_forward_process(loss)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=2e-6, atol=1e-7)
        if step == 0:  # what ran is fastkd's: its meter saw the untrained student's logits
            assert criterion.meter.compute().ece == pytest.approx(expected.compute().ece, abs=1e-6)
    for p, q in zip(ours.student_model.parameters(), ref.student_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert criterion.meter.compute().count == 2 * len(y) and criterion.teacher_meter.compute().count == 2 * len(y)
