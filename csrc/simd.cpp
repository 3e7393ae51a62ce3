// See simd.h.
#include "simd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace peftfast {

int simd_level() {
  static const int level = [] {
    int have = 0;
#ifdef PEFTFAST_X86_SIMD
    have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") ? 2
           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                            : 0;
#endif
    const char* cap = std::getenv("PEFTFAST_CPU_SIMD");
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(have, 1);
    if (cap != nullptr && std::strcmp(cap, "scalar") == 0) return 0;
    return have;
  }();
  return level;
}

const char* simd_name() {
  static const char* names[] = {"scalar", "avx2", "avx512"};
  return names[simd_level()];
}

}  // namespace peftfast
