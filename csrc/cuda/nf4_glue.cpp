// ATen glue of the NF4 CUDA kernels (csrc/cuda/nf4.cu): CUDA implementations of peftfast::nf4_quantize and
// peftfast::nf4_dequantize (schemas in ops.cpp). Compiled only in CUDA builds.
#ifdef PEFTFAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

namespace peftfast {
cudaError_t nf4_quantize_cuda(const void* w, int dtype, uint8_t* q, float* absmax, int64_t nblocks, int64_t bs,
                              cudaStream_t s);
cudaError_t nf4_dequantize_cuda(const uint8_t* q, const float* absmax, void* out, int dtype, int64_t nbytes, int64_t bs,
                                cudaStream_t s);

namespace {

int dtype_code(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "peftfast::", op, ": CUDA kernels take fp32/fp16/bf16, got ", t);
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cu(const at::Tensor& w, int64_t bs) {
  TORCH_CHECK(w.dim() == 2, "peftfast::nf4_quantize: expected a 2-D weight [N, K], got ", w.sizes());
  TORCH_CHECK(bs >= 2 && bs % 2 == 0, "peftfast::nf4_quantize: block_size must be even and >= 2, got ", bs);
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k % bs == 0, "peftfast::nf4_quantize: K=", k, " is not divisible into blocks of ", bs);
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor wc = w.contiguous();
  const int code = dtype_code(wc.scalar_type(), "nf4_quantize");
  at::Tensor q = at::empty({n, k / 2}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({n, k / bs}, w.options().dtype(at::kFloat));
  const cudaError_t err = nf4_quantize_cuda(wc.const_data_ptr(), code, q.mutable_data_ptr<uint8_t>(),
                                            absmax.mutable_data_ptr<float>(), n * (k / bs), bs,
                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "peftfast::nf4_quantize: CUDA launch failed: ", cudaGetErrorString(err));
  return {q, absmax};
}

at::Tensor nf4_dequantize_cu(const at::Tensor& q, const at::Tensor& absmax, int64_t bs, at::ScalarType dtype) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "peftfast::nf4_dequantize: qweight must be 2-D uint8");
  const int64_t n = q.size(0), k = q.size(1) * 2;
  TORCH_CHECK(bs >= 2 && bs % 2 == 0 && k % bs == 0, "peftfast::nf4_dequantize: K=", k,
              " is not divisible into blocks of ", bs);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == n * (k / bs),
              "peftfast::nf4_dequantize: absmax must be fp32 [", n, ", ", k / bs, "]");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor qc = q.contiguous(), ac = absmax.contiguous();
  at::Tensor out = at::empty({n, k}, q.options().dtype(dtype));
  const cudaError_t err = nf4_dequantize_cuda(qc.const_data_ptr<uint8_t>(), ac.const_data_ptr<float>(),
                                              out.mutable_data_ptr(), dtype_code(dtype, "nf4_dequantize"), qc.numel(),
                                              bs, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "peftfast::nf4_dequantize: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, CUDA, m) {
  m.impl("nf4_quantize", &peftfast::nf4_quantize_cu);
  m.impl("nf4_dequantize", &peftfast::nf4_dequantize_cu);
}
#endif
