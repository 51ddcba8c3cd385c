// Declares slug_fast's operators with torch's dispatcher and registers their CPU kernels;
// importing the module slug_fast._C runs these registrations (the pattern of
// pytorch/extension-cpp). slug_fast/_backends.py adds the fake kernels and, on machines
// with CUDA, the Triton kernels of slug_fast.kernels as the CUDA kernels.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "Registers the torch operators slug_fast::layer_sums, "
                               "slug_fast::axpy_into and slug_fast::pareto_front with their "
                               "CPU kernels.",
                               -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(slug_fast, m) {
  m.set_python_module("slug_fast._backends");  // where the fake kernels are registered
  m.def("layer_sums(Tensor[] params, Tensor[] forget, Tensor[]? retain=None) -> Tensor");
  m.def("axpy_into(Tensor(a!) out, Tensor base, Tensor direction, float step) -> ()");
  m.def("pareto_front(Tensor alignment, Tensor importance) -> Tensor");
}

TORCH_LIBRARY_IMPL(slug_fast, CPU, m) {
  m.impl("layer_sums", &slug_fast::layer_sums);
  m.impl("axpy_into", &slug_fast::axpy_into);
  m.impl("pareto_front", &slug_fast::pareto_front);
}
