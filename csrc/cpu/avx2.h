// AVX2+FMA kernels and the AVX2 kernel set of tiles.h (the AVX-512 kernel set derives from
// it). Everything here is inline and compiled with KQ_AVX2, so it inlines into task_avx2
// and task_avx512.
//
// Exact int8 sums without VNNI. vpmaddubsw (u8 x s8 -> int16 pair sums) saturates for
// general int8 operands, so two exact sequences are used:
//  * few rows (SignGemm, decode): the sign trick vpmaddubsw(|a|, sign(w, a)). With a, w in
//    [-127, 127] a pair sums to at most 2 * 127 * 127 = 32258 < 32767, so it never
//    saturates; then vpmaddwd(.., 1) + vpaddd. 4 uops per 32 MACs and a single int8 weight
//    load: the fewest weight bytes per MAC, which is what one row is bound by.
//  * more rows (Int16Gemm): int16 operands with vpmaddwd. Activations are quantized
//    straight to int16, weights widened with one vpmovsxbw per 16 bytes (shared by 4
//    rows), then vpmaddwd + vpaddd: 2 uops per 16 MACs, and only one of them needs a
//    multiply port (3 of the sign trick's 4 do), so it has the higher throughput once
//    several rows share each weight load.
//  * W4A8: nibbles u in 0..15 are the unsigned vpmaddubsw operand; pairs are at most
//    2 * 15 * 127 = 3810, so 4 k-octets (7620 each) accumulate safely in int16 before
//    one vpmaddwd: more MACs per uop than the int8 GEMM. The zero point 8 is folded out
//    exactly with per-group activation sums.
// Weight-only kernels keep fp32 lanes (channel, k mod 4) and reduce them pairwise, the
// order wo_sums_scalar reproduces.
#pragma once

#include "tiles.h"

#if KQ_X86

namespace kquant::cpu {

// ----------------------------------------------------------------------------- loads and stores
KQ_AVX2 inline __m256 load8(const void* x, OutT t, int64_t i) {
  switch (t) {
    case OutT::F16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
    case OutT::BF16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i))), 16));
    default: return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  }
}

// fp32 -> out dtype with round-to-nearest-even (what torch's .to() does); n lanes
KQ_AVX2 inline void store8(void* y, OutT t, int64_t i, __m256 v, int n) {
  if (n == 8) {
    switch (t) {
      case OutT::F16:
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return;
      case OutT::BF16: {
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + i), p);
        return;
      }
      default: _mm256_storeu_ps(static_cast<float*>(y) + i, v); return;
    }
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int c = 0; c < n; ++c) store_f(y, t, i + c, tmp[c]);
}

// 16 int8 q of row m from k (k % 16 == 0): q8, plain or tiled, and |q| (the AVX2 and
// AVX-512 quantizers)
KQ_AVX2 inline void store_q8x16(const QuantArgs& a, int64_t m, int64_t k, __m128i b) {
  if (a.q8) _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q8 + q8_index(a, m, k)), b);
  if (a.qabs) _mm_storeu_si128(reinterpret_cast<__m128i*>(a.qabs + m * a.lda + k), _mm_abs_epi8(b));
}

