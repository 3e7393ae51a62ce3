// CPU kernels of the fused LoRA linear (schemas in ops.cpp; autograd and the CUDA/Triton path in
// peftfast/ops/lora.py). Same memory contract as the Triton path: nothing M×K is kept besides x itself, the
// dropout masks are regenerated from the seed with the Philox stream the Triton kernels use (philox.h), so both
// paths drop the same elements. GEMMs are ATen's (MKL/oneDNN); masking runs in at::parallel_for epilogues over
// row chunks, so a masked copy never exceeds one chunk (kChunkElems elements) per segment.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "dropout.h"
#include "gemm.h"
#include "philox.h"

namespace peftfast {
namespace {

using at::Tensor;
constexpr int64_t kChunkElems = int64_t{1} << 20;

int64_t chunk_rows(int64_t m, int64_t k) {
  return std::max<int64_t>(1, std::min<int64_t>(m, kChunkElems / std::max<int64_t>(k, 1)));
}

void check_common(const Tensor& x, at::TensorList weights, at::TensorList lora_as, at::TensorList lora_bs,
                  at::ArrayRef<double> scales, double p) {
  TORCH_CHECK(x.dim() == 2, "peftfast::lora_group: x must be 2-D [M, K], got ", x.sizes());
  const size_t n = weights.size();
  TORCH_CHECK(n >= 1 && lora_as.size() == n && lora_bs.size() == n && scales.size() == n,
              "peftfast::lora_group: weights, lora_as, lora_bs and scales need the same non-zero length");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "peftfast::lora_group: dropout probability must be in [0, 1), got ", p);
  const int64_t r = lora_as[0].size(0), k = x.size(1);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == k, "peftfast::lora_group: weight ", i, " has shape ",
                weights[i].sizes(), ", expected [N, ", k, "]");
    TORCH_CHECK(lora_as[i].dim() == 2 && lora_as[i].size(0) == r && lora_as[i].size(1) == k,
                "peftfast::lora_group: lora_A ", i, " has shape ", lora_as[i].sizes(), ", expected [", r, ", ", k, "]");
    TORCH_CHECK(lora_bs[i].dim() == 2 && lora_bs[i].size(0) == weights[i].size(0) && lora_bs[i].size(1) == r,
                "peftfast::lora_group: lora_B ", i, " has shape ", lora_bs[i].sizes());
  }
}

