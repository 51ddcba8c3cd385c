// Helpers shared by the kernels: element widening and per-CPU code clones.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// Functions marked SLUG_CPU_CLONES are compiled twice, for x86-64-v3 (AVX2, FMA,
// F16C) and for the baseline ISA; the loader picks the right one at run time, so
// the extension stays portable while the hot loops are vectorised with AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLUG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SLUG_CPU_CLONES
#endif
#define SLUG_INLINE inline __attribute__((always_inline))

namespace slug_fast {

// Accumulation type: float32 for 16/32-bit inputs, float64 for float64 inputs.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
SLUG_INLINE typename Acc<T>::type widen(T x) {
  return static_cast<typename Acc<T>::type>(x);
}

// bfloat16 is the top half of a float32: widening is a shift, which vectorises.
template <>
SLUG_INLINE float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__FLT16_MAX__) && defined(__x86_64__)
// With the compiler's _Float16, x86-64-v3 clones widen with F16C instructions
// instead of c10::Half's bit manipulation.
template <>
SLUG_INLINE float widen(c10::Half x) {
  _Float16 h;
  std::memcpy(&h, &x.x, sizeof h);
  return static_cast<float>(h);
}
#endif

}  // namespace slug_fast
