// What the CPU kernel's instruction-set variants share: each is a translation unit of its own
// (fastavg_cpu.cpp: the baseline and the run-time choice; fastavg_cpu_avx2.cpp, fastavg_cpu_avx512.cpp), so that
// they compile in parallel. Included before any `#pragma GCC target`, so that the standard library's and these
// inline functions are compiled for the baseline in every unit: the linker keeps one copy of each, and that
// copy must run on any x86-64 CPU.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fastavg_step.h"

namespace fastavg {
namespace {

constexpr int64_t kChunk = 256;
constexpr int64_t kGrain = 32 * 1024;

// bfloat16 and float16 as raw bits, converted without branches so that the conversion loops vectorize.
// bfloat16: round to nearest even, NaN kept quiet. float16: IEEE round to nearest even with subnormals,
// by the float-arithmetic method of the FP16 library (the one c10::Half uses).
struct BFloat16Bits {
  uint16_t bits;
};
struct Float16Bits {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// condition ? a : b as bit masks, which the vectorizer never mistakes for control flow.
inline uint32_t select(bool condition, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return (a & mask) | (b & ~mask);
}

inline float to_float(float x) { return x; }
inline float to_float(BFloat16Bits x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_float(Float16Bits x) {
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_float(sign | select(two_w < (1u << 27), float_to_bits(subnormal), float_to_bits(normalized)));
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline BFloat16Bits from_float<BFloat16Bits>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BFloat16Bits{static_cast<uint16_t>(select(x != x, 0x7FC0u, rounded))};
}
template <>
inline Float16Bits from_float<Float16Bits>(float x) {
  const uint32_t w = float_to_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  const float base = bits_to_float((bias >> 1) + 0x07800000u) + (std::fabs(x) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return Float16Bits{static_cast<uint16_t>((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign))};
}

template <typename T>
inline float round_to(float x) {
  return to_float(from_float<T>(x));
}

}  // namespace
}  // namespace fastavg
