// AVX2 kernels of the 2- and 3-bit weights (lowbit.h): the decode kernels for int8 and float
// activations, and the unpacking into layout 1; and the float decode kernels of 4-bit weights
// (layout 2). Vector shifts issue once per cycle on the CPUs this targets, against two vpshufb
// and three or four logic ops per cycle, so codes are cut out of their bytes with as few shifts
// as the layouts allow (a vpshufb table stands in for one), and the float kernels AND each field
// in place (lowbit.h). Measured on Zen 2, an AND next to each FMA costs about as much as the FMA
// (a field's AND, subtraction and FMA take 1.2 cycles where the last two alone take 0.7), which is
// what bounds the one-row float kernels.
#include <utility>

#include "avx2.h"
#include "lowbit.h"

#if KQ_X86

namespace kquant::cpu {
namespace {

// Units (of 16 / 32 k) whose int16 sums cannot overflow: a unit adds at most 4 * 2 * 3 * 128
// = 3072 (2-bit) or 8 * 2 * 7 * 128 = 14336 (3-bit) to a sum; 8 and 2 of them stay below 2^15
// (a 2-bit unit's odd codes, at 4x, reach 2 * 2 * 12 * 128 = 6144 before their shift).
template <int Bits>
constexpr int64_t kFlushUnits = Bits == 2 ? 8 : 2;
constexpr int kChains = kLowChains;

// ----------------------------------------------------------------------------- codes
struct Consts {
  __m256i m3, mC, m4, m7, mF, shr2;  // shr2: the vpshufb table n >> 2 over a nibble n
  KQ_AVX2 Consts() {
    m3 = _mm256_set1_epi8(3);
    mC = _mm256_set1_epi8(0x0C);
    m4 = _mm256_set1_epi8(4);
    m7 = _mm256_set1_epi8(7);
    mF = _mm256_set1_epi8(0x0F);
    shr2 = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,  //
                            0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  }
};

// The rows of a unit of a block (at wu) a kernel reads: a 2-bit row (r[0]), or a 3-bit unit's
// rows A, B, C
template <int Bits>
KQ_AVX2 inline void load_unit(const uint8_t* wu, __m256i* r) {
  for (int i = 0; i < low_unit_rows(Bits); ++i)
    r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wu + 32 * i));
}

// 3-bit: the code t = 6 (Q = 0) or 7 (Q = 1) of each byte, from its low bits in row A or B and
// its third bit in row C
template <int Q>
KQ_AVX2 inline __m256i code67(const Consts& l, const __m256i* r) {
  return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(r[Q], 6), l.m3),
                         _mm256_and_si256(_mm256_srli_epi16(r[2], 4 + Q), l.m4));
}

// Code block T of a unit: the 8 channels x 4 k (byte (c, j): k = 4 T + j of the unit), unsigned
template <int Bits, int T>
KQ_AVX2 inline __m256i code_block(const Consts& l, const __m256i* r) {
  if constexpr (Bits == 2) {
    if constexpr (T == 0) return _mm256_and_si256(r[0], l.m3);
    if constexpr (T == 1) return _mm256_shuffle_epi8(l.shr2, _mm256_and_si256(r[0], l.mF));
    return _mm256_and_si256(_mm256_srli_epi16(r[0], 2 * T), l.m3);
  } else {
    if constexpr (T >= 6) return code67<T - 6>(l, r);
    if constexpr (T % 2 == 0) return _mm256_and_si256(r[T / 2], l.m7);
    return _mm256_and_si256(_mm256_srli_epi16(r[T / 2], 3), l.m7);
  }
}

