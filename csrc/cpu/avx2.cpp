// AVX2+FMA level: the per-token quantizer, the block dequantizer and the task function
// that instantiates the tile loops with the AVX2 kernel set (avx2.h).
#include "avx2.h"

#if KQ_X86

namespace kquant::cpu {

// max |x| of the row at x offset off into *amax; returns whether the row holds NaN or Inf.
// The max is taken over the int32 bits of |x|: for non-negative floats they order as the
// values do, and a NaN or Inf (bits >= 0x7F800000, above every finite value) becomes the
// maximum, so the pass needs no extra operation to find them.
KQ_AVX2 inline bool amax_avx2(const QuantArgs& a, int64_t off, __m256 absmask, float* amax) {
  __m256i vm = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= a.K; k += 8)
    vm = _mm256_max_epi32(vm, _mm256_castps_si256(_mm256_and_ps(load8(a.x, a.xt, off + k), absmask)));
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), vm);
  int32_t bits = 0;
  for (int c = 0; c < 8; ++c) bits = std::max(bits, t[c]);
  std::memcpy(amax, &bits, sizeof(float));
  const bool nonfinite = amax_tail(a, off, k, amax);
  return nonfinite || bits >= 0x7F800000;
}

// The codes of row m (x at offset off) for k < K16, 16 at a time: fp32 multiply by inv,
// nearest-even rounding and clamp, the reference's operations. CheckFinite (static mode,
// which has no amax pass): returns whether an x was NaN or Inf.
template <bool CheckFinite>
KQ_AVX2 inline bool codes_avx2(const QuantArgs& a, int64_t m, int64_t off, int64_t K16, float inv) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256 vinv = _mm256_set1_ps(inv);
  int16_t* q16 = a.q16 ? a.q16 + m * a.lda : nullptr;
  __m256 bad = _mm256_setzero_ps();  // lanes that saw NaN or Inf
  for (int64_t k = 0; k < K16; k += 16) {
    const __m256 x0 = load8(a.x, a.xt, off + k), x1 = load8(a.x, a.xt, off + k + 8);
    if constexpr (CheckFinite)
      bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(_mm256_and_ps(x0, absmask), inf, _CMP_NLT_UQ),
                                           _mm256_cmp_ps(_mm256_and_ps(x1, absmask), inf, _CMP_NLT_UQ)));
    __m256 f0 = _mm256_mul_ps(x0, vinv);
    __m256 f1 = _mm256_mul_ps(x1, vinv);
    f0 = _mm256_round_ps(f0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    f1 = _mm256_round_ps(f1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    f0 = _mm256_min_ps(_mm256_max_ps(f0, lo), hi);
    f1 = _mm256_min_ps(_mm256_max_ps(f1, lo), hi);
    __m256i w = _mm256_permute4x64_epi64(
        _mm256_packs_epi32(_mm256_cvtps_epi32(f0), _mm256_cvtps_epi32(f1)), 0xD8);
    if (q16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + k), w);
    if (a.q8 || a.qabs)
      store_q8x16(a, m, k, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi16(w, w), 0x08)));
  }
  return _mm256_movemask_ps(bad) != 0;
}

// Rows [m0, m1): an amax pass (dynamic mode), then the codes. Rows holding NaN or Inf and
// rows to lift go to quant_row_scalar; in static mode a non-finite x found while
// quantizing turns the row into the poisoned row afterwards.
KQ_AVX2 void quant_rows_avx2(const QuantArgs& a, int64_t m0, int64_t m1) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const int64_t K16 = a.K & ~int64_t(15);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t off = m * a.K;
    float amax = 0.0f, inv;
    const bool nonfinite = !a.is_static && amax_avx2(a, off, absmask, &amax);
    if (!begin_row(a, m, amax, nonfinite, &inv)) continue;
    const bool bad = a.is_static ? codes_avx2<true>(a, m, off, K16, inv) : codes_avx2<false>(a, m, off, K16, inv);
    end_row(a, m, K16, inv, 1.0f, bad);
  }
}

// k-blocks [b0, b1) of 8-channel block nb to fp32 (q - z) * s, k-major from dst, one
// k-quad (dequant_quad) at a time
KQ_AVX2 void dequant_block_avx2(const Problem& p, int64_t nb, int nv, int64_t b0, int64_t b1, float* dst, int64_t ld) {
  const bool int4 = p.int4;
  alignas(32) float z8[8], s8[8];
  const int64_t per = int4 ? 8 : 4;
  const int64_t gb = p.G > 1 ? p.gsz / per : p.kblocks;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  // symmetric: the implicit zero point (0 for int8, 8 for int4: q - 8 fits int8)
  const bool sym = p.zeros == nullptr && (int4 || p.wo_zero == 0);
  const __m256i zb = _mm256_set1_epi8(static_cast<char>(p.wo_zero));
  for (int64_t g = b0 / gb; g < p.G && g * gb < b1; ++g) {
    for (int c = 0; c < 8; ++c) {
      const int64_t n = nb * kBlockN + c;
      s8[c] = c < nv ? p.sw[n * p.G + g] : 0.0f;
      z8[c] = c < nv && p.zeros ? p.zeros[n * p.G + g] : float(p.wo_zero);
    }
    const __m256 z = _mm256_load_ps(z8), sc = _mm256_load_ps(s8);
    const int64_t e = std::min(b1, p.G > 1 ? (g + 1) * gb : p.kblocks);
    for (int64_t b = std::max(b0, g * gb); b < e; ++b) {
      float* d = dst + (b - b0) * per * ld;
      if (int4) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.w4 + (nb * p.kblocks + b) * 32));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (sym) {  // q - 8 in int8: one subtraction per 32 codes instead of one per 8 floats
          dequant_quad<false>(_mm256_sub_epi8(lo, zb), z, sc, d, ld);
          dequant_quad<false>(_mm256_sub_epi8(hi, zb), z, sc, d + 4 * ld, ld);
        } else {
          dequant_quad(lo, z, sc, d, ld);
          dequant_quad(hi, z, sc, d + 4 * ld, ld);
        }
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w8_block(p, nb) + b * kW8Row));
        if (sym) dequant_quad<false>(v, z, sc, d, ld);  // zero point 0
        else dequant_quad(v, z, sc, d, ld);
      }
    }
  }
}

KQ_AVX2 void task_avx2(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  tile_task<Avx2Kernels>(p, kind, m0, m1, nb0, nb1);
}

}  // namespace kquant::cpu

#endif  // KQ_X86
