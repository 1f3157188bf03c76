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
        return _parse(_DIVERGENCE_MEMBERS, DIVERGENCES, value, name)


class Tail(enum.IntEnum):
    """A sparse teacher's missing mass m (1 - the listed probabilities) in the target, tempered with
    the listed classes' power r, and the student's mass off the list (see fastkd/sparse.py); its value
    is the kernels' TAIL code."""

    BUCKET = 0  # spread evenly over the V - K' unlisted classes, each tempered: (V - K') (m / (V - K'))^r
    RENORMALIZE = 1  # dropped: the teacher restricted to its listed classes
    LUMPED = 2  # one extra class tempered as a whole: m^r
    # both sides conditioned on the listed classes: the teacher as RENORMALIZE, the student's softmax
    # divided by its listed mass too (TRL's server loss without its tail)
    CONDITIONAL = 3

    @classmethod
    def parse(cls, value, name: str = "tail") -> Tail:
        """The member a public argument names (one of TAILS), or a ValueError naming it."""
        return _parse(_TAIL_MEMBERS, TAILS, value, name)


def _parse(members: tuple, names: tuple, value, name: str):
    """The member of ``members`` (an IntEnum's, in code order) that ``value`` is or names (its lower-case
    name in ``names``), or a ValueError naming the argument."""
    if isinstance(value, type(members[0])):
        return value
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"{name} must be one of {names}, got {value!r}")
    return members[names.index(value)]


_DIVERGENCE_MEMBERS = tuple(Divergence)
DIVERGENCES = tuple(d.name.lower() for d in Divergence)  # the public names, in code order
REDUCTIONS = ("batchmean", "sum", "mean", "none")
LINEAR_REDUCTIONS = REDUCTIONS[:3]  # the fused-linear losses: "none" would need a weight gradient per row
_TAIL_MEMBERS = tuple(Tail)
TAILS = tuple(t.name.lower() for t in Tail)  # the public names, in code order
BACKENDS = ("auto", "triton", "cuda", "torch")  # backend= and FASTKD_BACKEND, in any case (fastkd.backends)
