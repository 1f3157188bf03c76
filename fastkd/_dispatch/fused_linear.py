"""The fused-linear losses below the public signature: autocast followed, weights gathered, the
tensors checked, the spec built (GEMM_PEAK: the fp16 gradient feeds the projections), one run."""
from __future__ import annotations

import torch

from .._core import checks
from .._core.options import Options
from .._core.spec import GEMM_PEAK, build_spec
from .. import backends
from ..calibration import check_meters
from . import gemm, vocab_parallel
from .functions import FusedLinearKD, autocast_off
from .rows import counted_rows


def _device_type(hidden):
    return hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"


def _check_labels(labels, hidden, n_classes, options: Options, check_range=True):
    checks.labels(labels, hidden.shape[:-1], n_classes, options.ignore_index, check_range=check_range,
                  device=hidden.device, whose="the hidden states'")


def run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        options: Options, meter=None, teacher_meter=None):
    """(loss, entropy sum) of a dense teacher's projection; column-parallel heads under group=."""
    if options.group is not None:
        return vocab_parallel.fused_linear(student_hidden, student_weight, student_bias, teacher_hidden,
                                           teacher_weight, teacher_bias, labels, options, meter, teacher_meter)
    device_type = _device_type(student_hidden)
    hs, ws, bs, ht, wt, bt = gemm.follow_autocast(device_type, student_hidden, gemm.full(student_weight),
                                                  gemm.full(student_bias), teacher_hidden,
                                                  gemm.full(teacher_weight), gemm.full(teacher_bias))
    with autocast_off(device_type):
        checks.linear(hs, ws, bs, "student")
        checks.linear(ht, wt, bt, "teacher")
        checks.same_rows(hs, ht)
        v_s = ws.shape[0]
        if labels is not None:
            _check_labels(labels, hs, v_s, options)
        checks.on_device(options.num_items, "num_items", hs.device)
        check_meters(meter, teacher_meter, labels is not None, hs.device)
        dtypes = (hs.dtype, ht.dtype)
        spec = build_spec(options, v_s, dtypes, GEMM_PEAK)
        name = backends.resolve_name(options.backend, hs.device, dtypes, "dense")
        checks.transforms_on_backend(name, spec)
        lab, (hs, ht), count = counted_rows(labels, options, hs, ht)
        chunk = options.chunk_size or gemm.default_chunk(hs.device, max(v_s, wt.shape[0]))
        return FusedLinearKD.apply(hs, ws, bs, ht, wt, bt, None, None, lab, count, spec, backends.load(name), chunk,
                                   None, (meter, teacher_meter), options.return_entropy)


def run_sparse(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, labels,
               options: Options, meter=None):
    """(loss, entropy sum) of the student's projection against a top-K teacher."""
    device_type = _device_type(student_hidden)
    hidden, weight, bias = gemm.follow_autocast(device_type, student_hidden, gemm.full(student_weight),
                                                gemm.full(student_bias))
    with autocast_off(device_type):
        checks.linear(hidden, weight, bias, "student")
        v = weight.shape[0]
        checks.teacher(teacher_ids, teacher_logprobs, hidden.shape[:-1], v, hidden.device, options.validate_labels)
        if labels is not None:
            _check_labels(labels, hidden, v, options, check_range=options.validate_labels)
        checks.on_device(options.num_items, "num_items", hidden.device)
        check_meters(meter, None, labels is not None, hidden.device)
        impl = backends.resolve(options.backend, hidden.device, (hidden.dtype,), "sparse")
        lab, (hs, ids, lp), count = counted_rows(labels, options, hidden, teacher_ids.to(torch.int64),
                                                 teacher_logprobs)
        spec = build_spec(options, v, (hidden.dtype,), GEMM_PEAK)
        chunk = options.chunk_size or gemm.default_chunk(hs.device, v)
        return FusedLinearKD.apply(hs, weight, bias, None, None, None, ids, lp, lab, count, spec, impl, chunk,
                                   int(options.tail), (meter, None), options.return_entropy)
