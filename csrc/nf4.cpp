// CPU kernels for NF4 (QLoRA 4-bit NormalFloat) base weights: quantize, dequantize, and the LoRA linear over an NF4
// base (schemas in ops.cpp; autograd, fake kernels and the Triton path in peftfast/ops/nf4.py).
//
// Layout (bitsandbytes' for a row-major [N, K] weight with K % block_size == 0): qweight [N, K/2] uint8, element
// (n, 2j) in the high nibble of byte (n, j), (n, 2j+1) in the low one; absmax [N, K/block_size] fp32, one per
// block of block_size consecutive elements of a row. W[n, k] = NF4[code(n, k)] * absmax[n, k / block_size], computed
// in fp32 and rounded once to the compute dtype. A code is the nearest table value to w / absmax (fp32 division;
// ties go down), an all-zero block gets absmax 0 and code 7 (0.0).
//
// The LoRA linear never builds the full 16-bit W: the forward dequantizes `chunk` output rows at a time and GEMMs
// them (y[:, n0:n1] = x W[n0:n1]ᵀ + ...), the backward dequantizes column blocks (dx[:, k0:k1] = dy W[:, k0:k1] +
// masked LoRA term), so every dx element is rounded once. Dropout masks are the Philox stream of philox.h
// (segment 0), i.e. the very masks the Triton kernels regenerate.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>

#include "dropout.h"
#include "gemm.h"
#include "simd.h"

namespace peftfast {
namespace {

using at::Tensor;

constexpr std::array<float, 16> kNF4 = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};

// decision thresholds: midpoints of neighbouring table values, in fp32 like the Python reference
std::array<float, 15> midpoints() {
  std::array<float, 15> m{};
  for (int i = 0; i < 15; ++i) m[i] = (kNF4[i] + kNF4[i + 1]) * 0.5f;
  return m;
}

inline uint8_t encode(float v, const std::array<float, 15>& mid) {
  uint8_t c = 0;
  for (int i = 0; i < 15; ++i) c += v > mid[i];
  return c;
}

constexpr int64_t kDefaultChunkElems = int64_t{1} << 21;

void check_layout(const Tensor& q, const Tensor& absmax, int64_t bs, const char* op) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "peftfast::", op,
              ": qweight must be a 2-D uint8 tensor [N, K/2], got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(bs >= 2 && bs % 2 == 0, "peftfast::", op, ": block_size must be even and >= 2, got ", bs);
  const int64_t n = q.size(0), k = q.size(1) * 2;
  TORCH_CHECK(k % bs == 0, "peftfast::", op, ": K=", k, " is not a multiple of block_size=", bs);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.dim() == 2 && absmax.size(0) == n &&
                  absmax.size(1) == k / bs,
              "peftfast::", op, ": absmax must be fp32 [", n, ", ", k / bs, "], got ", absmax.scalar_type(), " ",
              absmax.sizes());
}

std::tuple<Tensor, Tensor> nf4_quantize_cpu(const Tensor& w, int64_t bs) {
  TORCH_CHECK(w.dim() == 2 && at::isFloatingType(w.scalar_type()),
              "peftfast::nf4_quantize: expected a 2-D floating weight [N, K], got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(bs >= 2 && bs % 2 == 0, "peftfast::nf4_quantize: block_size must be even and >= 2, got ", bs);
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k % bs == 0, "peftfast::nf4_quantize: K=", k, " is not divisible into blocks of ", bs);
  Tensor wc = w.contiguous();
  Tensor q = at::empty({n, k / 2}, w.options().dtype(at::kByte));
  Tensor absmax = at::empty({n, k / bs}, w.options().dtype(at::kFloat));
  const auto mid = midpoints();
  uint8_t* qp = q.mutable_data_ptr<uint8_t>();
  float* ap = absmax.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "peftfast_nf4_quantize", [&] {
    const scalar_t* src = wc.const_data_ptr<scalar_t>();
    at::parallel_for(0, n * (k / bs), std::max<int64_t>(1, 4096 / bs), [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        const scalar_t* s = src + blk * bs;  // blocks never straddle rows (k % bs == 0)
        float am = 0.0f;
        for (int64_t i = 0; i < bs; ++i) am = std::max(am, std::abs(static_cast<float>(s[i])));
        ap[blk] = am;
        uint8_t* out = qp + blk * bs / 2;
        for (int64_t i = 0; i < bs; i += 2) {
          const float v0 = am > 0.0f ? static_cast<float>(s[i]) / am : 0.0f;
          const float v1 = am > 0.0f ? static_cast<float>(s[i + 1]) / am : 0.0f;
          out[i / 2] = static_cast<uint8_t>((encode(v0, mid) << 4) | encode(v1, mid));
        }
      }
    });
  });
  return {q, absmax};
}

