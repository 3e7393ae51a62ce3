// Philox4x32-10 exactly as Triton's tl.rand draws it, so the CPU path regenerates the very dropout masks the Triton
// kernels use (forward, backward and every backend agree bit for bit on which elements are kept).
#pragma once

#include <cstdint>

namespace peftfast {

// the Weyl key increments and round multipliers of Philox4x32 (also the SIMD paths' in dropout.cpp)
constexpr uint32_t kPhKeyA = 0x9E3779B9u, kPhKeyB = 0xBB67AE85u, kPhRoundA = 0xD2511F53u, kPhRoundB = 0xCD9E8D57u;
// 2^-31 in float: first output word (as |int32|) to [0, 1)
constexpr float kPhUnit = 4.6566127342e-10f;

// tl.rand(seed, offset) for an int64 offset: counters (lo(offset), hi(offset), 0, 0), key (lo(seed), hi(seed)),
// ten rounds, first output word mapped to [0, 1) the way triton.language.random.uint_to_uniform_float does.
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t pa = static_cast<uint64_t>(kPhRoundA) * c0;
    const uint64_t pb = static_cast<uint64_t>(kPhRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhKeyA;
    k1 += kPhKeyB;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * kPhUnit;
}

}  // namespace peftfast
