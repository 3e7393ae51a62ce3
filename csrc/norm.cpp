// CPU kernels of the fused RMSNorm and residual-add + RMSNorm (schemas in ops.cpp; autograd and the Triton/torch
// paths in peftfast/ops/norm.py). Same maths, rounding points and memory contract as the Triton kernels
// (kernels/norm.py): one pass over each row in fp32 (fp64 for fp64 inputs), per-row statistics kept in the
// accumulation type, nothing else saved. Rows are split into a fixed number of blocks (independent of the thread
// count) run by at::parallel_for; the weight gradient is the sum of per-block partials in a fixed order, so results
// do not depend on the number of threads.
//
//   forward   rstd = 1 / sqrt(mean(x²) + eps);  n = x · rstd
//             y = w · round_x(n)  (round_normed: Llama's eager cast order)  |  y = (1 + w) · n  (add_one: Gemma)
//             |  y = w · n;   with a residual, h = round_x(x + r) is written and normalised in place of x
//   backward  g = dy · w',  dx = rstd · (g - n · mean(g · n)) (+ dh),  dw = Σ_rows dy · n'  (n' = round_x(n) when
//             round_normed)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "simd.h"

namespace peftfast {
namespace {

using at::Tensor;

constexpr int64_t kMaxBlocks = 64;  // weight-gradient partials: at most 64 × N accumulators
constexpr int kLanes = 16;          // independent accumulators, so the compiler vectorises the reductions

// ``t`` [..., n] as [M, n] rows with a unit column stride: a view when the layout allows it, else a copy.
Tensor as_rows(const Tensor& t, int64_t n) {
  Tensor r = t.reshape({-1, n});
  if (n > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

template <typename T>
PEFTFAST_HOT T sum_sq(const T* p, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += p[i + j] * p[i + j];
  T s = 0;
  for (; i < n; ++i) s += p[i] * p[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
PEFTFAST_HOT T dot(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  T s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// (rows per block, number of blocks) for m rows
std::pair<int64_t, int64_t> split_rows(int64_t m) {
  const int64_t per = std::max<int64_t>(1, (m + kMaxBlocks - 1) / kMaxBlocks);
  return {per, (m + per - 1) / per};
}

// blocks a thread takes at least, so that small inputs are not spread over threads (about 32k values each)
int64_t block_grain(int64_t per, int64_t n) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(per * n, 1));
}

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_input(const Tensor& x, const Tensor& weight, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "peftfast::", op, ": the CPU kernel got a tensor on ", x.device());
  TORCH_CHECK(x.dim() >= 1, "peftfast::", op, ": the input must have at least one dimension");
  TORCH_CHECK(supported(x.scalar_type()), "peftfast::", op, ": input dtype ", x.scalar_type(),
              " is not supported (float32, float16, bfloat16, float64)");
  TORCH_CHECK(supported(weight.scalar_type()), "peftfast::", op, ": weight dtype ", weight.scalar_type(),
              " is not supported");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n > 0, "peftfast::", op, ": the last dimension is empty");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "peftfast::", op, ": input has ", n,
              " features, the weight has shape ", weight.sizes());
}

// dtype of y: Llama's ``weight * h.to(input_dtype)`` promotes; the other forms cast to the input's dtype
at::ScalarType out_type(const Tensor& x, const Tensor& weight, bool round_normed) {
  return round_normed ? at::promote_types(x.scalar_type(), weight.scalar_type()) : x.scalar_type();
}

template <typename x_t, typename y_t>
void rms_fwd_kernel(const Tensor& x2d, const Tensor& r2d, Tensor& h2d, const Tensor& wf, Tensor& y2d, Tensor& rstd,
                    double eps, bool round_normed) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t m = x2d.size(0), n = x2d.size(1);
  const bool has_res = r2d.defined();
  const x_t* xp = x2d.const_data_ptr<x_t>();
  const x_t* rp = has_res ? r2d.const_data_ptr<x_t>() : nullptr;
  x_t* hp = has_res ? h2d.mutable_data_ptr<x_t>() : nullptr;
  const int64_t sx = x2d.stride(0), sr = has_res ? r2d.stride(0) : 0;
  const acc_t* w = wf.const_data_ptr<acc_t>();
  y_t* yp = y2d.mutable_data_ptr<y_t>();
  acc_t* rs = rstd.mutable_data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps), inv_n = acc_t(1) / static_cast<acc_t>(n);
  const auto [per, blocks] = split_rows(m);
  at::parallel_for(0, blocks, block_grain(per, n), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(n);
    simd_call([&]() PEFTFAST_SIMD_BODY {
      for (int64_t row = b0 * per; row < std::min(m, b1 * per); ++row) {
        const x_t* xr = xp + row * sx;
        if (has_res) {
          const x_t* rr = rp + row * sr;
          x_t* hr = hp + row * n;
          for (int64_t c = 0; c < n; ++c) {
            // rounded as the eager add rounds it: the norm sees the h the next block receives
            const x_t hv = static_cast<x_t>(static_cast<acc_t>(xr[c]) + static_cast<acc_t>(rr[c]));
            hr[c] = hv;
            buf[c] = static_cast<acc_t>(hv);
          }
        } else {
          for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<acc_t>(xr[c]);
        }
        const acc_t r = acc_t(1) / std::sqrt(sum_sq(buf.data(), n) * inv_n + e);
        rs[row] = r;
        y_t* yr = yp + row * n;
        if (round_normed) {
          for (int64_t c = 0; c < n; ++c)
            yr[c] = static_cast<y_t>(w[c] * static_cast<acc_t>(static_cast<x_t>(buf[c] * r)));
        } else {
          for (int64_t c = 0; c < n; ++c) yr[c] = static_cast<y_t>(buf[c] * r * w[c]);
        }
      }
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                                    const Tensor& weight, double eps, bool add_one,
                                                    bool round_normed) {
  check_input(x, weight, "rms_norm_fwd");
  const int64_t n = x.size(-1);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "peftfast::rms_norm_fwd: residual ", residual->sizes(), " ", residual->scalar_type(),
                " does not match the input ", x.sizes(), " ", x.scalar_type());
  }
  const auto ydt = out_type(x, weight, round_normed);
  TORCH_CHECK(ydt == x.scalar_type() || ydt == at::kFloat, "peftfast::rms_norm_fwd: input ", x.scalar_type(),
              " with weight ", weight.scalar_type(), " is not a supported combination");
  const auto adt = acc_type(x.scalar_type());
  Tensor x2d = as_rows(x, n);
  const int64_t m = x2d.size(0);
  Tensor r2d = has_res ? as_rows(*residual, n) : Tensor();
  Tensor y = at::empty(x.sizes(), x.options().dtype(ydt));
  Tensor h = has_res ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor rstd = at::empty({m}, x.options().dtype(adt));
  if (m == 0) return {y, h, rstd};
  Tensor wf = weight.to(adt).contiguous();
  if (add_one) wf = wf.add(1.0);  // 1 + w in the accumulation type, as Gemma's ``1.0 + weight.float()``
  Tensor y2d = y.view({m, n});
  Tensor h2d = has_res ? h.view({m, n}) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peftfast_rms_norm_fwd", [&] {
    if (ydt == x.scalar_type())
      rms_fwd_kernel<scalar_t, scalar_t>(x2d, r2d, h2d, wf, y2d, rstd, eps, round_normed);
    else
      rms_fwd_kernel<scalar_t, float>(x2d, r2d, h2d, wf, y2d, rstd, eps, round_normed);
  });
  return {y, h, rstd};
}

