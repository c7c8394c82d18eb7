// AVX-512 level (AVX-512 F/BW/VL/DQ + VNNI): kernels for one activation row (decode) over
// 4 output-channel blocks (32 channels) per call, the AVX-512 per-token quantizer, and the
// task function that runs the tile loops with the AVX2 kernel set plus these one-row
// kernels. Compiled per function with target attributes, so the library still loads on
// AVX2-only and older CPUs; plan.cpp calls them only at Isa::Avx512 and above.
//
// One row reads every weight once, so these calls are bound by the weight stream; the
// kernels aim at as few uops per weight byte as possible:
//  * W8A8 (layout 1: a 64-byte row is one k-quad of 16 channels, one zmm): vpdpbusd is
//    u8 x s8, so the weights go in as the unsigned operand w ^ 0x80 = w + 128 and the
//    activations (in [-127, 127]) as the signed one; the offset is removed exactly with
//    128 * sum(a) at the end (int32 arithmetic is modular and the true sum fits in int32,
//    so the result is the exact dot product). 2 uops per 64 weight bytes (vpxord +
//    vpdpbusd) instead of 4 per 32 for the AVX2 sign trick.
//  * W4A8 (layout 2): nibbles u in 0..15 are the unsigned operand as they are (no int16
//    step, no saturation): vpandd / vpsrlw+vpandd + 2 vpdpbusd per 64 bytes (128 weights).
//    Groups fold as f = fma(float(acc_g - 8 * sum_g(a)), s, f), the AVX2/scalar order, so
//    all ISA levels give the same bits.
//  * W4A16: lanes = 16 channels (two 8-channel blocks side by side, same octet), so every
//    FMA takes one broadcast activation. A nibble becomes the float (u - 8) through vpermps
//    with a 16-entry table (it reads only bits 0-3 of each dword): per 16 weights one shift,
//    one vpermps and one FMA, with exact fp32 products (no bf16 rounding of x).
//    Asymmetric zeros: one more subtraction per 16 weights, (u - 8) - (z - 8).
//  * W8A16: vpmovsxbd (16 bytes = 4 channels x 4 k) + vcvtdq2ps + FMA against the 4
//    activations broadcast to each 128-bit lane; lanes (channel, k mod 4) are reduced once
//    per group.
// The weight-only kernels sum in a different order than the AVX2 ones (fp32 results agree
// to rounding, not to the bit); the int8-activation ones give the same bits.
#include "avx2.h"

// GCC 12 warns that its own 256->512-bit cast intrinsics read an uninitialized upper half
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#if KQ_X86

#define KQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

namespace kquant::cpu {
namespace {

// lanes 0-7: block 2P, lanes 8-15: block 2P + 1; a lane is valid if its channel exists
KQ_AVX512 inline __mmask16 pair_mask(const int* nv, int pr) {
  const unsigned lo = (1u << nv[2 * pr]) - 1, hi = (1u << nv[2 * pr + 1]) - 1;
  return static_cast<__mmask16>(lo | (hi << 8));
}

// per-lane [N, G] value (scale or zero) of group g for the 16 channels from n0
KQ_AVX512 inline __m512 gather16(const float* v, int64_t n0, int64_t G, int64_t g, __mmask16 k) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(G)));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, v + n0 * G + g, 4);
}

// two blocks' accumulators with lanes (channel, octet/quad parity) -> 16 channel sums
KQ_AVX512 inline __m512i pair_sum(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_shuffle_i64x2(a, b, 0xEE));
}

// Into L2, for the next int4 decode call (blocks nb + 4 .. nb + 7, contiguous from w + 4 ws),
// at even octet o of this call's blocks from w:
//  * the same line of each weight block. A block is only K/2 bytes, too short a stream for
//    the hardware prefetcher;
//  * one line of its per-group scales, [32 channels][G] floats (2G lines, one per 2 octets).
//    The gathers of 16 channels' scales would otherwise miss 16 lines at once.
// This helps decode from DRAM and costs nothing measurable from the LLC. L2 (T1), not L1:
// prefetching into L1 slows decode when the weights are already in the LLC.
KQ_AVX512 inline void prefetch_next_int4(const Problem& p, const uint8_t* w, int64_t ws, int64_t nb, int64_t o) {
  for (int j = 4; j < 8; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * ws + 32 * o), _MM_HINT_T1);
  if (o < 4 * p.G) _mm_prefetch(reinterpret_cast<const char*>(p.sw + (nb + 4) * kBlockN * p.G) + 32 * o, _MM_HINT_T1);
}

