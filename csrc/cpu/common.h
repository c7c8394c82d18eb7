// Shared pieces of kquant's CPU kernels: the blocked weight layouts, the problem one op call
// describes, the ISA levels and kernel kinds, the scalar helpers of every level (dtype
// conversion, per-token quantization of a value and of a row) and each level's entry points.
//
//   common.h       this header
//   tiles.h        the tile loops of the scalar, AVX2 and AVX-512 levels, templates over a
//                  kernel set (its interface is documented there)
//   scalar.cpp     portable C++: the operation order every other level reproduces
//   avx2.h, .cpp   AVX2+FMA: exact int8 GEMMs without VNNI, weight-only fp32 GEMMs
//   avx512.cpp     AVX-512 VNNI one-row (decode) kernels and the AVX-512 quantizer
//   lanes16.h      16-lane fp32 load/store helpers shared by AVX-512 and AMX
//   amx.h          AMX tile configuration and the epilogue of a 32 x 32 tile block
//   amx_int8.cpp   AMX-INT8: W8A8, W4A8 and int8_mm on tiles
//   amx_bf16.cpp   AMX-BF16: W8A16 and W4A16 on tiles
//   plan.h, .cpp   the choice of level, kernel kind and work split for a call; the runner
//   ops.cpp        the torch ops: argument checks, activation preparation, registration
//   lowbit.h, lowbit.cpp, lowbit_avx2.cpp
//                  2- and 3-bit weights: their layouts (3, 4), kernels and ops
//
// Every level gives the reference's int32 sums exactly, and the scalar and AVX2 levels give
// the same float bits: the tile loops are shared and the kernels keep the operation order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_features.h"

// x86 code of each level is compiled per function (target attributes), so the library
// still loads on x86-64 CPUs without AVX2 and runs the scalar level there.
#if defined(__x86_64__) || defined(_M_X64)
#define KQ_X86 1
#define KQ_AVX2 __attribute__((target("avx2,fma,f16c")))
// AMX code may use AVX-512 too: every AMX CPU has it (cpu_has_amx_int8 checks)
#define KQ_AVX512F __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define KQ_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
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

// ----------------------------------------------------------------------------- weight layouts
// Layout ids shared with kquant/backends/cpu.py:
//  1  int8  [N/16][Kq][16][4]: 16 output channels x 4 consecutive k per 64-byte row, a
//     full-width AMX B row and one zmm; an 8-channel half (32 bytes, w8_block below) feeds
//     vpmaddubsw (4 k per 32-bit lane) or two vpmovsxbw (int16 pairs). Kq is a multiple
//     of 16 (K padded to 64 with zeros): whole AMX tiles of 16 k-quads.
//  2  int4  [N/8][Ko][8][4] bytes: byte (c, j) of octet o = nib(k=8o+j) | nib(k=8o+4+j) << 4,
//     so `v & 0xF` and `(v >> 4) & 0xF` give two vpmaddubsw-ready 8x4 blocks
//     (Ko a multiple of 8, K padded to 64 like layout 1).
constexpr int kLayoutInt8 = 1;
constexpr int kLayoutInt4 = 2;
// Output channels per block: a layout-2 block, half a layout-1 block. The tile loops and
// the scalar and AVX2 kernels work on such blocks, numbered nb (channels 8 nb .. 8 nb + 7).
constexpr int kBlockN = 8;
constexpr int64_t kW8Row = 64;  // bytes of a layout-1 k-quad row (16 channels x 4 k)

// ----------------------------------------------------------------------------- levels and kinds
// Each level includes the ones below: Avx512 adds AVX-512 (VNNI) one-row kernels and
// quantizer, Amx adds AMX-INT8 tiles for the int8 GEMMs and, where the CPU has AMX-BF16,
// tiles for the weight-only GEMMs.
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };

// Every kernel kind a plan can choose (plan.cpp picks one per call; the weight width comes
// from Problem::int4).
enum class Kind {
  // int8 activations (quantized per token or with a static scale): exact int32 sums
  SignGemm,     // W8A8 of a few rows: vpmaddubsw(|a|, sign(w, a)) on int8 codes and |codes|
  Int16Gemm,    // W8A8 of more rows and int8_mm: vpmaddwd on int16 codes
  W4A8Gemm,     // W4A8: unsigned nibbles x int8 codes; the zero point 8 removed with group sums
  AmxInt8,      // W8A8, W4A8 and int8_mm on AMX-INT8 tiles (codes in 16 x 64 tiles)
  // fp32 / fp16 / bf16 activations (weight-only): fp32 sums
  WoFused,      // 1-2 rows, whole zero points: dequantize inside the FMA loop
  WoBlock,      // more rows: K chunks of 16-channel panels dequantized into L1, fp32 GEMM over rows
  WoAmxBf16,    // AMX-BF16 tiles: x split exactly into three bf16 parts
  WoDequantMm,  // many rows: dequantize W^T a slab at a time and let at::mm multiply
};

