// The single-layer update theta = theta0 + step * d, in one pass, never accumulated.
#include <ATen/Parallel.h>

#include "ops.h"
#include "simd.h"

namespace slug_fast {
namespace {

constexpr int64_t kGrain = int64_t{1} << 15;

// Computed as base + (step * d), two roundings and no fused multiply-add
// (the extension is built with -ffp-contract=off), so the result equals torch's
// `base.float() + step * d.float()` bit for bit.
template <typename T, typename D>
SLUG_INLINE void axpy_range(T* out, const T* base, const D* d, typename Acc<T>::type step,
                            int64_t n) {
  using A = typename Acc<T>::type;
  for (int64_t i = 0; i < n; ++i) {
    const A scaled = step * static_cast<A>(widen(d[i]));
    out[i] = static_cast<T>(static_cast<A>(widen(base[i])) + scaled);
  }
}

template <typename T, typename D>
SLUG_CPU_CLONES void axpy_kernel(void* out, const void* base, const void* d, double step,
                                 int64_t n) {
  using A = typename Acc<T>::type;
  const A s = static_cast<A>(step);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    axpy_range<T, D>(static_cast<T*>(out) + b, static_cast<const T*>(base) + b,
                     static_cast<const D*>(d) + b, s, e - b);
  });
}

}  // namespace

void axpy_into(at::Tensor& out, const at::Tensor& base, const at::Tensor& direction, double step) {
  TORCH_CHECK(out.device().is_cpu() && base.device().is_cpu() && direction.device().is_cpu(),
              "axpy_into takes CPU tensors; got out on ", out.device(), ", base on ",
              base.device(), ", direction on ", direction.device());
  TORCH_CHECK(out.sizes() == base.sizes() && out.sizes() == direction.sizes(),
              "shape mismatch: out ", out.sizes(), ", base ", base.sizes(), ", direction ",
              direction.sizes());
  TORCH_CHECK(out.scalar_type() == base.scalar_type(), "base has dtype ", base.scalar_type(),
              " but out has dtype ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous() && base.is_contiguous() && direction.is_contiguous(),
              "axpy_into takes contiguous tensors");
  TORCH_CHECK(std::isfinite(step), "step must be finite, got ", step);
  const int64_t n = out.numel();
  void* o = out.data_ptr();
  const void* b = base.data_ptr();
  const void* d = direction.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "axpy_into", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, direction.scalar_type(), "axpy_into_direction",
        [&] { axpy_kernel<T, scalar_t>(o, b, d, step, n); });
  });
}

}  // namespace slug_fast
