"""The autograd Functions of the eager path: each computes the loss and its gradients in the forward
(one backend call), and its backward only scales the saved gradients by grad_output (and by the row
scale the forward left to it, KDSpec.grad_unit)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .._core.spec import backward_factor, wide
from . import gemm


def autocast_off(device_type: str):
    """Autocast off for the loss (its backends pick their own precision): ``torch.autocast(...,
    enabled=False)`` where autocast is on or a trace may turn it on, else nothing (entering it costs
    as much as a small op, paid in every call)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def refuse_second_derivative(loss_name):
    """The backward of every fastkd loss scales a gradient computed in the forward, which carries no
    graph of its own: a backward with create_graph=True (a gradient penalty, gradgradcheck, a
    Hessian-vector product, MAML) would return a first derivative whose own derivative is silently
    0. Refused instead, at that backward. (``once_differentiable`` alone refuses only when the
    upstream gradient requires grad, not for ``autograd.grad(loss, s, create_graph=True)``.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastkd {loss_name}: second derivatives are not supported (backward ran with create_graph=True). "
            "Its gradient is computed in the forward pass and carries no graph, so a gradient penalty or any "
            "double backward through this loss would be silently wrong. Compute the term you differentiate "
            "twice with plain PyTorch ops (e.g. F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1))), or "
            "call backward without create_graph=True.")


def scaled_grads(ctx, grad_output):
    """The backward of the fused losses: the forward's gradients (ctx.grads) times grad_output
    (and the row scale left to the backward, ctx.factor)."""
    if ctx.grads is None:
        raise RuntimeError("fastkd's triton and cuda backends scale the saved gradient in place, so "
                           "a graph can be back-propagated once per forward; use backend='torch' "
                           "to call backward again on the same graph")
    grads = ctx.grads
    if ctx.impl.INPLACE_BACKWARD:
        ctx.grads = None
    # grad_output is the loss's dtype: fp32, or float64 for float64 logits (kept: float64 in,
    # float64 arithmetic out)
    factor = grad_output.detach().to(wide(grad_output.dtype))
    if ctx.factor is not None:
        factor = factor * ctx.factor
    return tuple(ctx.impl.scale_grad(g, factor) if g is not None else None for g in grads)


def _save(ctx, impl, grads, row_count, spec, *dtypes):
    """What the backward needs: the backend (its scale_grad), the forward's gradients and the factor."""
    ctx.impl, ctx.grads = impl, grads
    ctx.factor = backward_factor(row_count, spec, wide(*dtypes))


def _backward(ctx, grad_output, loss_name, n_inputs):
    """The scaled gradients of the first inputs, None for the other ones (``n_inputs`` in all)."""
    refuse_second_derivative(loss_name)
    grads = scaled_grads(ctx, grad_output)
    return grads + (None,) * (n_inputs - len(grads))


class FusedKD(torch.autograd.Function):
    """kl_loss / kd_loss: ``impl`` is the backend (or the vocabulary-parallel executor)."""

    @staticmethod
    def forward(ctx, s, t, labels, row_count, spec, reduce, impl, meter, teacher_meter):
        loss, gs, gt = impl.kd_forward(s, t, labels, row_count, spec, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1], meter, teacher_meter,
                                       reduce=reduce)  # rows come scaled by 1/count
        _save(ctx, impl, (gs, gt), row_count, spec, s.dtype, t.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output, "kl_loss / kd_loss", 9)


class SparseKD(torch.autograd.Function):
    """sparse_kd_loss: ``impl`` is the backend (or the vocabulary-parallel executor): its
    sparse_kd_forward runs the forward, its scale_grad the backward."""

    @staticmethod
    def forward(ctx, s, teacher_ids, teacher_logprobs, labels, row_count, spec, tail, reduce, impl, meter):
        loss, gs = impl.sparse_kd_forward(s, teacher_ids, teacher_logprobs, labels, row_count, spec, tail,
                                          ctx.needs_input_grad[0], meter, reduce=reduce)
        _save(ctx, impl, (gs,), row_count, spec, s.dtype, teacher_logprobs.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output, "sparse_kd_loss", 10)


def _times(g, grad_output, dtype):
    """g * grad_output in fp32 (float64 for float64), rounded once to ``dtype``. A gradient kept in
    fp32 (the weights', accumulated over chunks) is written straight into the result: no fp32
    temporary of the weight's shape."""
    w = wide(g.dtype)
    if g.dtype == w:
        return torch.mul(g, grad_output.to(w), out=torch.empty(g.shape, dtype=dtype, device=g.device))
    return (g.to(w) * grad_output.to(w)).to(dtype)


class FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, teacher_ids, teacher_logprobs, labels, row_count, spec, impl, chunk,
                tail, meters, entropy):
        """The teacher is dense (``ht``, ``wt``, ``bt``: h_t W_t^T + b_t; ``tail`` None) or sparse
        (its top-K ``teacher_ids`` and ``teacher_logprobs`` per row, ``tail`` its Tail code; no
        teacher gradient). ``meters``: (student meter, teacher meter), each None or a CalibrationMeter
        fed by every chunk. ``entropy``: also return the sum of the student's entropies (else an
        empty tensor)."""
        need = ctx.needs_input_grad
        dense = tail is None
        grad_s, grad_t = any(need[0:3]), dense and any(need[3:6])
        n, v_s, v_t = hs.shape[0], ws.shape[0], (wt.shape[0] if dense else 0)
        # sums in fp32, float64 where an input is float64 (the loss: where either side is)
        loss = torch.zeros((), dtype=wide(*(x.dtype for x in (hs, ws, ht, wt, teacher_logprobs) if x is not None)),
                           device=hs.device)
        entropy_sum = torch.zeros((), dtype=torch.float32, device=hs.device) if entropy else hs.new_empty(0)
        deferred = not spec.row_scaled_grad  # fp16: hidden-state gradients kept in fp32 until the end

        def grad_of(x, rows, asked):
            if not asked:
                return None
            if rows:  # the hidden states' gradient, per chunk
                return torch.empty(x.shape, dtype=wide(x.dtype), device=x.device) if deferred else torch.empty_like(x)
            return torch.zeros(x.shape, dtype=wide(x.dtype), device=x.device)  # accumulated over chunks

        g_hs, g_ws = grad_of(hs, True, need[0]), grad_of(ws, False, need[1])
        g_bs = torch.zeros(v_s, dtype=wide(ws.dtype), device=ws.device) if need[2] else None
        g_ht, g_wt = (grad_of(ht, True, need[3]), grad_of(wt, False, need[4])) if grad_t else (None, None)
        g_bt = torch.zeros(v_t, dtype=wide(wt.dtype), device=wt.device) if grad_t and need[5] else None
        ws_g, wt_g = gemm.widened(ws), gemm.widened(wt)  # off CUDA: fp32 once per call, not per chunk
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h_s = hs[lo:hi]
            s = gemm.logits(h_s, ws_g, bs)
            lab = labels[lo:hi] if labels is not None else None
            if dense:
                h_t = ht[lo:hi]
                t = gemm.match_vocab(gemm.logits(h_t, wt_g, bt), v_s)
                chunk_loss, d_s, d_t = impl.kd_forward(s, t, lab, row_count, spec, grad_s, grad_t, *meters,
                                                       reduce=True)
            else:
                chunk_loss, d_s = impl.sparse_kd_forward(s, teacher_ids[lo:hi], teacher_logprobs[lo:hi], lab,
                                                         row_count, spec, tail, grad_s, meters[0], reduce=True)
            loss += chunk_loss
            if entropy:
                entropy_sum += gemm.entropy(s, spec).sum()
            s = t = None  # the chunk's fp32 logits are not needed by the projections
            if grad_s:
                gemm.project_back(d_s, h_s, ws_g, g_hs, g_ws, g_bs, lo, hi)
            if grad_t:
                d_t = d_t[:, :v_t] if v_t <= v_s else F.pad(d_t, (0, v_t - v_s))  # dropped classes: 0
                gemm.project_back(d_t, h_t, wt_g, g_ht, g_wt, g_bt, lo, hi)
            d_s = d_t = None  # not held while the next chunk's logits and temporaries are built
        ctx.grads = (g_hs, g_ws, g_bs, g_ht, g_wt, g_bt)
        if deferred:  # the row scale the kernel left out (KDSpec.grad_unit), now in fp32 (float64)
            for g in ctx.grads:
                if g is not None:
                    g.mul_(backward_factor(row_count, spec, g.dtype))
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (hs, ws, bs, ht, wt, bt))
        ctx.mark_non_differentiable(entropy_sum)
        ctx.loss_name = "fused_linear_kd_loss" if dense else "fused_linear_sparse_kd_loss"
        return loss, entropy_sum  # rows come scaled by 1 / row_count

    @staticmethod
    def backward(ctx, grad_output, _):
        refuse_second_derivative(ctx.loss_name)
        out = [None if g is None else _times(g, grad_output, dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        return (*out,) + (None,) * 10