// ----------------------------------------------------------------------------- per-group tables
// A [N][G] table (scales, zero points) for the blocks [nb0, nb1), transposed per block:
// dst[((nb - nb0) G + g) 8 + c] (0 past N). One pass over the blocks' rows, which lie in one run
// of memory: read ahead by the hardware, where a table per few blocks stalls on each.
KQ_AVX2 void transpose_groups(const float* src, int64_t N, int64_t G, int64_t nb0, int64_t nb1, float* dst) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const float* s = src + nb * kBlockN * G;
    float* d = dst + (nb - nb0) * G * 8;
    const int nv = static_cast<int>(std::min<int64_t>(kBlockN, N - nb * kBlockN));
    int64_t g = 0;
    if (nv == kBlockN)
      for (; g + 8 <= G; g += 8) {  // an 8 x 8 transpose
        __m256 r[8], t[8];
        for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(s + c * G + g);
        for (int c = 0; c < 8; c += 2) {
          t[c] = _mm256_unpacklo_ps(r[c], r[c + 1]);
          t[c + 1] = _mm256_unpackhi_ps(r[c], r[c + 1]);
        }
        for (int c = 0; c < 8; c += 4) {
          r[c] = _mm256_shuffle_ps(t[c], t[c + 2], 0x44);
          r[c + 1] = _mm256_shuffle_ps(t[c], t[c + 2], 0xEE);
          r[c + 2] = _mm256_shuffle_ps(t[c + 1], t[c + 3], 0x44);
          r[c + 3] = _mm256_shuffle_ps(t[c + 1], t[c + 3], 0xEE);
        }
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(d + (g + i) * 8, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
          _mm256_storeu_ps(d + (g + i + 4) * 8, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
        }
      }
    for (; g < G; ++g)
      for (int c = 0; c < kBlockN; ++c) d[g * 8 + c] = c < nv ? s[c * G + g] : 0.0f;
  }
}

// ----------------------------------------------------------------------------- prefetch
// The next NB blocks' weights (those after these, nb + NB ..; past the task's or the tensor's end a
// prefetch is wasted, never a fault) fetched into L2 a unit at a time while these stream from
// DRAM: a block's run of bytes is too short for the hardware prefetcher to ramp up on its own
template <int Bits, int NB>
KQ_AVX2 inline void prefetch_next(const uint8_t* w, int64_t bb, int64_t u) {
  constexpr int64_t ub = 32 * low_unit_rows(Bits);
  if (Bits == 3 || (u & 1) == 0)  // a 2-bit unit is half a line
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (NB + j) * bb + u * ub), _MM_HINT_T1);
      if (Bits == 3) _mm_prefetch(reinterpret_cast<const char*>(w + (NB + j) * bb + u * ub + 64), _MM_HINT_T1);
    }
}

// ----------------------------------------------------------------------------- int8 activations
// s[r][j] += vpmaddubsw(code block T of unit rows[j], a[r][4 T .. 4 T + 3]) for NB blocks, MR rows
template <int Bits, int MR, int NB, int T>
KQ_AVX2 inline void a8_block(const Consts& l, const int8_t* a, int64_t lda, const __m256i (*rows)[3],
                             __m256i (&s)[MR][NB]) {
  __m256i av[MR];
  for (int r = 0; r < MR; ++r) {
    int32_t v;
    std::memcpy(&v, a + r * lda + 4 * T, 4);
    av[r] = _mm256_set1_epi32(v);
  }
  for (int j = 0; j < NB; ++j) {
    const __m256i c = code_block<Bits, T>(l, rows[j]);
    for (int r = 0; r < MR; ++r) s[r][j] = _mm256_add_epi16(s[r][j], _mm256_maddubs_epi16(c, av[r]));
  }
}

template <int Bits, int MR, int NB, int... T>
KQ_AVX2 inline void a8_blocks_of(const Consts& l, const int8_t* a, int64_t lda, const __m256i (*rows)[3],
                                 __m256i (&s)[MR][NB], std::integer_sequence<int, T...>) {
  (a8_block<Bits, MR, NB, T>(l, a, lda, rows, s), ...);
}

// one unit wu (block j at wu + j bb) against a (the unit's first k)
template <int Bits, int MR, int NB>
KQ_AVX2 inline void a8_unit(const Consts& l, const int8_t* a, int64_t lda, const uint8_t* wu, int64_t bb,
                            __m256i (&s)[MR][NB]) {
  __m256i rows[NB][3];
  for (int j = 0; j < NB; ++j) load_unit<Bits>(wu + j * bb, rows[j]);
  a8_blocks_of<Bits, MR, NB>(l, a, lda, rows, s, std::make_integer_sequence<int, 8>());
}

