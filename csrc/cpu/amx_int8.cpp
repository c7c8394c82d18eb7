// AMX-INT8 level: W8A8, W4A8 and int8_mm on tiles with tdpbssd (signed x signed int8,
// int32 accumulation, no saturation: exact for every int8 operand, -128 included). Every
// path runs full-width tiles, 2 x 2 per 32-row x 32-channel block (amx.h): the B tiles come
// straight from layout 1, whose 16-channel k-quad rows are full-width B rows; W4A8 unpacks
// its nibbles once per task into int8 (u - 8) rows of the same form, so its int32 sums are
// exact too. Activations come quantized into 16-row x 64-k tiles (QuantArgs::tiled).
#include "amx.h"

// GCC 12 warns that its own 256->512-bit cast intrinsics read an uninitialized upper half
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#if KQ_X86

namespace kquant::cpu {
namespace {

// a: the row block's first tile (tiled activations), ab: bytes from one row block to the
// next; b0, b1: 16-channel B operands (k-quad rows of kW8Row bytes)
template <bool A2, bool B2>
KQ_AMX inline void amx_steps(const int8_t* a, int64_t ab, const int8_t* b0, const int8_t* b1, int64_t q0,
                             int64_t q1) {
  for (int64_t q = q0; q < q1; q += 16) {
    _tile_loadd(4, a + q * 64, 64);
    if (A2) _tile_loadd(5, a + ab + q * 64, 64);
    _tile_loadd(6, b0 + q * kW8Row, kW8Row);
    if (B2) _tile_loadd(7, b1 + q * kW8Row, kW8Row);
    _tile_dpbssd(0, 4, 6);
    if (B2) _tile_dpbssd(1, 4, 7);
    if (A2) _tile_dpbssd(2, 5, 6);
    if (A2 && B2) _tile_dpbssd(3, 5, 7);
  }
}

// the 4 C tiles <-> acc (4 tiles of 16 x 16 int32, back to back)
KQ_AMX inline void amx_store(int32_t* acc) {
  _tile_stored(0, acc, 64);
  _tile_stored(1, acc + 256, 64);
  _tile_stored(2, acc + 512, 64);
  _tile_stored(3, acc + 768, 64);
}

KQ_AMX inline void amx_load(const int32_t* acc) {
  _tile_loadd(0, acc, 64);
  _tile_loadd(1, acc + 256, 64);
  _tile_loadd(2, acc + 512, 64);
  _tile_loadd(3, acc + 768, 64);
}

KQ_AMX inline void amx_run(bool a2, bool b2, const int8_t* a, int64_t ab, const int8_t* b0, const int8_t* b1,
                           int64_t q0, int64_t q1) {
  if (a2 && b2) amx_steps<true, true>(a, ab, b0, b1, q0, q1);
  else if (a2) amx_steps<true, false>(a, ab, b0, b1, q0, q1);
  else if (b2) amx_steps<false, true>(a, ab, b0, b1, q0, q1);
  else amx_steps<false, false>(a, ab, b0, b1, q0, q1);
}

// layout-2 blocks nb, nb + 1 (p.kblocks octets each; nb + 1 only if < nb1) -> int8 (u - 8)
// as one 16-channel block of layout 1 (2 * p.kblocks k-quad rows of 64 bytes; a missing
// block gives 0)
KQ_AMX inline void unpack_int4_pair(const Problem& p, int64_t nb, int64_t nb1, int8_t* dst) {
  const __m256i lo = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  const uint8_t* w0 = p.w4 + nb * p.kblocks * 32;
  const uint8_t* w1 = w0 + p.kblocks * 32;
  const bool two = nb + 1 < nb1;
  for (int64_t o = 0; o < p.kblocks; ++o) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + o * 32));
    const __m256i v1 = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + o * 32)) : _mm256_set1_epi8(0x88);
    int8_t* d = dst + o * 128;  // quads 2o (low nibbles) and 2o + 1 (high)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm256_sub_epi8(_mm256_and_si256(v0, lo), eight));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 32), _mm256_sub_epi8(_mm256_and_si256(v1, lo), eight));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 64),
                        _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v0, 4), lo), eight));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 96),
                        _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v1, 4), lo), eight));
  }
}

// Per-channel W8A8 and int8_mm on full-width tiles: a 32-row x 32-channel block is 2 x 2 C
// tiles. A task (plan.cpp: 256 rows x 256 channels) runs in K chunks of 512: the chunk's
// activations and weights (128 KiB each) come once from L3 into L2 (128 MACs per byte), a
// 32-row slice (16 KiB) stays in L1 while the task's eight 32-channel blocks use it, and the
// int32 tiles wait in a buffer between chunks (exact).
constexpr int64_t kAmxKQ = 128;  // k-quads per chunk (512 k)

