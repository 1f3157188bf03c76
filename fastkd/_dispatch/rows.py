"""Row preparation: logits and labels as rows (N, ·), what the rows are divided by, and the rows
that count."""
from __future__ import annotations

import torch


def as_rows(x):
    """``x`` (..., C) as rows (N, C) with unit stride in C (a view where one can express it)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def pair_rows(s, t, in_place_3d: bool):
    """Student and teacher logits as (N, C) rows with unit stride in C, without a copy where a view
    can express them; two (B, T, C) views that no view can flatten stay 3-D when the backend reads
    them in place."""
    c = s.shape[-1]
    rows = []
    for x in (s, t):
        x = x if x.stride(-1) == 1 else x.contiguous()
        try:
            rows.append(x.view(-1, c))
        except RuntimeError:  # not expressible with one row stride
            rows.append(x if in_place_3d and x.dim() == 3 else x.reshape(-1, c))
    if rows[0].dim() != rows[1].dim():  # one of them is 3-D: hand both over as (B, T, C)
        rows = [x if x.dim() == 3 else x.view(s.shape) for x in rows]
    return rows


def label_rows(labels):
    """Labels (...) as contiguous int64 rows (N,), or None."""
    return labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None


def row_count(labels, options, n_rows):
    """What the rows are divided by: the caller's ``num_items``, 1 for "sum" / "none", else the rows
    that count — summed on the device when labels decide it (no host sync)."""
    if options.num_items is not None:
        return options.num_items
    if options.reduction not in ("batchmean", "mean"):
        return 1
    return (labels != options.ignore_index).sum().reshape(1) if labels is not None else n_rows


def counted_rows(labels, options, *tensors):
    """(labels, row tensors, row_count): the tensors flattened to rows (N, ·) and restricted to the
    rows not labelled ``ignore_index`` (only those are projected: differentiable gathers, whose
    backward puts zeros in the others; one host synchronisation, nothing copied when every row
    counts), and what the loss divides by."""
    rows = tuple(x.reshape(-1, x.shape[-1]) for x in tensors)
    lab = labels.reshape(-1).to(torch.int64) if labels is not None else None
    if lab is not None:
        keep = (lab != options.ignore_index).nonzero().squeeze(1)
        if keep.numel() != lab.numel():
            lab, rows = lab[keep], tuple(x.index_select(0, keep) for x in rows)
    rows = tuple(x.contiguous() for x in rows)
    return (lab.contiguous() if lab is not None else None), rows, row_count(None, options, rows[0].shape[0])