// 2-bit: codes 0 and 2 of each byte (bits 0-1, 4-5: one shift), and codes 1 and 3 left in place
// at 4x their value (bits 2-3: no shift or table), whose int16 sum, a multiple of 4, is shifted
// back exactly before it joins s
template <int MR, int NB>
KQ_AVX2 inline void a8_unit2(const Consts& l, const int8_t* a, int64_t lda, const uint8_t* wu, int64_t bb,
                             __m256i (&s)[MR][NB]) {
  __m256i av[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < 4; ++t) {
      int32_t v;
      std::memcpy(&v, a + r * lda + 4 * t, 4);
      av[r][t] = _mm256_set1_epi32(v);
    }
  for (int j = 0; j < NB; ++j) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wu + j * bb));
    const __m256i w4 = _mm256_srli_epi16(w, 4);
    const __m256i c0 = _mm256_and_si256(w, l.m3), c1 = _mm256_and_si256(w, l.mC);
    const __m256i c2 = _mm256_and_si256(w4, l.m3), c3 = _mm256_and_si256(w4, l.mC);
    for (int r = 0; r < MR; ++r) {
      const __m256i even = _mm256_add_epi16(_mm256_maddubs_epi16(c0, av[r][0]), _mm256_maddubs_epi16(c2, av[r][2]));
      const __m256i odd4 = _mm256_add_epi16(_mm256_maddubs_epi16(c1, av[r][1]), _mm256_maddubs_epi16(c3, av[r][3]));
      s[r][j] = _mm256_add_epi16(s[r][j], _mm256_add_epi16(even, _mm256_srai_epi16(odd4, 2)));
    }
  }
}

// f[r][8 j + c] = sum_g fma(float(acc_g - z * asum_g), s_g, .) for MR rows from m, NB blocks
// from nb; sT: the blocks' scales transposed ([NB][G][8])
template <int Bits, int MR, int NB>
KQ_AVX2 void a8_blocks(const Problem& p, const LowBit& lb, int64_t m, int64_t nb, const float* sT, float* out) {
  constexpr int64_t uk = low_unit_k(Bits), ub = 32 * low_unit_rows(Bits);
  const int64_t bb = lb.block_bytes(), G = p.G;
  const uint8_t* w = lb.block(nb);
  const int8_t* a = p.a8 + m * p.lda;
  const Consts l;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) f[r][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t u0 = g * lb.per_group, u1 = std::min(u0 + lb.per_group, lb.units);
    __m256i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t u = u0; u < u1; u += kFlushUnits<Bits>) {
      const int64_t ue = std::min(u + kFlushUnits<Bits>, u1);
      __m256i s[MR][NB];
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) s[r][j] = _mm256_setzero_si256();
      for (int64_t uu = u; uu < ue; ++uu) {
        prefetch_next<Bits, NB>(w, bb, uu);
        if constexpr (Bits == 2)
          a8_unit2<MR, NB>(l, a + uu * uk, p.lda, w + uu * ub, bb, s);
        else
          a8_unit<Bits, MR, NB>(l, a + uu * uk, p.lda, w + uu * ub, bb, s);
      }
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(s[r][j], ones));
    }
    for (int r = 0; r < MR; ++r) {
      const __m256i corr = _mm256_set1_epi32(lb.zero * p.asum[(m + r) * G + g]);
      for (int j = 0; j < NB; ++j)
        f[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][j], corr)),
                                  _mm256_loadu_ps(sT + (j * G + g) * 8), f[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) _mm256_storeu_ps(out + (r * NB + j) * 8, f[r][j]);
}

// ----------------------------------------------------------------------------- float activations
// The float bits of 2^16, ORed into each 16-bit lane half above its codes (lowbit.h)
constexpr int32_t kExp16 = (127 + 16) << 23;

// the field of a code at bit p of a lane half w (w: the half with kExp16 ORed in), as the float
// 2^16 + u 2^(p - 7)
template <int Bits>
KQ_AVX2 inline __m256 field(__m256i w, int p) {
  return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(kExp16 | (((1 << Bits) - 1) << p))));
}

// lane half h of a row, with the exponent bits ORed in
KQ_AVX2 inline __m256i half(__m256i v, int h) {
  // half 0 keeps half 1's bits: the field masks clear them (or keep the exponent bits set)
  __m256i w = _mm256_or_si256(h ? _mm256_srli_epi32(v, 16) : v, _mm256_set1_epi32(kExp16));
  KQ_NO_CONTRACT(w);  // hides the OR from the compiler, which would redo it after every AND
  return w;
}

