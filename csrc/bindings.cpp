#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slug_fast CPU kernels: fused layer statistics, Pareto front, single-layer update";
  m.def("layer_sums", &slug_fast::layer_sums, "per-layer [|theta|^2, |g_f|^2, |g_r|^2, <g_f,g_r>]",
        py::arg("params"), py::arg("forget"), py::arg("retain") = py::none());
  m.def("pareto_front", &slug_fast::pareto_front, "indices of the non-dominated points",
        py::arg("alignment"), py::arg("importance"));
  m.def("axpy_into", &slug_fast::axpy_into, "out = cast(base + step * direction)",
        py::arg("out"), py::arg("base"), py::arg("direction"), py::arg("step"));
  m.def("num_threads", []() { return at::get_num_threads(); });
}