std::tuple<std::vector<Tensor>, Tensor> lora_group_fwd_cpu(const Tensor& x, at::TensorList weights,
                                                          at::TensorList biases, at::TensorList lora_biases,
                                                          at::TensorList lora_as, at::TensorList lora_bs,
                                                          at::ArrayRef<double> scales, double p, const Tensor& seed,
                                                          bool keep_xa) {
  check_common(x, weights, lora_as, lora_bs, scales, p);
  const int64_t n = weights.size(), r = lora_as[0].size(0);
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == n && static_cast<int64_t>(lora_biases.size()) == n,
              "peftfast::lora_group_fwd: one (possibly empty) bias and LoRA bias per member");
  Tensor xa = masked_down(x, lora_as, p, p > 0.0 ? read_seed(seed, "lora_group") : 0, kChunkElems);
  std::vector<Tensor> ys;
  ys.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    // an empty tensor stands for "no bias" (see the schema)
    const std::optional<Tensor> b = biases[i].numel() ? std::optional<Tensor>(biases[i]) : std::nullopt;
    const std::optional<Tensor> lb = lora_biases[i].numel() ? std::optional<Tensor>(lora_biases[i]) : std::nullopt;
    Tensor y = b.has_value() ? at::addmm(*b, x, weights[i].t()) : at::mm(x, weights[i].t());
    Tensor xa_i = xa.narrow(1, i * r, r);
    if (xa_i.scalar_type() == y.scalar_type()) {
      y.addmm_(xa_i, lora_bs[i].t(), 1.0, scales[i]);
      if (lb.has_value()) y.add_(*lb, scales[i]);
    } else {
      // LoRA weights in another dtype (fp32 LoRA over a bf16 base): the low-rank term in the LoRA dtype, as PEFT does
      Tensor low = lb.has_value() ? at::addmm(*lb, xa_i, lora_bs[i].t()) : at::mm(xa_i, lora_bs[i].t());
      y = low.mul_(scales[i]).add_(y).to(y.scalar_type());
    }
    ys.push_back(std::move(y));
  }
  if (!keep_xa) return {std::move(ys), at::empty({0}, xa.options())};
  return {std::move(ys), std::move(xa)};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> lora_group_bwd_cpu(
    const Tensor& x, const Tensor& xa, const c10::List<std::optional<Tensor>>& grads, at::TensorList weights,
    at::TensorList lora_as, at::TensorList lora_bs, at::ArrayRef<double> scales, double p, const Tensor& seed,
    bool need_x, bool need_a, at::IntArrayRef need_b) {
  check_common(x, weights, lora_as, lora_bs, scales, p);
  const bool xa_kept = xa.dim() == 2;
  TORCH_CHECK(xa_kept ? xa.size(0) == x.size(0) && xa.size(1) == static_cast<int64_t>(weights.size()) * lora_as[0].size(0)
                      : xa.numel() == 0,
              "peftfast::lora_group_bwd: xa has shape ", xa.sizes(), ", expected [M, n*r] or [0] (not kept: rebuilt)");
  const int64_t n = weights.size(), r = lora_as[0].size(0), m = x.size(0), k = x.size(1);
  const auto ldt = xa.scalar_type();
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(need_b.size()) == n,
              "peftfast::lora_group_bwd: one grad and one need_b flag per member");
  const uint64_t sd = p > 0.0 ? read_seed(seed, "lora_group") : 0;
  const double inv = p > 0.0 ? 1.0 / (1.0 - p) : 1.0;

  Tensor g_cat;  // scale_i * dy_i B_i, [M, n*r] in the LoRA dtype
  if (need_x || need_a) {
    const std::optional<Tensor> dy0 = grads.get(0);
    if (n == 1 && dy0.has_value()) {
      // one member (most calls): the product itself, no [M, r] buffer to copy it into
      g_cat = scaled_mm(dy0->to(ldt), lora_bs[0], scales[0]);
    } else {
      g_cat = at::empty({m, n * r}, x.options().dtype(ldt));
      for (int64_t i = 0; i < n; ++i) {
        Tensor gi = g_cat.narrow(1, i * r, r);
        const std::optional<Tensor> dy = grads.get(i);
        if (dy.has_value())
          gi.copy_(scaled_mm(dy->to(ldt), lora_bs[i], scales[i]));
        else
          gi.zero_();
      }
    }
  }

  Tensor dx = at::empty({0}, x.options());
  if (need_x) {
    Tensor dense;
    for (int64_t i = 0; i < n; ++i) {
      const std::optional<Tensor> dy = grads.get(i);
      if (!dy.has_value()) continue;
      Tensor w = weights[i].to(dy->scalar_type());
      dense = dense.defined() ? dense.addmm_(*dy, w) : at::mm(*dy, w);
    }
    if (p == 0.0) {
      Tensor a_cat = n == 1 ? lora_as[0] : at::cat(lora_as, 0);
      if (dense.defined() && g_cat.scalar_type() == dense.scalar_type()) {
        dx = dense.addmm_(g_cat, a_cat);  // into the dense term: no [M, K] temporary, no extra pass over it
      } else {
        Tensor low = at::mm(g_cat, a_cat);
        dx = dense.defined() ? dense.add_(low.to(dense.scalar_type())) : low.to(x.scalar_type());
      }
    } else {
      dx = dense.defined() ? dense : at::zeros({m, k}, x.options());
    }
  }

  Tensor da = at::empty({0}, xa.options());
  if (need_a && p == 0.0) da = at::mm(g_cat.t(), x.to(ldt));
  if (p > 0.0 && (need_x || need_a)) {
    // one pass over row chunks: each (chunk, segment) mask is generated once and serves dx and dA
    const auto acc_a = acc_type(ldt);
    Tensor da_acc = need_a ? at::zeros({n * r, k}, x.options().dtype(acc_a)) : Tensor();
    const int64_t ch = chunk_rows(m, k);
    Tensor mbuf = at::empty({ch, k}, x.options().dtype(at::kByte));
    Tensor xbuf = need_a ? at::empty({ch, k}, x.options().dtype(acc_a)) : Tensor();
      for (int64_t row0 = 0; row0 < m; row0 += ch) {
      const int64_t rows = std::min(ch, m - row0);
      Tensor mask = mbuf.narrow(0, 0, rows);
      // one rounding of dx per chunk whatever the number of members: accumulate in fp32 (fp64 for fp64)
      Tensor dxc, acc;
      if (need_x) {
        dxc = dx.narrow(0, row0, rows);
        acc = dxc.to(acc_type(dx.scalar_type())).contiguous();
      }
      for (int64_t s = 0; s < n; ++s) {
        fill_mask(mask, row0, 0, s, m, k, sd, static_cast<float>(p));
        Tensor g_s = g_cat.narrow(0, row0, rows).narrow(1, s * r, r);
        if (need_x) add_masked(acc, at::mm(g_s, lora_as[s]).contiguous(), mask, inv);
        if (need_a) {
          Tensor b = xbuf.narrow(0, 0, rows);
          apply_mask(x, mask, b, row0);
          da_acc.narrow(0, s * r, r).addmm_(g_s.t().to(acc_a), b);
        }
      }
      if (need_x && !acc.is_same(dxc)) dxc.copy_(acc);  // fp32 dx: acc is dx itself, accumulated in place
    }
    if (need_a) da = da_acc.mul_(inv).to(ldt);
  }

  std::vector<Tensor> dbs;
  dbs.reserve(n);
  bool need_xa = false;
  for (int64_t i = 0; i < n; ++i) need_xa = need_xa || (need_b[i] && grads.get(i).has_value());
  // the forward kept no xa (keep_xa=false): the same masked GEMM on the same x and seed gives the same bits
  const Tensor xa_full = xa_kept || !need_xa ? xa : masked_down(x, lora_as, p, sd, kChunkElems);
  for (int64_t i = 0; i < n; ++i) {
    const std::optional<Tensor> dy = grads.get(i);
    if (need_b[i] && dy.has_value())
      dbs.push_back(scaled_mm(dy->t().to(ldt), xa_full.narrow(1, i * r, r), scales[i]));
    else
      dbs.push_back(at::empty({0}, xa.options()));
  }
  return {dx, da, std::move(dbs)};
}

Tensor dropout_keep_mask_cpu(const Tensor& like, const Tensor& seed, int64_t nseg, int64_t m, int64_t k, double p) {
  Tensor out = at::empty({nseg, m, k}, like.options().dtype(at::kBool));
  // bool is one byte holding 0/1, exactly what fill_mask writes; segment s is rows s*m.. of one [nseg*m, k] mask
  Tensor flat = out.view({nseg * m, k}).view(at::kByte);
  fill_mask(flat, 0, 0, 0, nseg * m, k, read_seed(seed, "dropout_keep_mask"), static_cast<float>(p));
  return out;
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, CPU, m) {
  m.impl("lora_group_fwd", &peftfast::lora_group_fwd_cpu);
  m.impl("lora_group_bwd", &peftfast::lora_group_bwd_cpu);
  m.impl("dropout_keep_mask", &peftfast::dropout_keep_mask_cpu);
}
