// See dropout.h.
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "philox.h"
#include "simd.h"

namespace peftfast {
namespace {

#ifdef PEFTFAST_X86_SIMD
// 16 keep flags per step: Philox words live in the low halves of 64-bit lanes (two groups of 8 for ILP), since
// vpmuludq multiplies exactly those halves; upper halves hold junk that no low half ever depends on
__attribute__((target("avx512f"))) int64_t keep_row_avx512(uint8_t* out, uint64_t seed, uint64_t base, int64_t n,
                                                          float p) {
  const __m512i ra = _mm512_set1_epi64(kPhRoundA), rb = _mm512_set1_epi64(kPhRoundB);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
  const __m512 scale = _mm512_set1_ps(kPhUnit), pv = _mm512_set1_ps(p);
  const __m512i one = _mm512_set1_epi32(1);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    __m512i a0 = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(base + c)), lane);
    __m512i b0 = _mm512_add_epi64(a0, eight);
    __m512i a1 = _mm512_srli_epi64(a0, 32), b1 = _mm512_srli_epi64(b0, 32);
    __m512i a2 = _mm512_setzero_si512(), b2 = a2, a3 = a2, b3 = a2;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int i = 0; i < 10; ++i) {
      const __m512i kk0 = _mm512_set1_epi64(k0), kk1 = _mm512_set1_epi64(k1);
      const __m512i pa = _mm512_mul_epu32(a0, ra), pb = _mm512_mul_epu32(a2, rb);
      const __m512i qa = _mm512_mul_epu32(b0, ra), qb = _mm512_mul_epu32(b2, rb);
      a0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pb, 32), a1), kk0);
      a2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pa, 32), a3), kk1);
      b0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(qb, 32), b1), kk0);
      b2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(qa, 32), b3), kk1);
      a1 = pb; a3 = pa; b1 = qb; b3 = qa;
      k0 += kPhKeyA;
      k1 += kPhKeyB;
    }
    // low halves of the 16 first words, in element order
    const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a0)),
                                         _mm512_cvtepi64_epi32(b0), 1);
    const __m512i y = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));  // x < 0 ? ~x : x
    const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_cvtepi32_ps(y), scale), pv, _CMP_GE_OQ);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(keep, one)));
  }
  return c;
}

__attribute__((target("avx2"))) int64_t keep_row_avx2(uint8_t* out, uint64_t seed, uint64_t base, int64_t n,
                                                     float p) {
  const __m256i ra = _mm256_set1_epi64x(kPhRoundA), rb = _mm256_set1_epi64x(kPhRoundB);
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0), four = _mm256_set1_epi64x(4);
  const __m256 scale = _mm256_set1_ps(kPhUnit), pv = _mm256_set1_ps(p);
  const __m256i pick = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
  int64_t c = 0;
  alignas(32) int32_t flags[8];
  for (; c + 8 <= n; c += 8) {
    __m256i a0 = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(base + c)), lane);
    __m256i b0 = _mm256_add_epi64(a0, four);
    __m256i a1 = _mm256_srli_epi64(a0, 32), b1 = _mm256_srli_epi64(b0, 32);
    __m256i a2 = _mm256_setzero_si256(), b2 = a2, a3 = a2, b3 = a2;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int i = 0; i < 10; ++i) {
      const __m256i kk0 = _mm256_set1_epi64x(k0), kk1 = _mm256_set1_epi64x(k1);
      const __m256i pa = _mm256_mul_epu32(a0, ra), pb = _mm256_mul_epu32(a2, rb);
      const __m256i qa = _mm256_mul_epu32(b0, ra), qb = _mm256_mul_epu32(b2, rb);
      a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), a1), kk0);
      a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), a3), kk1);
      b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(qb, 32), b1), kk0);
      b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(qa, 32), b3), kk1);
      a1 = pb; a3 = pa; b1 = qb; b3 = qa;
      k0 += kPhKeyA;
      k1 += kPhKeyB;
    }
    // low halves: a0 holds elements 0-3 in its even 32-bit slots, b0 elements 4-7
    const __m256i lo = _mm256_blend_epi32(a0, _mm256_slli_epi64(b0, 32), 0xAA);  // a0.lo, b0.lo interleaved
    const __m256i x = _mm256_permutevar8x32_epi32(lo, pick);  // -> a0 elems 0-3, then b0 elems 0-3
    const __m256i y = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
    const __m256 ge = _mm256_cmp_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(y), scale), pv, _CMP_GE_OQ);
    _mm256_store_si256(reinterpret_cast<__m256i*>(flags), _mm256_castps_si256(ge));
    for (int j = 0; j < 8; ++j) out[c + j] = static_cast<uint8_t>(flags[j] & 1);
  }
  return c;
}
#endif

