# A plain shim: all metadata lives in pyproject.toml. The optional CUDA extension
# (kernels/, built with ninja when a toolkit is present) will be added here.
from setuptools import setup

setup()
