// 16-lane fp32 loads and stores of activations and outputs in any of kquant's dtypes, for
// the AVX-512 and AMX code (the 8-lane AVX2 versions, load8 / store8, are in avx2.h).
#pragma once

#include "avx2.h"

#if KQ_X86

namespace kquant::cpu {

// 16 values of x as fp32
KQ_AVX512F inline __m512 load16(const void* x, OutT t, int64_t i) {
  if (t == OutT::F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  return _mm512_insertf32x8(_mm512_castps256_ps512(load8(x, t, i)), load8(x, t, i + 8), 1);
}

// store8's conversions, 16 lanes wide (same rounding: nearest even; bf16 NaN -> 0x7FC0);
// only the lanes in k are written
KQ_AVX512F inline void store16(void* y, OutT t, int64_t i, __m512 v, __mmask16 k = 0xFFFF) {
  switch (t) {
    case OutT::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + i, k,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    case OutT::BF16: {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + i, k, _mm512_cvtepi32_epi16(r));
      return;
    }
    default: _mm512_mask_storeu_ps(static_cast<float*>(y) + i, k, v); return;
  }
}

}  // namespace kquant::cpu

#endif  // KQ_X86
