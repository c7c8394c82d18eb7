// AMX pieces shared by the AMX-INT8 and AMX-BF16 kernels (and bench/ceilings.py): the tile
// configuration, zeroing the four C tiles, and the epilogue of a 32-row x 32-channel tile
// block. Tile use of every AMX kernel: C tiles 0-3 hold a 32 x 32 block of int32 or fp32 sums
// as 2 x 2 tiles of 16 rows x 16 channels, A tiles 4-5 two 16-row slices of activations, B
// tiles 6-7 two 16-channel slices of weights.
#pragma once

#include <type_traits>

#include "lanes16.h"

#if KQ_X86

namespace kquant::cpu {

struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The AMX tile configuration (per thread; _tile_release() when done). Tiles 0-3: C, 16 rows
// x bw bytes (int32 or fp32 per channel); 4-5: A, 16 rows x 64 bytes; 6-7: B, 16 rows x bw
// bytes (k-quads of int8 or k-pairs of bf16). The kernels use bw = 64, 16 channels, the full
// width; bench/ceilings.py also times bw = 32 (8 channels: half the MACs per instruction).
KQ_AMX inline void amx_config(int bw = 64) {
  TileCfg c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>((t == 4 || t == 5) ? 64 : bw);
  }
  _tile_loadconfig(&c);
}

KQ_AMX inline void amx_zero() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Epilogue of one 32-row x 32-channel tile block (four 16 x 16 tiles: t + 256 * (2 * row
// half + channel half)) for rows [m, min(m + 32, m1)) and channels [n0, n1): the AVX2
// epilogue's operations 16 lanes wide, masked at the channel tail. T = int32_t: per-channel
// sums (scaled here; raw for int8_mm); T = float: grouped sums already scaled per group.
// Called right after the next block's tiles are issued, so the vector units convert one
// block while the AMX unit works on the next.
template <class T>
KQ_AMX inline void amx_epilogue(const Problem& p, int64_t m, int64_t m1, int64_t n0, int64_t n1, const T* t) {
  constexpr bool grouped = std::is_same<T, float>::value;
  for (int j = 0; j < 2; ++j) {
    const int64_t c0 = n0 + 16 * j, nv = std::min<int64_t>(16, n1 - c0);
    if (nv <= 0) break;
    const __mmask16 k = static_cast<__mmask16>((1u << nv) - 1);
    const bool i32 = p.yt == OutT::I32;  // int8_mm: the raw int32 sums
    const __m512 s = i32 || grouped ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(k, p.sw + c0);
    const __m512 b = p.bias ? _mm512_maskz_loadu_ps(k, p.bias + c0) : _mm512_setzero_ps();
    for (int i = 0; i < 2; ++i) {
      const int64_t row = m + 16 * i;
      const int mr = static_cast<int>(std::min<int64_t>(16, m1 - row));
      const T* ti = t + 256 * (2 * i + j);
      for (int r = 0; r < mr; ++r) {
        __m512 f;
        if constexpr (grouped) {
          f = _mm512_load_ps(ti + 16 * r);
          if (p.sx) f = _mm512_mul_ps(f, _mm512_set1_ps(p.sx[row + r]));
        } else {
          const __m512i v = _mm512_load_si512(ti + 16 * r);
          if (i32) {
            _mm512_mask_storeu_epi32(static_cast<int32_t*>(p.y) + (row + r) * p.N + c0, k, v);
            continue;
          }
          f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), s), _mm512_set1_ps(p.sx[row + r]));
        }
        KQ_NO_CONTRACT(f);  // the reference rounds the product before adding the bias
        if (p.bias) f = _mm512_add_ps(f, b);
        store16(p.y, p.yt, (row + r) * p.N + c0, f, k);
      }
    }
  }
}

}  // namespace kquant::cpu

#endif  // KQ_X86