// Code I of a unit (lowbit.h's order) for NB blocks and MR rows: wv[j], the lane half of block j
// that holds it (exponent ORed in); x: the scaled x of the unit; sub: per block and field bit p,
// 2^16 + z 2^(p - 7)
template <int Bits, int MR, int NB, int I>
KQ_AVX2 inline void a16_code(const __m256i* wv, const float* x, int64_t ldx, const float* sub,
                             __m256 (&acc)[MR][NB][kChains]) {
  constexpr int k = low_order_k(Bits, I), p = low_field_bit(Bits, k);
  __m256 xb[MR];
  for (int r = 0; r < MR; ++r) xb[r] = _mm256_broadcast_ss(x + r * ldx + k);
  for (int j = 0; j < NB; ++j) {
    const __m256 fv = _mm256_sub_ps(field<Bits>(wv[j], p), _mm256_load_ps(sub + (16 * j + p) * 8));
    for (int r = 0; r < MR; ++r) acc[r][j][I % kChains] = _mm256_fmadd_ps(xb[r], fv, acc[r][j][I % kChains]);
  }
}

// the codes I0 .. I0 + sizeof(II) - 1 of lane half H of rows[j]
template <int Bits, int MR, int NB, int I0, int H, int... II>
KQ_AVX2 inline void a16_half(const __m256i* rows, const float* x, int64_t ldx, const float* sub,
                             __m256 (&acc)[MR][NB][kChains], std::integer_sequence<int, II...>) {
  __m256i wv[NB];
  for (int j = 0; j < NB; ++j) wv[j] = half(rows[j], H);
  (a16_code<Bits, MR, NB, I0 + II>(wv, x, ldx, sub, acc), ...);
}

// the codes I0 .. of rows[j], N per lane half
template <int Bits, int MR, int NB, int I0, int N>
KQ_AVX2 inline void a16_row(const __m256i* rows, const float* x, int64_t ldx, const float* sub,
                            __m256 (&acc)[MR][NB][kChains]) {
  a16_half<Bits, MR, NB, I0, 0>(rows, x, ldx, sub, acc, std::make_integer_sequence<int, N>());
  a16_half<Bits, MR, NB, I0 + N, 1>(rows, x, ldx, sub, acc, std::make_integer_sequence<int, N>());
}

// unit wu (block j at wu + j bb) of NB blocks
template <int Bits, int MR, int NB>
KQ_AVX2 inline void a16_unit(const Consts& l, const uint8_t* wu, int64_t bb, const float* x, int64_t ldx,
                             const float* sub, __m256 (&acc)[MR][NB][kChains]) {
  __m256i u[NB][3], rows[NB];
  for (int j = 0; j < NB; ++j) load_unit<Bits>(wu + j * bb, u[j]);
  if constexpr (Bits == 2) {
    for (int j = 0; j < NB; ++j) rows[j] = u[j][0];
    a16_row<Bits, MR, NB, 0, 8>(rows, x, ldx, sub, acc);
  } else {
    for (int j = 0; j < NB; ++j) rows[j] = u[j][0];
    a16_row<Bits, MR, NB, 0, 4>(rows, x, ldx, sub, acc);
    for (int j = 0; j < NB; ++j) rows[j] = u[j][1];
    a16_row<Bits, MR, NB, 8, 4>(rows, x, ldx, sub, acc);
    for (int j = 0; j < NB; ++j) rows[j] = u[j][2];
    a16_row<Bits, MR, NB, 16, 4>(rows, x, ldx, sub, acc);
    for (int j = 0; j < NB; ++j) rows[j] = code67<0>(l, u[j]);
    a16_row<Bits, MR, NB, 24, 2>(rows, x, ldx, sub, acc);
    for (int j = 0; j < NB; ++j) rows[j] = code67<1>(l, u[j]);
    a16_row<Bits, MR, NB, 28, 2>(rows, x, ldx, sub, acc);
  }
}

