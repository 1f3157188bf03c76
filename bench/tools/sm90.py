"""Compiling for Hopper (sm_90) on a machine without a GPU, the way the real launch would.

Triton: the public API runs on CPU tensors while every kernel of the Triton backend records its
launches (``recorded_launches``; ``split_path`` lets long rows take the split-row path as on a GPU).
A launch recorded from the real launcher (arguments, keyword constexprs, grid) is bound and
specialised by Triton's own JIT binder (``create_function_from_signature`` and
``JITFunction._pack_args``, the code ``JITFunction.run`` uses): integers equal to 1 become
constants, integers and pointers divisible by 16 get the divisibility hint that decides vector
widths, small integers are i32. Only the target differs: sm_90 instead of the (absent) current
device. CUDA C++: ``nvcc -cubin`` with the flags torch's extension builder uses.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces kernels by Python functions

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # cuobjdump, nvdisasm
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastkd-roofline"


# ---------------------------------------------------------------------------------------------
# recording the Triton launchers, through the hooks the library offers (no attribute is patched)


@contextlib.contextmanager
def recorded_launches():
    """Every launch of the Triton backend (dense, split-row, scale, sparse, vocabulary-parallel) is
    recorded instead of run (``fastkd.backends.triton.recorded_launches``), and fastkd's dispatch
    resolves every call to the Triton backend (``fastkd.backends.override``): the real launchers run
    on CPU tensors (allocated, never read: outputs stay as torch.empty left them). Yields the list of
    launches (``kernel``, ``grid``, ``args``, ``kwargs``) in launch order."""
    from fastkd import backends
    from fastkd.backends import triton as triton_backend

    with backends.override("triton"), triton_backend.recorded_launches() as launches:
        yield launches


@contextlib.contextmanager
def split_path(allowed: bool):
    """The launcher's switch for static models: calls on CPU tensors take the split-row path (as on a
    GPU with cooperative launches) only with it; else long rows take the looping path."""
    from fastkd.backends import triton as triton_backend

    with triton_backend.plan_override(SPLIT_STATIC=allowed):
        yield


@dataclass(frozen=True)
class TritonJob:
    """Everything ``triton.compile`` needs, picklable (for a process pool) and hashable (a cache key)."""
    module: str
    kernel: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple


def triton_job(kernel, args, kwargs) -> tuple[TritonJob, dict]:
    """The compile job of one recorded launch, and the bound arguments by name."""
    backend = make_backend(TARGET)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):  # as JITFunction.run: Triton 3.4 has no such knob
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    pack = getattr(kernel, "_pack_args", None) or _pack_args_34.__get__(kernel)
    options, signature, constexprs, attrs = pack(backend, kwargs, bound, specialization, options)
    job = TritonJob(kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()),
                    tuple(sorted(constexprs.items())), tuple(sorted((k, _frozen(v)) for k, v in attrs.items())),
                    tuple(sorted((k, _frozen(v)) for k, v in options.__dict__.items())))
    return job, bound


def _pack_args_34(kernel, backend, kwargs, bound, specialization, options):
    """JITFunction._pack_args for Triton 3.4, whose JITFunction.run does this inline (the oldest Triton
    that compiles the kernels: scripts/check_floor.sh --compile)."""
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, val: val == "constexpr")}
    attrvals = [x[1] for x in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path))
             for path in find_paths_if(attrvals, lambda _, x: isinstance(x, str))}
    return options, signature, constexprs, attrs


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value):
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


def compile_triton(job: TritonJob) -> dict:
    """Compiles one job for sm_90: {"cubin": bytes, "name": str, "num_warps": int, "shared": int}."""
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    attrs = {k: _thawed(v) for k, v in job.attrs}
    options = {k: (v if k != "extern_libs" or v is None else tuple(v)) for k, v in job.options}
    src = ASTSource(kernel, dict(job.signature), dict(job.constexprs), attrs)
    compiled = triton.compile(src, target=TARGET, options=options)
    meta = compiled.metadata
    return {"cubin": compiled.asm["cubin"], "name": meta.name, "num_warps": meta.num_warps,
            "shared": meta.shared}


# ---------------------------------------------------------------------------------------------
# tools


def _with_cubin(cubin: bytes, *command: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([*command, f.name], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed: {done.stderr[-2000:]}")
    return done.stdout


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage per function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}."""
    out = _with_cubin(cubin, str(TOOLS / "cuobjdump"), "-res-usage")
    usage, current = {}, None
    for line in out.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            current = m.group(1)
        elif current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            current = None
    return usage


def disassemble(cubin: bytes) -> str:
    """SASS with line information (``nvdisasm -c -g``)."""
    return _with_cubin(cubin, str(TOOLS / "nvdisasm"), "-c", "-g")


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# ---------------------------------------------------------------------------------------------
# CUDA C++


def nvcc_command(source: Path, out: Path) -> list[str]:
    """nvcc for one translation unit of the extension, with torch's flags and include paths."""
    from torch.utils import cpp_extension

    from fastkd.backends.cuda import build as _cuda_build

    root = _cuda_build.toolkit_root()
    includes = [f"-I{p}" for p in cpp_extension.include_paths("cuda")] + [f"-I{root}/include"]
    return ["nvcc", "-cubin", "-arch=sm_90", "-lineinfo", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS,
            *_cuda_build.CUDA_FLAGS, *includes, str(source), "-o", str(out)]


def compile_cuda(source: Path) -> bytes | None:
    """The sm_90 cubin of a .cu file (cached by its text and flags), or None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    probe = nvcc_command(source, Path("out.cubin"))
    key = hashlib.sha256((source.read_text() + " ".join(probe)).encode()).hexdigest()[:16]
    cached = CACHE / f"{source.stem}-{key}.cubin"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(nvcc_command(source, tmp), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-3000:]}")
        tmp.replace(cached)
    return cached.read_bytes()