// ----------------------------------------------------------------------------- int8 GEMMs
// Sign trick: exact int32 sums of MR rows x one 8-channel half w of layout 1 over k-quads
// [q0, q1); a: int8 codes, aa: their absolute values (row stride lda); out [MR][8]
template <int MR>
KQ_AVX2 inline void gemm_sign(const int8_t* a, const uint8_t* aa, int64_t lda, const int8_t* w, int64_t q0,
                              int64_t q1, int32_t* out) {
  // two accumulator sets over even/odd quads: shorter dependency chains, more loads in flight
  __m256i acc[MR], acc2[MR];
  for (int r = 0; r < MR; ++r) acc[r] = acc2[r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t q = q0;
  for (; q + 2 <= q1; q += 2) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kW8Row * q));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kW8Row * (q + 1)));
    for (int r = 0; r < MR; ++r) {
      int64_t av, aav;
      std::memcpy(&av, a + r * lda + 4 * q, 8);
      std::memcpy(&aav, aa + r * lda + 4 * q, 8);
      const __m256i va = _mm256_set1_epi64x(av), vaa = _mm256_set1_epi64x(aav);
      // quad q uses bytes 0-3 of the pair, quad q+1 bytes 4-7
      const __m256i a0 = _mm256_shuffle_epi32(va, 0x00), a1 = _mm256_shuffle_epi32(va, 0x55);
      const __m256i aa0 = _mm256_shuffle_epi32(vaa, 0x00), aa1 = _mm256_shuffle_epi32(vaa, 0x55);
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aa0, _mm256_sign_epi8(b0, a0)), ones));
      acc2[r] = _mm256_add_epi32(acc2[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aa1, _mm256_sign_epi8(b1, a1)), ones));
    }
  }
  for (; q < q1; ++q) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kW8Row * q));
    for (int r = 0; r < MR; ++r) {
      int32_t av, aav;
      std::memcpy(&av, a + r * lda + 4 * q, 4);
      std::memcpy(&aav, aa + r * lda + 4 * q, 4);
      const __m256i p = _mm256_maddubs_epi16(_mm256_set1_epi32(aav), _mm256_sign_epi8(b, _mm256_set1_epi32(av)));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
    }
  }
  for (int r = 0; r < MR; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * r), _mm256_add_epi32(acc[r], acc2[r]));
}

// Sign trick for one row x 4 channel blocks at once (w0, w2: two 16-channel blocks of
// layout 1) over all nq k-quads: the activation broadcasts are shared by 4 weight streams
// (1.5 loads per 32 MACs, not 3). out[8 j + c], j = block
KQ_AVX2 inline void gemv_sign4(const int8_t* a, const uint8_t* aa, const int8_t* w0, const int8_t* w2, int64_t nq,
                               int32_t* out) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < nq; ++q) {
    if (q + 16 < nq) {  // 1 KiB ahead in both streams (one row is bound by DRAM)
      _mm_prefetch(reinterpret_cast<const char*>(w0 + kW8Row * q + 1024), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w2 + kW8Row * q + 1024), _MM_HINT_T0);
    }
    int32_t av, aav;
    std::memcpy(&av, a + 4 * q, 4);
    std::memcpy(&aav, aa + 4 * q, 4);
    const __m256i va = _mm256_set1_epi32(av), vaa = _mm256_set1_epi32(aav);
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + kW8Row * q));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + kW8Row * q + 32));
    const __m256i b2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w2 + kW8Row * q));
    const __m256i b3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w2 + kW8Row * q + 32));
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(vaa, _mm256_sign_epi8(b0, va)), ones));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(vaa, _mm256_sign_epi8(b1, va)), ones));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(_mm256_maddubs_epi16(vaa, _mm256_sign_epi8(b2, va)), ones));
    c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(_mm256_maddubs_epi16(vaa, _mm256_sign_epi8(b3, va)), ones));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 24), c3);
}

// int16 GEMM of MR rows (int16 codes a, row stride lda) x 8 channels over k-quads [q0, q1).
// Widened = false: w is an 8-channel half of layout 1, widened in the loop; its 64-byte
// rows give it one cache line per k-quad, so the loop prefetches 1 KiB (16 quads) ahead.
// Widened = true: w holds quads [q0, q1) already widened (widen_block: [q][8 channels][4 k]),
// so the loop has no vpmovsxbw.
template <int MR, bool Widened = false>
KQ_AVX2 inline void gemm_i16(const int16_t* a, int64_t lda, const void* w, int64_t q0, int64_t q1, int32_t* out) {
  __m256i lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  const int8_t* w8 = static_cast<const int8_t*>(w);
  const int16_t* w16 = static_cast<const int16_t*>(w);
  for (int64_t q = q0; q < q1; ++q) {
    __m256i blo, bhi;
    if constexpr (Widened) {
      blo = _mm256_load_si256(reinterpret_cast<const __m256i*>(w16 + 32 * (q - q0)));
      bhi = _mm256_load_si256(reinterpret_cast<const __m256i*>(w16 + 32 * (q - q0) + 16));
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(w8 + kW8Row * (q + 16)), _MM_HINT_T0);
      blo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w8 + kW8Row * q)));
      bhi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w8 + kW8Row * q + 16)));
    }
    for (int r = 0; r < MR; ++r) {
      int64_t av;
      std::memcpy(&av, a + r * lda + 4 * q, 8);
      const __m256i va = _mm256_set1_epi64x(av);
      lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(va, blo));
      hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(va, bhi));
    }
  }
  // lanes hold (channel, k-half) partials: add the halves and restore channel order
  for (int r = 0; r < MR; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * r),
                        _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[r], hi[r]), 0xD8));
}

