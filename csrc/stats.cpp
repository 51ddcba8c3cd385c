// Fused per-layer statistics: one read of theta, g_f and g_r for every layer.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "ops.h"
#include "simd.h"

namespace slug_fast {
namespace {

constexpr int64_t kChunk = int64_t{1} << 15;  // elements per parallel task

// Four elements widened to float32, then to float64 (vcvtps2pd under AVX2). GCC's
// vector types, because its auto-vectoriser makes poor code of the same loop on arrays.
typedef float F4 __attribute__((vector_size(16)));
typedef double D4 __attribute__((vector_size(32)));

template <typename T>
SLUG_INLINE D4 load4(const T* x) {
  const F4 v = {widen(x[0]), widen(x[1]), widen(x[2]), widen(x[3])};
  return __builtin_convertvector(v, D4);
}
template <>
SLUG_INLINE D4 load4(const double* x) {
  D4 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

// Sums over n elements in float64. Each element is widened to double before it is
// multiplied: a product of two 32-bit floats (or 16-bit ones) is then exact, so squares
// neither overflow (|x| > 1.8e19) nor underflow (|x| < 1e-19) as they would in float32,
// and the sums match the float64 reference at any magnitude.
template <typename T, bool kRetain>
SLUG_INLINE void chunk_sums(const T* theta, const T* gf, const T* gr, int64_t n, double* out) {
  constexpr int kVecs = 2;  // independent accumulators per sum, 4 lanes each
  D4 tt[kVecs] = {}, ff[kVecs] = {}, rr[kVecs] = {}, fr[kVecs] = {};
  int64_t i = 0;
  for (; i + 4 * kVecs <= n; i += 4 * kVecs) {
    for (int v = 0; v < kVecs; ++v) {
      const D4 t = load4(theta + i + 4 * v);
      const D4 f = load4(gf + i + 4 * v);
      tt[v] += t * t;
      ff[v] += f * f;
      if constexpr (kRetain) {
        const D4 r = load4(gr + i + 4 * v);
        rr[v] += r * r;
        fr[v] += f * r;
      }
    }
  }
  double s_tt = 0, s_ff = 0, s_rr = 0, s_fr = 0;
  for (int v = 0; v < kVecs; ++v) {
    for (int l = 0; l < 4; ++l) {
      s_tt += tt[v][l];
      s_ff += ff[v][l];
      s_rr += rr[v][l];
      s_fr += fr[v][l];
    }
  }
  for (; i < n; ++i) {
    const double t = widen(theta[i]);
    const double f = widen(gf[i]);
    s_tt += t * t;
    s_ff += f * f;
    if constexpr (kRetain) {
      const double r = widen(gr[i]);
      s_rr += r * r;
      s_fr += f * r;
    }
  }
  out[0] = s_tt;
  out[1] = s_ff;
  out[2] = s_rr;
  out[3] = s_fr;
}

template <typename T>
SLUG_INLINE void chunk_sums_any(const void* theta, const void* gf, const void* gr, int64_t n,
                                double* out) {
  auto* t = static_cast<const T*>(theta);
  auto* f = static_cast<const T*>(gf);
  if (gr != nullptr) {
    chunk_sums<T, true>(t, f, static_cast<const T*>(gr), n, out);
  } else {
    chunk_sums<T, false>(t, f, nullptr, n, out);
  }
}

SLUG_CPU_CLONES void sums_f32(const void* t, const void* f, const void* r, int64_t n, double* o) {
  chunk_sums_any<float>(t, f, r, n, o);
}
SLUG_CPU_CLONES void sums_f64(const void* t, const void* f, const void* r, int64_t n, double* o) {
  chunk_sums_any<double>(t, f, r, n, o);
}
SLUG_CPU_CLONES void sums_bf16(const void* t, const void* f, const void* r, int64_t n, double* o) {
  chunk_sums_any<c10::BFloat16>(t, f, r, n, o);
}
// Not cloned: where an x86-64-v3 clone could run, sums_f16_f16c below is used instead.
void sums_f16(const void* t, const void* f, const void* r, int64_t n, double* o) {
  chunk_sums_any<c10::Half>(t, f, r, n, o);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// float16 widened 8 at a time with F16C into float32 blocks, then summed as above:
// the compiler does not vectorise the scalar half-to-float conversion on its own.
#define SLUG_F16C __attribute__((target("avx2,fma,f16c")))
constexpr int64_t kBlock = 512;  // float16 elements widened per batch

SLUG_F16C void widen_block(const void* src, int64_t first, int64_t m, float* dst) {
  const auto* h = static_cast<const uint16_t*>(src) + first;
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    _mm256_store_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
  for (; i < m; ++i) dst[i] = _cvtsh_ss(h[i]);
}

SLUG_F16C void sums_f16_f16c(const void* t, const void* f, const void* r, int64_t n, double* o) {
  alignas(32) float bt[kBlock], bf[kBlock], br[kBlock];
  double total[4] = {0, 0, 0, 0};
  for (int64_t first = 0; first < n; first += kBlock) {
    const int64_t m = std::min(kBlock, n - first);
    widen_block(t, first, m, bt);
    widen_block(f, first, m, bf);
    double part[4];
    if (r != nullptr) {
      widen_block(r, first, m, br);
      chunk_sums<float, true>(bt, bf, br, m, part);
    } else {
      chunk_sums<float, false>(bt, bf, nullptr, m, part);
    }
    for (int c = 0; c < 4; ++c) total[c] += part[c];
  }
  for (int c = 0; c < 4; ++c) o[c] = total[c];
}
#endif

using SumsFn = void (*)(const void*, const void*, const void*, int64_t, double*);

SumsFn sums_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return sums_f32;
    case at::kDouble: return sums_f64;
    case at::kBFloat16: return sums_bf16;
    case at::kHalf:
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
      if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma")) {
        return sums_f16_f16c;
      }
#endif
      return sums_f16;
    default: return nullptr;
  }
}

void check_pair(const at::Tensor& param, const at::Tensor& grad, int64_t i, const char* what) {
  TORCH_CHECK(grad.defined(), "layer ", i, ": ", what, " gradient is undefined");
  TORCH_CHECK(grad.device().is_cpu(), "layer ", i, ": ", what, " gradient is on ", grad.device(),
              "; layer_sums takes CPU tensors");
  TORCH_CHECK(grad.sizes() == param.sizes(), "layer ", i, ": ", what, " gradient has shape ",
              grad.sizes(), " but the parameter has shape ", param.sizes());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "layer ", i, ": ", what,
              " gradient has dtype ", grad.scalar_type(), " but the parameter has dtype ",
              param.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), "layer ", i, ": ", what, " gradient is not contiguous");
}

