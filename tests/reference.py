"""Float64 references, written from the formulas, independent of fastkd's code."""
import math

import torch


def _plogq(p, logp, logq):
    """sum p (log p - log q) with 0 log 0 = 0, and no NaN gradients from masked (-inf) classes."""
    on = p > 0
    return (p * (torch.where(on, logp, 0.0) - torch.where(on, logq, 0.0))).sum(-1)


def divergence(s, t, temperature, kind="kl", beta=0.5):
    """Per-row divergence between softmax(t/T) and softmax(s/T), float64."""
    ls = torch.log_softmax(s.double() / temperature, -1)
    lt = torch.log_softmax(t.double() / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "kl":
        return _plogq(pt, lt, ls)
    if kind == "reverse_kl":
        return _plogq(ps, ls, lt)
    m = beta * pt + (1 - beta) * ps
    lm = torch.log(torch.where(m > 0, m, 1.0))  # classes with m = 0 are masked by _plogq
    return beta * _plogq(pt, lt, lm) + (1 - beta) * _plogq(ps, ls, lm)


def kd_objective(s, t, labels, temperature, alpha, kind="kl", beta=0.5, ignore_index=-100,
                 reduction="batchmean", t_squared=True):
    """alpha T^2 D + (1 - alpha) CE per row, reduced; rows labelled ignore_index dropped."""
    c = s.shape[-1]
    s2, t2 = s.reshape(-1, c), t.reshape(-1, c)
    d = divergence(s2, t2, temperature, kind, beta) * (temperature**2 if t_squared else 1.0)
    return _with_ce_reduced(s, alpha * d, labels, alpha, ignore_index, reduction)


def _with_ce_reduced(s, row, labels, alpha, ignore_index, reduction):
    """Rows of alpha T^2 D plus (1 - alpha) CE, ignored rows dropped, reduced."""
    c = s.shape[-1]
    s2 = s.reshape(-1, c)
    if reduction == "mean":
        row = row / c
    keep = torch.ones(s2.shape[0], dtype=torch.bool, device=s2.device)
    if labels is not None:
        lab = labels.reshape(-1)
        keep = lab != ignore_index
        if alpha < 1:
            ce = -torch.log_softmax(s2.double(), -1).gather(1, torch.where(keep, lab, 0)[:, None])[:, 0]
            row = row + (1 - alpha) * ce
    row = torch.where(keep, row, 0.0)
    if reduction == "none":
        return row.reshape(s.shape[:-1])
    if reduction == "sum":
        return row.sum()
    return row.sum() / max(int(keep.sum()), 1)


def sparse_divergence(s, ids, logprobs, temperature, tail="bucket", teacher_temperature=1.0):
    """Per-row KL of a top-K teacher, float64, built densely from its definition. The listed
    log-probabilities, computed at ``teacher_temperature``, are tempered to ``temperature`` as
    q^r, r = teacher_temperature / temperature. The missing mass m = 1 - sum q: "bucket", spread
    evenly over the unlisted classes, each tempered the same way, then summed into one tail;
    "lumped", one extra class m^r; "renormalize", dropped. The student's full softmax, its
    unlisted mass summed the same way. With every class listed there is no tail."""
    n, v = s.shape
    r = teacher_temperature / temperature
    ps = torch.softmax(s.double() / temperature, -1)
    listed = torch.zeros(n, v, dtype=torch.bool)
    q = torch.zeros(n, v, dtype=torch.float64)
    for row in range(n):
        for i, lp in zip(ids[row].tolist(), logprobs[row].double().tolist()):
            if i >= 0:
                listed[row, i] = True
                q[row, i] = math.exp(lp)
    out = []
    for row in range(n):
        if not listed[row].any():
            out.append(s.new_zeros((), dtype=torch.float64))
            continue
        weights = torch.where(listed[row], q[row] ** r, 0.0)
        free = int((~listed[row]).sum())
        missing = max(1.0 - float(q[row].sum()), 0.0)
        tail_weight = 0.0
        if free and missing > 0:
            if tail == "bucket":
                tail_weight = free * (missing / free) ** r
            elif tail == "lumped":
                tail_weight = missing**r
        total = weights.sum() + tail_weight
        p = weights / total
        d = (p[listed[row]] * (p[listed[row]].log() - ps[row][listed[row]].log())).sum()
        p_tail, ps_tail = tail_weight / total, ps[row][~listed[row]].sum()
        if p_tail > 0:
            d = d + p_tail * (p_tail.log() - ps_tail.log())
        out.append(d)
    return torch.stack(out)


def sparse_kd_objective(s, ids, logprobs, labels, temperature, alpha, tail="bucket", ignore_index=-100,
                        reduction="batchmean", teacher_temperature=1.0):
    """alpha T^2 D_sparse + (1 - alpha) CE per row, reduced as kd_objective does."""
    k = ids.shape[-1]
    d = sparse_divergence(s.reshape(-1, s.shape[-1]), ids.reshape(-1, k), logprobs.reshape(-1, k), temperature, tail,
                          teacher_temperature)
    return _with_ce_reduced(s, alpha * temperature**2 * d, labels, alpha, ignore_index, reduction)