// sub[j][p] = 2^16 + z 2^(p - 7) for block j's zero points of group g (zT: transposed, [NB][G][8];
// null: zero), p = 0 .. 14 (exact: |z| <= 1024)
template <int NB>
KQ_AVX2 inline void subtrahends(const float* zT, int64_t G, int64_t g, int zero, float (*sub)[16][8]) {
  for (int j = 0; j < NB; ++j) {
    const __m256 z = zT ? _mm256_loadu_ps(zT + (j * G + g) * 8) : _mm256_set1_ps(float(zero));
    for (int b = 0; b < 16; ++b)
      _mm256_store_ps(sub[j][b], _mm256_fmadd_ps(z, _mm256_set1_ps(std::ldexp(1.0f, b - 7)), _mm256_set1_ps(65536.0f)));
  }
}

// f[r][8 j + c] = sum_g fma(sum over g's k of x[k] (u - z), s_g, .) for MR rows, NB blocks;
// sT, zT: the blocks' scales and zero points transposed ([NB][G][8]; zT null: lb.zero)
template <int Bits, int MR, int NB>
KQ_AVX2 void a16_blocks(const Problem& p, const LowBit& lb, int64_t m, int64_t nb, const float* sT, const float* zT,
                        float* out) {
  constexpr int64_t uk = low_unit_k(Bits), ub = 32 * low_unit_rows(Bits);
  const int64_t bb = lb.block_bytes(), G = p.G;
  const uint8_t* w = lb.block(nb);
  const float* x = p.xf + m * p.ldx;
  const Consts l;
  alignas(32) float sub[NB][16][8];  // [block][field bit p][channel]
  __m256 f[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) f[r][j] = _mm256_setzero_ps();
  subtrahends<NB>(zT, G, 0, lb.zero, sub);
  for (int64_t g = 0; g < G; ++g) {
    if (zT && g > 0) subtrahends<NB>(zT, G, g, lb.zero, sub);
    const int64_t u0 = g * lb.per_group, u1 = std::min(u0 + lb.per_group, lb.units);
    __m256 acc[MR][NB][kChains];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j)
        for (int i = 0; i < kChains; ++i) acc[r][j][i] = _mm256_setzero_ps();
    for (int64_t u = u0; u < u1; ++u) {
      prefetch_next<Bits, NB>(w, bb, u);
      a16_unit<Bits, MR, NB>(l, w + u * ub, bb, x + u * uk, p.ldx, &sub[0][0][0], acc);
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j)
        f[r][j] = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(acc[r][j][0], acc[r][j][1]),
                                                _mm256_add_ps(acc[r][j][2], acc[r][j][3])),
                                  _mm256_loadu_ps(sT + (j * G + g) * 8), f[r][j]);
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) _mm256_storeu_ps(out + (r * NB + j) * 8, f[r][j]);
}

// ----------------------------------------------------------------------------- 4-bit, float activations
// The constants of the conversions (lowbit.h): the exponent bits interleaved with a unit row,
// and the masks of fields q = 0 .. 3 (bit 4 q) with the exponent bits, kept in registers
struct W4Consts {
  __m256i e, mask[4];
  KQ_AVX2 W4Consts() {
    e = _mm256_set1_epi16(static_cast<int16_t>(kExp16 >> 16));
    for (int q = 0; q < 4; ++q) mask[q] = _mm256_set1_epi32(kExp16 | (15 << (4 * q)));
  }
  // once per unit: else the register allocator reloads the masks from the stack for every code
  KQ_AVX2 void pin() { asm volatile("" : "+x"(mask[0]), "+x"(mask[1]), "+x"(mask[2]), "+x"(mask[3])); }
};

// view V of unit row wu: view 0 holds channels 0, 1, 4, 5 and view 1 channels 2, 3, 6, 7, a
// 32-bit lane per (channel, lane half h), so one 8-byte broadcast of x serves both halves and
// vhaddps puts the two views' half sums back in channel order
template <int V>
KQ_AVX2 inline __m256i w4_view(const W4Consts& l, const uint8_t* wu) {
  const __m256i row = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wu));
  return V ? _mm256_unpackhi_epi16(row, l.e) : _mm256_unpacklo_epi16(row, l.e);
}

// x'[k(0, q)], x'[k(1, q)] of unit u (adjacent: low4_slot) in the lanes of halves 0, 1
KQ_AVX2 inline __m256 w4_x(const float* x, int64_t u, int q) {
  return _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x + 8 * u + 2 * q)));
}