// k-quads [q0, q1) of both 8-channel halves of a layout-1 block as int16, each contiguous
// (gemm_i16<MR, true>'s operand): dst for the first half, dst + 32 * (q1 - q0) for the second
KQ_AVX2 inline void widen_block(const int8_t* w, int64_t q0, int64_t q1, int16_t* dst) {
  int16_t* d1 = dst + 32 * (q1 - q0);
  for (int64_t q = q0; q < q1; ++q) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kW8Row * q));
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kW8Row * q + 32));
    int16_t* d = dst + 32 * (q - q0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(d), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(d + 16), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)));
    d = d1 + 32 * (q - q0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(d), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(u)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(d + 16), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(u, 1)));
  }
}

// W4A8 over all G groups of MR rows x NB layout-2 blocks (w, blocks wstride bytes apart;
// kblocks k-octets, per_group per group), the per-group fold kept in registers (a call per
// group would cost as much as a group's work for one row). Scales: sT ([NB][G][8], 0 past N)
// or, where null, gathered from sw ([N][G] from the first block's channel 0):
// out[r][8 j + c] = sum_g fma(float(acc_g - 8 * asum[r][g]), sw[c][g], .). NB > 1 shares the
// activation loads between blocks for one row; nv[j]: valid channels of block j.
template <int MR, int NB>
KQ_AVX2 inline void gemm_w4a8(const int8_t* a, int64_t lda, const uint8_t* w, int64_t wstride, int64_t kblocks,
                              int64_t per_group, int64_t G, const float* sw, const float* sT, const int* nv,
                              const int32_t* asum, float* out) {
  // f stays in out (folded once per group): registers hold the int16 and int32 sums, the
  // nibbles and the broadcasts of one row at a time, without spilling
  for (int i = 0; i < MR * NB * 8; ++i) out[i] = 0.0f;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i gidx = _mm256_mullo_epi32(lane, _mm256_set1_epi32(int(G)));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o0 = g * per_group, o1 = G > 1 ? o0 + per_group : kblocks;
    __m256i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t o = o0; o < o1; o += 4) {
      const int64_t oe = std::min(o + 4, o1);  // 4 octets keep int16 sums <= 4 * 7620
      __m256i s16[MR][NB];
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) s16[r][j] = _mm256_setzero_si256();
      if (NB > 1 && o + 32 < o1)  // 1 KiB ahead in each weight stream (one row is bound by DRAM)
        for (int j = 0; j < NB; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(w + j * wstride + 32 * o + 1024), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w + j * wstride + 32 * o + 1088), _MM_HINT_T0);
        }
      for (int64_t oo = o; oo < oe; ++oo) {
        for (int j = 0; j < NB; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * wstride + 32 * oo));
          const __m256i bl = _mm256_and_si256(v, m4);
          const __m256i bh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          for (int r = 0; r < MR; ++r) {
            // two broadcast loads (k 8oo..8oo+3 and 8oo+4..8oo+7): no shuffle, which
            // competes with the nibble unpacking
            int32_t v0, v1;
            std::memcpy(&v0, a + r * lda + 8 * oo, 4);
            std::memcpy(&v1, a + r * lda + 8 * oo + 4, 4);
            s16[r][j] = _mm256_add_epi16(s16[r][j], _mm256_maddubs_epi16(bl, _mm256_set1_epi32(v0)));
            s16[r][j] = _mm256_add_epi16(s16[r][j], _mm256_maddubs_epi16(bh, _mm256_set1_epi32(v1)));
          }
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(s16[r][j], ones));
    }
    for (int j = 0; j < NB; ++j) {
      __m256 sv;
      if (sT) {
        sv = _mm256_loadu_ps(sT + (j * G + g) * 8);
      } else {
        const __m256 gmask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nv[j]), lane));
        sv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), sw + j * kBlockN * G + g, gidx, gmask, 4);
      }
      for (int r = 0; r < MR; ++r) {
        const __m256i corr = _mm256_set1_epi32(8 * asum[r * G + g]);
        float* fo = out + r * NB * 8 + 8 * j;
        _mm256_storeu_ps(fo, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][j], corr)), sv,
                                             _mm256_loadu_ps(fo)));
      }
    }
  }
}

