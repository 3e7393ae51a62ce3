// See dropout.h.
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "philox.h"

namespace peftfast {
namespace {

// One row of keep flags: out[c] = keep(seed, linear index base + c). A branch-free loop the compiler vectorizes;
// cloned for AVX-512/AVX2 (picked at load time) because Philox is most of the masking cost.
__attribute__((target_clones("avx512f", "avx2", "default"))) void keep_row(uint8_t* out, uint64_t seed,
                                                                            uint64_t base, int64_t n, float p) {
  for (int64_t c = 0; c < n; ++c) out[c] = philox_uniform(seed, base + static_cast<uint64_t>(c)) >= p;
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
        for (int64_t i = b * k; i < e * k; ++i) a[i] += mk[i] ? static_cast<acc_t>(src[i]) * mu : acc_t(0);
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
