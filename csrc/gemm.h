// Small GEMM helpers shared by the CPU ops.
#pragma once

#include <ATen/ATen.h>

namespace peftfast {

// s · (a @ b) with the scale applied inside the GEMM, in its accumulation type: one rounding to a 16-bit dtype, not
// one for the product and another for a separate multiply (PEFT's eager path rounds s · dy first, then the product).
// beta = 0: the uninitialised output is never read.
inline at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double s) {
  return at::addmm(at::empty({a.size(0), b.size(1)}, a.options()), a, b, /*beta=*/0, /*alpha=*/s);
}

}  // namespace peftfast
