"""The names a call chooses among: divergences, reductions, sparse-teacher tails, backends."""
from __future__ import annotations

import enum


class Divergence(enum.IntEnum):
    """The divergence of a call; its value is the kernels' DIVERGENCE code."""

    KL = 0  # KL(p_t || p_s)
    REVERSE_KL = 1  # KL(p_s || p_t)
    JSD = 2  # beta KL(p_t || M) + (1 - beta) KL(p_s || M)

    @classmethod
    def parse(cls, value, name: str = "divergence") -> Divergence:
        """The member a public argument names ("kl", "reverse_kl", "jsd"), or a ValueError naming it."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, str) or value not in DIVERGENCES:
            raise ValueError(f"{name} must be one of {DIVERGENCES}, got {value!r}")
        return _MEMBERS[DIVERGENCES.index(value)]


_MEMBERS = tuple(Divergence)
DIVERGENCES = tuple(d.name.lower() for d in Divergence)  # the public names, in code order
REDUCTIONS = ("batchmean", "sum", "mean", "none")
LINEAR_REDUCTIONS = REDUCTIONS[:3]  # the fused-linear losses: "none" would need a weight gradient per row
TAILS = ("bucket", "renormalize")  # a sparse teacher's missing mass: one more class, or dropped
BACKENDS = ("auto", "triton", "cuda", "torch")  # backend= and FASTKD_BACKEND, in any case (fastkd.backends)