template <typename x_t, typename dy_t>
void rms_bwd_kernel(const Tensor& dy2d, const Tensor& x2d, const Tensor& wf, const Tensor& rstd, const Tensor& dh2d,
                    Tensor& dx2d, Tensor& part, bool round_normed) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t m = x2d.size(0), n = x2d.size(1);
  const bool need_dx = dx2d.defined(), need_dw = part.defined(), has_dh = dh2d.defined();
  const x_t* xp = x2d.const_data_ptr<x_t>();
  const dy_t* dyp = dy2d.const_data_ptr<dy_t>();
  const x_t* dhp = has_dh ? dh2d.const_data_ptr<x_t>() : nullptr;
  x_t* dxp = need_dx ? dx2d.mutable_data_ptr<x_t>() : nullptr;
  acc_t* pp = need_dw ? part.mutable_data_ptr<acc_t>() : nullptr;
  const int64_t sx = x2d.stride(0), sdy = dy2d.stride(0), sdh = has_dh ? dh2d.stride(0) : 0;
  const acc_t* w = wf.const_data_ptr<acc_t>();
  const acc_t* rs = rstd.const_data_ptr<acc_t>();
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const auto [per, blocks] = split_rows(m);
  at::parallel_for(0, blocks, block_grain(per, n), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> nb(n), gb(n), db(n);
    simd_call([&]() PEFTFAST_SIMD_BODY {
      for (int64_t blk = b0; blk < b1; ++blk) {
        acc_t* dw = need_dw ? pp + blk * n : nullptr;
        for (int64_t row = blk * per; row < std::min(m, (blk + 1) * per); ++row) {
          const x_t* xr = xp + row * sx;
          const dy_t* dyr = dyp + row * sdy;
          const acc_t r = rs[row];
          // branch-free loops, so each vectorises
          for (int64_t c = 0; c < n; ++c) {
            db[c] = static_cast<acc_t>(dyr[c]);
            nb[c] = static_cast<acc_t>(xr[c]) * r;
          }
          for (int64_t c = 0; c < n; ++c) gb[c] = db[c] * w[c];
          if (need_dw) {
            if (round_normed) {
              for (int64_t c = 0; c < n; ++c) dw[c] += db[c] * static_cast<acc_t>(static_cast<x_t>(nb[c]));
            } else {
              for (int64_t c = 0; c < n; ++c) dw[c] += db[c] * nb[c];
            }
          }
          if (!need_dx) continue;
          const acc_t mean_gn = dot(gb.data(), nb.data(), n) * inv_n;
          x_t* dxr = dxp + row * n;
          if (has_dh) {
            const x_t* dhr = dhp + row * sdh;
            for (int64_t c = 0; c < n; ++c)
              dxr[c] = static_cast<x_t>((gb[c] - nb[c] * mean_gn) * r + static_cast<acc_t>(dhr[c]));
          } else {
            for (int64_t c = 0; c < n; ++c) dxr[c] = static_cast<x_t>((gb[c] - nb[c] * mean_gn) * r);
          }
        }
      }
    });
  });
}

