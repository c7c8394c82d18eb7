// 2- and 3-bit weights: their blocked layouts, the kernels that read them directly (in tiles of
// one or two rows: decode), and their unpacking into layout 1, through which the int8 and
// weight-only kernels of plan.h run them (lowbit.cpp chooses per call). The float-activation
// decode kernels also read 4-bit weights in layout 2 (common.h): the W4A16 calls of a few
// rows at the scalar and AVX2 levels.
//
//   lowbit.h          this header
//   lowbit.cpp        the ops _w{3,2}a{8,16}_linear_cpu, their driver (and that of the 4-bit
//                     decode calls) and the scalar kernels
//   lowbit_avx2.cpp   the AVX2 kernels (also run at the AVX-512 and AMX levels)
//
// Layouts (ids shared with kquant/backends/cpu.py). K is padded with code 0 to Kpad, a multiple
// of 64 (as layouts 1 and 2), N to whole 8-channel blocks; block nb (channels 8 nb .. 8 nb + 7)
// is a run of 32-byte rows [8 channels][4 bytes], byte (c, j) at 4 c + j:
//  3  int2  uint8 [N/8][Kpad/16][8][4]: row o (a 16-k unit) byte (c, j) holds the code of
//     k = 16 o + 4 t + j in bits 2t..2t+1 (t = 0..3): `(v >> 2t) & 3` is a vpmaddubsw-ready
//     block of 8 channels x 4 consecutive k.
//  4  int3  uint8 [N/8][3 Kpad/32][8][4]: a 32-k unit o is rows 3o..3o+2 (A, B, C); byte (c, j)
//     holds codes of k = 32 o + 4 t + j:
//       A: t = 0 in bits 0-2, t = 1 in bits 3-5, the low two bits of t = 6 in bits 6-7
//       B: t = 2 in bits 0-2, t = 3 in bits 3-5, the low two bits of t = 7 in bits 6-7
//       C: t = 4 in bits 0-2, t = 5 in bits 3-5, the third bits of t = 6 and 7 in bits 6 and 7
//     so six of a byte triple's eight codes are whole fields, cut out with a shift and a mask.
//  2  int4  uint8 [N/8][Kpad/8][8][4] (common.h): row o (an 8-k unit) byte (c, j) holds the code
//     of k = 8 o + 4 t + j in bits 4t..4t+3 (t = 0, 1), the same shape as a 2-bit unit.
//
// Int8 activations (symmetric weights, zero point z = 2 or 4): vpmaddubsw of the unsigned codes
// and the int8 codes of x, int16 sums flushed to int32 before they can overflow, then z times the
// group's activation sum removed: exact int32 sums per group, folded in fp32 like W4A8
// (f = fma(float(acc_g - z * asum_g), s_g, f)).
//
// Float activations: each code becomes an exact float without a conversion instruction. A
// 16-bit lane half of codes (2- or 4-bit fields, 3-bit fields of a row, or the codes t = 6, 7
// put together per unit) gets the float exponent of 2^16 ORed in above them, so ANDing the field
// of a code at bit p (p <= 14) leaves the float 2^16 + u 2^(p - 7); subtracting 2^16 + z 2^(p - 7)
// (exact) leaves (u - z) 2^(p - 7), and x was multiplied by 2^(7 - p) once per call (exact but
// for |x| beyond 2^120 or below 2^-119: the driver leaves such calls to the other kernels): each
// product is x * (u - z) as in the reference (adding z * sum(x) afterwards instead would cancel).
// Lanes are channels; each (row, block) keeps four fp32 chains, codes taking turns in a fixed
// order (low_order_k), added pairwise per group and folded with fma(sum, s_g, f). 4-bit weights
// keep chains per lane half instead (low4_slot). The scalar kernels keep the same order and
// scaling, so both levels give the same bits.
#pragma once

#include "plan.h"

