// Run-time choice of the instruction set for the CPU kernels' hot loops. The extension is built for the baseline
// x86-64 ISA (SSE2), where GCC vectorises the element-wise loops only 4 wide and fast_exp's integer clamp has no
// single instruction; compiled again for AVX2+FMA the SwiGLU product runs about 4x faster (measured on an AVX2 EPYC).
// So each hot loop is written once, as a lambda, and simd_call compiles it for both and runs the one this CPU takes.
#pragma once

namespace peftfast {

// 2 (AVX-512F), 1 (AVX2 and FMA) or 0 (baseline): what this CPU has, capped by PEFTFAST_CPU_SIMD=avx2|scalar (read
// once; the tests run every level in its own process). The Philox masks use all three levels; the element-wise
// loops use AVX2+FMA from level 1 up.
int simd_level();

// "avx512", "avx2" or "scalar"
const char* simd_name();

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define PEFTFAST_X86_SIMD 1
// The loop lambda is always_inline, so it is compiled inside each of these (with its callees, which are inline or
// header templates): a function with a wider target may inline one built for the baseline, never the reverse.
#define PEFTFAST_SIMD_BODY __attribute__((always_inline))
// for the small helpers such a loop calls, so that none is left behind as a baseline-ISA call
#define PEFTFAST_HOT inline __attribute__((always_inline))

template <typename F>
__attribute__((target("avx2,fma"), noinline)) void simd_run_avx2(const F& f) {
  f();
}

template <typename F>
__attribute__((noinline)) void simd_run_base(const F& f) {
  f();
}

template <typename F>
inline void simd_call(const F& f) {
  if (simd_level() >= 1)
    simd_run_avx2(f);
  else
    simd_run_base(f);
}
#else
#define PEFTFAST_SIMD_BODY
#define PEFTFAST_HOT inline
template <typename F>
inline void simd_call(const F& f) {
  f();
}
#endif

}  // namespace peftfast