// sub[v][q] = 2^16 + z 2^(4 q - 7) in view v's lanes for the block's zero points of group g (zT:
// transposed, [G][8]; null: zero, the views alike)
KQ_AVX2 inline void w4_subtrahends(const float* zT, int64_t g, int zero, float (*sub)[4][8]) {
  const __m256i lanes[2] = {_mm256_setr_epi32(0, 0, 1, 1, 4, 4, 5, 5), _mm256_setr_epi32(2, 2, 3, 3, 6, 6, 7, 7)};
  for (int v = 0; v < 2; ++v) {
    const __m256 z = zT ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(zT + g * 8), lanes[v]) : _mm256_set1_ps(float(zero));
    for (int q = 0; q < 4; ++q)
      _mm256_store_ps(sub[v][q],
                      _mm256_fmadd_ps(z, _mm256_set1_ps(std::ldexp(1.0f, 4 * q - 7)), _mm256_set1_ps(65536.0f)));
  }
}

// the half sums of a view's four chains, (q0 + q1) + (q2 + q3)
KQ_AVX2 inline __m256 w4_sum(const __m256 (&a)[4]) {
  return _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
}

// The chains acc[r][q] += x'(q) (u - z) 2^(4 q - 7) of MR rows over units [u0, u1) of a block (at
// w; the next block's units prefetched), then tot[r][v] = w4_sum of view v's. Inlined before GCC
// splits up the chains' arrays, else it stores them on every unit.
// Two rows, view V: eight chains, the masks in registers (two views at once would spill).
template <int MR, int V>
KQ_AVX2 __attribute__((always_inline)) inline void w4_pass(W4Consts& l, const uint8_t* w, int64_t bb, int64_t u0,
                                                           int64_t u1, const float* x, int64_t ldx,
                                                           const float (*sub)[8], __m256 (&tot)[MR][2]) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_ps();
  for (int64_t u = u0; u < u1; ++u) {
    l.pin();
    if (V == 0) _mm_prefetch(reinterpret_cast<const char*>(w + bb + 32 * u), _MM_HINT_T1);
    const __m256i wv = w4_view<V>(l, w + 32 * u);
    for (int q = 0; q < 4; ++q) {
      const __m256 fv = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, l.mask[q])), _mm256_load_ps(sub[q]));
      for (int r = 0; r < MR; ++r) acc[r][q] = _mm256_fmadd_ps(w4_x(x + r * ldx, u, q), fv, acc[r][q]);
    }
  }
  for (int r = 0; r < MR; ++r) tot[r][V] = w4_sum(acc[r]);
}

// One row, both views at once (four chains alone would wait on the FMA latency): a code of each
// view per broadcast of x, which would otherwise stay in a register for the second view and push
// chains out of theirs
KQ_AVX2 __attribute__((always_inline)) inline void w4_both(W4Consts& l, const uint8_t* w, int64_t bb, int64_t u0,
                                                           int64_t u1, const float* x, const float (*sub0)[8],
                                                           const float (*sub1)[8], __m256 (&tot)[1][2]) {
  __m256 a0[4], a1[4];
  for (int q = 0; q < 4; ++q) a0[q] = a1[q] = _mm256_setzero_ps();
  for (int64_t u = u0; u < u1; ++u) {
    l.pin();
    _mm_prefetch(reinterpret_cast<const char*>(w + bb + 32 * u), _MM_HINT_T1);
    const __m256i v0 = w4_view<0>(l, w + 32 * u), v1 = w4_view<1>(l, w + 32 * u);
    for (int q = 0; q < 4; ++q) {
      const __m256 xq = w4_x(x, u, q);
      const __m256 f0 = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, l.mask[q])), _mm256_load_ps(sub0[q]));
      a0[q] = _mm256_fmadd_ps(xq, f0, a0[q]);
      const __m256 f1 = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, l.mask[q])), _mm256_load_ps(sub1[q]));
      a1[q] = _mm256_fmadd_ps(xq, f1, a1[q]);
    }
  }
  tot[0][0] = w4_sum(a0);
  tot[0][1] = w4_sum(a1);
}

