"""Triton kernels of slug_fast (installed as slug_fast.kernels).

They run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests them).
"""
from .stats import layer_sums
from .update import axpy_into, axpy_many

__all__ = ["layer_sums", "axpy_into", "axpy_many"]
