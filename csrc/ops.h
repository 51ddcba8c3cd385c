// slug_fast._C: the CPU kernels of slug_fast's three operators (registered in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace slug_fast {

// slug_fast::layer_sums. Per-layer sums in one pass over every tensor, float64 result of
// shape (n, 4): [sum(theta^2), sum(g_f^2), sum(g_r^2), sum(g_f * g_r)]. Columns 2-3 are
// zero when `retain` is absent.
at::Tensor layer_sums(at::TensorList params, at::TensorList forget,
                      std::optional<at::TensorList> retain);

// slug_fast::pareto_front. Ascending indices of the points no other point strictly
// dominates (j dominates i iff alignment[j] < alignment[i] and importance[j] > importance[i]).
at::Tensor pareto_front(const at::Tensor& alignment, const at::Tensor& importance);

// slug_fast::axpy_into. out = cast(base + step * direction), computed in float32 (float64
// for float64 tensors). `out` may be `base` itself.
void axpy_into(at::Tensor& out, const at::Tensor& base, const at::Tensor& direction,
               double step);

}  // namespace slug_fast
