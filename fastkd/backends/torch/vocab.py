"""The torch backend's kernels of the vocabulary-parallel executor (fastkd._dispatch.vocab_parallel):
local statistics, JSD partials and gradients of this rank's slice, in plain tensor ops."""
from __future__ import annotations

import torch

from ..._core.enums import Divergence
from ..._core.spec import KDSpec
from .math import finite, masked


def local_stats(s, t, spec: KDSpec, cd, need_s1=True, need_t1=True):
    """(N, 9) local statistics (the executor's M_S ... Q_T columns) and the first local argmaxes (N, 2)."""
    x, y = s.to(cd), t.to(cd)
    k = spec.inv_temperature
    m_s, i_s = x.max(1) if x.shape[0] else (x.new_empty(0), x.new_empty(0, dtype=torch.int64))
    m_t, i_t = y.max(1) if y.shape[0] else (y.new_empty(0), y.new_empty(0, dtype=torch.int64))
    e_a = torch.exp((x - finite(m_s)[:, None]) * k)
    e_b = torch.exp((y - finite(m_t)[:, None]) * k)
    if spec.divergence == Divergence.REVERSE_KL:
        w = masked(e_a, x * k - y * k).sum(1)
    elif spec.divergence == Divergence.KL:
        w = masked(e_b, y * k - x * k).sum(1)
    else:
        w = torch.zeros_like(m_s)
    e1_s = torch.exp(x - finite(m_s)[:, None])
    e1_t = torch.exp(y - finite(m_t)[:, None])
    st = torch.stack([m_s, m_t, e_a.sum(1), e_b.sum(1), w, e1_s.sum(1), (e1_s * e1_s).sum(1),
                      e1_t.sum(1), (e1_t * e1_t).sum(1)], 1)
    return st, torch.stack([i_s, i_t], 1)


def _logp(s, t, g, spec, cd):
    k = spec.inv_temperature
    return s.to(cd) * k - g.lse_a[:, None], t.to(cd) * k - g.lse_b[:, None]


def jsd_partials(s, t, g, spec, cd):
    """(N, 2): the local sums of JSD's two partial divergences against the global mixture."""
    la, lb = _logp(s, t, g, spec, cd)
    ps, pt = la.exp(), lb.exp()
    lm = torch.log(spec.beta * pt + (1 - spec.beta) * ps)
    return torch.stack([masked(pt, lb - lm).sum(1), masked(ps, la - lm).sum(1)], 1)


def grads(s, t, g, label_local, w_grad, spec, grad_s, grad_t, cd):
    """The gradients of the local slices from the global statistics ``g`` (those asked for)."""
    if not (grad_s or grad_t):
        return None, None
    la, lb = _logp(s, t, g, spec, cd)
    ps, pt = la.exp(), lb.exp()
    d = g.d[:, None]
    if spec.divergence == Divergence.KL:
        ga, gb = ps - pt, masked(pt, lb - la - d)
    elif spec.divergence == Divergence.REVERSE_KL:
        ga, gb = masked(ps, la - lb - d), pt - ps
    else:
        b = spec.beta
        lm = torch.log(b * pt + (1 - b) * ps)
        ga = (1 - b) * masked(ps, la - lm - g.d_s[:, None])
        gb = b * masked(pt, lb - lm - g.d_t[:, None])
    kd_g = spec.kd_scale * spec.inv_temperature
    w = w_grad[:, None]
    gs = gt = None
    if grad_s:
        out = kd_g * ga
        if spec.has_ce:
            p1 = torch.exp(s.to(cd) - g.lse1_s[:, None])
            owner = label_local >= 0
            out = out + spec.ce_scale * p1
            out = out.scatter_add(1, label_local.clamp(min=0)[:, None],
                                  (owner.to(cd) * -spec.ce_scale)[:, None])
        gs = torch.where(w != 0, out * w, 0.0).to(s.dtype)
    if grad_t:
        gt = torch.where(w != 0, kd_g * gb * w, 0.0).to(t.dtype)
    return gs, gt
