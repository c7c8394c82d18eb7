// AMX-BF16 level: W8A16 and W4A16 on tiles, for the weight-only calls plan.cpp gives it on
// CPUs with AMX-BF16; the activations come prepared by split_x_bf16 below.
//
// tdpbf16ps: bf16 x bf16 products, exact in fp32, fp32 accumulation. The weights enter as
// their integer codes, exact in bf16; x is split exactly into three bf16 parts, x = hi +
// mid + lo (8 + 8 + 8 significant bits), so every product x_k * q_k is the exact fp32 one
// and only the order of the fp32 sums differs from the reference. Per group the zero point
// and the scale are applied in fp32: f += s[n, g] * (sum_k x_k q_k - z[n, g] * sum_k x_k);
// whole zero points (Problem::whole_zeros) go into the codes as q - z instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "amx.h"

// GCC 12 warns that its own 256->512-bit cast intrinsics read an uninitialized upper half
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#if KQ_X86

namespace kquant::cpu {

#define KQ_AMXBF __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace {

// bf16 bits of v rounded to nearest even (in the low half of each 32-bit lane)
KQ_AMXBF inline __m512i bf16_rne(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}

KQ_AMXBF inline __m512 bf16_f32(__m512i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }

// rows [m0, m1) of x -> a3: three bf16 parts, each tiled [Mp/16][lda/32][16][32] (1 KiB
// tiles); xs[m][g] = sum of the group's x (fp32)
KQ_AMXBF void split_rows(const Problem& p, const void* x, OutT xt, uint16_t* a3, int64_t part, float* xs, int64_t m0,
                         int64_t m1) {
  const int64_t K = p.Kp, kt = p.ldx / 32;
  for (int64_t m = m0; m < m1; ++m) {
    uint16_t* row = a3 + ((m >> 4) * kt) * 512 + (m & 15) * 32;
    __m512 gs = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.ldx; k += 16) {
      __m512 f;
      if (k + 16 <= K) {
        f = load16(x, xt, m * K + k);
      } else {
        alignas(64) float t[16] = {};
        for (int64_t j = k; j < K; ++j) t[j - k] = to_f(x, xt, m * K + j);
        f = _mm512_load_ps(t);
      }
      gs = _mm512_add_ps(gs, f);
      // groups of G > 1 are multiples of 32 k; one group (G = 1) ends with the row
      if (p.G > 1 ? (k + 16) % p.gsz == 0 && k < K : k + 16 >= p.ldx) {
        xs[m * p.G + (p.G > 1 ? k / p.gsz : 0)] = _mm512_reduce_add_ps(gs);
        gs = _mm512_setzero_ps();
      }
      const __m512i h = bf16_rne(f);
      const __m512 r1 = _mm512_sub_ps(f, bf16_f32(h));
      const __m512i md = bf16_rne(r1);
      const __m512i lo = bf16_rne(_mm512_sub_ps(r1, bf16_f32(md)));
      uint16_t* d = row + (k >> 5) * 512 + (k & 31);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + part), _mm512_cvtepi32_epi16(md));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * part), _mm512_cvtepi32_epi16(lo));
    }
  }
}

// one quad row of int8 codes (8 channels x 4 k) -> two bf16 pair rows (8 channels x 2 k
// each, rs elements apart) of q - z (z: the zero point of each lane's channel, a whole
// number, so q - z in [-255, 255] is exact in bf16)
KQ_AMXBF inline void quad_to_pairs(__m256i v, __m512 z, uint16_t* dst, int64_t rs) {
  const __m256i sel = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                       0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, sel), 0xD8);  // [k0k1 c0-7 | k2k3 c0-7]
  const __m512i w = _mm512_cvtepi8_epi16(v);
  const __m512i a = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(w));
  const __m512i b = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w, 1));
  // integer codes are exact in bf16: the top half of their fp32 bits
  const __m512 fa = _mm512_sub_ps(_mm512_cvtepi32_ps(a), z), fb = _mm512_sub_ps(_mm512_cvtepi32_ps(b), z);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(fa), 16)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + rs),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(fb), 16)));
}

