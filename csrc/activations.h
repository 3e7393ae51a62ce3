// Element-wise activations and their derivatives in the accumulation type (fp32, or fp64 for fp64 tensors), shared
// by the gated-MLP (mlp.cpp) and bottleneck-Adapter (adapter.cpp) CPU kernels. Formulas are those of ATen's CPU
// kernels (and of the Triton kernels in kernels/mlp.py and kernels/adapter.py); exp and tanh are vectorisable
// fp32 versions (fp64 uses the C library).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "simd.h"

namespace peftfast {

enum class Act { kRelu, kGelu, kSilu, kGeluTanh };

inline Act parse_act(const std::string& name, const char* op) {
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK(false, "peftfast::", op, ": unknown activation '", name, "' (relu, gelu, gelu_tanh, silu)");
}

// exp for fp32 written so loops over it vectorise (no calls, and no float compares, which GCC does not if-convert
// under -ftrapping-math): Cephes' polynomial on [-ln2/2, ln2/2] scaled by 2^n through the exponent bits; within
// 1.5 ulp of exp on [-87.3, 88.3], saturating outside (at about 1e-38 and 2e38 rather than 0 and inf, which the
// activations below do not tell apart); NaN stays NaN.
PEFTFAST_HOT float fast_exp(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof(b));
  const int32_t sign = b >> 31;  // all ones for negative x
  const int32_t mag = b & 0x7FFFFFFF;
  constexpr int32_t kHi = 0x42B0999A, kLo = 0x42AE999A;  // bits of 88.3f and 87.3f: |x| clamped on its bit pattern
  const int32_t lim = kHi ^ ((kHi ^ kLo) & sign);
  const int32_t cb = (mag < lim ? mag : lim) | (b & INT32_MIN);
  float xc;
  std::memcpy(&xc, &cb, sizeof(xc));
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const float t = xc * 1.44269504088896341f + kShift;
  int32_t n;
  std::memcpy(&n, &t, sizeof(n));
  n -= 0x4B400000;
  const float nf = t - kShift;
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float res = y * scale;
  int32_t rb;
  std::memcpy(&rb, &res, sizeof(rb));
  const int32_t nan = -static_cast<int32_t>(mag > 0x7F800000);  // all ones for NaN
  const int32_t ob = (b & nan) | (rb & ~nan);
  float out;
  std::memcpy(&out, &ob, sizeof(out));
  return out;
}
PEFTFAST_HOT double fast_exp(double x) { return std::exp(x); }

template <typename T>
struct ActConst {
  static constexpr T kSqrt1_2 = T(0.70710678118654752440);       // 1 / sqrt(2)
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);    // 1 / sqrt(2 pi)
  static constexpr T kSqrt2OverPi = T(0.79788456080286535588);   // sqrt(2 / pi)
  static constexpr T kCubic = T(0.044715);
};

template <Act A, typename T>
PEFTFAST_HOT T act_fn(T z) {
  using C = ActConst<T>;
  if constexpr (A == Act::kRelu) {
    return z > T(0) ? z : T(0);
  } else if constexpr (A == Act::kSilu) {
    return z / (T(1) + fast_exp(-z));
  } else if constexpr (A == Act::kGelu) {
    return T(0.5) * z * (T(1) + std::erf(z * C::kSqrt1_2));
  } else {
    // 0.5·(1 + tanh(y)) = sigmoid(2y): no cancellation where tanh(y) is near -1 or 0
    return z / (T(1) + fast_exp(T(-2) * C::kSqrt2OverPi * (z + C::kCubic * z * z * z)));
  }
}

// act(z) and act'(z) together (they share the expensive part)
template <Act A, typename T>
PEFTFAST_HOT void act_and_grad(T z, T& a, T& da) {
  using C = ActConst<T>;
  if constexpr (A == Act::kRelu) {
    a = z > T(0) ? z : T(0);
    da = z > T(0) ? T(1) : T(0);
  } else if constexpr (A == Act::kSilu) {
    const T q = fast_exp(-z);
    const T s = T(1) / (T(1) + q);
    a = z * s;
    da = s * (T(1) + z * (q * s));  // 1 - s as q·s: exact where s is near 1
  } else if constexpr (A == Act::kGelu) {
    const T cdf = T(0.5) * (T(1) + std::erf(z * C::kSqrt1_2));
    a = z * cdf;
    da = cdf + z * C::kInvSqrt2Pi * fast_exp(T(-0.5) * z * z);
  } else {
    // with s = sigmoid(2y) = 0.5·(1 + tanh y) and 1 - s = q·s, q = exp(-2y): 0.5·(1 - tanh²y) = 2·s·(1 - s),
    // so neither the value nor the derivative subtracts nearly equal numbers
    const T q = fast_exp(T(-2) * C::kSqrt2OverPi * (z + C::kCubic * z * z * z));
    const T s = T(1) / (T(1) + q);
    a = z * s;
    da = s + T(2) * z * s * (q * s) * C::kSqrt2OverPi * (T(1) + T(3) * C::kCubic * z * z);
  }
}

// calls f(std::integral_constant<Act, A>{}) for the runtime activation, so kernels are compiled once per activation
template <typename F>
inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kRelu: f(std::integral_constant<Act, Act::kRelu>{}); break;
    case Act::kGelu: f(std::integral_constant<Act, Act::kGelu>{}); break;
    case Act::kSilu: f(std::integral_constant<Act, Act::kSilu>{}); break;
    case Act::kGeluTanh: f(std::integral_constant<Act, Act::kGeluTanh>{}); break;
  }
}

}  // namespace peftfast