// dst[0:n1-n0, 0:k1-k0] (contiguous, dst's dtype) = W[n0:n1, k0:k1]; k0, k1 multiples of 2
void dequant_block(const Tensor& q, const Tensor& absmax, int64_t bs, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                   Tensor& dst) {
  const int64_t ldq = q.stride(0), lda = absmax.stride(0), cols = k1 - k0;
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const float* ap = absmax.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "peftfast_nf4_dequant", [&] {
    scalar_t* d = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(n0, n1, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
      simd_call([&]() PEFTFAST_SIMD_BODY {
        for (int64_t r = b; r < e; ++r) {
          const uint8_t* qr = qp + r * ldq;
          const float* ar = ap + r * lda;
          scalar_t* dr = d + (r - n0) * cols;
          // block by block: one absmax read per block, no division per element
          for (int64_t c = k0; c < k1;) {
            const float am = ar[c / bs];
            const int64_t end = std::min(k1, (c / bs + 1) * bs);
            for (; c < end; c += 2) {  // c and c+1 share a block (bs even, c even)
              const uint8_t byte = qr[c / 2];
              dr[c - k0] = static_cast<scalar_t>(kNF4[byte >> 4] * am);
              dr[c - k0 + 1] = static_cast<scalar_t>(kNF4[byte & 15] * am);
            }
          }
        }
      });
    });
  });
}

Tensor nf4_dequantize_cpu(const Tensor& q, const Tensor& absmax, int64_t bs, at::ScalarType dtype) {
  check_layout(q, absmax, bs, "nf4_dequantize");
  TORCH_CHECK(at::isFloatingType(dtype), "peftfast::nf4_dequantize: dtype must be floating, got ", dtype);
  const int64_t n = q.size(0), k = q.size(1) * 2;
  Tensor out = at::empty({n, k}, q.options().dtype(dtype));
  dequant_block(q, absmax.contiguous(), bs, 0, n, 0, k, out);
  return out;
}

