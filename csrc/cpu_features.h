// Run-time CPU feature checks shared by the CPU kernels.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace kquant {

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// AVX-512 F/BW/VL/DQ with VNNI (vpdpbusd): the AVX-512 GEMV paths
inline bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

// AMX-INT8 usable by this process: the CPU has AMX-TILE and AMX-INT8, the OS saves the tile
// state (XCR0 bits 17-18) and, on Linux, grants this process the tile data (arch_prctl
// ARCH_REQ_XCOMP_PERM, asked once; without it the first tile instruction faults).
inline bool cpu_has_amx_int8() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool ok = [] {
    if (!cpu_has_avx512_vnni()) return false;  // every AMX CPU has it; the kernels may use both
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-TILE, AMX-INT8
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// AMX-BF16 too (tdpbf16ps), for the weight-only GEMMs
inline bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool ok = [] {
    unsigned a, b, c, d;
    return cpu_has_amx_int8() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1);
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace kquant
