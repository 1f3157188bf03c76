"""Which backend runs a call: ``backend=`` > ``FASTKD_BACKEND`` > auto.

auto picks triton for CUDA tensors when Triton imports (and for CPU tensors under
``TRITON_INTERPRET=1``), else torch; the cuda C++ extension runs only when asked for by name. A
backend asked for by name that cannot run raises with the reason; nothing falls back silently.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
from typing import NamedTuple

import torch as _torch  # not `torch`: the subpackage fastkd.backends.torch takes that attribute

from .._core.enums import BACKENDS


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str  # why it cannot run here ("" when it can)


_PROBED: dict = {}  # the answers of the two probes below, found once per process


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result``'s mark, set without calling it: that call imports Dynamo,
    and with it Triton, at ``import fastkd``. torch.compile then calls ``fn`` while tracing and takes
    its answer as a constant, instead of tracing into it (through an lru_cache, Dynamo warned)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def _env(name: str, default: str) -> str:
    """An environment variable, read at trace time under torch.compile (torch 2.4's Dynamo cannot
    trace os.environ)."""
    return os.environ.get(name, default)


# The oldest Triton that compiles the kernels: they pass tuples between @triton.jit functions (Triton
# 3.0 cannot) and chain `or` over constexprs (3.3 cannot); 3.4 (torch 2.8's) compiles every variant.
# With an older Triton the kernels cannot run on a GPU: auto takes torch (the interpreter is unaffected).
TRITON_COMPILES_FROM = (3, 4)


@_constant_under_compile
def _triton_too_old() -> str:
    """Why the installed Triton cannot compile the kernels ("" when it can)."""
    import triton

    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version >= TRITON_COMPILES_FROM:
        return ""
    need = ".".join(map(str, TRITON_COMPILES_FROM))
    return f"triton {triton.__version__} cannot compile the kernels (they need Triton >= {need}, as torch >= 2.8 has)"


@_constant_under_compile
def _triton_import_error() -> str:
    if "triton" not in _PROBED:
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install raising anything else
            _PROBED["triton"] = f"triton does not import ({type(e).__name__}: {e})"
        else:
            _PROBED["triton"] = ""
    return _PROBED["triton"]


def _triton_unusable(device: _torch.device, dtypes=()) -> str:
    """Why the Triton kernels cannot run on this device / these dtypes ("" when they can)."""
    err = _triton_import_error()
    if err:
        return err
    if device.type == "cpu" and _env("TRITON_INTERPRET", "") != "1":
        return "tensors are on the CPU (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    if device.type not in ("cuda", "cpu"):
        return f"Triton does not run on {device.type} tensors"
    if device.type == "cuda" and _triton_too_old():  # the interpreter (CPU) compiles nothing
        return _triton_too_old()
    if _torch.float64 in dtypes:
        return "the kernels compute in float32; float64 logits need backend='torch'"
    return ""


def _cuda_unusable(device: _torch.device, dtypes=()) -> str:
    """Why the CUDA C++ extension cannot run here ("" when it can, built or buildable on first use)."""
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors (got {device.type})"
    if _torch.float64 in dtypes:
        return "the kernels compute in float32; float64 logits need backend='torch'"
    return _cuda_unbuildable()


@_constant_under_compile
def _cuda_unbuildable() -> str:
    if "cuda" not in _PROBED:
        _PROBED["cuda"] = _cuda_build_problem()
    return _PROBED["cuda"]


def _cuda_build_problem() -> str:
    if importlib.util.find_spec("fastkd._C") is not None:
        return ""
    from torch.utils.cpp_extension import is_ninja_available

    from .cuda.build import SOURCES, toolkit_root

    not_built = "the extension is not built (FASTKD_BUILD_CUDA=1) and cannot be compiled here"
    if toolkit_root() is None or not all(p.is_file() for p in SOURCES):
        return f"{not_built} (no nvcc or no kernels/ sources)"
    if not is_ninja_available():
        return f"{not_built} (pip install ninja)"
    return ""


def available_backends(device: _torch.device | str | None = None) -> list[BackendInfo]:
    """Each backend with whether it can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if _torch.cuda.is_available() else "cpu"
    device = _torch.device(device)
    triton_why, cuda_why = _triton_unusable(device), _cuda_unusable(device)
    return [BackendInfo("triton", not triton_why, triton_why), BackendInfo("cuda", not cuda_why, cuda_why),
            BackendInfo("torch", True, "")]


# what each backend implements: dense (kd_forward), sparse (sparse_kd_forward), vocab (local_stats,
# jsd_partials, grads: the vocabulary-parallel executor's kernels), scale (scale_grad, INPLACE_BACKWARD)
CAPABILITIES = {"triton": frozenset({"dense", "sparse", "vocab", "scale"}),
                "torch": frozenset({"dense", "sparse", "vocab", "scale"}),
                "cuda": frozenset({"dense", "scale"})}
_KERNEL = {"dense": "dense-teacher kernel", "sparse": "sparse-teacher kernel",
           "vocab": "vocabulary-parallel kernel (group=)", "scale": "gradient-scaling kernel"}


def requested(backend) -> tuple[str, str]:
    """(name, source): ``backend=`` if given, else ``FASTKD_BACKEND`` (read here only), else auto;
    source is the argument to name in an error."""
    name = backend if backend is not None else _env("FASTKD_BACKEND", "auto") or "auto"
    source = "backend" if backend is not None else "FASTKD_BACKEND"
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower(), source


def require(name: str, capability: str, source: str = "backend"):
    """A ValueError naming the backend and the kernel it lacks, if it does not implement ``capability``."""
    if name in CAPABILITIES and capability not in CAPABILITIES[name]:
        others = " or ".join(repr(n) for n, caps in CAPABILITIES.items() if capability in caps)
        raise ValueError(f"{source}={name!r} has no {_KERNEL[capability]}; use backend={others}")


_OVERRIDE: list = []  # the active override()'s backend names, innermost last


@contextlib.contextmanager
def override(name: str):
    """A tools' and tests' hook: while active, every call resolves to backend ``name`` whatever the
    device and ``backend=`` say (bench/tools/sm90.py records the Triton launches of calls on CPU
    tensors without the interpreter). Not for users: nothing is checked."""
    if name not in BACKENDS[1:]:
        raise ValueError(f"override: name must be one of {BACKENDS[1:]}, got {name!r}")
    _OVERRIDE.append(name)
    try:
        yield
    finally:
        _OVERRIDE.pop()


def resolve_name(backend, device: _torch.device, dtypes, capability: str = "dense") -> str:
    """The name of the backend that runs a call needing ``capability``, or a ValueError saying why none can."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    name, source = requested(backend)
    require(name, capability, source)
    if name == "cuda":
        why = _cuda_unusable(device, dtypes)
        if why:
            raise ValueError(f"{source}='cuda' cannot run: {why}")
    elif name != "torch":
        why = _triton_unusable(device, dtypes)
        if why and name == "triton":
            raise ValueError(f"{source}='triton' cannot run: {why}")
        name = "torch" if why else "triton"
    return name


def load(name: str):
    """The module of a backend that can run (``resolve_name``'s answer): fastkd.backends.<name>, which
    exports the functions of its capabilities. The triton and cuda ones load their kernels here."""
    return importlib.import_module(f"fastkd.backends.{name}")


module = load


def resolve(backend, device: _torch.device, dtypes, capability: str = "dense"):
    """The backend module for a call, or a ValueError saying why not."""
    return load(resolve_name(backend, device, dtypes, capability))