// ---- LoRA pieces (single member, dropout segment 0; masking from dropout.h) ----
void check_lora(const Tensor& x, const Tensor& q, const Tensor& absmax, const Tensor& a, const Tensor& b, int64_t bs,
                double p, const char* op) {
  check_layout(q, absmax, bs, op);
  const int64_t n = q.size(0), k = q.size(1) * 2;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "peftfast::", op, ": x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(a.dim() == 2 && a.size(1) == k && a.size(0) >= 1, "peftfast::", op, ": lora_a must be [r, ", k,
              "], got ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == n && b.size(1) == a.size(0), "peftfast::", op, ": lora_b must be [", n,
              ", ", a.size(0), "], got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "peftfast::", op, ": lora_a/lora_b dtypes differ");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "peftfast::", op, ": dropout probability must be in [0, 1), got ", p);
}

int64_t chunk_elems(int64_t chunk) { return chunk > 0 ? chunk : kDefaultChunkElems; }

std::tuple<Tensor, Tensor> nf4_lora_fwd_cpu(const Tensor& x, const Tensor& q, const Tensor& absmax,
                                            const std::optional<Tensor>& bias, const std::optional<Tensor>& lbias,
                                            const Tensor& a, const Tensor& b, double scale, double p,
                                            const Tensor& seed, int64_t bs, int64_t chunk) {
  check_lora(x, q, absmax, a, b, bs, p, "nf4_lora_fwd");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  const auto ldt = a.scalar_type();
  Tensor am = absmax.contiguous();
  // xa = keep ⊙ x Aᵀ / (1 - p), in row chunks so no masked copy of x exceeds one chunk
  Tensor xa = masked_down(x, {a}, p, p > 0.0 ? read_seed(seed, "nf4_lora") : 0, chunk_elems(chunk));
  Tensor y = at::empty({m, n}, x.options());
  const int64_t rows_per = std::max<int64_t>(1, std::min<int64_t>(n, chunk_elems(chunk) / std::max<int64_t>(k, 1)));
  Tensor wbuf = at::empty({rows_per, k}, x.options());
  for (int64_t n0 = 0; n0 < n; n0 += rows_per) {
    const int64_t nr = std::min(rows_per, n - n0);
    Tensor wc = wbuf.narrow(0, 0, nr);
    dequant_block(q, am, bs, n0, n0 + nr, 0, k, wc);
    Tensor yc = bias.has_value() ? at::addmm(bias->narrow(0, n0, nr), x, wc.t()) : at::mm(x, wc.t());
    Tensor bc = b.narrow(0, n0, nr);
    if (ldt == yc.scalar_type()) {
      yc.addmm_(xa, bc.t(), 1.0, scale);
      if (lbias.has_value()) yc.add_(lbias->narrow(0, n0, nr), scale);
    } else {
      // LoRA weights in another dtype (fp32 LoRA over a bf16 base): the low-rank term in the LoRA dtype, as PEFT does
      Tensor low = lbias.has_value() ? at::addmm(lbias->narrow(0, n0, nr), xa, bc.t()) : at::mm(xa, bc.t());
      yc = low.mul_(scale).add_(yc).to(yc.scalar_type());
    }
    y.narrow(1, n0, nr).copy_(yc);
  }
  return {y, xa};
}

std::tuple<Tensor, Tensor, Tensor> nf4_lora_bwd_cpu(const Tensor& x, const Tensor& xa, const Tensor& dy,
                                                    const Tensor& q, const Tensor& absmax, const Tensor& a,
                                                    const Tensor& b, double scale, double p, const Tensor& seed,
                                                    int64_t bs, int64_t chunk, bool need_x, bool need_a,
                                                    bool need_b) {
  check_lora(x, q, absmax, a, b, bs, p, "nf4_lora_bwd");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), r = a.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == m && dy.size(1) == n, "peftfast::nf4_lora_bwd: grad must be [", m, ", ",
              n, "], got ", dy.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == m && xa.size(1) == r, "peftfast::nf4_lora_bwd: xa must be [", m, ", ", r,
              "], got ", xa.sizes());
  const auto ldt = xa.scalar_type();
  const uint64_t sd = p > 0.0 ? read_seed(seed, "nf4_lora") : 0;
  const double inv = p > 0.0 ? 1.0 / (1.0 - p) : 1.0;
  Tensor am = absmax.contiguous();
  Tensor g;  // scale * dy B, [M, r] in the LoRA dtype
  if (need_x || need_a) g = scaled_mm(dy.to(ldt), b, scale);

  Tensor dx = at::empty({0}, x.options());
  if (need_x) {
    dx = at::empty({m, k}, dy.options());
    // column blocks of W (multiples of the quantization block), each dx column block computed and rounded once
    int64_t cols = std::max<int64_t>(bs, chunk_elems(chunk) / std::max<int64_t>(n, 1) / bs * bs);
    cols = std::min(cols, k);
    Tensor wbuf = at::empty({n, cols}, dy.options());
    for (int64_t k0 = 0; k0 < k; k0 += cols) {
      const int64_t kc = std::min(cols, k - k0);
      Tensor wc = kc == cols ? wbuf : at::empty({n, kc}, dy.options());
      dequant_block(q, am, bs, 0, n, k0, k0 + kc, wc);
      Tensor dense = at::mm(dy, wc);
      Tensor low = at::mm(g, a.narrow(1, k0, kc)).contiguous();
      Tensor acc = dense.to(acc_type(dy.scalar_type()));
      if (p == 0.0)
        acc.add_(low.to(acc.scalar_type()));
      else {
        Tensor mask = at::empty({m, kc}, x.options().dtype(at::kByte));  // columns k0.. of the M × K mask
        fill_mask(mask, 0, k0, 0, m, k, sd, static_cast<float>(p));
        add_masked(acc, low, mask, inv);
      }
      dx.narrow(1, k0, kc).copy_(acc);
    }
  }

  Tensor da = at::empty({0}, xa.options());
  if (need_a) {
    if (p == 0.0) {
      da = at::mm(g.t(), x.to(ldt));
    } else {
      const auto at_ = acc_type(ldt);
      Tensor acc = at::zeros({r, k}, x.options().dtype(at_));
      const int64_t ch = std::max<int64_t>(1, std::min<int64_t>(m, chunk_elems(chunk) / std::max<int64_t>(k, 1)));
      Tensor buf = at::empty({ch, k}, x.options().dtype(at_));
      Tensor mbuf = at::empty({ch, k}, x.options().dtype(at::kByte));
      for (int64_t r0 = 0; r0 < m; r0 += ch) {
        const int64_t rows = std::min(ch, m - r0);
        Tensor bb = buf.narrow(0, 0, rows), mask = mbuf.narrow(0, 0, rows);
        fill_mask(mask, r0, 0, 0, m, k, sd, static_cast<float>(p));
        apply_mask(x, mask, bb, r0);
        acc.addmm_(g.narrow(0, r0, rows).t().to(at_), bb);
      }
      da = acc.mul_(inv).to(ldt);
    }
  }
  Tensor db = need_b ? scaled_mm(dy.t().to(ldt), xa, scale) : at::empty({0}, xa.options());
  return {dx, da, db};
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, CPU, m) {
  m.impl("nf4_quantize", &peftfast::nf4_quantize_cpu);
  m.impl("nf4_dequantize", &peftfast::nf4_dequantize_cpu);
  m.impl("nf4_lora_fwd", &peftfast::nf4_lora_fwd_cpu);
  m.impl("nf4_lora_bwd", &peftfast::nf4_lora_bwd_cpu);
}