std::tuple<Tensor, Tensor> rms_norm_bwd_cpu(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                            const Tensor& rstd, const std::optional<Tensor>& dh, bool add_one,
                                            bool round_normed, bool need_dx, bool need_dw) {
  check_input(x, weight, "rms_norm_bwd");
  const int64_t n = x.size(-1);
  TORCH_CHECK(dy.sizes() == x.sizes(), "peftfast::rms_norm_bwd: grad ", dy.sizes(), " does not match the input ",
              x.sizes());
  const auto dydt = dy.scalar_type();
  TORCH_CHECK(dydt == x.scalar_type() || dydt == at::kFloat, "peftfast::rms_norm_bwd: grad dtype ", dydt,
              " with input ", x.scalar_type(), " is not supported");
  const bool has_dh = dh.has_value() && dh->defined();
  if (has_dh) {
    TORCH_CHECK(dh->sizes() == x.sizes() && dh->scalar_type() == x.scalar_type(), "peftfast::rms_norm_bwd: dh ",
                dh->sizes(), " ", dh->scalar_type(), " does not match the input");
  }
  const auto adt = acc_type(x.scalar_type());
  Tensor x2d = as_rows(x, n);
  const int64_t m = x2d.size(0);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == m && rstd.scalar_type() == adt,
              "peftfast::rms_norm_bwd: rstd must be ", adt, " [", m, "], got ", rstd.scalar_type(), " ", rstd.sizes());
  Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor dw = at::empty({0}, weight.options());
  if (!need_dx && !need_dw) return {dx, dw};
  const auto [per, blocks] = split_rows(m);
  Tensor part = need_dw ? at::zeros({blocks, n}, x.options().dtype(adt)) : Tensor();
  if (m > 0) {
    Tensor wf = weight.to(adt).contiguous();
    if (add_one) wf = wf.add(1.0);
    Tensor dy2d = as_rows(dy, n);
    Tensor dh2d = has_dh ? as_rows(*dh, n) : Tensor();
    Tensor dx2d = need_dx ? dx.view({m, n}) : Tensor();
    Tensor rs = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peftfast_rms_norm_bwd", [&] {
      if (dydt == x.scalar_type())
        rms_bwd_kernel<scalar_t, scalar_t>(dy2d, x2d, wf, rs, dh2d, dx2d, part, round_normed);
      else
        rms_bwd_kernel<scalar_t, float>(dy2d, x2d, wf, rs, dh2d, dx2d, part, round_normed);
    });
  }
  if (need_dw) dw = m > 0 ? part.sum(0).to(weight.scalar_type()) : at::zeros_like(weight);
  return {dx, dw};
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, CPU, m) {
  m.impl("rms_norm_fwd", &peftfast::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &peftfast::rms_norm_bwd_cpu);
}
