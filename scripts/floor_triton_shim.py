"""Installed into the floor venv by scripts/check_floor.sh (a .pth line imports it in every process of
that venv, the gloo workers' too); never part of the package. Under TRITON_INTERPRET=1 it mends three
places where Triton 3.0's interpreter, which runs the kernels on CPU tensors in the tests, does not do
what the GPU does:

- tl.maximum / tl.minimum with propagate_nan=NONE ignore NaN on the GPU (PTX max.f32 / min.f32), but
  the interpreter emulates them with NaN-propagating np.maximum / np.minimum up to Triton 3.7 (3.8
  uses np.fmax / np.fmin). The kernels rely on the GPU's rule: backends/triton/helpers.py._weighted_gap gives 0 for a
  masked column (0 x max(-inf - -inf, -FLT_MAX)), where the old interpreter gives NaN.
- ``~`` on a boolean tensor: Triton 3.0 / 3.1's interpreter has no int1 type nor a boolean all-ones
  value (later ones have both, written as here).
- tl.store / tl.atomic_* with a one-element mask that is False: Triton 3.0 tests the mask with
  ``if not mask`` (later: ``if mask is None``), which the interpreter reads as "no mask", so a
  masked-off row of a one-row block (BLOCK_N = 1: the looping path) is written anyway, past the end
  of the buffer (heap corruption, then an abort).

Compiled kernels are untouched.
"""
import importlib.abc
import importlib.util
import os
import sys


def _patch(_interp):
    import inspect

    import numpy as np
    from triton.language import core as _core
    from triton.language import semantic as _sem

    _B = _interp.InterpreterBuilder
    _B.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    _B.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)
    if not hasattr(_B, "get_int1_ty"):
        _B.get_int1_ty = lambda self: _interp.tl.int1
        _all_ones = _B.get_all_ones_value

        def _all_ones_bool(self, type):
            if _interp._get_np_dtype(type) == np.bool_:
                return _interp.TensorHandle(np.full(1, True, dtype=np.bool_), type.scalar)
            return _all_ones(self, type)

        _B.get_all_ones_value = _all_ones_bool

    def _masked_off(mask):  # a one-element mask that is False, which `not mask` takes for no mask
        return mask is not None and mask.handle.data.size == 1 and not mask.handle.data.any()

    if "if not mask:" in inspect.getsource(_sem._store_legacy):
        _store = _sem._store_legacy

        def _store_legacy(ptr, val, mask, *args, **kwargs):
            if _masked_off(mask):
                return _core.tensor(None, _core.void)  # nothing is stored
            return _store(ptr, val, mask, *args, **kwargs)

        _sem._store_legacy = _store_legacy

    if "if not mask:" in inspect.getsource(_sem.atom_red_typechecking_impl):
        _atom = _sem.atom_red_typechecking_impl

        def _atom_checked(ptr, val, mask, op, builder):
            ptr, val, full = _atom(ptr, val, mask, op, builder)
            if _masked_off(mask):  # the mask given, not the all-true one put in its place
                full = _sem.broadcast_impl_shape(mask, ptr.type.get_block_shapes(), builder) \
                    if ptr.type.is_block() else mask
            return ptr, val, full

        _sem.atom_red_typechecking_impl = _atom_checked


class _AfterInterpreterImport(importlib.abc.MetaPathFinder):
    """Patches triton.runtime.interpreter once something imports it (nothing imports Triton early:
    `import fastkd` must not import it, tests/test_loss.py checks)."""

    def find_spec(self, name, path, target=None):
        if name != "triton.runtime.interpreter":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TRITON_INTERPRET") == "1":
    sys.meta_path.insert(0, _AfterInterpreterImport())