enum class OutT { F32, F16, BF16, I32 };

// ----------------------------------------------------------------------------- the problem
// One op call, as the tasks see it: y[M][N] = x[M][K] . W[N][K]^T with the weights in a
// blocked layout, K padded to 64 (Kp is x's K; the weights hold kblocks k-blocks).
struct Problem {
  int64_t M = 0, N = 0, Kp = 0;
  int64_t kblocks = 0;     // k-blocks of a weight block: k-quads (layout 1) or k-octets (layout 2)
  int64_t G = 1, gsz = 0;  // weight groups and group size in k (gsz = Kp per channel)
  bool int4 = false;       // layout-2 int4 weights (w4), else layout-1 int8 (w8)
  const int8_t* w8 = nullptr;
  const uint8_t* w4 = nullptr;
  const float* sw = nullptr;     // weight scales [N][G]
  const float* zeros = nullptr;  // [N][G] weight-only asymmetric, else null
  const float* bias = nullptr;   // [N] (fp32) or null
  // int8 activations
  const int8_t* a8 = nullptr;    // [M][lda] codes (AmxInt8: in 16 x 64 tiles)
  const uint8_t* aabs = nullptr; // |a8| for the sign-trick kernel
  const int16_t* a16 = nullptr;  // [M][lda] codes as int16 for the int16 GEMM
  int64_t lda = 0;
  const float* sx = nullptr;     // [M] per-token scale
  const int32_t* asum = nullptr; // [M][G] sum of the codes per group (W4A8 zero-point fix)
  // float activations (weight-only)
  const float* xf = nullptr;     // [M][ldx] fp32
  int64_t ldx = 0;
  // AMX-BF16 weight-only: x as three bf16 parts (hi, mid, lo), each tiled [Mp/16][ldx/32][16][32]
  // and xb_part elements apart, and the sum of x per row and weight group [M][G]
  const uint16_t* xb = nullptr;
  int64_t xb_part = 0;
  const float* xsum = nullptr;
  // zero points all whole numbers (or none): WoFused subtracts them in int32, WoAmxBf16 puts
  // q - z into the bf16 codes
  bool whole_zeros = false;
  int wo_zero = 0;  // implicit symmetric zero point for weight-only (8 for int4)
  int64_t kchunk = 0;  // Int16Gemm, WoBlock: k-blocks per K chunk (plan.cpp sizes it from the L1 size)
  void* y = nullptr;
  OutT yt = OutT::F32;
};