// ----------------------------------------------------------------------------- W8A8
// exact int32 sums of row m x the 4 blocks from nb (nb a multiple of 4): out[8 j + c]
KQ_AVX512 void avx512_w8a8_gemv4(const Problem& p, int64_t m, int64_t nb, int32_t* out) {
  const int8_t* a = p.a8 + m * p.lda;
  const int64_t nq = p.kblocks;
  const int8_t* w[2] = {w8_block(p, nb), w8_block(p, nb + 2)};  // two 16-channel blocks (nb is even)
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i c0[2], c1[2];  // two sets over alternate quads: shorter dependency chains
  for (int j = 0; j < 2; ++j) c0[j] = c1[j] = _mm512_setzero_si512();
  for (int64_t q = 0; q < nq; q += 2) {  // nq is a multiple of 16
    int32_t a0, a1;
    std::memcpy(&a0, a + 4 * q, 4);
    std::memcpy(&a1, a + 4 * q + 4, 4);
    const __m512i av0 = _mm512_set1_epi32(a0), av1 = _mm512_set1_epi32(a1);
    for (int j = 0; j < 2; ++j) {  // a 64-byte row: one k-quad of 16 channels
      const int8_t* wj = w[j] + kW8Row * q;
      c0[j] = _mm512_dpbusd_epi32(c0[j], _mm512_xor_si512(_mm512_loadu_si512(wj), flip), av0);
      c1[j] = _mm512_dpbusd_epi32(c1[j], _mm512_xor_si512(_mm512_loadu_si512(wj + kW8Row), flip), av1);
    }
  }
  // remove the +128 weight offset: 128 * sum(a) (K is padded to 64 with zeros)
  __m512i s = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < 4 * nq; k += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(a + k));
  const __m512i corr = _mm512_set1_epi32(128 * _mm512_reduce_add_epi32(s));
  for (int j = 0; j < 2; ++j)
    _mm512_storeu_si512(out + 16 * j, _mm512_sub_epi32(_mm512_add_epi32(c0[j], c1[j]), corr));
}

// ----------------------------------------------------------------------------- W4A8
// row m x the 4 blocks from nb, all groups: f[8 j + c] = sum_g fma(float(acc_g - 8 asum_g),
// s[n][g], .) in group order (nv[j] valid channels of block j)
KQ_AVX512 void avx512_w4a8_gemv4(const Problem& p, int64_t m, int64_t nb, const int* nv, float* f) {
  const int8_t* a = p.a8 + m * p.lda;
  const int64_t ws = p.kblocks * 32, per = p.G > 1 ? p.gsz / 8 : p.kblocks;
  const uint8_t* w = p.w4 + nb * ws;
  const int32_t* asum = p.asum + m * p.G;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  // a[8o .. 8o + 15] = dwords d0..d3: low nibbles of octet o take d0, high ones d1; octet
  // o + 1 (lanes 8-15) d2 and d3
  const __m512i sel_lo = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i sel_hi = _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3);
  const __mmask16 km[2] = {pair_mask(nv, 0), pair_mask(nv, 1)};
  __m512 fo[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t o0 = g * per, o1 = p.G > 1 ? o0 + per : p.kblocks;  // even octet counts
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm512_setzero_si512();
    for (int64_t o = o0; o < o1; o += 2) {
      prefetch_next_int4(p, w, ws, nb, o);
      const __m512i a16 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 8 * o)));
      const __m512i alo = _mm512_permutexvar_epi32(sel_lo, a16), ahi = _mm512_permutexvar_epi32(sel_hi, a16);
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(w + j * ws + 32 * o);
        lo[j] = _mm512_dpbusd_epi32(lo[j], _mm512_and_si512(v, m4), alo);
        hi[j] = _mm512_dpbusd_epi32(hi[j], _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), ahi);
      }
    }
    const __m512i corr = _mm512_set1_epi32(8 * asum[g]);
    for (int pr = 0; pr < 2; ++pr) {
      const __m512i t = pair_sum(_mm512_add_epi32(lo[2 * pr], hi[2 * pr]),
                                 _mm512_add_epi32(lo[2 * pr + 1], hi[2 * pr + 1]));
      const __m512 sv = gather16(p.sw, (nb + 2 * pr) * kBlockN, p.G, g, km[pr]);
      fo[pr] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(t, corr)), sv, fo[pr]);
    }
  }
  _mm512_storeu_ps(f, fo[0]);
  _mm512_storeu_ps(f + 16, fo[1]);
}