// k in [k0, k0 + kc) of an 8-channel block's codes -> bf16 pair rows of 32 elements (16
// channels x 2 k: the full-width B rows of two blocks side by side), this block's 16 at dst
KQ_AMXBF void block_to_bf16(const Problem& p, bool int4, int64_t nb, int64_t k0, int64_t kc, const float* z8,
                            uint16_t* dst) {
  // lane 2c and 2c + 1 of a pair row belong to channel c
  const __m512 z = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                         _mm512_castps256_ps512(_mm256_loadu_ps(z8)));
  if (int4) {
    const uint8_t* w = p.w4 + nb * p.kblocks * 32;
    const __m256i lo = _mm256_set1_epi8(0x0F);
    for (int64_t o = k0 / 8; o < (k0 + kc) / 8; ++o, dst += 128) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + o * 32));
      quad_to_pairs(_mm256_and_si256(v, lo), z, dst, 32);
      quad_to_pairs(_mm256_and_si256(_mm256_srli_epi16(v, 4), lo), z, dst + 64, 32);
    }
  } else {
    const int8_t* w = w8_block(p, nb);
    for (int64_t q = k0 / 4; q < (k0 + kc) / 4; ++q, dst += 64)
      quad_to_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * kW8Row)), z, dst, 32);
  }
}

