"""sparse_kd_loss below the public signature: the tensors checked, the spec built, one run."""
from __future__ import annotations

import torch

from .._core import checks
from .._core.options import Options
from .._core.spec import build_spec
from .. import backends
from ..calibration import check_meters
from . import vocab_parallel
from .functions import SparseKD, autocast_off
from .rows import as_rows, label_rows, row_count


def run(s, teacher_ids, teacher_logprobs, labels, options: Options, meter=None):
    """The loss of student logits (..., V) against a top-K teacher (..., K) on the backend the call
    resolves to, or on the vocabulary-parallel executor."""
    if options.group is not None or (not torch.compiler.is_compiling() and vocab_parallel.vocab_sharded_dtensor(s)):
        return vocab_parallel.sparse(s, teacher_ids, teacher_logprobs, labels, options, meter)
    checks.logits(s, "student_logits")
    c = s.shape[-1]
    checks.teacher(teacher_ids, teacher_logprobs, s.shape[:-1], c, s.device, options.validate_labels)
    if labels is not None:
        checks.labels(labels, s.shape[:-1], c, options.ignore_index, check_range=options.validate_labels,
                      device=s.device)
    checks.on_device(options.num_items, "num_items", s.device)
    check_meters(meter, None, labels is not None, s.device)
    impl = backends.resolve(options.backend, s.device, (s.dtype, teacher_logprobs.dtype), "sparse")

    k = teacher_ids.shape[-1]
    s2 = as_rows(s)
    labels2 = label_rows(labels)
    spec = build_spec(options, c, (s.dtype,))
    reduce = options.reduction != "none"
    with autocast_off(s.device.type):
        loss = SparseKD.apply(s2, teacher_ids.reshape(-1, k).to(torch.int64).contiguous(),
                              teacher_logprobs.reshape(-1, k).contiguous(), labels2,
                              row_count(labels2, options, s2.shape[0]), spec, int(options.tail), reduce, impl, meter)
    return loss if reduce else loss.reshape(s.shape[:-1])