// ----------------------------------------------------------------------------- weight-only
// f[32] = sum_g s_g * sum_{k in g} x[k] * (u - z) for 4 int4 blocks. The table gives u - 8;
// asymmetric weights (Z) subtract each lane's z - 8 before the FMA, so the products are
// x * (u - z) as in the reference. Adding (8 - z) * sum(x) afterwards instead would cancel:
// the result can be far smaller than either term.
template <bool Z>
KQ_AVX512 void wo4(const Problem& p, const float* x, int64_t nb, const int* nv, float* f) {
  const int64_t ws = p.kblocks * 32, per = p.G > 1 ? p.gsz / 8 : p.kblocks;
  const uint8_t* w = p.w4 + nb * ws;
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);  // u - 8
  const int kk[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // nibble t of a dword (bits 4t..4t+3) is k = kk[t] of the octet
  const __mmask16 km[2] = {pair_mask(nv, 0), pair_mask(nv, 1)};
  __m512 fo[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t o0 = g * per, o1 = p.G > 1 ? o0 + per : p.kblocks;
    __m512 acc[2][4], zc[2];
    for (int pr = 0; pr < 2; ++pr) {
      for (int i = 0; i < 4; ++i) acc[pr][i] = _mm512_setzero_ps();
      zc[pr] = Z ? _mm512_sub_ps(gather16(p.zeros, (nb + 2 * pr) * kBlockN, p.G, g, km[pr]), _mm512_set1_ps(8.0f))
                 : _mm512_setzero_ps();
    }
    for (int64_t o = o0; o < o1; ++o) {
      const float* xo = x + 8 * o;
      if ((o & 1) == 0) prefetch_next_int4(p, w, ws, nb, o);
      for (int pr = 0; pr < 2; ++pr) {
        const uint8_t* b = w + 2 * pr * ws + 32 * o;
        const __m512i v = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + ws)), 1);
        for (int t = 0; t < 8; ++t) {
          __m512 wf = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * t), table);
          if (Z) wf = _mm512_sub_ps(wf, zc[pr]);
          acc[pr][t & 3] = _mm512_fmadd_ps(_mm512_set1_ps(xo[kk[t]]), wf, acc[pr][t & 3]);
        }
      }
    }
    for (int pr = 0; pr < 2; ++pr) {
      const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[pr][0], acc[pr][1]), _mm512_add_ps(acc[pr][2], acc[pr][3]));
      fo[pr] = _mm512_fmadd_ps(s, gather16(p.sw, (nb + 2 * pr) * kBlockN, p.G, g, km[pr]), fo[pr]);
    }
  }
  _mm512_storeu_ps(f, fo[0]);
  _mm512_storeu_ps(f + 16, fo[1]);
}

// 4 accumulators of one block pair, lanes (channel, k mod 4) per 128-bit lane
// (a: block 2P channels 0-3, b: 4-7, c, d: block 2P + 1) -> 16 channel sums in order
KQ_AVX512 inline __m512 reduce_quads(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 s1 = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // [a02 b02 a13 b13]
  const __m512 s2 = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s1, s2, 0x44), _mm512_shuffle_ps(s1, s2, 0xEE));
  // r's 128-bit lane l holds channels (l, 4 + l) of block 2P, then of block 2P + 1
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, r);
}