// Layout 1 (int8 weights) holds 16-channel blocks [ceil(N/16)][Kq][16][4]: a k-quad row of
// 16 channels is 64 bytes, the full-width B row of AMX tdpbssd and one zmm for vpdpbusd.
// The other kernels work on its 8-channel halves, numbered nb like layout 2's blocks: half
// nb starts at w8_block(p, nb) and its k-quad rows are kW8Row bytes apart.
inline const int8_t* w8_block(const Problem& p, int64_t nb) {
  return p.w8 + (nb >> 1) * p.kblocks * kW8Row + (nb & 1) * 32;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n elements of a thread's scratch vector v, 64-byte aligned (whole cache lines per tile row)
template <class T>
T* scratch(std::vector<T>& v, int64_t n) {
  const int64_t pad = 64 / sizeof(T);
  if (static_cast<int64_t>(v.size()) < n + pad) v.resize(n + pad);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// ----------------------------------------------------------------------------- scalar helpers
inline float to_f(const void* x, OutT t, int64_t i) {
  switch (t) {
    case OutT::F16: return static_cast<float>(static_cast<const c10::Half*>(x)[i]);
    case OutT::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

inline void store_f(void* y, OutT t, int64_t i, float v) {
  switch (t) {
    case OutT::F16: static_cast<c10::Half*>(y)[i] = c10::Half(v); break;
    case OutT::BF16: static_cast<c10::BFloat16*>(y)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(y)[i] = v;
  }
}

// ----------------------------------------------------------------------------- per-token quantization
// q = clamp(rint(x * inv), -127, 127) per row, as kquant/backends/reference.py computes it:
//  * dynamic: amax = max |x| of the row; scale = amax / 127, inv = (1 / amax) * 127 (1 and 1
//    for an all-zero row). A row with 0 < amax < 2^-64 is lifted: x and amax are multiplied
//    by 2^64 first (exact), so inv cannot overflow; the scale stays amax / 127.
//  * static: one calibrated scale s for every row, inv = 1 / s.
//  * a row holding NaN or +-Inf gets q = 0 everywhere (K padding included) and scale NaN, so
//    every output of the row is NaN.
// The vector levels quantize the ordinary rows themselves and hand the rest (non-finite,
// lifted) to quant_row_scalar, after their amax pass.
constexpr float kTinyAmax = 0x1p-64f;
constexpr float kTinyLift = 0x1p64f;

struct QuantArgs {
  const void* x; OutT xt; int64_t K;
  bool is_static; float s_inv, s_scale;
  int8_t* q8; uint8_t* qabs; int16_t* q16; int64_t lda;  // any of the three may be null
  float* sx; int32_t* asum; int64_t G, gsz;               // asum: group sums of q8, or null
  // AMX: q8 in 16-row x 64-k tiles of 1 KiB, row-block-major ([M/16][lda/64][16][64]), so
  // each tile load reads 1 KiB of consecutive bytes (only q8 is written then)
  bool tiled = false;
};

inline int quant1(float v, float inv) {
  float t = std::nearbyint(v * inv);  // round half to even, like torch.round
  t = std::min(127.0f, std::max(-127.0f, t));
  return static_cast<int>(t);
}

inline int64_t q8_index(const QuantArgs& a, int64_t m, int64_t k) {
  if (!a.tiled) return m * a.lda + k;
  return ((m >> 4) * (a.lda >> 6) + (k >> 6)) * 1024 + (m & 15) * 64 + (k & 63);
}

// whether |x| is NaN or infinite (|x| < inf is false for both)
inline bool nonfinite_abs(float ax) { return !(ax < INFINITY); }

// Scale of a row: sx, the multiplier inv, and the exact power of two x is lifted by first
struct RowScale {
  float inv, scale, lift;
};

inline RowScale row_scale(const QuantArgs& a, float amax) {
  if (a.is_static) return {a.s_inv, a.s_scale, 1.0f};
  if (!(amax > 0.0f)) return {1.0f, 1.0f, 1.0f};
  const float lift = amax < kTinyAmax ? kTinyLift : 1.0f;
  // torch evaluates the reference's `127.0 / amax` as reciprocal(amax) * 127: match it
  return {(1.0f / (amax * lift)) * 127.0f, amax / 127.0f, lift};
}

// Rows the vector loops quantize themselves: finite and not lifted
inline bool plain_row(const QuantArgs& a, float amax, bool nonfinite) {
  return !nonfinite && (a.is_static || !(amax > 0.0f && amax < kTinyAmax));
}

// max |x| over k in [k, K) of the row at x offset off, into *amax; returns whether any of
// those values is NaN or infinite (the vector amax passes' tails)
inline bool amax_tail(const QuantArgs& a, int64_t off, int64_t k, float* amax) {
  bool nonfinite = false;
  for (; k < a.K; ++k) {
    const float ax = std::fabs(to_f(a.x, a.xt, off + k));
    *amax = std::max(*amax, ax);
    nonfinite |= nonfinite_abs(ax);
  }
  return nonfinite;
}

// q of row m for k in [k0, lda) one value at a time (zeros from K on): x * lift * inv. The
// scalar rows, and the vector rows' tails. Returns whether an x it read was NaN or infinite.
inline bool quant_tail(const QuantArgs& a, int64_t m, int64_t k0, float inv, float lift = 1.0f) {
  bool nonfinite = false;
  for (int64_t k = k0; k < a.lda; ++k) {
    int q = 0;
    if (k < a.K) {
      const float v = to_f(a.x, a.xt, m * a.K + k);
      nonfinite |= nonfinite_abs(std::fabs(v));
      q = quant1(v * lift, inv);
    }
    if (a.q8) a.q8[q8_index(a, m, k)] = static_cast<int8_t>(q);
    if (a.qabs) a.qabs[m * a.lda + k] = static_cast<uint8_t>(q < 0 ? -q : q);
    if (a.q16) a.q16[m * a.lda + k] = static_cast<int16_t>(q);
  }
  return nonfinite;
}

// the group sums of row m's codes (W4A8)
inline void finish_row(const QuantArgs& a, int64_t m) {
  if (a.asum) {
    const int8_t* q = a.q8 + m * a.lda;
    for (int64_t g = 0; g < a.G; ++g) {
      int32_t s = 0;
      const int64_t k1 = std::min(a.K, (g + 1) * a.gsz);
      for (int64_t k = g * a.gsz; k < k1; ++k) s += q[k];
      a.asum[m * a.G + g] = s;
    }
  }
}

// Row m of a row holding NaN or Inf: q = 0 everywhere, group sums 0, scale NaN
inline void poison_row(const QuantArgs& a, int64_t m) {
  for (int64_t k = 0; k < a.lda; ++k) {
    if (a.q8) a.q8[q8_index(a, m, k)] = 0;
    if (a.qabs) a.qabs[m * a.lda + k] = 0;
    if (a.q16) a.q16[m * a.lda + k] = 0;
  }
  if (a.asum) std::fill(a.asum + m * a.G, a.asum + (m + 1) * a.G, 0);
  a.sx[m] = NAN;
}

// any row after the amax pass (dynamic; amax, nonfinite unused in static mode), in scalar.cpp
void quant_row_scalar(const QuantArgs& a, int64_t m, float amax, bool nonfinite);

// Row m of a vector level after its amax pass: a row the vector loop does not take (NaN or
// Inf, or to lift) goes to quant_row_scalar (returns false); otherwise sets sx[m] and *inv
inline bool begin_row(const QuantArgs& a, int64_t m, float amax, bool nonfinite, float* inv) {
  if (!plain_row(a, amax, nonfinite)) {
    quant_row_scalar(a, m, amax, nonfinite);
    return false;
  }
  const RowScale rs = row_scale(a, amax);
  a.sx[m] = rs.scale;
  *inv = rs.inv;
  return true;
}

// Row m after a loop wrote its codes for k < k0 (vector_nonfinite: whether that loop saw NaN
// or Inf; it looks only in static mode): the codes from k0 on, then the group sums, or the
// poisoned row for a static row that held NaN or Inf (dynamic rows here are finite)
inline void end_row(const QuantArgs& a, int64_t m, int64_t k0, float inv, float lift, bool vector_nonfinite) {
  const bool nonfinite = quant_tail(a, m, k0, inv, lift) || vector_nonfinite;
  if (a.is_static && nonfinite) poison_row(a, m);
  else finish_row(a, m);
}

// ----------------------------------------------------------------------------- level entry points
// Task functions: rows [m0, m1) x 8-channel blocks [nb0, nb1) of p with a kernel of `kind`
// (the runner in plan.cpp calls them; each output element is written by one task).
// Quantizers: rows [m0, m1) of a. Dequantizers: 8-channel block nb (nv valid channels) to
// fp32, k-major: dst[(k - k0) * ld + c] = (q - z) * s for the k of k-blocks [b0, b1) (k0:
// the first k of b0).

// scalar.cpp (and quant_row_scalar above)
void quant_rows_scalar(const QuantArgs& a, int64_t m0, int64_t m1);
void dequant_block_scalar(const Problem& p, int64_t nb, int nv, int64_t b0, int64_t b1, float* dst, int64_t ld);
void task_scalar(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);

#if KQ_X86
// avx2.cpp
void quant_rows_avx2(const QuantArgs& a, int64_t m0, int64_t m1);
void dequant_block_avx2(const Problem& p, int64_t nb, int nv, int64_t b0, int64_t b1, float* dst, int64_t ld);
void task_avx2(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);

// avx512.cpp (call only at Isa::Avx512 and above)
void quant_rows_avx512(const QuantArgs& a, int64_t m0, int64_t m1);
void task_avx512(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);

// amx_int8.cpp (Isa::Amx): W8A8, W4A8 and int8_mm. p.a8 holds whole 16-row tiles (rows
// past M are zeros) and K padded to 64.
void task_amx_int8(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);

// amx_bf16.cpp (Isa::Amx and cpu_has_amx_bf16()): W8A16, W4A16 on x prepared by split_x_bf16,
// which fills p.xb / p.xsum and returns the buffers that hold them
void task_amx_bf16(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
std::pair<at::Tensor, at::Tensor> split_x_bf16(Problem& p, const void* x, OutT xt);
#endif

}  // namespace kquant::cpu