// One row of keep flags: out[c] = keep(seed, linear index base + c). Philox is most of the masking cost: AVX-512 or
// AVX2 draw 16 or 8 flags per step, the scalar philox.h finishes the row (and is all of it elsewhere); every path
// yields the very bits of tl.rand (test_lora_cpp checks each against the Triton kernel).
void keep_row(uint8_t* out, uint64_t seed, uint64_t base, int64_t n, float p) {
  int64_t c = 0;
#ifdef PEFTFAST_X86_SIMD
  const int level = simd_level();
  if (level == 2)
    c = keep_row_avx512(out, seed, base, n, p);
  else if (level == 1)
    c = keep_row_avx2(out, seed, base, n, p);
#endif
  for (; c < n; ++c) out[c] = philox_uniform(seed, base + static_cast<uint64_t>(c)) >= p;
}

}  // namespace

int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(k, 1)); }

uint64_t read_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.numel() == 1, "peftfast::", op, ": the dropout seed must be a one-element integer tensor");
  return static_cast<uint64_t>(seed.to(at::kCPU).reshape({}).item<int64_t>());
}

void fill_mask(at::Tensor& mask, int64_t row0, int64_t col0, int64_t seg, int64_t m, int64_t k, uint64_t seed,
               float p) {
  const int64_t rows = mask.size(0), cols = mask.size(1);
  uint8_t* o = mask.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      keep_row(o + r * cols, seed, static_cast<uint64_t>((seg * m + row0 + r) * k + col0), cols, p);
  });
}

void apply_mask(const at::Tensor& src, const at::Tensor& mask, at::Tensor& dst, int64_t row0) {
  const int64_t rows = mask.size(0), k = src.size(1), ld = src.stride(0), cs = src.stride(1);
  const uint8_t* mk = mask.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "peftfast_masked_src", [&] {
    using src_t = scalar_t;
    const src_t* s = src.const_data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "peftfast_masked_dst", [&] {
      scalar_t* d = dst.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(k), [&](int64_t b, int64_t e) {
        simd_call([&]() PEFTFAST_SIMD_BODY {
          for (int64_t r = b; r < e; ++r) {
            const src_t* srow = s + (row0 + r) * ld;
            const uint8_t* mrow = mk + r * k;
            scalar_t* drow = d + r * k;
            if (cs == 1) {  // the common layout, kept separate so the loop vectorizes
              for (int64_t c = 0; c < k; ++c) drow[c] = mrow[c] ? static_cast<scalar_t>(srow[c]) : scalar_t(0);
            } else {
              for (int64_t c = 0; c < k; ++c) drow[c] = mrow[c] ? static_cast<scalar_t>(srow[c * cs]) : scalar_t(0);
            }
          }
        });
      });
    });
  });
}

void add_masked(at::Tensor& acc, const at::Tensor& part, const at::Tensor& mask, double mul) {
  const int64_t rows = part.size(0), k = part.size(1);
  const uint8_t* mk = mask.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "peftfast_add_masked_acc", [&] {
    using acc_t = scalar_t;
    acc_t* a = acc.mutable_data_ptr<acc_t>();
    const acc_t mu = static_cast<acc_t>(mul);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, part.scalar_type(), "peftfast_add_masked", [&] {
      const scalar_t* src = part.const_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(k), [&](int64_t b, int64_t e) {
        simd_call([&]() PEFTFAST_SIMD_BODY {
          for (int64_t i = b * k; i < e * k; ++i) a[i] += mk[i] ? static_cast<acc_t>(src[i]) * mu : acc_t(0);
        });
      });
    });
  });
}

at::Tensor masked_down(const at::Tensor& x, at::TensorList lora_as, double p, uint64_t seed, int64_t chunk_elems) {
  const auto ldt = lora_as[0].scalar_type();
  const int64_t n = lora_as.size(), r = lora_as[0].size(0), m = x.size(0), k = x.size(1);
  if (p == 0.0) {
    at::Tensor a_cat = n == 1 ? lora_as[0] : at::cat(lora_as, 0);
    return at::mm(x.to(ldt), a_cat.t());
  }
  at::Tensor xa = at::empty({m, n * r}, x.options().dtype(ldt));
  const int64_t ch = std::max<int64_t>(1, std::min<int64_t>(m, chunk_elems / std::max<int64_t>(k, 1)));
  at::Tensor buf = at::empty({ch, k}, x.options().dtype(ldt));
  at::Tensor mbuf = at::empty({ch, k}, x.options().dtype(at::kByte));
  for (int64_t row0 = 0; row0 < m; row0 += ch) {
    const int64_t rows = std::min(ch, m - row0);
    at::Tensor b = buf.narrow(0, 0, rows), mask = mbuf.narrow(0, 0, rows);
    for (int64_t s = 0; s < n; ++s) {
      fill_mask(mask, row0, 0, s, m, k, seed, static_cast<float>(p));
      apply_mask(x, mask, b, row0);
      xa.narrow(0, row0, rows).narrow(1, s * r, r).copy_(at::mm(b, lora_as[s].t()));
    }
  }
  return xa.mul_(1.0 / (1.0 - p));
}

}  // namespace peftfast