// ----------------------------------------------------------------------------- weight-only
// four accumulators with lanes (channel pair, k mod 4) -> 8 channel sums, pairwise
KQ_AVX2 inline __m256 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// per-channel int32 z[8] in the lanes (channel pair, k mod 4) of reduce4's four inputs
KQ_AVX2 inline void pair_lanes(const int32_t* z, __m256i* zv) {
  for (int j = 0; j < 4; ++j)
    zv[j] = _mm256_setr_epi32(z[2 * j], z[2 * j], z[2 * j], z[2 * j], z[2 * j + 1], z[2 * j + 1], z[2 * j + 1],
                              z[2 * j + 1]);
}

// fp32 sums of MR rows of x (row stride ldx) x one 8-channel half w of layout 1 over
// k-quads [q0, q1): out[8 r + c] = sum_k x[r][k] * (q - z[c]) (HasZero: z applied in int32)
template <int MR, bool HasZero>
KQ_AVX2 inline void wo_gemm_i8(const float* x, int64_t ldx, const int8_t* w, int64_t q0, int64_t q1, const int32_t* z,
                               float* out) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  __m256i zv[4] = {};
  if (HasZero) pair_lanes(z, zv);
  for (int64_t q = q0; q < q1; ++q) {
    const __m128i wl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kW8Row * q));
    const __m128i wh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kW8Row * q + 16));
    __m256i i[4] = {_mm256_cvtepi8_epi32(wl), _mm256_cvtepi8_epi32(_mm_srli_si128(wl, 8)), _mm256_cvtepi8_epi32(wh),
                    _mm256_cvtepi8_epi32(_mm_srli_si128(wh, 8))};
    __m256 f[4];
    for (int j = 0; j < 4; ++j) f[j] = _mm256_cvtepi32_ps(HasZero ? _mm256_sub_epi32(i[j], zv[j]) : i[j]);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + r * ldx + 4 * q));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(xv, f[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + 8 * r, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
}

// the same for one layout-2 block w over k-octets [o0, o1) (nibbles u, zero points z)
template <int MR>
KQ_AVX2 inline void wo_gemm_i4(const float* x, int64_t ldx, const uint8_t* w, int64_t o0, int64_t o1, const int32_t* z,
                               float* out) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  __m256i zv[4];
  pair_lanes(z, zv);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t o = o0; o < o1; ++o) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * o));
    const __m256i bl = _mm256_and_si256(v, m4);
    const __m256i bh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    __m256 fl[4], fh[4];
    {
      const __m128i l0 = _mm256_castsi256_si128(bl), l1 = _mm256_extracti128_si256(bl, 1);
      const __m128i h0 = _mm256_castsi256_si128(bh), h1 = _mm256_extracti128_si256(bh, 1);
      const __m256i il[4] = {_mm256_cvtepu8_epi32(l0), _mm256_cvtepu8_epi32(_mm_srli_si128(l0, 8)),
                             _mm256_cvtepu8_epi32(l1), _mm256_cvtepu8_epi32(_mm_srli_si128(l1, 8))};
      const __m256i ih[4] = {_mm256_cvtepu8_epi32(h0), _mm256_cvtepu8_epi32(_mm_srli_si128(h0, 8)),
                             _mm256_cvtepu8_epi32(h1), _mm256_cvtepu8_epi32(_mm_srli_si128(h1, 8))};
      for (int j = 0; j < 4; ++j) {
        fl[j] = _mm256_cvtepi32_ps(_mm256_sub_epi32(il[j], zv[j]));
        fh[j] = _mm256_cvtepi32_ps(_mm256_sub_epi32(ih[j], zv[j]));
      }
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 x0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + r * ldx + 8 * o));
      const __m256 x1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + r * ldx + 8 * o + 4));
      for (int j = 0; j < 4; ++j) {
        acc[r][j] = _mm256_fmadd_ps(x0, fl[j], acc[r][j]);
        acc[r][j] = _mm256_fmadd_ps(x1, fh[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + 8 * r, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
}

// One k-quad of 8 channels (v: [c][4 k] bytes) to fp32, k-major: dst[k * ld + c] =
// (q - z) * s, the reference's exact values. The 4x8 bytes are transposed with one
// vpshufb + vpermd. SubZ false: the bytes are q - z already (symmetric weights, whose zero
// point is removed in int8, exactly, before the call).
template <bool SubZ = true>
KQ_AVX2 inline void dequant_quad(__m256i v, __m256 z, __m256 s, float* dst, int64_t ld) {
  const __m256i ctrl = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i t = _mm256_shuffle_epi8(v, ctrl);  // per lane: [k0: c0..3][k1: c0..3]...
  for (int j = 0; j < 4; ++j) {
    const __m256i b = _mm256_permutevar8x32_epi32(t, _mm256_setr_epi32(j, 4 + j, j, j, j, j, j, j));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    _mm256_storeu_ps(dst + j * ld, _mm256_mul_ps(SubZ ? _mm256_sub_ps(f, z) : f, s));
  }
}

// fp32 GEMM of MR rows with two dequantized 8-channel blocks wq [K][16] (channels 0-7 of
// block nb, 8-15 of nb + 1): f0 / f1 [MR][8] = fma(x[k], w[k], .) over k in order, from 0
// (init) or from their values (the next K chunk). 2 MR accumulators, 2 loads of w and MR
// broadcasts of x per k: FMA-bound at MR = 6.
template <int MR>
KQ_AVX2 inline void fgemm16_avx2(const float* x, int64_t ldx, const float* wq, int64_t K, float* f0, float* f1,
                                 bool init) {
  __m256 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = init ? _mm256_setzero_ps() : _mm256_loadu_ps(f0 + 8 * r);
    c1[r] = init ? _mm256_setzero_ps() : _mm256_loadu_ps(f1 + 8 * r);
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_load_ps(wq + 16 * k), w1 = _mm256_load_ps(wq + 16 * k + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      c0[r] = _mm256_fmadd_ps(xb, w0, c0[r]);
      c1[r] = _mm256_fmadd_ps(xb, w1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(f0 + 8 * r, c0[r]);
    _mm256_storeu_ps(f1 + 8 * r, c1[r]);
  }
}

// ----------------------------------------------------------------------------- kernel set
// The kernel set of tiles.h at AVX2 (no one-row weight-only kernel: wo_gemv4 is absent)
struct Avx2Kernels {
  KQ_AVX2 static inline void int_sums(const Problem& p, Kind kind, int mr, int64_t m, int64_t nb, int64_t b0,
                                      int64_t b1, int32_t* out) {
    if (kind == Kind::SignGemm) {
      const int8_t* a = p.a8 + m * p.lda;
      const uint8_t* aa = p.aabs + m * p.lda;
      const int8_t* w = w8_block(p, nb);
      switch (mr) {
        case 1: gemm_sign<1>(a, aa, p.lda, w, b0, b1, out); break;
        case 2: gemm_sign<2>(a, aa, p.lda, w, b0, b1, out); break;
        default: gemm_sign<3>(a, aa, p.lda, w, b0, b1, out); break;
      }
    } else {
      const int16_t* a = p.a16 + m * p.lda;
      const int8_t* w = w8_block(p, nb);
      switch (mr) {
        case 1: gemm_i16<1>(a, p.lda, w, b0, b1, out); break;
        case 2: gemm_i16<2>(a, p.lda, w, b0, b1, out); break;
        case 3: gemm_i16<3>(a, p.lda, w, b0, b1, out); break;
        default: gemm_i16<4>(a, p.lda, w, b0, b1, out); break;
      }
    }
  }
  static constexpr bool kWidens = true;
  KQ_AVX2 static inline void widen(const Problem& p, int64_t nb, int64_t q0, int64_t q1, int16_t* dst) {
    widen_block(w8_block(p, nb), q0, q1, dst);  // nb even: both halves
  }
  KQ_AVX2 static inline void int_sums_widened(const Problem& p, int mr, int64_t m, int64_t q0, const int16_t* w,
                                              int64_t n, int32_t* out) {
    const int16_t* a = p.a16 + m * p.lda;
    switch (mr) {
      case 1: gemm_i16<1, true>(a, p.lda, w, q0, q0 + n, out); break;
      case 2: gemm_i16<2, true>(a, p.lda, w, q0, q0 + n, out); break;
      case 3: gemm_i16<3, true>(a, p.lda, w, q0, q0 + n, out); break;
      default: gemm_i16<4, true>(a, p.lda, w, q0, q0 + n, out); break;
    }
  }
  KQ_AVX2 static inline bool w8a8_gemv4(const Problem& p, int64_t m, int64_t nb, int32_t* out) {
    gemv_sign4(p.a8 + m * p.lda, p.aabs + m * p.lda, w8_block(p, nb), w8_block(p, nb + 2), p.kblocks, out);
    return true;
  }
  KQ_AVX2 static inline void dequant_block(const Problem& p, int64_t nb, int nv, int64_t b0, int64_t b1, float* dst,
                                           int64_t ld) {
    dequant_block_avx2(p, nb, nv, b0, b1, dst, ld);
  }
  KQ_AVX2 static inline void fgemm16(int mr, const float* x, int64_t ldx, const float* wq, int64_t K, float* f0,
                                     float* f1, bool init) {
    switch (mr) {
      case 1: fgemm16_avx2<1>(x, ldx, wq, K, f0, f1, init); break;
      case 2: fgemm16_avx2<2>(x, ldx, wq, K, f0, f1, init); break;
      case 3: fgemm16_avx2<3>(x, ldx, wq, K, f0, f1, init); break;
      case 4: fgemm16_avx2<4>(x, ldx, wq, K, f0, f1, init); break;
      case 5: fgemm16_avx2<5>(x, ldx, wq, K, f0, f1, init); break;
      default: fgemm16_avx2<6>(x, ldx, wq, K, f0, f1, init); break;
    }
  }
  KQ_AVX2 static inline void w4a8_folded(const Problem& p, int mr, int64_t m, int64_t nb, const float* sT, float* f) {
    const int8_t* a = p.a8 + m * p.lda;
    const uint8_t* w = p.w4 + nb * p.kblocks * 32;
    const int64_t per_group = p.G > 1 ? p.gsz / 8 : p.kblocks;
    const int32_t* as = p.asum + m * p.G;
    switch (mr) {
      case 1: gemm_w4a8<1, 1>(a, p.lda, w, 0, p.kblocks, per_group, p.G, nullptr, sT, nullptr, as, f); break;
      case 2: gemm_w4a8<2, 1>(a, p.lda, w, 0, p.kblocks, per_group, p.G, nullptr, sT, nullptr, as, f); break;
      case 3: gemm_w4a8<3, 1>(a, p.lda, w, 0, p.kblocks, per_group, p.G, nullptr, sT, nullptr, as, f); break;
      default: gemm_w4a8<4, 1>(a, p.lda, w, 0, p.kblocks, per_group, p.G, nullptr, sT, nullptr, as, f); break;
    }
  }
  KQ_AVX2 static inline bool w4a8_gemv4(const Problem& p, int64_t m, int64_t nb, const int* nv, float* f) {
    const int64_t per_group = p.G > 1 ? p.gsz / 8 : p.kblocks;
    gemm_w4a8<1, 4>(p.a8 + m * p.lda, p.lda, p.w4 + nb * p.kblocks * 32, p.kblocks * 32, p.kblocks, per_group, p.G,
                    p.sw + nb * kBlockN * p.G, nullptr, nv, p.asum + m * p.G, f);
    return true;
  }
  KQ_AVX2 static inline bool wo_gemv4(const Problem&, int64_t, int64_t, const int*, float*) { return false; }
  KQ_AVX2 static inline void wo_sums(const Problem& p, bool has_zero, int mr, int64_t m, int64_t nb, int64_t b0,
                                     int64_t b1, const int32_t* z, float* out) {
    const float* x = p.xf + m * p.ldx;
    if (p.int4) {
      const uint8_t* w = p.w4 + nb * p.kblocks * 32;
      if (mr == 1) wo_gemm_i4<1>(x, p.ldx, w, b0, b1, z, out);
      else wo_gemm_i4<2>(x, p.ldx, w, b0, b1, z, out);
    } else {
      const int8_t* w = w8_block(p, nb);
      if (has_zero) {
        if (mr == 1) wo_gemm_i8<1, true>(x, p.ldx, w, b0, b1, z, out);
        else wo_gemm_i8<2, true>(x, p.ldx, w, b0, b1, z, out);
      } else {
        if (mr == 1) wo_gemm_i8<1, false>(x, p.ldx, w, b0, b1, z, out);
        else wo_gemm_i8<2, false>(x, p.ldx, w, b0, b1, z, out);
      }
    }
  }
  KQ_AVX2 static inline void fold_int(int mr, const int32_t* acc, const float* s, float* f) {
    const __m256 sv = _mm256_loadu_ps(s);
    for (int r = 0; r < mr; ++r)
      _mm256_storeu_ps(f + 8 * r, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(
                                                      reinterpret_cast<const __m256i*>(acc + 8 * r))),
                                                  sv, _mm256_loadu_ps(f + 8 * r)));
  }
  KQ_AVX2 static inline void fold_float(int mr, const float* acc, const float* s, float* f) {
    const __m256 sv = _mm256_loadu_ps(s);
    for (int r = 0; r < mr; ++r)
      _mm256_storeu_ps(f + 8 * r, _mm256_fmadd_ps(_mm256_loadu_ps(acc + 8 * r), sv, _mm256_loadu_ps(f + 8 * r)));
  }
  KQ_AVX2 static inline void epilogue_int(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const int32_t* acc,
                                          const float* s, const float* b8) {
    const __m256 bv = _mm256_loadu_ps(b8), sv = _mm256_loadu_ps(s);
    for (int r = 0; r < mr; ++r) {
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 8 * r))), sv);
      v = _mm256_mul_ps(v, _mm256_set1_ps(p.sx[m + r]));
      KQ_NO_CONTRACT(v);  // the reference rounds the product before adding the bias
      if (p.bias) v = _mm256_add_ps(v, bv);
      store8(p.y, p.yt, (m + r) * p.N + n0, v, nv);
    }
  }
  KQ_AVX2 static inline void epilogue(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const float* f,
                                      const float* b8) {
    const __m256 bv = _mm256_loadu_ps(b8);
    for (int r = 0; r < mr; ++r) {
      __m256 v = _mm256_loadu_ps(f + 8 * r);
      if (p.sx) v = _mm256_mul_ps(v, _mm256_set1_ps(p.sx[m + r]));
      KQ_NO_CONTRACT(v);
      if (p.bias) v = _mm256_add_ps(v, bv);
      store8(p.y, p.yt, (m + r) * p.N + n0, v, nv);
    }
  }
};

}  // namespace kquant::cpu

#endif  // KQ_X86
