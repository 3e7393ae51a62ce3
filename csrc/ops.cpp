// Every op of peftfast._C is declared here, once, with its schema. Implementations register per dispatch key in
// the feature files (TORCH_LIBRARY_IMPL(peftfast, CPU/CUDA, m)); fake (meta) kernels and autograd are registered
// from Python in peftfast/ops/<feature>.py, as are the CUDA paths of Triton-backed ops.
#include <torch/library.h>

#include <string>

#include "simd.h"

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
  s += ";simd=";
  s += simd_name();
  return s;
}

}  // namespace peftfast

TORCH_LIBRARY(peftfast, m) {
  m.def("build_info() -> str", &peftfast::build_info);

  // ---- fused LoRA linear (kernels: csrc/lora.cpp on CPU, Triton on CUDA) ----
  // n members sharing x [M, K]: y_i = x W_iᵀ + b_i + s_i (drop_i(x) A_iᵀ B_iᵀ + bB_i); returns (ys, xa = drop(x) A_catᵀ),
  // xa as an empty tensor of the LoRA dtype when keep_xa is false (backward then rebuilds it from x and the seed).
  // An absent bias is an empty tensor (not None): autograd of list arguments only flows through Tensor[].
  m.def(
      "lora_group_fwd(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] lora_biases, Tensor[] lora_as, "
      "Tensor[] lora_bs, float[] scales, float p, Tensor seed, bool keep_xa=True) -> (Tensor[], Tensor)");
  // returns (dx or an empty tensor, dA_cat [n*r, K] or empty, dB_i [N_i, r] (empty where not needed)); an empty xa
  // (lora_group_fwd with keep_xa=false) is rebuilt here when some dB_i is needed
  m.def(
      "lora_group_bwd(Tensor x, Tensor xa, Tensor?[] grads, Tensor[] weights, Tensor[] lora_as, Tensor[] lora_bs, "
      "float[] scales, float p, Tensor seed, bool need_x, bool need_a, int[] need_b) -> (Tensor, Tensor, Tensor[])");
  // lora_group_fwd's outputs ys with autograd in C++ (csrc/lora_autograd.cpp): the eager training path on CPU, one
  // dispatch a call and a C++ backward node; below autograd it is lora_group_fwd without xa
  m.def(
      "lora_group(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] lora_biases, Tensor[] lora_as, "
      "Tensor[] lora_bs, float[] scales, float p, Tensor seed, bool keep_xa=True) -> Tensor[]");
  // the keep-masks [nseg, m, k] (bool) both backends regenerate for seed: Philox keyed by (seg*m + row)*k + col
  m.def("dropout_keep_mask(Tensor like, Tensor seed, int nseg, int m, int k, float p) -> Tensor");

  // ---- further ops: one block per feature file ----
  // ---- NF4 base weights, QLoRA (csrc/nf4.cpp on CPU, csrc/cuda/nf4.cu on CUDA; Triton fused linear on CUDA) ----
  // qweight [N, K/2] uint8 (high nibble = even k), absmax [N, K/block_size] fp32
  m.def("nf4_quantize(Tensor w, int block_size) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor qweight, Tensor absmax, int block_size, ScalarType dtype) -> Tensor");
  // y = x Wᵀ + b + s (drop(x) Aᵀ Bᵀ + bB) over an NF4 W dequantized `chunk` elements at a time; returns (y, xa)
  m.def(
      "nf4_lora_fwd(Tensor x, Tensor qweight, Tensor absmax, Tensor? bias, Tensor? lora_bias, Tensor lora_a, "
      "Tensor lora_b, float scale, float p, Tensor seed, int block_size, int chunk) -> (Tensor, Tensor)");
  // returns (dx, dA, dB), each an empty tensor where not needed
  m.def(
      "nf4_lora_bwd(Tensor x, Tensor xa, Tensor dy, Tensor qweight, Tensor absmax, Tensor lora_a, Tensor lora_b, "
      "float scale, float p, Tensor seed, int block_size, int chunk, bool need_x, bool need_a, bool need_b) -> "
      "(Tensor, Tensor, Tensor)");

  // ---- fused RMSNorm / residual-add + RMSNorm (kernels: csrc/norm.cpp on CPU; Triton on CUDA from Python) ----
  // x [..., N]; returns (y [..., N], h = x + residual (empty without one), rstd [M] fp32 (fp64 for fp64 x));
  // y = w·round_x(n) (round_normed, Llama), (1 + w)·n (add_one, Gemma) or w·n (OLMo-2), n = x·rstd
  m.def(
      "rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps, bool add_one, bool round_normed) -> "
      "(Tensor, Tensor, Tensor)");
  // x is the normalised input (h for the residual op); returns (dx (+ dh) or empty, dw or empty)
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dh, bool add_one, bool round_normed, "
      "bool need_dx, bool need_dw) -> (Tensor, Tensor)");

  // ---- gated MLP activation product h = act(g)·u (kernels: csrc/mlp.cpp on CPU) ----
  // act: silu, gelu, gelu_tanh (relu too); backward returns (dg, du)
  m.def("act_mul_fwd(Tensor g, Tensor u, str act) -> Tensor");
  m.def("act_mul_bwd(Tensor dh, Tensor g, Tensor u, str act) -> (Tensor, Tensor)");

  // ---- rotary embedding: the CPU kernel of the ``peftfast::rope`` op (csrc/rope.cpp; that op, its autograd and the
  // fake kernels are in peftfast/ops/rope.py) ----
  // q [B, HQ, S, D], k [B, HK, S, D] any strides, cos/sin [B or 1, S, R]; outputs [B, H, S, D], with [B, S, H, D]
  // memory where *_seq_major; backward applies the inverse rotation
  m.def(
      "rope_rotate(Tensor q, Tensor k, Tensor cos, Tensor sin, bool backward, bool q_seq_major, bool k_seq_major) "
      "-> (Tensor, Tensor)");

  // ---- fused bottleneck Adapter (kernels: csrc/adapter.cpp on CPU) ----
  // x [M, K], Wd [H, K], Wu [N, H], scale a 1-element tensor; out = res + s·act(x Wdᵀ + bd) Wuᵀ + bu (res = x when
  // absent); returns (out [M, N], z [M, H])
  m.def(
      "adapter_fwd(Tensor x, Tensor? residual, Tensor wd, Tensor? bd, Tensor wu, Tensor? bu, Tensor scale, str act) "
      "-> (Tensor, Tensor)");
  // returns (dz [M, H], a = act(z) [M, H], dx = dz Wd (+ grad when add_grad) or empty, ds = Σ a⊙(grad Wu) or empty)
  m.def(
      "adapter_bwd(Tensor grad, Tensor z, Tensor wd, Tensor wu, Tensor scale, str act, bool add_grad, bool need_dx, "
      "bool need_ds) -> (Tensor, Tensor, Tensor, Tensor)");
}
