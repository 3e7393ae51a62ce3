// CPU kernels of the fused bottleneck Adapter (schemas in ops.cpp; autograd and the weight gradients in
// peftfast/ops/adapter.py). Same maths and memory contract as the Triton kernels (kernels/adapter.py):
//
//   forward   z = x Wdᵀ + bd                              (returned and saved, M × H)
//             a = act(z)                                  (row-wise epilogue; transient, never saved)
//             out = res + s · a Wuᵀ + bu
//   backward  u = dout Wu                                 (M × H, fp32)
//             dz = s · u ⊙ act'(z),  a = act(z),  ds = Σ a ⊙ u   (one row-wise pass over z and u, fp32 inside)
//             dx = dz Wd (+ dout when res is x)
//
// The GEMMs are ATen's, in the tensors' dtype (rounded as the torch backend rounds them: it mirrors the eager
// module); the element-wise parts between them run in fp32 (fp64 for fp64) in at::parallel_for over rows, one
// rounding per output. Everything M × H is small next to M × K (H <= 256).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "activations.h"
#include "simd.h"

namespace peftfast {
namespace {

using at::Tensor;
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

double read_scale(const Tensor& scale, const char* op) {
  TORCH_CHECK(scale.numel() == 1, "peftfast::", op, ": scale must be a one-element tensor, got ", scale.sizes());
  return scale.to(at::kCPU).to(at::kDouble).reshape({}).item<double>();
}

void check_weights(const Tensor& wd, const Tensor& wu, const Tensor& like, const char* op) {
  TORCH_CHECK(like.device().is_cpu(), "peftfast::", op, ": the CPU kernel got a tensor on ", like.device());
  const auto t = like.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, "peftfast::", op,
              ": dtype ", t, " is not supported (float32, float16, bfloat16, float64)");
  TORCH_CHECK(wd.dim() == 2 && wu.dim() == 2 && wu.size(1) == wd.size(0), "peftfast::", op,
              ": projections must be Wd [H, K] and Wu [N, H], got ", wd.sizes(), " and ", wu.sizes());
  TORCH_CHECK(wd.scalar_type() == t && wu.scalar_type() == t, "peftfast::", op,
              ": input and adapter weights must share one dtype (", t, ", ", wd.scalar_type(), ", ",
              wu.scalar_type(), ")");
}

// a = act(z) over contiguous [M, H]
template <typename T, Act A>
void act_rows(const Tensor& z, Tensor& a) {
  using acc_t = at::opmath_type<T>;
  const T* zp = z.const_data_ptr<T>();
  T* ap = a.mutable_data_ptr<T>();
  at::parallel_for(0, z.numel(), grain(1), [&](int64_t b, int64_t e) {
    simd_call([&]() PEFTFAST_SIMD_BODY {
      for (int64_t i = b; i < e; ++i) ap[i] = static_cast<T>(act_fn<A>(static_cast<acc_t>(zp[i])));
    });
  });
}

std::tuple<Tensor, Tensor> adapter_fwd_cpu(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& wd,
                                           const std::optional<Tensor>& bd, const Tensor& wu,
                                           const std::optional<Tensor>& bu, const Tensor& scale,
                                           const std::string& act) {
  check_weights(wd, wu, x, "adapter_fwd");
  const Act a = parse_act(act, "adapter_fwd");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == wd.size(1), "peftfast::adapter_fwd: x must be [M, ", wd.size(1),
              "], got ", x.sizes());
  const int64_t m = x.size(0), h = wd.size(0), n = wu.size(0);
  const bool has_res = residual.has_value() && residual->defined();
  TORCH_CHECK(has_res || n == x.size(1), "peftfast::adapter_fwd: a sequential adapter must map ", x.size(1),
              " features back to ", x.size(1), ", not ", n);
  if (has_res) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n &&
                    residual->scalar_type() == x.scalar_type(),
                "peftfast::adapter_fwd: residual ", residual->sizes(), " ", residual->scalar_type(), " must be [",
                m, ", ", n, "] ", x.scalar_type());
  }
  const bool has_bd = bd.has_value() && bd->defined(), has_bu = bu.has_value() && bu->defined();
  TORCH_CHECK(!has_bd || (bd->dim() == 1 && bd->size(0) == h && bd->scalar_type() == x.scalar_type()),
              "peftfast::adapter_fwd: down bias must be [", h, "] ", x.scalar_type());
  TORCH_CHECK(!has_bu || (bu->dim() == 1 && bu->size(0) == n && bu->scalar_type() == x.scalar_type()),
              "peftfast::adapter_fwd: up bias must be [", n, "] ", x.scalar_type());
  const double s = read_scale(scale, "adapter_fwd");
  Tensor z = has_bd ? at::addmm(*bd, x, wd.t()) : at::mm(x, wd.t());
  if (!z.is_contiguous()) z = z.contiguous();
  Tensor act_out = at::empty_like(z);
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peftfast_adapter_fwd", [&] {
      dispatch_act(a, [&](auto tag) { act_rows<scalar_t, decltype(tag)::value>(z, act_out); });
    });
  }
  Tensor out = at::addmm(has_res ? *residual : x, act_out, wu.t(), 1.0, s);
  if (has_bu) out.add_(*bu);
  if (!out.is_contiguous()) out = out.contiguous();
  return {out, z};
}

