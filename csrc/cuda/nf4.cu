// CUDA kernels for NF4 base weights: quantize and dequantize (layout and rounding as csrc/nf4.cpp, so every backend
// produces identical codes and identical dequantized values). No torch headers here: raw pointers and a stream;
// the ATen glue is nf4_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace peftfast {
namespace {

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint8_t encode(float v) {
  uint8_t c = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) c += v > (kNF4[i] + kNF4[i + 1]) * 0.5f;  // same fp32 midpoints as the CPU path
  return c;
}

// one thread per quantization block: a one-off conversion, so simplicity over peak bandwidth
template <typename T>
__global__ void quantize_kernel(const T* __restrict__ w, uint8_t* __restrict__ q, float* __restrict__ absmax,
                                int64_t nblocks, int64_t bs) {
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (blk >= nblocks) return;
  const T* s = w + blk * bs;
  float am = 0.0f;
  for (int64_t i = 0; i < bs; ++i) am = fmaxf(am, fabsf(to_f(s[i])));
  absmax[blk] = am;
  uint8_t* out = q + blk * bs / 2;
  for (int64_t i = 0; i < bs; i += 2) {
    const float v0 = am > 0.0f ? __fdiv_rn(to_f(s[i]), am) : 0.0f;
    const float v1 = am > 0.0f ? __fdiv_rn(to_f(s[i + 1]), am) : 0.0f;
    out[i / 2] = static_cast<uint8_t>((encode(v0) << 4) | encode(v1));
  }
}

// one thread per byte (two weights); rows of K/2 bytes, absmax per block of bs weights
template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax, T* __restrict__ out,
                                  int64_t nbytes, int64_t bs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nbytes) return;
  const uint8_t byte = q[i];
  const float am = absmax[(2 * i) / bs];  // rows hold a whole number of blocks, so the flat index suffices
  out[2 * i] = from_f<T>(__fmul_rn(kNF4[byte >> 4], am));
  out[2 * i + 1] = from_f<T>(__fmul_rn(kNF4[byte & 15], am));
}

template <typename T>
cudaError_t launch_quantize(const void* w, uint8_t* q, float* absmax, int64_t nblocks, int64_t bs, cudaStream_t s) {
  if (nblocks == 0) return cudaSuccess;
  const int threads = 128;
  const int64_t grid = (nblocks + threads - 1) / threads;
  quantize_kernel<T><<<static_cast<unsigned>(grid), threads, 0, s>>>(static_cast<const T*>(w), q, absmax, nblocks, bs);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dequantize(const uint8_t* q, const float* absmax, void* out, int64_t nbytes, int64_t bs,
                              cudaStream_t s) {
  if (nbytes == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t grid = (nbytes + threads - 1) / threads;
  dequantize_kernel<T><<<static_cast<unsigned>(grid), threads, 0, s>>>(q, absmax, static_cast<T*>(out), nbytes, bs);
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 fp32, 1 fp16, 2 bf16 (inputs of quantize, outputs of dequantize); contiguous tensors
cudaError_t nf4_quantize_cuda(const void* w, int dtype, uint8_t* q, float* absmax, int64_t nblocks, int64_t bs,
                              cudaStream_t s) {
  switch (dtype) {
    case 0: return launch_quantize<float>(w, q, absmax, nblocks, bs, s);
    case 1: return launch_quantize<__half>(w, q, absmax, nblocks, bs, s);
    case 2: return launch_quantize<__nv_bfloat16>(w, q, absmax, nblocks, bs, s);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t nf4_dequantize_cuda(const uint8_t* q, const float* absmax, void* out, int dtype, int64_t nbytes, int64_t bs,
                                cudaStream_t s) {
  switch (dtype) {
    case 0: return launch_dequantize<float>(q, absmax, out, nbytes, bs, s);
    case 1: return launch_dequantize<__half>(q, absmax, out, nbytes, bs, s);
    case 2: return launch_dequantize<__nv_bfloat16>(q, absmax, out, nbytes, bs, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace peftfast
