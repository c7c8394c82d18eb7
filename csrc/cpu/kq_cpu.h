// Shared pieces of kquant's CPU kernels: the blocked weight layouts, the ISA switch
// and the problem description passed from the op drivers to the per-thread tasks.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <strings.h>

#include "cpu_features.h"

// AVX2 code is compiled per function so the library still loads on pre-AVX2 x86-64.
#if defined(__x86_64__) || defined(_M_X64)
#define KQ_X86 1
#define KQ_AVX2 __attribute__((target("avx2,fma,f16c")))
// an empty asm the value must pass through: stops GCC from fusing a mul and a following
// add into one FMA (different rounding from the reference's separate ops)
#define KQ_NO_CONTRACT(v) asm volatile("" : "+x"(v))
#else
#define KQ_X86 0
#define KQ_AVX2
#define KQ_NO_CONTRACT(v) (void)0
#endif

#if KQ_X86
#include <immintrin.h>
#endif

namespace kquant::cpu {

// Weight layouts (ids shared with kquant/backends/cpu.py):
//  1  int8  [N/16][Kq][16][4]: 16 output channels x 4 consecutive k per 64-byte row, a
//     full-width AMX B row and one zmm; an 8-channel half (32 bytes, w8_block below) feeds
//     vpmaddubsw (4 k per 32-bit lane) or two vpmovsxbw (int16 pairs). Kq is a multiple
//     of 16 (K padded to 64 with zeros): whole AMX tiles of 16 k-quads.
//  2  int4  [Nb][Ko][8][4] bytes: byte (c, j) of octet o = nib(k=8o+j) | nib(k=8o+4+j) << 4,
//     so `v & 0xF` and `(v >> 4) & 0xF` give two vpmaddubsw-ready 8x4 blocks
//     (Ko a multiple of 8, K padded to 64 like layout 1).
constexpr int kLayoutInt8 = 1;
constexpr int kLayoutInt4 = 2;
constexpr int kNB = 8;  // output channels per block (layout 2; a half block of layout 1)

// Each level includes the ones below: Avx512 adds AVX-512 (VNNI) kernels where they are
// written, Amx adds AMX-INT8 tiles for the int8 GEMMs of M >= kAmxMinM rows.
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };

// KQUANT_CPU_ISA=scalar|avx2|avx512|amx caps the ISA (read per call so tests can flip
// it); the default is the best the machine has.
inline Isa active_isa() {
  Isa best = kquant::cpu_has_amx_int8()      ? Isa::Amx
             : kquant::cpu_has_avx512_vnni() ? Isa::Avx512
             : kquant::cpu_has_avx2_fma()    ? Isa::Avx2
                                             : Isa::Scalar;
  const char* e = std::getenv("KQUANT_CPU_ISA");
  if (!e || !*e) return best;
  Isa cap = best;
  if (strcasecmp(e, "scalar") == 0) cap = Isa::Scalar;
  else if (strcasecmp(e, "avx2") == 0) cap = Isa::Avx2;
  else if (strcasecmp(e, "avx512") == 0) cap = Isa::Avx512;
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

#if KQ_X86
// AMX code may use AVX-512 too: every AMX CPU has it (cpu_has_amx_int8 checks)
#define KQ_AVX512F __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define KQ_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The AMX tile configuration (per thread; _tile_release() when done). Tiles 0-3: C, 16 rows
// x bw bytes (int32 or fp32 per channel); 4-5: A, 16 rows x 64 bytes; 6-7: B, 16 rows x bw
// bytes (k-quads of int8 or k-pairs of bf16). The kernels use bw = 64, 16 channels, the full
// width; the ceilings also time bw = 32 (8 channels: half the MACs per instruction).
KQ_AMX inline void amx_config(int bw = 64) {
  TileCfg c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>((t == 4 || t == 5) ? 64 : bw);
  }
  _tile_loadconfig(&c);
}
#endif

enum class OutT { F32, F16, BF16, I32 };

struct Problem {
  int64_t M = 0, N = 0, Kp = 0;
  int64_t nblk = 0;      // k-quads (int8 layout) or k-octets (int4 layout)
  int64_t G = 1, gsz = 0;  // weight groups and group size in k (gsz = Kp per channel)
  const int8_t* w8 = nullptr;
  const uint8_t* w4 = nullptr;
  const float* sw = nullptr;     // [N][G]
  const float* zeros = nullptr;  // [N][G] weight-only asymmetric, else null
  const float* bias = nullptr;   // [N] (fp32) or null
  // int8 activations
  const int8_t* a8 = nullptr;    // [M][lda]
  const uint8_t* aabs = nullptr; // |a8| for the sign-trick kernel
  const int16_t* a16 = nullptr;  // [M][lda] widened activations for the int16 GEMM
  int64_t lda = 0;
  const float* sx = nullptr;     // [M] per-token scale
  const int32_t* asum = nullptr; // [M][G] sum of activations per group (W4A8 zero-point fix)
  // float activations (weight-only)
  const float* xf = nullptr;
  int64_t ldx = 0;
  // AMX-BF16 weight-only: x as three bf16 parts (hi, mid, lo), each tiled [Mp/16][ldx/32][16][32]
  // and xb_part elements apart, and the sum of x per row and weight group [M][G]
  const uint16_t* xb = nullptr;
  int64_t xb_part = 0;
  const float* xsum = nullptr;
  bool zfold = false;  // zero points whole (or none): int32 z in the small-M kernels, q - z in the bf16 codes
  int wo_zero = 0;  // implicit symmetric zero point for weight-only (8 for int4)
  void* y = nullptr;
  OutT yt = OutT::F32;
  bool sign_path = false;  // small-M W8A8 kernel
};

// Layout 1 (int8 weights) holds 16-channel blocks [ceil(N/16)][Kq][16][4]: a k-quad row of
// 16 channels is 64 bytes, the full-width B row of AMX tdpbssd and one zmm for vpdpbusd.
// The other kernels work on its 8-channel halves, numbered nb like layout 2's blocks: half
// nb starts at w8_block(p, nb) and its k-quad rows are kW8Row bytes apart.
constexpr int64_t kW8Row = 64;
inline const int8_t* w8_block(const Problem& p, int64_t nb) {
  return p.w8 + (nb >> 1) * p.nblk * kW8Row + (nb & 1) * 32;
}

#if KQ_X86
// AVX-512 (VNNI) decode kernels, kq_avx512.cpp: one activation row m x 4 channel blocks
// from nb (32 channels); nv[j] = valid channels of block j. Call only at Isa::Avx512+.
// exact int32 W8A8 sums, out[8 * j + c]
void avx512_w8a8_gemv4(const Problem& p, int64_t m, int64_t nb, int32_t* out);
// W4A8 per-group fold f[8 * j + c] = sum_g fma(float(acc_g - 8 * asum_g), s, .) in group order
void avx512_w4a8_gemv4(const Problem& p, int64_t m, int64_t nb, const int* nv, float* f);
// weight-only f[8 * j + c] = sum_g s_g * sum_{k in g} x[k] * (q - z) (fp32, before bias)
void avx512_wo_gemv4(const Problem& p, bool int4, int64_t m, int64_t nb, const int* nv, float* f);
#endif

}  // namespace kquant::cpu