// f[r][c] = sum_g fma(sum over g's k of x[k] (u - z), s_g, .) for MR rows of block nb (lowbit.h's
// 4-bit order); sT, zT: the block's scales and zero points transposed ([G][8]; zT null: lb.zero)
template <int MR>
KQ_AVX2 void w4_blocks(const Problem& p, const LowBit& lb, int64_t m, int64_t nb, const float* sT, const float* zT,
                       float* out) {
  const int64_t bb = lb.block_bytes(), G = p.G;
  const uint8_t* w = lb.block(nb);
  const float* x = p.xf + m * p.ldx;
  const int zb = zT ? 1 : 0;  // the views' subtrahends differ
  alignas(32) float sub[2][4][8];
  W4Consts l;
  __m256 f[MR];
  for (int r = 0; r < MR; ++r) f[r] = _mm256_setzero_ps();
  w4_subtrahends(zT, 0, lb.zero, sub);
  for (int64_t g = 0; g < G; ++g) {
    if (zT && g > 0) w4_subtrahends(zT, g, lb.zero, sub);
    const int64_t u0 = g * lb.per_group, u1 = std::min(u0 + lb.per_group, lb.units);
    __m256 tot[MR][2];
    if constexpr (MR == 1) {
      w4_both(l, w, bb, u0, u1, x, sub[0], sub[zb], tot);
    } else {
      w4_pass<MR, 0>(l, w, bb, u0, u1, x, p.ldx, sub[0], tot);
      w4_pass<MR, 1>(l, w, bb, u0, u1, x, p.ldx, sub[zb], tot);
    }
    for (int r = 0; r < MR; ++r)  // vhaddps: half 0 + half 1 in channel order
      f[r] = _mm256_fmadd_ps(_mm256_hadd_ps(tot[r][0], tot[r][1]), _mm256_loadu_ps(sT + g * 8), f[r]);
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + r * 8, f[r]);
}

template <int Bits>
KQ_AVX2 void blocks(const Problem& p, const LowBit& lb, bool a8, int mr, int nbk, int64_t m, int64_t nb,
                    const float* sT, const float* zT, float* out) {
  if (a8 && mr == 1 && nbk == 4) return a8_blocks<Bits, 1, 4>(p, lb, m, nb, sT, out);
  if (a8 && mr == 1 && nbk == 2) return a8_blocks<Bits, 1, 2>(p, lb, m, nb, sT, out);
  if (a8 && mr == 1) return a8_blocks<Bits, 1, 1>(p, lb, m, nb, sT, out);
  if (a8 && nbk == 2) return a8_blocks<Bits, 2, 2>(p, lb, m, nb, sT, out);
  if (a8) return a8_blocks<Bits, 2, 1>(p, lb, m, nb, sT, out);
  if (mr == 1) return a16_blocks<Bits, 1, 1>(p, lb, m, nb, sT, zT, out);
  return a16_blocks<Bits, 2, 1>(p, lb, m, nb, sT, zT, out);
}

// the 4-bit float kernels (one block per pass)
KQ_AVX2 void blocks4(const Problem& p, const LowBit& lb, int mr, int64_t m, int64_t nb, const float* sT,
                     const float* zT, float* out) {
  if (mr == 1) return w4_blocks<1>(p, lb, m, nb, sT, zT, out);
  w4_blocks<2>(p, lb, m, nb, sT, zT, out);
}

// unpacking: k-quad q of a layout-1 half block, the codes minus sv
KQ_AVX2 inline void put(int8_t* dst, __m256i sv, int64_t q, __m256i c) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kW8Row * q), _mm256_sub_epi8(c, sv));
}

template <int Bits, int... T>
KQ_AVX2 inline void put_unit(const Consts& l, const __m256i* r, int8_t* dst, __m256i sv, int64_t q0,
                             std::integer_sequence<int, T...>) {
  (put(dst, sv, q0 + T, code_block<Bits, T>(l, r)), ...);
}

}  // namespace

