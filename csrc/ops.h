// slug_fast._C: the CPU kernels behind slug_fast's three hot operations.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace slug_fast {

// Per-layer sums in one pass over every tensor, float64 result of shape (n, 4):
// [sum(theta^2), sum(g_f^2), sum(g_r^2), sum(g_f * g_r)]. Columns 2-3 are zero
// when `retain` is absent.
at::Tensor layer_sums(const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& forget,
                      const std::optional<std::vector<at::Tensor>>& retain);

// Ascending indices of the points no other point strictly dominates
// (j dominates i iff alignment[j] < alignment[i] and importance[j] > importance[i]).
at::Tensor pareto_front(const at::Tensor& alignment, const at::Tensor& importance);

// out = cast(base + step * direction), computed in float32 (float64 for float64
// tensors). `out` may be `base` itself.
void axpy_into(at::Tensor& out, const at::Tensor& base, const at::Tensor& direction,
               double step);

}  // namespace slug_fast
