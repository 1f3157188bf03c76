"""The Triton backend: one fused kernel for the KD loss, its gradients and calibration statistics.

Imported lazily (only when the triton backend runs). Under ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors, which is how the test suite checks them without a GPU. The modules, one kernel
family each: helpers (the shared ``@triton.jit`` helpers), dense (one-pass and looping), split
(split-row), scale (the backward's in-place scale), sparse (the sparse teacher), vocab (the
vocabulary-parallel kernels), plan (the launch plan of a dense call), launch (``kd_forward``, the
launch state and the tools' hooks: ``recorded_launches``, ``plan_override``).

Per row, a = s/T and b = t/T: max and sum of exp of a and b (and of s at T = 1 for the
cross-entropy and the calibration statistics), the divergence, then the gradients, all from one
exp2 per element and tensor (exp((x - m) / T) = exp2(x k - m k), k = log2(e) / T, kept in
registers and reused). ``plan._plan`` picks the path of a call; traffic per path, N rows, C classes, b
bytes per logit (floor: read s, read t, write grad_s = 3 N C b; + N C b for grad_t; labels 8 and
the loss 4 bytes per row):

- one-pass (C <= ONE_PASS_MAX = 8192): rows in registers, read once, written once: the floor. A
  row is read by 1-64 threads (``LANES``), each holding ``VECS`` 16-byte vectors, so per-row work
  (reductions, logs, labels, meters) is done by few threads; short rows several per program.
- split-row (longer rows; KL or reverse KL with a gradient): a row split over PARTS programs that
  keep their chunks in registers and exchange per-chunk statistics through global memory inside
  one cooperative launch: the floor again (6 bytes per element in bf16).
- looping (the fallback: JSD, the teacher's meter, graph capture, no cooperative launch): sweep 1
  keeps running statistics per thread (and KL's or reverse KL's divergence), sweep 2 writes the
  gradients: 5 N C b; JSD with a gradient needs its divergence first, a third sweep: 7 N C b.
  Without gradients one sweep (KL, reverse KL) or two (JSD). With a meter a program takes several
  rows (one flush of its statistics for all of them).

Logit transforms (KDSpec.s_scale / s_cap, t_scale / t_cap; ``_transform``): every tile is transformed
as it is loaded, on every path, and so is the label's logit; the gradients take the chain rule (a
scale folded into per-row coefficients, a softcap's slope per element). Compiled in only where set
(S_SCALE, T_SCALE, S_CAP, T_CAP): the default compiles to the code it had without them.
"""
from __future__ import annotations

from .launch import kd_forward, plan_override, recorded_launches
from .scale import INPLACE_BACKWARD, scale_grad
from .sparse import sparse_kd_forward
from .vocab import grads, jsd_partials, local_stats

__all__ = ["INPLACE_BACKWARD", "grads", "jsd_partials", "kd_forward", "local_stats", "plan_override",
           "recorded_launches", "scale_grad", "sparse_kd_forward"]
