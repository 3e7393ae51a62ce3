// Dropout masking shared by the C++ LoRA kernels (csrc/lora.cpp, csrc/nf4.cpp): keep flags regenerated from the
// Philox stream of the Triton kernels (philox.h), applied in at::parallel_for passes over row chunks so that no
// mask or masked copy ever spans more than one chunk.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace peftfast {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// rows per at::parallel_for task for rows of k elements
int64_t row_grain(int64_t k);

// the one-element int64 seed tensor the ops take, as an integer
uint64_t read_seed(const at::Tensor& seed, const char* op);

// mask[rows, cols] (uint8, contiguous) = keep flags of rows row0.. and columns col0.. of segment seg of an m × k
// operand (linear index (seg * m + row) * k + col, as the Triton kernels key it).
void fill_mask(at::Tensor& mask, int64_t row0, int64_t col0, int64_t seg, int64_t m, int64_t k, uint64_t seed, float p);

// dst[rows, k] (contiguous, dst's dtype) = mask ⊙ src[row0:row0+rows, :] (any strides)
void apply_mask(const at::Tensor& src, const at::Tensor& mask, at::Tensor& dst, int64_t row0);

// acc[rows, cols] (fp32 or fp64, contiguous) += mask ⊙ part * mul (part contiguous)
void add_masked(at::Tensor& acc, const at::Tensor& part, const at::Tensor& mask, double mul);

// xa = (keep_s ⊙ x) A_sᵀ / (1 - p) for each segment s (its own mask), [M, n*r] in the LoRA dtype: the LoRA
// down-projection of the forward. x [M, K] any strides; masked copies of x span at most chunk_elems elements.
at::Tensor masked_down(const at::Tensor& x, at::TensorList lora_as, double p, uint64_t seed, int64_t chunk_elems);

}  // namespace peftfast