template <typename T, Act A>
void bwd_rows(const Tensor& u, const Tensor& z, Tensor& dz, Tensor& a, Tensor& ds_rows, double scale) {
  using acc_t = at::opmath_type<T>;
  const int64_t m = z.size(0), h = z.size(1);
  const acc_t* up = u.const_data_ptr<acc_t>();
  const T* zp = z.const_data_ptr<T>();
  T* dzp = dz.mutable_data_ptr<T>();
  T* ap = a.mutable_data_ptr<T>();
  acc_t* dsp = ds_rows.defined() ? ds_rows.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t s = static_cast<acc_t>(scale);
  at::parallel_for(0, m, grain(h), [&](int64_t b, int64_t e) {
    simd_call([&]() PEFTFAST_SIMD_BODY {
      for (int64_t r = b; r < e; ++r) {
        acc_t ds = 0;
        for (int64_t c = r * h; c < (r + 1) * h; ++c) {
          acc_t av, dav;
          act_and_grad<A>(static_cast<acc_t>(zp[c]), av, dav);
          const acc_t uv = up[c];
          dzp[c] = static_cast<T>(uv * s * dav);
          ap[c] = static_cast<T>(av);
          ds += av * uv;
        }
        if (dsp) dsp[r] = ds;
      }
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> adapter_bwd_cpu(const Tensor& grad, const Tensor& z, const Tensor& wd,
                                                           const Tensor& wu, const Tensor& scale,
                                                           const std::string& act, bool add_grad, bool need_dx,
                                                           bool need_ds) {
  check_weights(wd, wu, z, "adapter_bwd");
  const Act a = parse_act(act, "adapter_bwd");
  const int64_t h = wd.size(0), k = wd.size(1), n = wu.size(0);
  TORCH_CHECK(z.dim() == 2 && z.size(1) == h, "peftfast::adapter_bwd: z must be [M, ", h, "], got ", z.sizes());
  const int64_t m = z.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == m && grad.size(1) == n && grad.scalar_type() == z.scalar_type(),
              "peftfast::adapter_bwd: grad must be [", m, ", ", n, "] ", z.scalar_type(), ", got ", grad.sizes(), " ",
              grad.scalar_type());
  TORCH_CHECK(!add_grad || n == k, "peftfast::adapter_bwd: add_grad needs N == K (", n, " vs ", k, ")");
  const double s = read_scale(scale, "adapter_bwd");
  const auto adt = acc_type(z.scalar_type());
  Tensor zc = z.contiguous();
  // u [M, H] in fp32 (as the Triton kernel keeps it): dz and ds (a sum that may cancel) take no rounding of u.
  // In fp16 / bf16 the fp32 copy of grad is made a row chunk at a time (at most 2^20 values).
  Tensor u;
  if (z.scalar_type() == adt) {
    u = at::mm(grad, wu).contiguous();
  } else {
    u = at::empty({m, h}, z.options().dtype(adt));
    Tensor wu_acc = wu.to(adt);
    const int64_t ch = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(n, 1));
    for (int64_t row0 = 0; row0 < m; row0 += ch) {
      const int64_t rows = std::min(ch, m - row0);
      Tensor uc = u.narrow(0, row0, rows);
      at::mm_out(uc, grad.narrow(0, row0, rows).to(adt), wu_acc);
    }
  }
  Tensor dz = at::empty({m, h}, z.options()), act_out = at::empty({m, h}, z.options());
  Tensor ds_rows = need_ds ? at::empty({m}, z.options().dtype(adt)) : Tensor();
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "peftfast_adapter_bwd", [&] {
      dispatch_act(a, [&](auto tag) { bwd_rows<scalar_t, decltype(tag)::value>(u, zc, dz, act_out, ds_rows, s); });
    });
  }
  Tensor dx = at::empty({0}, z.options());
  if (need_dx) {
    dx = add_grad ? at::addmm(grad, dz, wd) : at::mm(dz, wd);
    if (!dx.is_contiguous()) dx = dx.contiguous();
  }
  Tensor ds = need_ds ? ds_rows.sum() : at::empty({0}, z.options().dtype(adt));
  return {dz, act_out, dx, ds};
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, CPU, m) {
  m.impl("adapter_fwd", &peftfast::adapter_fwd_cpu);
  m.impl("adapter_bwd", &peftfast::adapter_bwd_cpu);
}