// k-quad rows ahead that wo8 prefetches (into L2) in each of its two 16-channel blocks.
// The blocks are long streams, but the FMA-bound loop leaves the hardware prefetcher behind
// on weights that come from DRAM (bench/RESULTS.md, "Kernel notes", has the distance sweep).
constexpr int64_t kWo8Ahead = 64;

template <bool Z>
KQ_AVX512 void wo8(const Problem& p, const float* x, int64_t nb, const int* nv, float* f) {
  const int64_t per = p.G > 1 ? p.gsz / 4 : p.kblocks;
  const __mmask16 km[2] = {pair_mask(nv, 0), pair_mask(nv, 1)};
  __m512 fo[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  // zero of channel 4h + (lane / 4) of block j, from the 16-lane pair vector
  __m512i zsel[2];
  for (int h = 0; h < 2; ++h)
    zsel[h] = _mm512_add_epi32(_mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2),
                               _mm512_set1_epi32(4 * h));
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t q0 = g * per, q1 = p.G > 1 ? q0 + per : p.kblocks;
    __m512 zq[8];
    if (Z)
      for (int pr = 0; pr < 2; ++pr) {
        const __m512 zp = gather16(p.zeros, (nb + 2 * pr) * kBlockN, p.G, g, km[pr]);
        for (int jj = 0; jj < 2; ++jj)
          for (int h = 0; h < 2; ++h)
            zq[4 * pr + 2 * jj + h] =
                _mm512_permutexvar_ps(_mm512_add_epi32(zsel[h], _mm512_set1_epi32(8 * jj)), zp);
      }
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t q = q0; q < q1; ++q) {
      for (int j = 0; j < 4; j += 2) _mm_prefetch(reinterpret_cast<const char*>(w8_block(p, nb + j) + kW8Row * (q + kWo8Ahead)), _MM_HINT_T1);
      const __m512 xv = _mm512_broadcast_f32x4(_mm_loadu_ps(x + 4 * q));
      for (int j = 0; j < 4; ++j)
        for (int h = 0; h < 2; ++h) {
          __m512 wf = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w8_block(p, nb + j) + kW8Row * q + 16 * h))));
          if (Z) wf = _mm512_sub_ps(wf, zq[2 * j + h]);
          acc[2 * j + h] = _mm512_fmadd_ps(xv, wf, acc[2 * j + h]);
        }
    }
    for (int pr = 0; pr < 2; ++pr) {
      const __m512 s = reduce_quads(acc[4 * pr], acc[4 * pr + 1], acc[4 * pr + 2], acc[4 * pr + 3]);
      fo[pr] = _mm512_fmadd_ps(s, gather16(p.sw, (nb + 2 * pr) * kBlockN, p.G, g, km[pr]), fo[pr]);
    }
  }
  _mm512_storeu_ps(f, fo[0]);
  _mm512_storeu_ps(f + 16, fo[1]);
}

// weight-only, row m x the 4 blocks from nb, all groups: f[8 j + c] = sum_g s_g * sum over k
// in g of x[k] * (q - z) (fp32, before bias)
KQ_AVX512 void avx512_wo_gemv4(const Problem& p, bool int4, int64_t m, int64_t nb, const int* nv, float* f) {
  const float* x = p.xf + m * p.ldx;
  if (int4 && p.zeros) wo4<true>(p, x, nb, nv, f);
  else if (int4) wo4<false>(p, x, nb, nv, f);
  else if (p.zeros) wo8<true>(p, x, nb, nv, f);
  else wo8<false>(p, x, nb, nv, f);
}