namespace kquant::cpu {

constexpr int kLayoutInt2 = 3;
constexpr int kLayoutInt3 = 4;

constexpr int64_t low_unit_k(int bits) { return bits == 2 ? 16 : bits == 4 ? 8 : 32; }  // k per unit
constexpr int64_t low_unit_rows(int bits) { return bits == 3 ? 3 : 1; }  // 32-byte rows per unit

// One call's low-bit weights (the rest is in the Problem)
struct LowBit {
  int bits = 2;
  const uint8_t* w = nullptr;  // layout 3, 4 or (4 bits) 2
  int64_t units = 0;           // units per block (Kpad / unit k)
  int64_t per_group = 0;       // units per weight group (per channel: all)
  int zero = 0;                // the symmetric zero point (2, 4 or 8), used where p.zeros is null
  int64_t unit_bytes() const { return 32 * low_unit_rows(bits); }
  int64_t block_bytes() const { return units * unit_bytes(); }
  const uint8_t* block(int64_t nb) const { return w + nb * block_bytes(); }
};

// Float activations: the order in which a kernel visits the codes of a unit, in 8-code lane
// halves h of 32-bit rows; code i is fed to chain i % kLowChains. k is the code's offset in its
// unit, j = k % 4 its byte in the lane (jj = j % 2 within the half), t = k / 4 % 8.
//  2-bit: i = 8 h + 4 jj + t (j = 2 h + jj) at bit p = 8 jj + 2 t of the half.
//  3-bit: rows A, B, C (v = 0, 1, 2), then rows of the codes t = 6 and 7 (v = 3, 4):
//         i < 24: i = 8 v + 4 h + 2 jj + f, t = 2 v + f, at bit p = 8 jj + 3 f;
//         i >= 24: i = 24 + 4 (v - 3) + 2 h + jj, t = 3 + v, at bit p = 8 jj.
constexpr int kLowChains = 4;  // fp32 chains per (row, block): enough to hide the FMA latency
constexpr int low_order_k(int bits, int i) {
  return bits == 2 ? 4 * (i & 3) + 2 * (i >> 3) + ((i >> 2) & 1)
         : i < 24  ? 4 * (2 * (i >> 3) + (i & 1)) + 2 * ((i >> 2) & 1) + ((i >> 1) & 1)
                   : 4 * (6 + ((i - 24) >> 2)) + (i & 3);
}
// the bit p of the code at unit offset k within its lane half; x[k] is scaled by 2^(7 - p)
constexpr int low_field_bit(int bits, int64_t k) {
  const int t = static_cast<int>((k >> 2) & 7), jj = static_cast<int>(k & 1);
  return bits == 2 ? 8 * jj + 2 * (t & 3) : bits == 4 ? 8 * jj + 4 * (t & 1) : 8 * jj + (t < 6 ? 3 * (t & 1) : 0);
}

// 4-bit float activations: a unit row is interleaved with the exponent bits (vpunpck{l,h}wd,
// no shift): each 32-bit lane is one half h of one channel, whose field q (bit p = 4 q) holds
// k = 8 o + 2 h + (q >> 1) + 4 (q & 1). The chains are (row, block, channel, h, q), in unit
// order; per group the chains of a half are added pairwise ((q0 + q1) + (q2 + q3)), then half 0 +
// half 1, and folded with fma(sum, s_g, f). x is stored with the pair (h = 0, 1) of each q
// adjacent, x[8 o + r] (scaled) at 8 o + low4_slot(r), so one 8-byte broadcast feeds both halves.
constexpr int low4_slot(int r) { return 4 * (r & 1) + 2 * (r >> 2) + ((r >> 1) & 1); }

// Kernels of a level. A task: rows [0, M) x 8-channel blocks [nb0, nb1), writing y. a8: int8
// activations (p.a8, p.asum, p.sx; 2 and 3 bits), else float (p.xf, p.ldx: x[k] scaled by
// 2^(7 - low_field_bit), 4-bit at low4_slot; p.zeros whole numbers of magnitude <= 1024, or null).
void low_task_scalar(const Problem& p, const LowBit& lb, bool a8, int64_t nb0, int64_t nb1);
// Block nb as layout 1: the codes minus sub as int8, k-quad q of it at dst + 64 q (dst: the
// block's 8-channel half of a 16-channel layout-1 block)
void low_unpack_scalar(const LowBit& lb, int64_t nb, int sub, int8_t* dst);
// W4A16 (_w4a16_linear_cpu, ops.cpp; p set up for layout 2, x: the op's x) on the decode
// kernels where they take the call (lowbit.cpp; path: the op's, 0 auto, 1 decode where it can, 2
// never): returns false, having written nothing, where not
bool w4_decode(Problem& p, const at::Tensor& x, int64_t path);
#if KQ_X86
void low_task_avx2(const Problem& p, const LowBit& lb, bool a8, int64_t nb0, int64_t nb1);
void low_unpack_avx2(const LowBit& lb, int64_t nb, int sub, int8_t* dst);
#endif

}  // namespace kquant::cpu
