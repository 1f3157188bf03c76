"""Building the optional CUDA extension: ahead of time by setup.py (``FASTKD_BUILD_CUDA=1``), or
on first use through ``torch.utils.cpp_extension.load`` (cached under ~/.cache/torch_extensions).

torch guesses the toolkit's root from where ``nvcc`` lies, which is wrong when ``nvcc`` is a
wrapper script (e.g. /usr/local/bin/nvcc): the link step then finds no libcudart. Unless
``CUDA_HOME`` is set, we ask nvcc itself (its ``TOP`` in a dry run) and set ``CUDA_HOME``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def _kernels_dir() -> Path:
    """An installed fastkd carries the sources in fastkd/kernels (package data); a source checkout
    keeps them in kernels/ beside the package, which is also where setup.py builds from."""
    package = Path(__file__).resolve().parents[2]  # fastkd/, above backends/cuda/
    installed = package / "kernels"
    return installed if installed.is_dir() else package.parent / "kernels"


KERNELS = _kernels_dir()
# kd_pair_*.cu: the fused kernels, one unit per student dtype so that ninja compiles them in parallel
SOURCES = [KERNELS / "kd_kernels.cu", KERNELS / "kd_pair_f32.cu", KERNELS / "kd_pair_f16.cu",
           KERNELS / "kd_pair_bf16.cu", KERNELS / "binding.cpp"]
HEADERS = [KERNELS / "kd_device.cuh", KERNELS / "kd_launch.cuh", KERNELS / "kd_launch.h",
           KERNELS / "launch_limits.h"]
CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr"]  # the C++ standard is torch's choice


def headers_digest() -> str:
    """A digest of the headers: torch's JIT cache only hashes the sources it compiles, so it is
    passed as a define to rebuild when a header changes."""
    digest = hashlib.sha256()
    for path in HEADERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def toolkit_root() -> str | None:
    """The CUDA toolkit's root: $CUDA_HOME, else where nvcc says it lives; None without nvcc."""
    return os.environ.get("CUDA_HOME") or _root_from_nvcc()


@functools.lru_cache(maxsize=None)
def _root_from_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.MULTILINE)
        if top:
            return str(Path(top.group(1).strip()).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST: the user's, else the card in use (real SASS), else Hopper (sm_90)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def prepare_environment():
    """Sets CUDA_HOME and TORCH_CUDA_ARCH_LIST (unless the user did) before torch reads them."""
    root = toolkit_root()
    if root is None:
        raise RuntimeError("nvcc not found (install a CUDA toolkit or set CUDA_HOME)")
    os.environ["CUDA_HOME"] = root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch_list())
    import torch.utils.cpp_extension as cpp

    cpp.CUDA_HOME = root  # the module read it at import time


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """The extension module: the ahead-of-time build if installed, else a JIT build (cached)."""
    try:
        from ... import _C  # type: ignore[attr-defined]  (fastkd._C, built by setup.py)

        return _C
    except ImportError:
        pass
    if not all(p.is_file() for p in SOURCES + HEADERS):
        raise RuntimeError(f"the CUDA sources are not at {KERNELS} (reinstall fastkd; "
                           "or build ahead of time with FASTKD_BUILD_CUDA=1)")
    prepare_environment()
    from torch.utils.cpp_extension import load as jit_load

    print("fastkd: compiling the CUDA extension (first use; cached afterwards)...", file=sys.stderr)
    return jit_load(name="fastkd_cuda", sources=[str(p) for p in SOURCES],
                    extra_cuda_cflags=CUDA_FLAGS + [f"-DFASTKD_HEADERS={headers_digest()}"],
                    extra_cflags=["-O3"], verbose=verbose)
