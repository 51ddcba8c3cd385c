// Pareto front of (alignment, importance) in O(n log n): sort by alignment, sweep.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

namespace slug_fast {

at::Tensor pareto_front(const at::Tensor& alignment, const at::Tensor& importance) {
  TORCH_CHECK(alignment.dim() == 1 && importance.dim() == 1,
              "pareto_front takes 1-D tensors; got ", alignment.dim(), "-D and ",
              importance.dim(), "-D");
  TORCH_CHECK(alignment.numel() == importance.numel(), "alignment has ", alignment.numel(),
              " values but importance has ", importance.numel());
  const at::Tensor a_t = alignment.to(at::kDouble).contiguous();
  const at::Tensor m_t = importance.to(at::kDouble).contiguous();
  const double* a = a_t.data_ptr<double>();
  const double* m = m_t.data_ptr<double>();
  const int64_t n = a_t.numel();

  // NaN points are never on the front and, comparing false, dominate nothing.
  std::vector<int64_t> order;
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isnan(a[i]) && !std::isnan(m[i])) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return a[x] < a[y]; });

  // i is dominated iff some point with strictly smaller alignment has strictly
  // larger importance, i.e. iff best_before(a[i]) > m[i]. Points of equal
  // alignment cannot dominate each other, so a group is judged before it joins.
  std::vector<int64_t> front;
  double best_before = -std::numeric_limits<double>::infinity();
  size_t g = 0;
  while (g < order.size()) {
    size_t end = g;
    double group_best = -std::numeric_limits<double>::infinity();
    while (end < order.size() && a[order[end]] == a[order[g]]) {
      const int64_t i = order[end];
      if (!(best_before > m[i])) front.push_back(i);
      group_best = std::max(group_best, m[i]);
      ++end;
    }
    best_before = std::max(best_before, group_best);
    g = end;
  }
  std::sort(front.begin(), front.end());
  at::Tensor out = at::empty({static_cast<int64_t>(front.size())}, at::kLong);
  std::copy(front.begin(), front.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace slug_fast