KQ_AMX void task_amx_per_channel(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const int64_t n16 = cdiv(nb1 - nb0, 2), n32 = cdiv(n16, 2), nmb = cdiv(m1 - m0, 32);
  const int64_t ab = p.lda * 16;  // bytes per 16-row block of tiled activations
  const int64_t n1 = std::min(p.N, nb1 * kBlockN);
  thread_local std::vector<int32_t> accv;
  int32_t* accb = scratch(accv, nmb * n32 * 1024);
  auto acc = [&](int64_t mb, int64_t j) { return accb + (mb * n32 + j) * 1024; };
  for (int64_t q0 = 0; q0 < p.kblocks; q0 += kAmxKQ) {
    const int64_t q1 = std::min(p.kblocks, q0 + kAmxKQ);
    const bool last = q1 == p.kblocks;
    for (int64_t mb = 0; mb < nmb; ++mb) {
      const int64_t m = m0 + 32 * mb;
      const int8_t* a = p.a8 + (m / 16) * ab;
      for (int64_t j = 0; j < n32; ++j) {
        const int8_t* b0 = w8_block(p, nb0 + 4 * j);
        if (q0 == 0) amx_zero();
        else amx_load(acc(mb, j));
        amx_run(m + 16 < m1, 2 * j + 1 < n16, a, ab, b0, b0 + p.kblocks * kW8Row, q0, q1);
        amx_store(acc(mb, j));
        if (last && j >= 1) amx_epilogue<int32_t>(p, m, m1, (nb0 + 4 * (j - 1)) * kBlockN, n1, acc(mb, j - 1));
      }
      if (last) amx_epilogue<int32_t>(p, m, m1, (nb0 + 4 * (n32 - 1)) * kBlockN, n1, acc(mb, n32 - 1));
    }
  }
}

// f += float(acc) * s for a 32 x 32 tile block (tiles as in amx_epilogue) of rows rows (<= 32
// valid) and one or two 16-channel halves; s: the 32 channels' scales
KQ_AMX inline void fold_block(const int32_t* acc, const float* s, int64_t rows, bool b2, float* f) {
  for (int j = 0; j < (b2 ? 2 : 1); ++j) {
    const __m512 sj = _mm512_loadu_ps(s + 16 * j);
    for (int i = 0; i < 2; ++i) {
      const int mr = static_cast<int>(std::min<int64_t>(16, rows - 16 * i));
      const int32_t* ai = acc + 256 * (2 * i + j);
      float* fi = f + 256 * (2 * i + j);
      for (int r = 0; r < mr; ++r)
        _mm512_store_ps(fi + 16 * r, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ai + 16 * r)), sj,
                                                     _mm512_load_ps(fi + 16 * r)));
    }
  }
}

// Grouped W8A8 and W4A8 (any G, W4A8 per-channel too) on full-width tiles, 32 rows x 32
// channels per tile block: each group's int32 tiles are folded into fp32 sums, f =
// fma(float(acc_g), s[n, g], f) as in the AVX2 path. The fold of group g - 1 is issued
// after group g's tiles, so the vector units fold while the AMX unit multiplies. W4A8
// unpacks the task's nibbles once per 32 channels into int8 (u - 8), 16-channel rows.
KQ_AMX void task_amx_grouped(const Problem& p, bool int4, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const int64_t nq = int4 ? 2 * p.kblocks : p.kblocks;  // k-quads
  const int64_t perq = p.G > 1 ? p.gsz / 4 : nq;
  const int64_t n1 = std::min(p.N, nb1 * kBlockN), ab = p.lda * 16;
  thread_local std::vector<int8_t> wqv;
  thread_local std::vector<float> sv;
  int8_t* wq = int4 ? scratch(wqv, 2 * nq * 64) : nullptr;
  float* st = scratch(sv, p.G * 32);  // [G][32] scales of the 32 channels
  alignas(64) int32_t acc[2][4][256];
  alignas(64) float f[4][256];
  for (int64_t nb = nb0; nb < nb1; nb += 4) {
    const bool b2 = nb + 2 < nb1;
    const int8_t* bw[2];
    for (int j = 0; j < (b2 ? 2 : 1); ++j) {
      if (int4) unpack_int4_pair(p, nb + 2 * j, nb1, wq + j * nq * 64);
      bw[j] = int4 ? wq + j * nq * 64 : w8_block(p, nb + 2 * j);
    }
    if (!b2) bw[1] = bw[0];
    const int64_t c0 = nb * kBlockN, nc = std::min<int64_t>(32, n1 - c0);
    for (int64_t g = 0; g < p.G; ++g)
      for (int c = 0; c < 32; ++c) st[g * 32 + c] = c < nc ? p.sw[(c0 + c) * p.G + g] : 0.0f;
    for (int64_t m = m0; m < m1; m += 32) {
      const bool a2 = m + 16 < m1;
      const int8_t* a = p.a8 + (m / 16) * ab;
      std::memset(f, 0, sizeof(f));
      amx_zero();
      for (int64_t g = 0; g < p.G; ++g) {
        const int64_t q0 = g * perq, q1 = p.G > 1 ? q0 + perq : nq;
        amx_run(a2, b2, a, ab, bw[0], bw[1], q0, q1);
        if (g > 0) fold_block(acc[(g - 1) & 1][0], st + (g - 1) * 32, m1 - m, b2, f[0]);
        amx_store(acc[g & 1][0]);
        amx_zero();
      }
      fold_block(acc[(p.G - 1) & 1][0], st + (p.G - 1) * 32, m1 - m, b2, f[0]);
      amx_epilogue<float>(p, m, m1, c0, n1, f[0]);
    }
  }
}

}  // namespace

// Rows [m0, m1) x channel blocks [nb0, nb1). p.a8 holds whole 16-row tiles (rows past M are
// zeros) and K padded to 64.
KQ_AMX void task_amx_int8(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const bool int4 = p.int4;
  amx_config();
  if (!int4 && p.G == 1) task_amx_per_channel(p, m0, m1, nb0, nb1);  // per-channel W8A8 and int8_mm
  else task_amx_grouped(p, int4, m0, m1, nb0, nb1);
  _tile_release();
}

}  // namespace kquant::cpu

#endif  // KQ_X86