struct Task {
  int64_t layer;
  int64_t begin;
  int64_t end;
};

}  // namespace

at::Tensor layer_sums(at::TensorList params, at::TensorList forget,
                      std::optional<at::TensorList> retain) {
  const int64_t n_layers = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(forget.size()) == n_layers, "got ", n_layers,
              " parameters but ", forget.size(), " forget gradients");
  const bool has_retain = retain.has_value();
  TORCH_CHECK(!has_retain || static_cast<int64_t>(retain->size()) == n_layers, "got ", n_layers,
              " parameters but ", has_retain ? retain->size() : 0, " retain gradients");

  std::vector<SumsFn> fns(n_layers);
  std::vector<Task> tasks;
  for (int64_t i = 0; i < n_layers; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), "layer ", i, ": parameter is undefined");
    TORCH_CHECK(p.device().is_cpu(), "layer ", i, ": parameter is on ", p.device(),
                "; layer_sums takes CPU tensors");
    TORCH_CHECK(p.is_contiguous(), "layer ", i, ": parameter is not contiguous");
    fns[i] = sums_for(p.scalar_type());
    TORCH_CHECK(fns[i] != nullptr, "layer ", i, ": dtype ", p.scalar_type(),
                " is not supported; use float32, float64, bfloat16 or float16");
    check_pair(p, forget[i], i, "forget");
    if (has_retain) check_pair(p, (*retain)[i], i, "retain");
    const int64_t numel = p.numel();
    for (int64_t b = 0; b < numel; b += kChunk) tasks.push_back({i, b, std::min(numel, b + kChunk)});
  }

  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  std::vector<double> partial(static_cast<size_t>(n_tasks) * 4, 0.0);
  at::parallel_for(0, n_tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Task& task = tasks[k];
      const int64_t i = task.layer;
      const int64_t esize = params[i].element_size();
      const auto* t = static_cast<const char*>(params[i].data_ptr()) + task.begin * esize;
      const auto* f = static_cast<const char*>(forget[i].data_ptr()) + task.begin * esize;
      const char* r = has_retain
                          ? static_cast<const char*>((*retain)[i].data_ptr()) + task.begin * esize
                          : nullptr;
      fns[i](t, f, r, task.end - task.begin, &partial[static_cast<size_t>(k) * 4]);
    }
  });

  // Combine the partials of each layer in task order: the result does not depend
  // on the number of threads.
  at::Tensor out = at::zeros({n_layers, 4}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < n_tasks; ++k) {
    for (int c = 0; c < 4; ++c) o[tasks[k].layer * 4 + c] += partial[static_cast<size_t>(k) * 4 + c];
  }
  return out;
}

}  // namespace slug_fast
