"""Build script of attn_kernels.

Metadata lives in pyproject.toml. The package is pure Python plus Triton kernels
(compiled at first use); the CUDA C++ extension (`csrc/`, issue "CUDA C++
extension") will be added here as an nvcc-built pybind11 module that links only
the CUDA runtime, so that `pip install -e .` keeps working with a CPU-only torch.
"""

from setuptools import setup

setup()
