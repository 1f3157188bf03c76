"""kl_loss / kd_loss below the public signature: the tensors checked, the spec built, one run."""
from __future__ import annotations

import torch

from .._core import checks
from .._core.options import Options
from .._core.spec import build_spec
from .. import backends
from ..backends.torch import cpu_compile
from ..calibration import check_meters
from . import compiled, vocab_parallel
from .functions import FusedKD, autocast_off
from .rows import label_rows, pair_rows, row_count


def run(s, t, labels, options: Options, meter=None, teacher_meter=None):
    """The loss of student / teacher logits (..., C) on the backend the call resolves to, or on the
    vocabulary-parallel executor (group=, or DTensors sharded on the last dimension)."""
    compiling = torch.compiler.is_compiling()
    if options.group is not None or (not compiling and vocab_parallel.vocab_sharded_dtensor(s)):
        return vocab_parallel.dense(s, t, labels, options, meter, teacher_meter)
    checks.pair(s, t)
    c = s.shape[-1]
    if labels is not None:
        # under torch.compile the range check would sync the host: a label out of range gives a
        # NaN loss and NaN gradients for its row instead (as with validate_labels=False)
        checks.labels(labels, s.shape[:-1], c, options.ignore_index,
                      check_range=options.validate_labels and not compiling, device=s.device)
    checks.on_device(options.num_items, "num_items", s.device)
    check_meters(meter, teacher_meter, labels is not None, s.device)
    dtypes = (s.dtype, t.dtype)
    name = backends.resolve_name(options.backend, s.device, dtypes, "dense")
    spec = build_spec(options, c, dtypes)
    checks.transforms_on_backend(name, spec)

    # the Triton kernel reads (B, T, C) views such as logits[:, :-1] in place (two row strides)
    s2, t2 = pair_rows(s, t, in_place_3d=name == "triton" and not compiling)
    labels2 = label_rows(labels)
    count = row_count(labels2, options, s2.numel() // c)
    reduce = options.reduction != "none"
    with autocast_off(s.device.type):  # the kernels pick their own precision
        if compiling:
            loss = compiled.fused_kd(s2, t2, labels2, count, spec, reduce, name, meter, teacher_meter)
        else:
            # opt-in (FASTKD_CPU_COMPILE=1): the torch backend's chunks compiled, on CPU tensors only
            impl = cpu_compile if name == "torch" and cpu_compile.requested(s.device) else backends.load(name)
            loss = FusedKD.apply(s2, t2, labels2, count, spec, reduce, impl, meter, teacher_meter)
    return loss if reduce else loss.reshape(s.shape[:-1])
