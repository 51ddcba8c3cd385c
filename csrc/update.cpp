// The single-layer update theta = theta0 + step * d, in one pass, never accumulated.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"
#include "simd.h"

namespace slug_fast {
namespace {

constexpr int64_t kGrain = int64_t{1} << 15;

// out[i] = base[i] + (step * d[i]) over [begin, end): two roundings and no fused multiply-add
// (the extension is built with -ffp-contract=off), so the result equals torch's
// `base.float() + step * d.float()` bit for bit. Cloned per CPU level and called from inside
// the parallel_for lambda: the lambda's body is a function of its own, which a clone
// attribute on the function creating the lambda does not reach.
template <typename T, typename D>
SLUG_CPU_CLONES void axpy_range(void* out, const void* base, const void* d,
                                typename Acc<T>::type step, int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  T* o = static_cast<T*>(out);
  const T* b = static_cast<const T*>(base);
  const D* x = static_cast<const D*>(d);
  for (int64_t i = begin; i < end; ++i) {
    const A scaled = step * static_cast<A>(widen(x[i]));
    o[i] = static_cast<T>(static_cast<A>(widen(b[i])) + scaled);
  }
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
  void* o = out.data_ptr();
  const void* b = base.data_ptr();
  const void* d = direction.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "axpy_into", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    const A s = static_cast<A>(step);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, direction.scalar_type(), "axpy_into_direction", [&] {
          at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
            axpy_range<T, scalar_t>(o, b, d, s, begin, end);
          });
        });
  });
}

}  // namespace slug_fast