// 32 k per step; B tiles: 16 pair rows x 16 channels (512 elements per step)
template <bool A2, bool B2>
KQ_AMXBF inline void amx_bf16_steps(const uint16_t* a, int64_t ab, int64_t part, const uint16_t* b0, const uint16_t* b1,
                                 int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s) {
    _tile_loadd(6, b0 + s * 512, 64);
    if (B2) _tile_loadd(7, b1 + s * 512, 64);
    for (int sp = 0; sp < 3; ++sp) {
      const uint16_t* as = a + sp * part + s * 512;
      _tile_loadd(4, as, 64);
      if (A2) _tile_loadd(5, as + ab, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (B2) _tile_dpbf16ps(1, 4, 7);
      if (A2) _tile_dpbf16ps(2, 5, 6);
      if (A2 && B2) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

KQ_AMXBF inline void amx_bf16_run(bool a2, bool b2, const uint16_t* a, int64_t ab, int64_t part, const uint16_t* b0,
                               const uint16_t* b1, int64_t s0, int64_t s1) {
  if (a2 && b2) amx_bf16_steps<true, true>(a, ab, part, b0, b1, s0, s1);
  else if (a2) amx_bf16_steps<true, false>(a, ab, part, b0, b1, s0, s1);
  else if (b2) amx_bf16_steps<false, true>(a, ab, part, b0, b1, s0, s1);
  else amx_bf16_steps<false, false>(a, ab, part, b0, b1, s0, s1);
}

inline float zero_of(const Problem& p, int64_t n, int64_t g) {
  return p.zeros ? p.zeros[n * p.G + g] : static_cast<float>(p.wo_zero);
}

}  // namespace

// A task (plan.cpp: 256 rows x 256 channels) runs in K chunks (a weight group, or 128 k per
// channel), on full-width tiles (32 rows x 32 channels per 2 x 2 tile block): per chunk the
// task's weights are converted once (128 KiB of bf16 at 128 k), a 32-row slice of the three
// activation parts stays in L1 while every channel block uses it, and the fp32 sums wait
// in f (per group already scaled).
KQ_AMXBF void task_amx_bf16(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const bool int4 = p.int4;
  amx_config();
  const uint16_t* a3 = p.xb;
  const int64_t part = p.xb_part;
  const float* xs = p.xsum;
  // k per chunk: the group, or 128 (64 when that does not divide the padded K): the 32-row
  // slice of the three parts is then 24 KiB, half of L1
  const int64_t kc = p.G > 1 ? p.gsz : p.ldx % 128 == 0 ? 128 : 64;
  const int64_t ab = (p.ldx / 32) * 512;  // elements per 16-row block
  const int64_t n16 = cdiv(nb1 - nb0, 2), n32 = cdiv(n16, 2), nmb = cdiv(m1 - m0, 32);
  const int64_t n1 = std::min(p.N, nb1 * kBlockN);
  thread_local std::vector<uint16_t> wbv;  // [n16][kc / 2][16][2] bf16 codes of the chunk
  thread_local std::vector<float> fv;      // [nmb][n32][4][256]
  uint16_t* wb = scratch(wbv, n16 * kc * 16);
  float* fb0 = scratch(fv, nmb * n32 * 1024);
  std::fill(fb0, fb0 + nmb * n32 * 1024, 0.0f);
  if ((nb1 - nb0) % 2) std::fill(wb, wb + n16 * kc * 16, uint16_t(0));  // the lone half's partner: zeros
  auto fb = [&](int64_t mb, int64_t j) { return fb0 + (mb * n32 + j) * 1024; };
  alignas(64) float c[4][256];
  alignas(64) float s32[32], z32[32];
  alignas(32) float z8[8];
  const int64_t nchunk = cdiv(p.Kp, kc);  // chunks past Kp hold only zero padding
  for (int64_t ch = 0; ch < nchunk; ++ch) {
    const int64_t g = p.G > 1 ? ch : 0;
    for (int64_t b = 0; b < nb1 - nb0; ++b) {  // whole zero points go into the codes (no x-sum term)
      const int64_t n0 = (nb0 + b) * kBlockN;
      for (int cc = 0; cc < kBlockN; ++cc) z8[cc] = p.whole_zeros && n0 + cc < p.N ? zero_of(p, n0 + cc, g) : 0.0f;
      block_to_bf16(p, int4, nb0 + b, ch * kc, kc, z8, wb + (b / 2) * kc * 16 + (b % 2) * 16);
    }
    for (int64_t mb = 0; mb < nmb; ++mb) {
      const int64_t m = m0 + 32 * mb;
      const bool a2 = m + 16 < m1;
      const uint16_t* a = a3 + (m / 16) * ab + (ch * kc / 32) * 512;
      for (int64_t j = 0; j < n32; ++j) {
        const bool b2 = 2 * j + 1 < n16;
        const uint16_t* b0 = wb + 2 * j * kc * 16;
        amx_zero();
        amx_bf16_run(a2, b2, a, ab, part, b0, b2 ? b0 + kc * 16 : b0, 0, kc / 32);
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        float* f = fb(mb, j);
        const int64_t c0 = (nb0 + 4 * j) * kBlockN;
        for (int cc = 0; cc < 32; ++cc) {
          const bool ok = c0 + cc < n1;
          s32[cc] = ok ? p.sw[(c0 + cc) * p.G + g] : 0.0f;
          z32[cc] = ok && !p.whole_zeros ? zero_of(p, c0 + cc, g) : 0.0f;
        }
        for (int h = 0; h < (b2 ? 2 : 1); ++h) {
          const __m512 sv = _mm512_load_ps(s32 + 16 * h), zv = _mm512_load_ps(z32 + 16 * h);
          for (int i = 0; i < (a2 ? 2 : 1); ++i) {
            const int mr = static_cast<int>(std::min<int64_t>(16, m1 - m - 16 * i));
            for (int r = 0; r < mr; ++r) {
              float* fr = f + (2 * i + h) * 256 + 16 * r;
              const __m512 cv = _mm512_load_ps(c[2 * i + h] + 16 * r);
              if (p.G == 1) {  // one group: sum the chunks; zero point and scale at the end
                _mm512_store_ps(fr, _mm512_add_ps(cv, _mm512_load_ps(fr)));
                if (ch + 1 < nchunk) continue;
              }
              const __m512 xsv = _mm512_set1_ps(xs[(m + 16 * i + r) * p.G + g]);
              const __m512 t = _mm512_fnmadd_ps(zv, xsv, p.G == 1 ? _mm512_load_ps(fr) : cv);
              _mm512_store_ps(fr, _mm512_fmadd_ps(t, sv, p.G == 1 ? _mm512_setzero_ps() : _mm512_load_ps(fr)));
            }
          }
        }
      }
    }
  }
  for (int64_t mb = 0; mb < nmb; ++mb)
    for (int64_t j = 0; j < n32; ++j) amx_epilogue<float>(p, m0 + 32 * mb, m1, (nb0 + 4 * j) * kBlockN, n1, fb(mb, j));
  _tile_release();
}

// x split into p.xb / p.xsum for task_amx_bf16; returns the buffers that hold them
KQ_AMXBF std::pair<at::Tensor, at::Tensor> split_x_bf16(Problem& p, const void* x, OutT xt) {
  const int64_t mp = cdiv(p.M, 16) * 16, part = mp * p.ldx;
  // not zero-filled: split_rows writes every element of the rows it owns (K padding too)
  at::Tensor a3t = at::empty({3 * part}, at::TensorOptions().dtype(at::kShort));
  at::Tensor xst = at::empty({p.M * p.G}, at::TensorOptions().dtype(at::kFloat));
  uint16_t* a3 = reinterpret_cast<uint16_t*>(a3t.data_ptr<int16_t>());
  float* xs = xst.data_ptr<float>();
  for (int64_t m = p.M; m < mp; ++m)  // rows past M: zeros in every part
    for (int sp = 0; sp < 3; ++sp)
      for (int64_t k = 0; k < p.ldx; k += 32)
        std::memset(a3 + sp * part + ((m >> 4) * (p.ldx / 32) + k / 32) * 512 + (m & 15) * 32, 0, 64);
  at::parallel_for(0, p.M, std::max<int64_t>(1, 16384 / p.ldx), [&](int64_t m0, int64_t m1) {
    split_rows(p, x, xt, a3, part, xs, m0, m1);
  });
  p.xb = a3;
  p.xb_part = part;
  p.xsum = xs;
  return {a3t, xst};
}

}  // namespace kquant::cpu

#endif  // KQ_X86