// ----------------------------------------------------------------------------- quantizer
// The rows of quant_rows_avx2 16 lanes wide, with the dtype fixed per call: four
// independent maxima in the amax pass (AVX2 has one vmaxps dependency chain) and vpmovdb
// for the codes, no dtype switch per load. The values are the same: max is exact in any
// order, and the products, nearest-even rounding and clamp are the same fp32 operations.
// What is left is bound by reading x.
template <OutT T>
KQ_AVX512F inline __m512 load16t(const void* x, int64_t i) {
  if constexpr (T == OutT::F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
  if constexpr (T == OutT::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16
}

// lanes of |x| (ax) that are NaN or +-Inf: not less than +Inf, or unordered
KQ_AVX512F inline __mmask16 nonfinite16(__m512 ax) {
  return _mm512_cmp_ps_mask(ax, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
}

// Rows holding NaN or Inf and rows to lift go to quant_row_scalar after the amax pass; in
// static mode (no amax pass) a non-finite x found while quantizing turns the row into the
// poisoned row afterwards.
template <OutT T>
KQ_AVX512F void quant_rows_avx512_t(const QuantArgs& a, int64_t m0, int64_t m1) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const int64_t K16 = a.K & ~int64_t(15);
  const bool is_static = a.is_static;  // a local: the loops below may test it without reloading
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t off = m * a.K;
    float amax = 0.0f;
    bool nonfinite = false;
    if (!is_static) {
      __m512 v[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      __mmask16 bad = 0;
      int64_t k = 0;
      for (; k + 64 <= a.K; k += 64)
        for (int j = 0; j < 4; ++j) {
          const __m512 ax = _mm512_abs_ps(load16t<T>(a.x, off + k + 16 * j));
          v[j] = _mm512_max_ps(v[j], ax);
          bad |= nonfinite16(ax);
        }
      for (; k < K16; k += 16) {
        const __m512 ax = _mm512_abs_ps(load16t<T>(a.x, off + k));
        v[0] = _mm512_max_ps(v[0], ax);
        bad |= nonfinite16(ax);
      }
      amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3])));
      nonfinite = amax_tail(a, off, k, &amax);
      nonfinite |= bad != 0;
    }
    float inv;
    if (!begin_row(a, m, amax, nonfinite, &inv)) continue;
    const __m512 vinv = _mm512_set1_ps(inv);
    int16_t* q16 = a.q16 ? a.q16 + m * a.lda : nullptr;
    __mmask16 bad = 0;  // static mode: lanes that saw NaN or Inf
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m512 xv = load16t<T>(a.x, off + k);
      if (is_static) bad |= nonfinite16(_mm512_abs_ps(xv));
      __m512 f = _mm512_mul_ps(xv, vinv);
      f = _mm512_roundscale_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(f, lo), hi));
      if (q16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + k), _mm512_cvtepi32_epi16(i));
      store_q8x16(a, m, k, _mm512_cvtepi32_epi8(i));  // values already in [-127, 127]
    }
    end_row(a, m, k, inv, 1.0f, bad != 0);
  }
}

// ----------------------------------------------------------------------------- kernel set
// The AVX2 kernel set with the one-row 4-block kernels above
struct Avx512Kernels : Avx2Kernels {
  KQ_AVX2 static inline bool w8a8_gemv4(const Problem& p, int64_t m, int64_t nb, int32_t* out) {
    avx512_w8a8_gemv4(p, m, nb, out);
    return true;
  }
  KQ_AVX2 static inline bool w4a8_gemv4(const Problem& p, int64_t m, int64_t nb, const int* nv, float* f) {
    avx512_w4a8_gemv4(p, m, nb, nv, f);
    return true;
  }
  KQ_AVX2 static inline bool wo_gemv4(const Problem& p, int64_t m, int64_t nb, const int* nv, float* f) {
    avx512_wo_gemv4(p, p.int4, m, nb, nv, f);
    return true;
  }
};

}  // namespace

void quant_rows_avx512(const QuantArgs& a, int64_t m0, int64_t m1) {
  switch (a.xt) {
    case OutT::F16: quant_rows_avx512_t<OutT::F16>(a, m0, m1); break;
    case OutT::BF16: quant_rows_avx512_t<OutT::BF16>(a, m0, m1); break;
    default: quant_rows_avx512_t<OutT::F32>(a, m0, m1); break;
  }
}

// KQ_AVX2 like the kernel set it inlines; the AVX-512 kernels are called, not inlined
KQ_AVX2 void task_avx512(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  tile_task<Avx512Kernels>(p, kind, m0, m1, nb0, nb1);
}

}  // namespace kquant::cpu

#endif  // KQ_X86
