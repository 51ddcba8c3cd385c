"""Builds slug_fast with its C++ extension slug_fast._C (csrc/, ninja: declares the torch
operators slug_fast::layer_sums, axpy_into and pareto_front with their CPU kernels) and ships
the Triton kernels of kernels/ as slug_fast.kernels (the operators' CUDA kernels). Needs torch
at build time: install torch first, then `pip install --no-build-isolation .`."""
import glob

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ext = CppExtension(
    name="slug_fast._C",
    sources=sorted(glob.glob("csrc/*.cpp")),
    extra_compile_args={"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]},
    extra_link_args=["-fopenmp"],
)

setup(
    packages=find_packages(include=["slug_fast", "slug_fast.*"]) + ["slug_fast.kernels"],
    package_dir={"slug_fast": "slug_fast", "slug_fast.kernels": "kernels"},
    package_data={"slug_fast": ["assets/*.safetensors"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