KQ_AVX2 void low_task_avx2(const Problem& p, const LowBit& lb, bool a8, int64_t nb0, int64_t nb1) {
  // Blocks per chunk: their transposed scales (<= 64 KiB) and weights (half of L2) stay in L2
  // while each pair of rows runs over them
  const int64_t chunk = std::max<int64_t>(
      4, std::min((int64_t(16) << 10) / (8 * p.G), active_caches().l2 / 2 / lb.block_bytes()) / 4 * 4);
  alignas(32) float f[4 * 8];  // [rows x blocks of a pass][8]
  alignas(32) float b8[8];
  thread_local std::vector<float> tables;
  for (int64_t c0 = nb0; c0 < nb1; c0 += chunk) {
    const int64_t c1 = std::min(nb1, c0 + chunk), tsize = (c1 - c0) * p.G * 8;
    float* sT = scratch(tables, 2 * tsize);
    float* zT = p.zeros ? sT + tsize : nullptr;
    transpose_groups(p.sw, p.N, p.G, c0, c1, sT);
    if (zT) transpose_groups(p.zeros, p.N, p.G, c0, c1, zT);
    for (int64_t m = 0; m < p.M; m += 2) {
      const int mr = static_cast<int>(std::min<int64_t>(2, p.M - m));
      // blocks per pass, measured: more streams keep more lines in flight from DRAM (int8
      // activations), up to what the registers hold (3-bit rows spill past two blocks)
      const int64_t most = a8 ? (lb.bits == 2 ? 4 : 2) / mr : 1;
      for (int64_t nb = c0; nb < c1;) {
        const int nbk = static_cast<int>(c1 - nb >= most ? most : 1);
        int nv[4];
        for (int j = 0; j < nbk; ++j) nv[j] = static_cast<int>(std::min<int64_t>(kBlockN, p.N - (nb + j) * kBlockN));
        // the next chunk's scales (and zero points) for the same blocks, into L2 while these
        // blocks run: the transposes would otherwise wait on them
        const int64_t pn0 = std::min(p.N, (c1 + nb - c0) * kBlockN), pn1 = std::min(p.N, pn0 + nbk * kBlockN);
        for (int64_t i = pn0 * p.G * 4; i < pn1 * p.G * 4; i += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(p.sw) + i, _MM_HINT_T1);
          if (p.zeros) _mm_prefetch(reinterpret_cast<const char*>(p.zeros) + i, _MM_HINT_T1);
        }
        const float* st = sT + (nb - c0) * p.G * 8;
        const float* zt = zT ? zT + (nb - c0) * p.G * 8 : nullptr;
        if (lb.bits == 2) blocks<2>(p, lb, a8, mr, nbk, m, nb, st, zt, f);
        else if (lb.bits == 3) blocks<3>(p, lb, a8, mr, nbk, m, nb, st, zt, f);
        else blocks4(p, lb, mr, m, nb, st, zt, f);
        for (int j = 0; j < nbk; ++j) {
          const int64_t n0 = (nb + j) * kBlockN;
          for (int c = 0; c < kBlockN; ++c) b8[c] = p.bias && c < nv[j] ? p.bias[n0 + c] : 0.0f;
          const __m256 bv = _mm256_load_ps(b8);
          for (int r = 0; r < mr; ++r) {
            __m256 v = _mm256_loadu_ps(f + (r * nbk + j) * 8);
            if (a8) v = _mm256_mul_ps(v, _mm256_set1_ps(p.sx[m + r]));
            KQ_NO_CONTRACT(v);  // the reference rounds the product before adding the bias
            if (p.bias) v = _mm256_add_ps(v, bv);
            store8(p.y, p.yt, (m + r) * p.N + n0, v, nv[j]);
          }
        }
        nb += nbk;
      }
    }
  }
}

KQ_AVX2 void low_unpack_avx2(const LowBit& lb, int64_t nb, int sub, int8_t* dst) {
  const uint8_t* w = lb.block(nb);
  const int64_t us = lb.unit_bytes();
  const Consts l;
  const __m256i sv = _mm256_set1_epi8(static_cast<char>(sub));
  __m256i r[3];
  for (int64_t u = 0; u < lb.units; ++u) {
    if (lb.bits == 2) {
      load_unit<2>(w + us * u, r);
      put_unit<2>(l, r, dst, sv, 4 * u, std::make_integer_sequence<int, 4>());
    } else {
      load_unit<3>(w + us * u, r);
      put_unit<3>(l, r, dst, sv, 8 * u, std::make_integer_sequence<int, 8>());
    }
  }
}

}  // namespace kquant::cpu

#endif  // KQ_X86
