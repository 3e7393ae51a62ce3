// CPU kernel of the rotary position embedding (schema in ops.cpp; called by the ``peftfast::rope`` op of
// peftfast/ops/rope.py for the cpp backend, which also owns autograd and the fake kernel). Same maths and rounding
// points as the torch backend there and the Triton kernel in kernels/rope.py: per (batch, position, head) row of
// D values, with R = cos.size(-1) rotated (rotate-half convention, partial rotary when R < D) and the tail copied,
//
//   forward   y[:R/2] = x1·c1 - x2·s1,   y[R/2:R] = x2·c2 + x1·s2      (c = cos[b, s], s = sin[b, s] in halves)
//   backward  y[:R/2] = x1·c1 + x2·s2,   y[R/2:R] = x2·c2 - x1·s1      (the transpose of the forward's linear map)
//
// in fp32 (fp64 for fp64), rounded once. One pass over q and k, no rotate-half temporaries: the torch backend makes
// about a dozen ATen calls and five copies of each tensor per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "simd.h"

namespace peftfast {
namespace {

using at::Tensor;

// out: [B, H, S, D] as x; written with [B, S, H, D] memory (seq_major, the layout of the models' projections,
// which the attention output and the o-projection input then keep) or contiguous [B, H, S, D]
Tensor empty_out(const Tensor& x, bool seq_major) {
  if (!seq_major) return at::empty(x.sizes(), x.options());
  return at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).transpose(1, 2);
}

template <typename T>
void rotate(const Tensor& x, Tensor& y, const Tensor& cf, const Tensor& sf, bool backward) {
  using acc_t = at::opmath_type<T>;
  const int64_t b = x.size(0), h = x.size(1), s = x.size(2), d = x.size(3);
  const int64_t rot = cf.size(-1), half = rot / 2;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const acc_t* cp = cf.const_data_ptr<acc_t>();
  const acc_t* sp = sf.const_data_ptr<acc_t>();
  const int64_t cb = cf.size(0) == 1 ? 0 : s * rot;  // cos/sin [B or 1, S, R], contiguous
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
  const int64_t ys0 = y.stride(0), ys1 = y.stride(1), ys2 = y.stride(2), ys3 = y.stride(3);
  const acc_t sign = backward ? acc_t(-1) : acc_t(1);
  // backward reads the sine halves crosswise: y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1
  const int64_t s_lo = backward ? half : 0, s_hi = backward ? 0 : half;
  at::parallel_for(0, b * s, std::max<int64_t>(1, 16384 / std::max<int64_t>(h * d, 1)), [&](int64_t r0, int64_t r1) {
    simd_call([&]() PEFTFAST_SIMD_BODY {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t bi = r / s, si = r % s;
        const acc_t* c = cp + bi * cb + si * rot;
        const acc_t* sn = sp + bi * cb + si * rot;
        for (int64_t hi = 0; hi < h; ++hi) {
          const T* xr = xp + bi * xs0 + hi * xs1 + si * xs2;
          T* yr = yp + bi * ys0 + hi * ys1 + si * ys2;
          if (xs3 == 1 && ys3 == 1) {  // the common layout, kept apart so that the loops vectorise
            for (int64_t j = 0; j < half; ++j) {
              const acc_t x1 = static_cast<acc_t>(xr[j]), x2 = static_cast<acc_t>(xr[j + half]);
              yr[j] = static_cast<T>(x1 * c[j] - sign * (x2 * sn[s_lo + j]));
              yr[j + half] = static_cast<T>(x2 * c[half + j] + sign * (x1 * sn[s_hi + j]));
            }
            for (int64_t j = rot; j < d; ++j) yr[j] = xr[j];
          } else {
            for (int64_t j = 0; j < half; ++j) {
              const acc_t x1 = static_cast<acc_t>(xr[j * xs3]), x2 = static_cast<acc_t>(xr[(j + half) * xs3]);
              yr[j * ys3] = static_cast<T>(x1 * c[j] - sign * (x2 * sn[s_lo + j]));
              yr[(j + half) * ys3] = static_cast<T>(x2 * c[half + j] + sign * (x1 * sn[s_hi + j]));
            }
            for (int64_t j = rot; j < d; ++j) yr[j * ys3] = xr[j * xs3];
          }
        }
      }
    });
  });
}

void check(const Tensor& x, const Tensor& cos, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "peftfast::rope_rotate: the CPU kernel got ", what, " on ", x.device());
  TORCH_CHECK(x.dim() == 4, "peftfast::rope_rotate: ", what, " must be [B, H, S, D], got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
              "peftfast::rope_rotate: ", what, " dtype ", t, " is not supported (float32, float16, bfloat16, float64)");
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == x.size(0), "peftfast::rope_rotate: cos batch ", cos.size(0),
              " does not broadcast to ", what, " batch ", x.size(0));
  TORCH_CHECK(cos.size(1) == x.size(2), "peftfast::rope_rotate: cos has ", cos.size(1), " positions, ", what,
              " has ", x.size(2));
  TORCH_CHECK(cos.size(2) <= x.size(3), "peftfast::rope_rotate: rotary dim ", cos.size(2), " exceeds the ", what,
              " head dim ", x.size(3));
}

std::tuple<Tensor, Tensor> rope_rotate_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                           bool backward, bool q_seq_major, bool k_seq_major) {
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes(), "peftfast::rope_rotate: cos and sin must be matching "
              "[B or 1, S, R], got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.size(2) % 2 == 0, "peftfast::rope_rotate: the rotary dim ", cos.size(2), " must be even");
  check(q, cos, "q");
  check(k, cos, "k");
  Tensor qo = empty_out(q, q_seq_major), ko = empty_out(k, k_seq_major);
  Tensor cf, sf;  // [B or 1, S, R] in the accumulation type (the torch backend's ``cos.to(ct)``), made once for both
  for (auto [x, y] : {std::pair<const Tensor*, Tensor*>{&q, &qo}, {&k, &ko}}) {
    if (x->numel() == 0) continue;
    const auto adt = at::toOpMathType(x->scalar_type());
    if (!cf.defined() || cf.scalar_type() != adt) {
      cf = cos.to(adt).contiguous();
      sf = sin.to(adt).contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x->scalar_type(), "peftfast_rope_rotate",
                                    [&] { rotate<scalar_t>(*x, *y, cf, sf, backward); });
  }
  return {qo, ko};
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, CPU, m) { m.impl("rope_rotate", &peftfast::rope_rotate_cpu); }
