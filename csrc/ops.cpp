// Every op of peftfast._C is declared here, once, with its schema. Implementations register per dispatch key in
// the feature files (TORCH_LIBRARY_IMPL(peftfast, CPU/CUDA, m)); fake (meta) kernels and autograd are registered
// from Python (peftfast/ops/_C_ops.py), the CUDA path of Triton-backed ops too.
#include <torch/library.h>

#include <string>

#ifndef PEFTFAST_TORCH_VERSION
#define PEFTFAST_TORCH_VERSION "unknown"
#endif

namespace peftfast {

std::string build_info() {
  std::string s = "torch=" PEFTFAST_TORCH_VERSION;
#ifdef PEFTFAST_WITH_CUDA
  s += ";cuda=1";
#else
  s += ";cuda=0";
#endif
#ifdef _OPENMP
  s += ";openmp=1";
#else
  s += ";openmp=0";
#endif
  return s;
}

}  // namespace peftfast

TORCH_LIBRARY(peftfast, m) {
  m.def("build_info() -> str", &peftfast::build_info);

  // ---- fused LoRA linear (kernels: csrc/lora.cpp on CPU, Triton on CUDA) ----
  // n members sharing x [M, K]: y_i = x W_iᵀ + b_i + s_i (drop_i(x) A_iᵀ B_iᵀ + bB_i); returns (ys, xa = drop(x) A_catᵀ)
  m.def(
      "lora_group_fwd(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor?[] lora_biases, Tensor[] lora_as, "
      "Tensor[] lora_bs, float[] scales, float p, Tensor seed) -> (Tensor[], Tensor)");
  // returns (dx or an empty tensor, dA_cat [n*r, K] or empty, dB_i [N_i, r] (empty where not needed))
  m.def(
      "lora_group_bwd(Tensor x, Tensor xa, Tensor?[] grads, Tensor[] weights, Tensor[] lora_as, Tensor[] lora_bs, "
      "float[] scales, float p, Tensor seed, bool need_x, bool need_a, int[] need_b) -> (Tensor, Tensor, Tensor[])");
  // the keep-masks [nseg, m, k] (bool) both backends regenerate for seed: Philox keyed by (seg*m + row)*k + col
  m.def("dropout_keep_mask(Tensor like, Tensor seed, int nseg, int m, int k, float p) -> Tensor");

  // ---- further ops: one block per feature file ----
}
