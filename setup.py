"""Metadata lives in pyproject.toml. This file only adds the optional CUDA extension fastkd._C:

    FASTKD_BUILD_CUDA=1 pip install --no-build-isolation -e .

builds kernels/ with torch.utils.cpp_extension and ninja when a CUDA toolkit is present; without
one (or without the variable) the install goes on with no `cuda` backend, never failing.
"""
import importlib.util
import os
import sys

from setuptools import setup


def cuda_extension() -> dict:
    if os.environ.get("FASTKD_BUILD_CUDA") != "1":
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_cuda_build", os.path.join(here, "fastkd", "backends", "cuda", "build.py"))
    build = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(build)
        build.prepare_environment()
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except (ImportError, RuntimeError) as e:
        print(f"fastkd: not building the CUDA extension ({e})", file=sys.stderr)
        return {}
    ext = CUDAExtension("fastkd._C", [os.path.relpath(str(p), here) for p in build.SOURCES],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": build.CUDA_FLAGS})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())
