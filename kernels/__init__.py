"""Triton kernels of slug_fast (installed as slug_fast.kernels).

layer_sums and axpy_into are registered as the CUDA kernels of the torch operators
slug_fast::layer_sums and slug_fast::axpy_into (slug_fast/_backends.py). Called directly they
run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests them: the
dispatcher sends CPU tensors to the C++ kernels).
"""
from .stats import layer_sums
from .update import axpy_into, axpy_many

__all__ = ["layer_sums", "axpy_into", "axpy_many"]
