// CPU kernels of the gated MLP activation product (SwiGLU / GeGLU) of the fused LoRA-MLP (schemas in ops.cpp; the
// op glue in peftfast/ops/mlp.py):
//
//   forward   h = act(g) · u
//   backward  dg = dh · u · act'(g),  du = dh · act(g)      (h is never saved: the LoRA-MLP op rebuilds it)
//
// One pass, in fp32 (fp64 for fp64 tensors) with a single rounding per output, like the Triton kernels in
// kernels/mlp.py. TensorIterator walks any strides (no contiguous copies) and splits the work with
// at::parallel_for; outputs take ``empty_like(g)``'s layout. The loops run AVX2+FMA code where the CPU has it (simd.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "activations.h"
#include "simd.h"

namespace peftfast {
namespace {

using at::Tensor;

void check(const Tensor& g, const Tensor& u, const char* op) {
  TORCH_CHECK(g.device().is_cpu() && u.device().is_cpu(), "peftfast::", op, ": the CPU kernel got tensors on ",
              g.device(), " and ", u.device());
  TORCH_CHECK(g.sizes() == u.sizes(), "peftfast::", op, ": gate ", g.sizes(), " and up ", u.sizes(),
              " shapes differ");
  TORCH_CHECK(g.scalar_type() == u.scalar_type(), "peftfast::", op, ": gate ", g.scalar_type(), " and up ",
              u.scalar_type(), " dtypes differ");
  const auto t = g.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, "peftfast::", op,
              ": dtype ", t, " is not supported (float32, float16, bfloat16, float64)");
}

// Blocks of kBlock elements are gathered into fp32 buffers (any stride), computed there in loops the compiler
// vectorises (the activations are call- and branch-free in fp32), and scattered back rounded once.
constexpr int64_t kBlock = 256;

template <typename T, typename A>
PEFTFAST_HOT void gather(const char* p, int64_t stride, int64_t len, A* out) {
  if (stride == static_cast<int64_t>(sizeof(T))) {
    const T* q = reinterpret_cast<const T*>(p);
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<A>(q[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<A>(*reinterpret_cast<const T*>(p + i * stride));
  }
}

template <typename T, typename A>
PEFTFAST_HOT void scatter(char* p, int64_t stride, int64_t len, const A* in) {
  if (stride == static_cast<int64_t>(sizeof(T))) {
    T* q = reinterpret_cast<T*>(p);
    for (int64_t i = 0; i < len; ++i) q[i] = static_cast<T>(in[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) *reinterpret_cast<T*>(p + i * stride) = static_cast<T>(in[i]);
  }
}

Tensor act_mul_fwd_cpu(const Tensor& g, const Tensor& u, const std::string& act) {
  check(g, u, "act_mul_fwd");
  const Act a = parse_act(act, "act_mul_fwd");
  Tensor h = at::empty_like(g);
  if (h.numel() == 0) return h;
  auto iter = at::TensorIteratorConfig().add_output(h).add_const_input(g).add_const_input(u).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "peftfast_act_mul_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      iter.for_each([](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        simd_call([&]() PEFTFAST_SIMD_BODY {
          acc_t gb[kBlock], ub[kBlock];
          for (int64_t j = 0; j < n1; ++j) {
            char* hp = data[0] + j * strides[3];
            const char* gp = data[1] + j * strides[4];
            const char* up = data[2] + j * strides[5];
            for (int64_t i0 = 0; i0 < n0; i0 += kBlock) {
              const int64_t len = std::min(kBlock, n0 - i0);
              gather<scalar_t>(gp + i0 * strides[1], strides[1], len, gb);
              gather<scalar_t>(up + i0 * strides[2], strides[2], len, ub);
              for (int64_t i = 0; i < len; ++i) gb[i] = act_fn<A>(gb[i]) * ub[i];
              scatter<scalar_t>(hp + i0 * strides[0], strides[0], len, gb);
            }
          }
        });
      });
    });
  });
  return h;
}

std::tuple<Tensor, Tensor> act_mul_bwd_cpu(const Tensor& dh, const Tensor& g, const Tensor& u,
                                           const std::string& act) {
  check(g, u, "act_mul_bwd");
  TORCH_CHECK(dh.sizes() == g.sizes() && dh.scalar_type() == g.scalar_type(), "peftfast::act_mul_bwd: grad ",
              dh.sizes(), " ", dh.scalar_type(), " does not match the gate ", g.sizes(), " ", g.scalar_type());
  const Act a = parse_act(act, "act_mul_bwd");
  Tensor dg = at::empty_like(g), du = at::empty_like(g);
  if (g.numel() == 0) return {dg, du};
  auto iter = at::TensorIteratorConfig()
                  .add_output(dg)
                  .add_output(du)
                  .add_const_input(dh)
                  .add_const_input(g)
                  .add_const_input(u)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "peftfast_act_mul_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      iter.for_each([](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        simd_call([&]() PEFTFAST_SIMD_BODY {
          acc_t db[kBlock], gb[kBlock], ub[kBlock];
          const int64_t* s1 = strides + 5;
          for (int64_t j = 0; j < n1; ++j) {
            char* dgp = data[0] + j * s1[0];
            char* dup = data[1] + j * s1[1];
            const char* dhp = data[2] + j * s1[2];
            const char* gp = data[3] + j * s1[3];
            const char* up = data[4] + j * s1[4];
            for (int64_t i0 = 0; i0 < n0; i0 += kBlock) {
              const int64_t len = std::min(kBlock, n0 - i0);
              gather<scalar_t>(dhp + i0 * strides[2], strides[2], len, db);
              gather<scalar_t>(gp + i0 * strides[3], strides[3], len, gb);
              gather<scalar_t>(up + i0 * strides[4], strides[4], len, ub);
              for (int64_t i = 0; i < len; ++i) {
                acc_t av, dav;
                act_and_grad<A>(gb[i], av, dav);
                gb[i] = db[i] * ub[i] * dav;  // dg
                ub[i] = db[i] * av;           // du
              }
              scatter<scalar_t>(dgp + i0 * strides[0], strides[0], len, gb);
              scatter<scalar_t>(dup + i0 * strides[1], strides[1], len, ub);
            }
          }
        });
      });
    });
  });
  return {dg, du};
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, CPU, m) {
  m.impl("act_mul_fwd", &peftfast::act_mul_fwd_cpu);
  m.impl("act_mul_bwd", &peftfast::act_mul_bwd_cpu);
}
