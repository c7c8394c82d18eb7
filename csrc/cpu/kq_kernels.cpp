// kquant CPU kernels: exact int8 GEMMs (W8A8, W4A8, int8_mm) and weight-only GEMMs
// (W8A16, W4A16) for AVX2+FMA machines, with a portable scalar path that gives the
// same bits (KQUANT_CPU_ISA=scalar forces it).
//
// Exactness without VNNI. vpmaddubsw (u8 x s8 -> int16 pair sums) saturates for
// general int8 operands, so two exact sequences are used:
//  * small M (<= 3 rows, decode): the sign trick vpmaddubsw(|a|, sign(w, a)). With
//    a, w in [-127, 127] a pair sums to at most 2 * 127 * 127 = 32258 < 32767, so it
//    never saturates; then vpmaddwd(.., 1) + vpaddd. 4 uops per 32 MACs and a single
//    int8 weight load: the fastest per weight byte (what M = 1 is bound by).
//  * larger M: int16 operands with vpmaddwd. Activations are quantized straight to
//    int16, weights widened with one vpmovsxbw per 16 bytes (shared by 4 rows), then
//    vpmaddwd + vpaddd: 2 uops per 16 MACs. bench/ceilings (register-only loops, one
//    core of this Xeon, test_ceiling in bench/test_cpu_linear.py): vpmaddwd+vpaddd
//    91 GMAC/s, the sign trick 83 GMAC/s (3 of its 4 uops need the two multiply
//    ports); in the kernels the int16 GEMM reached 69 GMAC/s at M >= 48 against
//    59 GMAC/s for the sign trick at its best tile (M = 3), so M > 3 uses int16.
//    (4 rows x 8 channels: 6 rows spilled accumulators with GCC 12 and ran at 50.)
//  * W4A8: nibbles u in 0..15 are the unsigned vpmaddubsw operand; pairs are at most
//    2 * 15 * 127 = 3810, so 4 k-octets (7620 each) accumulate safely in int16 before
//    one vpmaddwd: ~1.5x the MACs per uop of the int8 GEMM. The zero point 8 is folded
//    out exactly with per-group activation sums.
// Every int32 result equals the reference's; float epilogues mirror the reference's
// operation order (per-channel W8A8 is bit-identical in fp32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kq_cpu.h"

#if KQ_X86
#include <immintrin.h>
#endif

namespace kquant::cpu {
namespace {

// (weight-only kinds 10-13 are the AVX2/scalar paths by M, see wo_linear)
enum Kind { kSign = 0, kI16 = 1, kW4 = 2, kAmx8 = 3, kAmx4 = 4, kAmxWo8 = 14, kAmxWo4 = 15 };
// Rows from which the int8 GEMMs use AMX tiles when the machine has them. Measured on one
// core (4096x4096): W8A8 streams the weights at the same speed from M = 2 to 16 on AMX
// (0.70-0.82 ms) while the vector kernels grow with M (M = 2: 0.83, 4: 1.16 ms); M = 1
// stays on the VNNI GEMV (0.64 ms). W4A8 unpacks its nibbles per task, which costs more
// than the vector kernel at M = 2 (0.80 vs 0.47 ms) but less from M = 4 (0.79-0.90 vs
// 0.93-0.99 ms; per-channel and 128-k groups).
constexpr int64_t kAmxMinM = 2;
constexpr int64_t kAmxMinM4 = 4;
constexpr int64_t kAmxSpeedup = 8;  // AMX MACs per AVX2 MAC in time, for the threading grain
constexpr int kMaxMR = 8;  // largest row tile (weight-only fp32 GEMM)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n elements of a thread's scratch vector v, 64-byte aligned (whole cache lines per tile row)
template <class T>
T* scratch(std::vector<T>& v, int64_t n) {
  const int64_t pad = 64 / sizeof(T);
  if (static_cast<int64_t>(v.size()) < n + pad) v.resize(n + pad);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// ----------------------------------------------------------------------------- scalar
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

inline int quant1(float v, float inv) {
  float t = std::nearbyint(v * inv);  // round half to even, like torch.round
  t = std::min(127.0f, std::max(-127.0f, t));
  return static_cast<int>(t);
}

struct QuantArgs {
  const void* x; OutT xt; int64_t K;
  bool is_static; float s_inv, s_scale;
  int8_t* q8; uint8_t* qabs; int16_t* q16; int64_t lda;
  float* sx; int32_t* asum; int64_t G, gsz;
  // AMX: q8 in 16-row x 64-k tiles of 1 KiB, row-block-major ([M/16][lda/64][16][64]), so
  // each tile load reads 1 KiB of consecutive bytes (only q8 is written then)
  bool tiled = false;
};

inline int64_t q8_index(const QuantArgs& a, int64_t m, int64_t k) {
  if (!a.tiled) return m * a.lda + k;
  return ((m >> 4) * (a.lda >> 6) + (k >> 6)) * 1024 + (m & 15) * 64 + (k & 63);
}

void finish_row(const QuantArgs& a, int64_t m) {
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

void row_params(float amax, const QuantArgs& a, float* inv, float* scale) {
  if (a.is_static) { *inv = a.s_inv; *scale = a.s_scale; return; }
  // torch evaluates the reference's `127.0 / amax` as reciprocal(amax) * 127: match it
  *inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 1.0f;
  *scale = amax > 0.0f ? amax / 127.0f : 1.0f;
}

// q of row m for k in [k0, lda) one value at a time (zeros from K on): the scalar path, and
// the vector paths' tails
void quant_tail(const QuantArgs& a, int64_t m, int64_t k0, float inv) {
  for (int64_t k = k0; k < a.lda; ++k) {
    const int q = k < a.K ? quant1(to_f(a.x, a.xt, m * a.K + k), inv) : 0;
    if (a.q8) a.q8[q8_index(a, m, k)] = static_cast<int8_t>(q);
    if (a.qabs) a.qabs[m * a.lda + k] = static_cast<uint8_t>(q < 0 ? -q : q);
    if (a.q16) a.q16[m * a.lda + k] = static_cast<int16_t>(q);
  }
}

void quant_rows_scalar(const QuantArgs& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t off = m * a.K;
    float amax = 0.0f;
    if (!a.is_static)
      for (int64_t k = 0; k < a.K; ++k) amax = std::max(amax, std::fabs(to_f(a.x, a.xt, off + k)));
    float inv, scale;
    row_params(amax, a, &inv, &scale);
    a.sx[m] = scale;
    quant_tail(a, m, 0, inv);
    finish_row(a, m);
  }
}

// ----------------------------------------------------------------------------- AVX2 helpers
#if KQ_X86
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

// fp32 -> out dtype with round-to-nearest-even (what torch's .to() does)
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

// 16 values of x as fp32
KQ_AVX512F inline __m512 load16(const void* x, OutT t, int64_t i) {
  if (t == OutT::F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  return _mm512_insertf32x8(_mm512_castps256_ps512(load8(x, t, i)), load8(x, t, i + 8), 1);
}

// 16 int8 q of row m from k (k % 16 == 0): q8, plain or tiled, and |q|
KQ_AVX2 inline void store_q8x16(const QuantArgs& a, int64_t m, int64_t k, __m128i b) {
  if (a.q8) _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q8 + q8_index(a, m, k)), b);
  if (a.qabs) _mm_storeu_si128(reinterpret_cast<__m128i*>(a.qabs + m * a.lda + k), _mm_abs_epi8(b));
}

KQ_AVX2 void quant_rows_avx2(const QuantArgs& a, int64_t m0, int64_t m1) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const int64_t K16 = a.K & ~int64_t(15);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t off = m * a.K;
    float amax = 0.0f;
    if (!a.is_static) {
      __m256 vm = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= a.K; k += 8) vm = _mm256_max_ps(vm, _mm256_and_ps(load8(a.x, a.xt, off + k), absmask));
      alignas(32) float t[8];
      _mm256_store_ps(t, vm);
      for (int c = 0; c < 8; ++c) amax = std::max(amax, t[c]);
      for (; k < a.K; ++k) amax = std::max(amax, std::fabs(to_f(a.x, a.xt, off + k)));
    }
    float inv, scale;
    row_params(amax, a, &inv, &scale);
    a.sx[m] = scale;
    const __m256 vinv = _mm256_set1_ps(inv);
    int16_t* q16 = a.q16 ? a.q16 + m * a.lda : nullptr;
    int64_t k = 0;
    for (; k < K16; k += 16) {
      __m256 f0 = _mm256_mul_ps(load8(a.x, a.xt, off + k), vinv);
      __m256 f1 = _mm256_mul_ps(load8(a.x, a.xt, off + k + 8), vinv);
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
    quant_tail(a, m, k, inv);
    finish_row(a, m);
  }
}

// The same rows 16 lanes wide, with the dtype fixed per call. The AVX2 loop above has one
// vmaxps dependency chain in the amax pass and a dtype switch per load. Here four
// independent maxima and vpmovdb cut both passes. The values are the same: max is exact in
// any order, and the products, nearest-even rounding and clamp are the same fp32 operations.
// Measured, one core: 512 x 384 0.10 -> 0.06 ms, 512 x 1536 0.37 -> 0.28 ms. 512 x 4096
// stays at ~0.7 ms, bound by reading x. In MiniLM W8A8 quantization went from 10.9% to 8.1%
// of perf samples; what is left waits on x's loads.
template <OutT T>
KQ_AVX512F inline __m512 load16t(const void* x, int64_t i) {
  if constexpr (T == OutT::F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
  if constexpr (T == OutT::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16
}

template <OutT T>
KQ_AVX512F void quant_rows_avx512_t(const QuantArgs& a, int64_t m0, int64_t m1) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const int64_t K16 = a.K & ~int64_t(15);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t off = m * a.K;
    float amax = 0.0f;
    if (!a.is_static) {
      __m512 v[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t k = 0;
      for (; k + 64 <= a.K; k += 64)
        for (int j = 0; j < 4; ++j) v[j] = _mm512_max_ps(v[j], _mm512_abs_ps(load16t<T>(a.x, off + k + 16 * j)));
      for (; k < K16; k += 16) v[0] = _mm512_max_ps(v[0], _mm512_abs_ps(load16t<T>(a.x, off + k)));
      amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3])));
      for (; k < a.K; ++k) amax = std::max(amax, std::fabs(to_f(a.x, a.xt, off + k)));
    }
    float inv, scale;
    row_params(amax, a, &inv, &scale);
    a.sx[m] = scale;
    const __m512 vinv = _mm512_set1_ps(inv);
    int16_t* q16 = a.q16 ? a.q16 + m * a.lda : nullptr;
    int64_t k = 0;
    for (; k < K16; k += 16) {
      __m512 f = _mm512_mul_ps(load16t<T>(a.x, off + k), vinv);
      f = _mm512_roundscale_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(f, lo), hi));
      if (q16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + k), _mm512_cvtepi32_epi16(i));
      store_q8x16(a, m, k, _mm512_cvtepi32_epi8(i));  // values already in [-127, 127]
    }
    quant_tail(a, m, k, inv);
    finish_row(a, m);
  }
}

void quant_rows_avx512(const QuantArgs& a, int64_t m0, int64_t m1) {
  switch (a.xt) {
    case OutT::F16: quant_rows_avx512_t<OutT::F16>(a, m0, m1); break;
    case OutT::BF16: quant_rows_avx512_t<OutT::BF16>(a, m0, m1); break;
    default: quant_rows_avx512_t<OutT::F32>(a, m0, m1); break;
  }
}

// ----------------------------------------------------------------------------- AVX2 kernels
// Each computes exact int32 sums over weight blocks [b0, b1) for MR rows x 8 channels.
template <int MR>
KQ_AVX2 inline void k_sign(const int8_t* a, const uint8_t* aa, int64_t lda, const int8_t* w, int64_t q0,
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

// M = 1 GEMV over 4 channel blocks at once (w0, w2: two 16-channel blocks of layout 1):
// the activation broadcasts are shared by 4 weight streams (1.5 loads per 32 MACs, not 3)
KQ_AVX2 inline void k_sign4(const int8_t* a, const uint8_t* aa, const int8_t* w0, const int8_t* w2, int64_t nq,
                            int32_t* out) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < nq; ++q) {
    if (q + 16 < nq) {  // 1 KiB ahead in both streams (DRAM-bound decode)
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

// Layout 1's 64-byte rows give an 8-channel half one line per k-quad: prefetching 1 KiB
// ahead (16 quads) keeps the int16 GEMM at the speed it had on 8-channel blocks (~4%
// slower without, M = 16 and 128 on one core).
// int16 GEMM of MR rows x 8 channels over k-quads [q0, q1). W16 = false: w is an 8-channel
// half of layout 1, widened in the loop; its 64-byte rows give it one line per k-quad, and
// prefetching 1 KiB ahead (16 quads) measured 2-4% faster (one core, M = 16 and 128).
// W16 = true: w holds quads [q0, q1) already widened (widen_block: [q][8 channels][4 k]),
// so the loop has no vpmovsxbw.
template <int MR, bool W16 = false>
KQ_AVX2 inline void k_i16(const int16_t* a, int64_t lda, const void* w, int64_t q0, int64_t q1, int32_t* out) {
  __m256i lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  const int8_t* w8 = static_cast<const int8_t*>(w);
  const int16_t* w16 = static_cast<const int16_t*>(w);
  for (int64_t q = q0; q < q1; ++q) {
    __m256i blo, bhi;
    if constexpr (W16) {
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
// (k_i16<MR, true>'s operand): dst for the first half, dst + 32 * (q1 - q0) for the second
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

// W4A8 over all groups with the per-group fold kept in registers (a call per group
// costs as much as a group's work at M = 1): f += float(acc_g - 8 * sum_g(a)) * s[n, g]
template <int MR, int NB>
KQ_AVX2 inline void k_w4a8g(const int8_t* a, int64_t lda, const uint8_t* w, int64_t wstride, int64_t nblk,
                            int64_t per, int64_t G, const float* sw, const int* nv, const int32_t* asum, float* out) {
  // out[r][j * 8 + c]: MR rows x NB channel blocks (NB > 1 shares activation loads at M = 1)
  __m256 f[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) f[r][j] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i gidx = _mm256_mullo_epi32(lane, _mm256_set1_epi32(int(G)));
  __m256 gmask[NB];
  for (int j = 0; j < NB; ++j) gmask[j] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nv[j]), lane));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o0 = g * per, o1 = G > 1 ? o0 + per : nblk;
    __m256i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t o = o0; o < o1; o += 4) {
      const int64_t oe = std::min(o + 4, o1);  // 4 octets keep int16 sums <= 4 * 7620
      __m256i s16[MR][NB];
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) s16[r][j] = _mm256_setzero_si256();
      if (NB > 1 && o + 32 < o1)  // 1 KiB ahead in each weight stream (DRAM-bound decode)
        for (int j = 0; j < NB; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(w + j * wstride + 32 * o + 1024), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w + j * wstride + 32 * o + 1088), _MM_HINT_T0);
        }
      for (int64_t oo = o; oo < oe; ++oo) {
        __m256i a0[MR], a1[MR];
        for (int r = 0; r < MR; ++r) {
          int64_t av;
          std::memcpy(&av, a + r * lda + 8 * oo, 8);
          const __m256i va = _mm256_set1_epi64x(av);
          a0[r] = _mm256_shuffle_epi32(va, 0x00);
          a1[r] = _mm256_shuffle_epi32(va, 0x55);
        }
        for (int j = 0; j < NB; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * wstride + 32 * oo));
          const __m256i bl = _mm256_and_si256(v, m4);
          const __m256i bh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          for (int r = 0; r < MR; ++r) {
            s16[r][j] = _mm256_add_epi16(s16[r][j], _mm256_maddubs_epi16(bl, a0[r]));
            s16[r][j] = _mm256_add_epi16(s16[r][j], _mm256_maddubs_epi16(bh, a1[r]));
          }
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(s16[r][j], ones));
    }
    for (int j = 0; j < NB; ++j) {
      const __m256 sv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), sw + j * kNB * G + g, gidx, gmask[j], 4);
      for (int r = 0; r < MR; ++r) {
        const __m256i corr = _mm256_set1_epi32(8 * asum[r * G + g]);
        f[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][j], corr)), sv, f[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) _mm256_storeu_ps(out + r * NB * 8 + 8 * j, f[r][j]);
}

// weight-only: fp32 sums over blocks; lanes (channel pair, k mod 4), reduced pairwise
KQ_AVX2 inline __m256 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

template <int MR, bool Z>
KQ_AVX2 inline void k_wo8(const float* x, int64_t ldx, const int8_t* w, int64_t q0, int64_t q1, const int32_t* z,
                          float* out) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  __m256i zv[4];
  for (int j = 0; j < 4; ++j)
    zv[j] = Z ? _mm256_setr_epi32(z[2 * j], z[2 * j], z[2 * j], z[2 * j], z[2 * j + 1], z[2 * j + 1], z[2 * j + 1],
                                  z[2 * j + 1])
              : _mm256_setzero_si256();
  for (int64_t q = q0; q < q1; ++q) {
    const __m128i wl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kW8Row * q));
    const __m128i wh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kW8Row * q + 16));
    __m256i i[4] = {_mm256_cvtepi8_epi32(wl), _mm256_cvtepi8_epi32(_mm_srli_si128(wl, 8)), _mm256_cvtepi8_epi32(wh),
                    _mm256_cvtepi8_epi32(_mm_srli_si128(wh, 8))};
    __m256 f[4];
    for (int j = 0; j < 4; ++j) f[j] = _mm256_cvtepi32_ps(Z ? _mm256_sub_epi32(i[j], zv[j]) : i[j]);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + r * ldx + 4 * q));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(xv, f[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + 8 * r, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
}

template <int MR>
KQ_AVX2 inline void k_wo4(const float* x, int64_t ldx, const uint8_t* w, int64_t o0, int64_t o1, const int32_t* z,
                          float* out) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  __m256i zv[4];
  for (int j = 0; j < 4; ++j)
    zv[j] = _mm256_setr_epi32(z[2 * j], z[2 * j], z[2 * j], z[2 * j], z[2 * j + 1], z[2 * j + 1], z[2 * j + 1],
                              z[2 * j + 1]);
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

// Dequantize one block of 8 channels to fp32, k-major: dst[k * ld + c] = (q - z) * s, the
// reference's exact values. 4x8 byte blocks are transposed with one vpshufb + vpermd.
KQ_AVX2 inline void dq_quad(__m256i v, __m256 z, __m256 s, float* dst, int64_t ld) {
  const __m256i ctrl = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i t = _mm256_shuffle_epi8(v, ctrl);  // per lane: [k0: c0..3][k1: c0..3]...
  for (int j = 0; j < 4; ++j) {
    const __m256i b = _mm256_permutevar8x32_epi32(t, _mm256_setr_epi32(j, 4 + j, j, j, j, j, j, j));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    _mm256_storeu_ps(dst + j * ld, _mm256_mul_ps(_mm256_sub_ps(f, z), s));
  }
}

KQ_AVX2 void dq_block_avx2(const Problem& p, bool int4, int64_t nb, int nv, float* dst, int64_t ld) {
  alignas(32) float z8[8], s8[8];
  const int64_t per = int4 ? 8 : 4;
  const int64_t gb = p.G > 1 ? p.gsz / per : p.nblk;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < p.G; ++g) {
    for (int c = 0; c < 8; ++c) {
      const int64_t n = nb * kNB + c;
      s8[c] = c < nv ? p.sw[n * p.G + g] : 0.0f;
      z8[c] = c < nv && p.zeros ? p.zeros[n * p.G + g] : float(p.wo_zero);
    }
    const __m256 z = _mm256_load_ps(z8), sc = _mm256_load_ps(s8);
    const int64_t b1 = p.G > 1 ? (g + 1) * gb : p.nblk;
    for (int64_t b = g * gb; b < b1; ++b) {
      if (int4) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.w4 + (nb * p.nblk + b) * 32));
        dq_quad(_mm256_and_si256(v, m4), z, sc, dst + 8 * b * ld, ld);
        dq_quad(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), z, sc, dst + (8 * b + 4) * ld, ld);
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w8_block(p, nb) + b * kW8Row));
        dq_quad(v, z, sc, dst + 4 * b * ld, ld);
      }
    }
  }
}

// fp32 GEMM of MR rows with one dequantized 8-channel block: acc = fma(x[k], w[k], acc)
template <int MR>
KQ_AVX2 inline void k_fgemm(const float* x, int64_t ldx, const float* wq, int64_t K, float* out) {
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w = _mm256_loadu_ps(wq + 8 * k);
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k), w, acc[r]);
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + 8 * r, acc[r]);
}
#endif  // KQ_X86

// ----------------------------------------------------------------------------- scalar kernels
void dq_block_scalar(const Problem& p, bool int4, int64_t nb, int nv, float* dst, int64_t ld) {
  const int64_t per = int4 ? 8 : 4;
  const int64_t kb = p.nblk * per;
  for (int c = 0; c < 8; ++c) {
    const int64_t n = nb * kNB + c;
    for (int64_t k = 0; k < kb; ++k) {
      const int64_t g = p.G > 1 ? std::min(k / p.gsz, p.G - 1) : 0;
      const float s = c < nv ? p.sw[n * p.G + g] : 0.0f;
      const float z = c < nv && p.zeros ? p.zeros[n * p.G + g] : float(p.wo_zero);
      int32_t q;
      if (int4) {
        const uint8_t v = p.w4[(nb * p.nblk + k / 8) * 32 + 4 * c + (k & 3)];
        q = (k & 4) ? (v >> 4) : (v & 15);
      } else {
        q = w8_block(p, nb)[(k / 4) * kW8Row + 4 * c + (k & 3)];
      }
      dst[k * ld + c] = (float(q) - z) * s;
    }
  }
}

void s_fgemm(int mr, const float* x, int64_t ldx, const float* wq, int64_t K, float* out) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < 8; ++c) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[r * ldx + k], wq[8 * k + c], acc);
      out[8 * r + c] = acc;
    }
}
void s_int(const Problem& p, int kind, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1, int32_t* out) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < kNB; ++c) {
      int32_t s = 0;
      if (kind == kW4) {
        const uint8_t* w = p.w4 + (nb * p.nblk) * 32;
        const int8_t* a = p.a8 + (m + r) * p.lda;
        for (int64_t o = b0; o < b1; ++o)
          for (int j = 0; j < 4; ++j) {
            const uint8_t v = w[32 * o + 4 * c + j];
            s += int32_t(v & 15) * a[8 * o + j] + int32_t(v >> 4) * a[8 * o + 4 + j];
          }
      } else {
        const int8_t* w = w8_block(p, nb);
        for (int64_t q = b0; q < b1; ++q)
          for (int j = 0; j < 4; ++j) {
            const int32_t av = kind == kSign ? p.a8[(m + r) * p.lda + 4 * q + j] : p.a16[(m + r) * p.lda + 4 * q + j];
            s += av * w[kW8Row * q + 4 * c + j];
          }
      }
      out[8 * r + c] = s;
    }
}

// weight-only: same lane order and fma sequence as k_wo8 / k_wo4, so results are identical
void s_wo(const Problem& p, bool int4, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1, const int32_t* z,
          float* out) {
  for (int r = 0; r < mr; ++r) {
    const float* x = p.xf + (m + r) * p.ldx;
    for (int c = 0; c < kNB; ++c) {
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t b = b0; b < b1; ++b)
        for (int l = 0; l < 4; ++l) {
          if (int4) {
            const uint8_t v = p.w4[(nb * p.nblk + b) * 32 + 4 * c + l];
            part[l] = std::fma(x[8 * b + l], float(int32_t(v & 15) - z[c]), part[l]);
            part[l] = std::fma(x[8 * b + 4 + l], float(int32_t(v >> 4) - z[c]), part[l]);
          } else {
            const int8_t v = w8_block(p, nb)[b * kW8Row + 4 * c + l];
            part[l] = std::fma(x[4 * b + l], float(int32_t(v) - z[c]), part[l]);
          }
        }
      out[8 * r + c] = (part[0] + part[1]) + (part[2] + part[3]);
    }
  }
}

// ----------------------------------------------------------------------------- tiles
// The tile loops are written once and inlined into an AVX2 and a scalar task function,
// so both paths run the same float operations in the same order.
struct ScalarK {
  static void kint(const Problem& p, int kind, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1, int32_t* out) {
    s_int(p, kind, mr, m, nb, b0, b1, out);
  }
  static void kwo(const Problem& p, bool int4, bool hasz, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1,
                  const int32_t* z, float* out) {
    (void)hasz;
    s_wo(p, int4, mr, m, nb, b0, b1, z, out);
  }
  static constexpr bool kWiden = false;  // no widen / kint_w (see Avx2K)
  static void widen(const Problem&, int64_t, int64_t, int64_t, int16_t*) {}
  static void kint_w(const Problem&, int, int64_t, int64_t, const int16_t*, int64_t, int32_t*) {}
  static bool gemv4(const Problem&, int64_t, int64_t, int32_t*) { return false; }
  static bool kw4x4(const Problem&, int64_t, int64_t, const int*, float*) { return false; }
  static bool wo4(const Problem&, bool, int64_t, int64_t, const int*, float*) { return false; }
  static void dq(const Problem& p, bool int4, int64_t nb, int nv, float* dst, int64_t ld) {
    dq_block_scalar(p, int4, nb, nv, dst, ld);
  }
  static void fgemm(int mr, const float* x, int64_t ldx, const float* wq, int64_t K, float* out) {
    s_fgemm(mr, x, ldx, wq, K, out);
  }
  static void kw4(const Problem& p, int mr, int64_t m, int64_t nb, int nv, float* f) {
    alignas(32) int32_t acc[kMaxMR * 8];
    const int64_t per = p.G > 1 ? p.gsz / 8 : p.nblk;
    std::memset(f, 0, sizeof(float) * 8 * mr);
    for (int64_t g = 0; g < p.G; ++g) {
      s_int(p, kW4, mr, m, nb, g * per, p.G > 1 ? (g + 1) * per : p.nblk, acc);
      for (int r = 0; r < mr; ++r)
        for (int c = 0; c < kNB; ++c) {
          const float s = c < nv ? p.sw[(nb * kNB + c) * p.G + g] : 0.0f;
          f[8 * r + c] = std::fma(float(acc[8 * r + c] - 8 * p.asum[(m + r) * p.G + g]), s, f[8 * r + c]);
        }
    }
  }
  static void fold(int mr, const int32_t* acc, const float* s, float* f) {
    for (int r = 0; r < mr; ++r)
      for (int c = 0; c < kNB; ++c) f[8 * r + c] = std::fma(float(acc[8 * r + c]), s[c], f[8 * r + c]);
  }
  static void fold_f(int mr, const float* acc, const float* s, float* f) {
    for (int r = 0; r < mr; ++r)
      for (int c = 0; c < kNB; ++c) f[8 * r + c] = std::fma(acc[8 * r + c], s[c], f[8 * r + c]);
  }
  // per channel: y = (acc * s) * sx + bias, the reference's order
  static void epi_int(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const int32_t* acc, const float* s,
                      const float* b8) {
    for (int r = 0; r < mr; ++r) {
      const int64_t row = (m + r) * p.N + n0;
      for (int c = 0; c < nv; ++c) {
        float v = float(acc[8 * r + c]) * s[c];
        v = v * p.sx[m + r];
        if (p.bias) v = v + b8[c];
        store_f(p.y, p.yt, row + c, v);
      }
    }
  }
  // y = f * sx + bias  (sx null: y = f + bias)
  static void epi(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const float* f, const float* b8) {
    for (int r = 0; r < mr; ++r) {
      const int64_t row = (m + r) * p.N + n0;
      for (int c = 0; c < nv; ++c) {
        float v = f[8 * r + c];
        if (p.sx) v = v * p.sx[m + r];
        if (p.bias) v = v + b8[c];
        store_f(p.y, p.yt, row + c, v);
      }
    }
  }
};

#if KQ_X86
struct Avx2K {
  KQ_AVX2 static inline void kint(const Problem& p, int kind, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1,
                                  int32_t* out) {
    if (kind == kSign) {
      const int8_t* a = p.a8 + m * p.lda;
      const uint8_t* aa = p.aabs + m * p.lda;
      const int8_t* w = w8_block(p, nb);
      switch (mr) {
        case 1: k_sign<1>(a, aa, p.lda, w, b0, b1, out); break;
        case 2: k_sign<2>(a, aa, p.lda, w, b0, b1, out); break;
        default: k_sign<3>(a, aa, p.lda, w, b0, b1, out); break;
      }
    } else {
      const int16_t* a = p.a16 + m * p.lda;
      const int8_t* w = w8_block(p, nb);
      switch (mr) {
        case 1: k_i16<1>(a, p.lda, w, b0, b1, out); break;
        case 2: k_i16<2>(a, p.lda, w, b0, b1, out); break;
        case 3: k_i16<3>(a, p.lda, w, b0, b1, out); break;
        default: k_i16<4>(a, p.lda, w, b0, b1, out); break;
      }
    }
  }
  // the int16 GEMM on a block widened once per K chunk (shared by all the task's row tiles)
  static constexpr bool kWiden = true;
  KQ_AVX2 static inline void widen(const Problem& p, int64_t nb, int64_t q0, int64_t q1, int16_t* dst) {
    widen_block(w8_block(p, nb), q0, q1, dst);  // nb even: both halves
  }
  // rows [m, m + mr), k-quads [q0, q0 + n) of a widened block w
  KQ_AVX2 static inline void kint_w(const Problem& p, int mr, int64_t m, int64_t q0, const int16_t* w, int64_t n,
                                    int32_t* out) {
    const int16_t* a = p.a16 + m * p.lda;
    switch (mr) {
      case 1: k_i16<1, true>(a, p.lda, w, q0, q0 + n, out); break;
      case 2: k_i16<2, true>(a, p.lda, w, q0, q0 + n, out); break;
      case 3: k_i16<3, true>(a, p.lda, w, q0, q0 + n, out); break;
      default: k_i16<4, true>(a, p.lda, w, q0, q0 + n, out); break;
    }
  }
  KQ_AVX2 static inline bool gemv4(const Problem& p, int64_t m, int64_t nb, int32_t* out) {
    k_sign4(p.a8 + m * p.lda, p.aabs + m * p.lda, w8_block(p, nb), w8_block(p, nb + 2), p.nblk, out);
    return true;
  }
  KQ_AVX2 static inline void dq(const Problem& p, bool int4, int64_t nb, int nv, float* dst, int64_t ld) {
    dq_block_avx2(p, int4, nb, nv, dst, ld);
  }
  KQ_AVX2 static inline void fgemm(int mr, const float* x, int64_t ldx, const float* wq, int64_t K, float* out) {
    switch (mr) {
      case 1: k_fgemm<1>(x, ldx, wq, K, out); break;
      case 2: k_fgemm<2>(x, ldx, wq, K, out); break;
      case 3: k_fgemm<3>(x, ldx, wq, K, out); break;
      case 4: k_fgemm<4>(x, ldx, wq, K, out); break;
      case 5: k_fgemm<5>(x, ldx, wq, K, out); break;
      case 6: k_fgemm<6>(x, ldx, wq, K, out); break;
      case 7: k_fgemm<7>(x, ldx, wq, K, out); break;
      default: k_fgemm<8>(x, ldx, wq, K, out); break;
    }
  }
  KQ_AVX2 static inline void kw4(const Problem& p, int mr, int64_t m, int64_t nb, int nv, float* f) {
    const int8_t* a = p.a8 + m * p.lda;
    const uint8_t* w = p.w4 + nb * p.nblk * 32;
    const int64_t per = p.G > 1 ? p.gsz / 8 : p.nblk;
    const float* sw = p.sw + nb * kNB * p.G;
    const int32_t* as = p.asum + m * p.G;
    const int nvv[1] = {nv};
    switch (mr) {
      case 1: k_w4a8g<1, 1>(a, p.lda, w, 0, p.nblk, per, p.G, sw, nvv, as, f); break;
      case 2: k_w4a8g<2, 1>(a, p.lda, w, 0, p.nblk, per, p.G, sw, nvv, as, f); break;
      case 3: k_w4a8g<3, 1>(a, p.lda, w, 0, p.nblk, per, p.G, sw, nvv, as, f); break;
      default: k_w4a8g<4, 1>(a, p.lda, w, 0, p.nblk, per, p.G, sw, nvv, as, f); break;
    }
  }
  // one row x 4 channel blocks; f is [4 * 8]
  KQ_AVX2 static inline bool kw4x4(const Problem& p, int64_t m, int64_t nb, const int* nv, float* f) {
    const int64_t per = p.G > 1 ? p.gsz / 8 : p.nblk;
    k_w4a8g<1, 4>(p.a8 + m * p.lda, p.lda, p.w4 + nb * p.nblk * 32, p.nblk * 32, p.nblk, per, p.G,
                  p.sw + nb * kNB * p.G, nv, p.asum + m * p.G, f);
    return true;
  }
  KQ_AVX2 static inline bool wo4(const Problem&, bool, int64_t, int64_t, const int*, float*) { return false; }
  KQ_AVX2 static inline void kwo(const Problem& p, bool int4, bool hasz, int mr, int64_t m, int64_t nb, int64_t b0,
                                 int64_t b1, const int32_t* z, float* out) {
    const float* x = p.xf + m * p.ldx;
    if (int4) {
      const uint8_t* w = p.w4 + nb * p.nblk * 32;
      if (mr == 1) k_wo4<1>(x, p.ldx, w, b0, b1, z, out);
      else k_wo4<2>(x, p.ldx, w, b0, b1, z, out);
    } else {
      const int8_t* w = w8_block(p, nb);
      if (hasz) {
        if (mr == 1) k_wo8<1, true>(x, p.ldx, w, b0, b1, z, out);
        else k_wo8<2, true>(x, p.ldx, w, b0, b1, z, out);
      } else {
        if (mr == 1) k_wo8<1, false>(x, p.ldx, w, b0, b1, z, out);
        else k_wo8<2, false>(x, p.ldx, w, b0, b1, z, out);
      }
    }
  }
  KQ_AVX2 static inline void fold(int mr, const int32_t* acc, const float* s, float* f) {
    const __m256 sv = _mm256_loadu_ps(s);
    for (int r = 0; r < mr; ++r)
      _mm256_storeu_ps(f + 8 * r, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(
                                                      reinterpret_cast<const __m256i*>(acc + 8 * r))),
                                                  sv, _mm256_loadu_ps(f + 8 * r)));
  }
  KQ_AVX2 static inline void fold_f(int mr, const float* acc, const float* s, float* f) {
    const __m256 sv = _mm256_loadu_ps(s);
    for (int r = 0; r < mr; ++r)
      _mm256_storeu_ps(f + 8 * r, _mm256_fmadd_ps(_mm256_loadu_ps(acc + 8 * r), sv, _mm256_loadu_ps(f + 8 * r)));
  }
  KQ_AVX2 static inline void epi_int(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const int32_t* acc,
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
  KQ_AVX2 static inline void epi(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const float* f,
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

// AVX-512 level: the M = 1 kernels of kq_avx512.cpp over 4 channel blocks, the rest AVX2
struct Avx512K : Avx2K {
  KQ_AVX2 static inline bool gemv4(const Problem& p, int64_t m, int64_t nb, int32_t* out) {
    avx512_w8a8_gemv4(p, m, nb, out);
    return true;
  }
  KQ_AVX2 static inline bool kw4x4(const Problem& p, int64_t m, int64_t nb, const int* nv, float* f) {
    avx512_w4a8_gemv4(p, m, nb, nv, f);
    return true;
  }
  KQ_AVX2 static inline bool wo4(const Problem& p, bool int4, int64_t m, int64_t nb, const int* nv, float* f) {
    avx512_wo_gemv4(p, int4, m, nb, nv, f);
    return true;
  }
};

// ----------------------------------------------------------------------------- AMX
// W8A8 / W4A8 / int8_mm with AMX-INT8 (tdpbssd: signed x signed int8, int32 accumulation,
// no saturation: exact for every int8 operand, -128 included). One core of this Xeon
// (bench/test_cpu_linear.py::test_ceiling): tdpbssd at full width (C tiles of 16 rows x 16
// channels) ~3.4 TMAC/s (amx_tdpbssd), at 8 channels ~1.7 (the same time per instruction
// for half the MACs), and the per-channel kernel's own tile sequence from L1 ~2.8
// (amx_kernel_seq). Every int8 path runs full-width tiles, 2 x 2 per 32-row x 32-channel
// block: the B tiles come straight from layout 1, whose 16-channel k-quad rows are
// full-width B rows; W4A8 unpacks its nibbles once per task into int8 (u - 8) rows of the
// same form, so its int32 sums are exact too.

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

KQ_AMX inline void amx_zero() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

KQ_AMX inline void amx_run(bool a2, bool b2, const int8_t* a, int64_t ab, const int8_t* b0, const int8_t* b1,
                           int64_t q0, int64_t q1) {
  if (a2 && b2) amx_steps<true, true>(a, ab, b0, b1, q0, q1);
  else if (a2) amx_steps<true, false>(a, ab, b0, b1, q0, q1);
  else if (b2) amx_steps<false, true>(a, ab, b0, b1, q0, q1);
  else amx_steps<false, false>(a, ab, b0, b1, q0, q1);
}

// layout-2 blocks nb, nb + 1 (no octets each; nb + 1 only if < nb1) -> int8 (u - 8) as one
// 16-channel block of layout 1 (2 * no k-quad rows of 64 bytes; a missing block gives 0)
KQ_AMX inline void unpack_int4_pair(const Problem& p, int64_t nb, int64_t nb1, int8_t* dst) {
  const __m256i lo = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  const uint8_t* w0 = p.w4 + nb * p.nblk * 32;
  const uint8_t* w1 = w0 + p.nblk * 32;
  const bool two = nb + 1 < nb1;
  for (int64_t o = 0; o < p.nblk; ++o) {
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

// Epilogue of one 32-row x 32-channel tile block (four 16 x 16 tiles: t + 256 * (2 * row
// half + channel half)) for rows [m, min(m + 32, m1)) and channels [n0, n1): the AVX2
// epilogue's operations 16 lanes wide, masked at the channel tail. T = int32_t: per-channel
// sums (scaled here; raw for int8_mm); T = float: grouped sums already scaled per group.
// Called right after the next block's tiles are issued, so the vector units convert one
// block while the AMX unit works on the next.
template <class T>
KQ_AMX inline void epi_block(const Problem& p, int64_t m, int64_t m1, int64_t n0, int64_t n1, const T* t) {
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

// Per-channel W8A8 and int8_mm on full-width tiles: a 32-row x 32-channel block is 2 x 2 C
// tiles. A task is 256 rows x 256 channels, in K chunks of 512: the chunk's activations and
// weights (128 KiB each) come once from L3 into L2 (128 MACs per byte; this Xeon gives one
// core ~25 GB/s from L3), a 32-row slice (16 KiB) stays in L1 while the task's eight
// 32-channel blocks use it, and the int32 tiles wait in a buffer between chunks (exact).
// Against the 8-channel tiles of 3dbb85c this ran 1.2-1.45x faster from M = 64 (A/B runs,
// one core); a per-task repack of 8-channel blocks into pairs cost more than it gained.
constexpr int64_t kAmxMC = 256;  // rows per AMX task
constexpr int64_t kAmxNB = 32;   // 8-channel blocks per AMX task
constexpr int64_t kAmxKQ = 128;  // k-quads per chunk (512 k)

KQ_AMX void task_amx_pc(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const int64_t n16 = cdiv(nb1 - nb0, 2), n32 = cdiv(n16, 2), nmb = cdiv(m1 - m0, 32);
  const int64_t ab = p.lda * 16;  // bytes per 16-row block of tiled activations
  const int64_t n1 = std::min(p.N, nb1 * kNB);
  thread_local std::vector<int32_t> accv;
  int32_t* accb = scratch(accv, nmb * n32 * 1024);
  auto acc = [&](int64_t mb, int64_t j) { return accb + (mb * n32 + j) * 1024; };
  for (int64_t q0 = 0; q0 < p.nblk; q0 += kAmxKQ) {
    const int64_t q1 = std::min(p.nblk, q0 + kAmxKQ);
    const bool last = q1 == p.nblk;
    for (int64_t mb = 0; mb < nmb; ++mb) {
      const int64_t m = m0 + 32 * mb;
      const int8_t* a = p.a8 + (m / 16) * ab;
      for (int64_t j = 0; j < n32; ++j) {
        const int8_t* b0 = w8_block(p, nb0 + 4 * j);
        if (q0 == 0) amx_zero();
        else amx_load(acc(mb, j));
        amx_run(m + 16 < m1, 2 * j + 1 < n16, a, ab, b0, b0 + p.nblk * kW8Row, q0, q1);
        amx_store(acc(mb, j));
        if (last && j >= 1) epi_block<int32_t>(p, m, m1, (nb0 + 4 * (j - 1)) * kNB, n1, acc(mb, j - 1));
      }
      if (last) epi_block<int32_t>(p, m, m1, (nb0 + 4 * (n32 - 1)) * kNB, n1, acc(mb, n32 - 1));
    }
  }
}

// f += float(acc) * s for a 32 x 32 tile block (tiles as in epi_block) of rows rows (<= 32
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
  const int64_t nq = int4 ? 2 * p.nblk : p.nblk;  // k-quads
  const int64_t perq = p.G > 1 ? p.gsz / 4 : nq;
  const int64_t n1 = std::min(p.N, nb1 * kNB), ab = p.lda * 16;
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
    const int64_t c0 = nb * kNB, nc = std::min<int64_t>(32, n1 - c0);
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
      epi_block<float>(p, m, m1, c0, n1, f[0]);
    }
  }
}

// Rows [m0, m1) x channel blocks [nb0, nb1). p.a8 holds whole 16-row tiles (rows past M are
// zeros) and K padded to 64.
KQ_AMX void task_amx(const Problem& p, bool int4, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  amx_config();
  if (!int4 && p.G == 1) task_amx_pc(p, m0, m1, nb0, nb1);  // per-channel W8A8 and int8_mm
  else task_amx_grouped(p, int4, m0, m1, nb0, nb1);
  _tile_release();
}

// ----------------------------------------------------------------------------- AMX-BF16
// Weight-only GEMMs (W8A16, W4A16) of M >= kAmxWoMinM rows with tdpbf16ps (bf16 x bf16
// products, exact in fp32, fp32 accumulation). The weights enter as their integer codes,
// exact in bf16; x is split exactly into three bf16 parts, x = hi + mid + lo (8 + 8 + 8
// significant bits), so every product x_k * q_k is the exact fp32 one and only the order
// of the fp32 sums differs from the reference. Per group the zero point and the scale are
// applied in fp32: f += s[n, g] * (sum_k x_k q_k - z[n, g] * sum_k x_k).
#define KQ_AMXBF __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
constexpr int64_t kAmxWoMinM = 16;

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

// one quad row of int8 codes (8 channels x 4 k) -> two bf16 pair rows (8 channels x 2 k each,
// rs elements apart) of q - z (z: the zero point of each lane's channel, a whole number, so q - z in [-255, 255]
// is exact in bf16)
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
    const uint8_t* w = p.w4 + nb * p.nblk * 32;
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
KQ_AMXBF inline void amxbf_steps(const uint16_t* a, int64_t ab, int64_t part, const uint16_t* b0, const uint16_t* b1,
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

KQ_AMXBF inline void amxbf_run(bool a2, bool b2, const uint16_t* a, int64_t ab, int64_t part, const uint16_t* b0,
                               const uint16_t* b1, int64_t s0, int64_t s1) {
  if (a2 && b2) amxbf_steps<true, true>(a, ab, part, b0, b1, s0, s1);
  else if (a2) amxbf_steps<true, false>(a, ab, part, b0, b1, s0, s1);
  else if (b2) amxbf_steps<false, true>(a, ab, part, b0, b1, s0, s1);
  else amxbf_steps<false, false>(a, ab, part, b0, b1, s0, s1);
}

inline float zero_of(const Problem& p, int64_t n, int64_t g) {
  return p.zeros ? p.zeros[n * p.G + g] : static_cast<float>(p.wo_zero);
}

// A task is 256 rows x 256 channels in K chunks (a weight group, or 128 k per channel),
// on full-width tiles (32 rows x 32 channels per 2 x 2 tile block): per chunk the task's
// weights are converted once (128 KiB of bf16 at 128 k), a 32-row slice of the three
// activation parts stays in L1 while every channel block uses it, and the fp32 sums wait
// in f (per group already scaled).
KQ_AMXBF void task_amx_wo(const Problem& p, bool int4, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  amx_config();
  const uint16_t* a3 = p.xb;
  const int64_t part = p.xb_part;
  const float* xs = p.xsum;
  // k per chunk: the group, or 128 (64 when that does not divide the padded K): the 32-row
  // slice of the three parts is then 24 KiB, half of L1
  const int64_t kc = p.G > 1 ? p.gsz : p.ldx % 128 == 0 ? 128 : 64;
  const int64_t ab = (p.ldx / 32) * 512;  // elements per 16-row block
  const int64_t n16 = cdiv(nb1 - nb0, 2), n32 = cdiv(n16, 2), nmb = cdiv(m1 - m0, 32);
  const int64_t n1 = std::min(p.N, nb1 * kNB);
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
      const int64_t n0 = (nb0 + b) * kNB;
      for (int cc = 0; cc < kNB; ++cc) z8[cc] = p.zfold && n0 + cc < p.N ? zero_of(p, n0 + cc, g) : 0.0f;
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
        amxbf_run(a2, b2, a, ab, part, b0, b2 ? b0 + kc * 16 : b0, 0, kc / 32);
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        float* f = fb(mb, j);
        const int64_t c0 = (nb0 + 4 * j) * kNB;
        for (int cc = 0; cc < 32; ++cc) {
          const bool ok = c0 + cc < n1;
          s32[cc] = ok ? p.sw[(c0 + cc) * p.G + g] : 0.0f;
          z32[cc] = ok && !p.zfold ? zero_of(p, c0 + cc, g) : 0.0f;
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
    for (int64_t j = 0; j < n32; ++j) epi_block<float>(p, m0 + 32 * mb, m1, (nb0 + 4 * j) * kNB, n1, fb(mb, j));
  _tile_release();
}

// x split into p.xb / p.xsum for task_amx_wo; returns the buffers that hold them
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
#endif

template <class KK>
__attribute__((always_inline)) inline void tile_int(const Problem& p, int kind, int64_t m0, int64_t m1, int64_t nb0,
                                                    int64_t nb1) {
  const int mrmax = kind == kSign ? 3 : 4;  // int16 tile 4 x 8: 6 rows spill with GCC 12
  const int64_t per = p.G > 1 ? p.gsz / (kind == kW4 ? 8 : 4) : p.nblk;
  alignas(32) int32_t acc[kMaxMR * 8] = {};
  alignas(32) float f[kMaxMR * 8];
  alignas(32) float s8[8];
  alignas(32) float s1[8];
  alignas(32) float b8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (kind == kI16 && p.G == 1) {
    // K blocked so a 4-row activation tile (8 KiB) and a weight block widened to int16 (16
    // KiB per 8 channels) stay in L1 across the task's tiles; int32 partial sums wait in a
    // small buffer (exact). Widening once per block and chunk (AVX2, tasks of 32 rows or
    // more) takes vpmovsxbw out of the inner loop and reads each 64-byte layout-1 line
    // once: one core, AVX2 level, 5-7% faster than k_i16 on layout 1 at M = 128 and 512
    // (about the speed it had on the former 8-channel layout); at M = 16 k_i16 is 6% faster.
    constexpr int64_t kcq = 256;  // quads = 1024 k per block
    const int64_t mm = m1 - m0;
    thread_local std::vector<int32_t> part;
    thread_local std::vector<int16_t> widev;
    if (static_cast<int64_t>(part.size()) < mm * (nb1 - nb0) * 8) part.resize(mm * (nb1 - nb0) * 8);
    int16_t* wide = scratch(widev, 2 * kcq * 32);
    const bool widen = KK::kWiden && mm >= 32;  // 8 row tiles or more share the widened block
    for (int64_t q0 = 0; q0 < p.nblk; q0 += kcq) {
      const int64_t q1 = std::min(p.nblk, q0 + kcq);
      for (int64_t nb = nb0; nb < nb1; ++nb) {
        // both halves of a layout-1 block widened in one pass over its lines (nb0 is even)
        if (widen && (nb - nb0) % 2 == 0) KK::widen(p, nb, q0, q1, wide);
        const int16_t* wh = wide + ((nb - nb0) % 2) * 32 * (q1 - q0);
        for (int64_t m = m0; m < m1; m += mrmax) {
          const int mr = static_cast<int>(std::min<int64_t>(mrmax, m1 - m));
          int32_t* dst = part.data() + ((nb - nb0) * mm + (m - m0)) * 8;
          if (widen) KK::kint_w(p, mr, m, q0, wh, q1 - q0, q0 == 0 ? dst : acc);
          else KK::kint(p, kind, mr, m, nb, q0, q1, q0 == 0 ? dst : acc);
          if (q0 != 0)
            for (int i = 0; i < 8 * mr; ++i) dst[i] += acc[i];
        }
      }
    }
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = nb * kNB;
      const int nv = static_cast<int>(std::min<int64_t>(kNB, p.N - n0));
      const int32_t* src = part.data() + (nb - nb0) * mm * 8;
      if (p.yt == OutT::I32) {
        int32_t* y = static_cast<int32_t*>(p.y);
        for (int64_t m = m0; m < m1; ++m) std::memcpy(y + m * p.N + n0, src + (m - m0) * 8, nv * sizeof(int32_t));
        continue;
      }
      for (int c = 0; c < kNB; ++c) {
        s1[c] = c < nv ? p.sw[n0 + c] : 0.0f;
        b8[c] = p.bias && c < nv ? p.bias[n0 + c] : 0.0f;
      }
      for (int64_t m = m0; m < m1; m += mrmax) {
        const int mr = static_cast<int>(std::min<int64_t>(mrmax, m1 - m));
        KK::epi_int(p, mr, m, n0, nv, src + (m - m0) * 8, s1, b8);
      }
    }
    return;
  }
  int64_t nbs = nb0;
  if (kind == kSign && p.G == 1 && p.yt != OutT::I32) {
    // one activation row at a time, 4 channel blocks per pass (same int32 sums)
    alignas(32) int32_t acc4[32];
    for (; nbs + 4 <= nb1; nbs += 4)
      for (int64_t m = m0; m < m1; ++m) {
        if (!KK::gemv4(p, m, nbs, acc4)) goto general;
        for (int j = 0; j < 4; ++j) {
          const int64_t n0 = (nbs + j) * kNB;
          const int nv = static_cast<int>(std::min<int64_t>(kNB, p.N - n0));
          for (int c = 0; c < kNB; ++c) {
            s1[c] = c < nv ? p.sw[n0 + c] : 0.0f;
            b8[c] = p.bias && c < nv ? p.bias[n0 + c] : 0.0f;
          }
          KK::epi_int(p, 1, m, n0, nv, acc4 + 8 * j, s1, b8);
        }
      }
  }
  if (kind == kW4 && m1 - m0 == 1) {
    alignas(32) float f4[32];
    int nv4[4];
    for (; nbs + 4 <= nb1; nbs += 4) {
      for (int j = 0; j < 4; ++j) nv4[j] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kNB, p.N - (nbs + j) * kNB)));
      if (!KK::kw4x4(p, m0, nbs, nv4, f4)) goto general;
      for (int j = 0; j < 4; ++j) {
        const int64_t n0 = (nbs + j) * kNB;
        for (int c = 0; c < kNB; ++c) b8[c] = p.bias && c < nv4[j] ? p.bias[n0 + c] : 0.0f;
        KK::epi(p, 1, m0, n0, nv4[j], f4 + 8 * j, b8);
      }
    }
  }
general:
  for (int64_t nb = nbs; nb < nb1; ++nb) {
    const int64_t n0 = nb * kNB;
    const int nv = static_cast<int>(std::min<int64_t>(kNB, p.N - n0));
    if (p.bias)
      for (int c = 0; c < nv; ++c) b8[c] = p.bias[n0 + c];
    if (p.G == 1 && p.sw)
      for (int c = 0; c < kNB; ++c) s1[c] = c < nv ? p.sw[n0 + c] : 0.0f;
    for (int64_t m = m0; m < m1; m += mrmax) {
      const int mr = static_cast<int>(std::min<int64_t>(mrmax, m1 - m));
      if (p.yt == OutT::I32) {  // int8_mm: raw int32
        KK::kint(p, kind, mr, m, nb, 0, p.nblk, acc);
        int32_t* y = static_cast<int32_t*>(p.y);
        for (int r = 0; r < mr; ++r) std::memcpy(y + (m + r) * p.N + n0, acc + 8 * r, nv * sizeof(int32_t));
        continue;
      }
      if (kind == kW4) {
        KK::kw4(p, mr, m, nb, nv, f);
        KK::epi(p, mr, m, n0, nv, f, b8);
        continue;
      }
      if (p.G == 1) {  // per channel: fma(acc, s, 0) == acc * s, skip the fold buffer
        KK::kint(p, kind, mr, m, nb, 0, p.nblk, acc);
        KK::epi_int(p, mr, m, n0, nv, acc, s1, b8);
        continue;
      }
      std::memset(f, 0, sizeof(f));
      for (int64_t g = 0; g < p.G; ++g) {
        KK::kint(p, kind, mr, m, nb, g * per, p.G > 1 ? (g + 1) * per : p.nblk, acc);
        if (kind == kW4)  // weight = nibble - 8: remove 8 * sum(a) exactly in int32
          for (int r = 0; r < mr; ++r) {
            const int32_t corr = 8 * p.asum[(m + r) * p.G + g];
            for (int c = 0; c < kNB; ++c) acc[8 * r + c] -= corr;
          }
        for (int c = 0; c < kNB; ++c) s8[c] = c < nv ? p.sw[(n0 + c) * p.G + g] : 0.0f;
        KK::fold(mr, acc, s8, f);
      }
      KK::epi(p, mr, m, n0, nv, f, b8);
    }
  }
}

template <class KK>
__attribute__((always_inline)) inline void tile_wo(const Problem& p, bool int4, int64_t m0, int64_t m1, int64_t nb0,
                                                   int64_t nb1) {
  constexpr int mrmax = 2;
  const int64_t per = p.G > 1 ? p.gsz / (int4 ? 8 : 4) : p.nblk;
  const bool hasz = p.zeros != nullptr || p.wo_zero != 0;
  alignas(32) float acc[kMaxMR * 8];
  alignas(32) float f[kMaxMR * 8];
  alignas(32) float s8[8];
  alignas(32) float b8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  alignas(32) int32_t z8[8];
  int64_t nbs = nb0;
  if (m1 - m0 == 1) {  // one row: 4 channel blocks per pass where the ISA has such a kernel
    alignas(64) float f4[32];
    int nv4[4];
    for (; nbs + 4 <= nb1; nbs += 4) {
      for (int j = 0; j < 4; ++j) nv4[j] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kNB, p.N - (nbs + j) * kNB)));
      if (!KK::wo4(p, int4, m0, nbs, nv4, f4)) break;
      for (int j = 0; j < 4; ++j) {
        const int64_t n0 = (nbs + j) * kNB;
        for (int c = 0; c < kNB; ++c) b8[c] = p.bias && c < nv4[j] ? p.bias[n0 + c] : 0.0f;
        KK::epi(p, 1, m0, n0, nv4[j], f4 + 8 * j, b8);
      }
    }
  }
  for (int64_t nb = nbs; nb < nb1; ++nb) {
    const int64_t n0 = nb * kNB;
    const int nv = static_cast<int>(std::min<int64_t>(kNB, p.N - n0));
    if (p.bias)
      for (int c = 0; c < nv; ++c) b8[c] = p.bias[n0 + c];
    for (int64_t m = m0; m < m1; m += mrmax) {
      const int mr = static_cast<int>(std::min<int64_t>(mrmax, m1 - m));
      std::memset(f, 0, sizeof(f));
      for (int64_t g = 0; g < p.G; ++g) {
        for (int c = 0; c < kNB; ++c) {
          const bool ok = c < nv;
          s8[c] = ok ? p.sw[(n0 + c) * p.G + g] : 0.0f;
          z8[c] = p.zeros ? (ok ? static_cast<int32_t>(p.zeros[(n0 + c) * p.G + g]) : 0) : p.wo_zero;
        }
        KK::kwo(p, int4, hasz, mr, m, nb, g * per, p.G > 1 ? (g + 1) * per : p.nblk, z8, acc);
        KK::fold_f(mr, acc, s8, f);
      }
      KK::epi(p, mr, m, n0, nv, f, b8);
    }
  }
}

// weight-only, moderate M: dequantize each 8-channel block once (thread-local buffer, in
// L2), then an fp32 GEMM over all rows of the task
template <class KK>
__attribute__((always_inline)) inline void tile_wog(const Problem& p, bool int4, int64_t m0, int64_t m1, int64_t nb0,
                                                    int64_t nb1) {
  constexpr int mrmax = 8;
  const int64_t kb = p.nblk * (int4 ? 8 : 4);
  thread_local std::vector<float> wbuf;
  if (static_cast<int64_t>(wbuf.size()) < kb * 8) wbuf.resize(kb * 8);
  float* wq = wbuf.data();
  alignas(32) float acc[8 * 8];
  alignas(32) float b8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int64_t n0 = nb * kNB;
    const int nv = static_cast<int>(std::min<int64_t>(kNB, p.N - n0));
    if (p.bias)
      for (int c = 0; c < nv; ++c) b8[c] = p.bias[n0 + c];
    KK::dq(p, int4, nb, nv, wq, 8);
    for (int64_t m = m0; m < m1; m += mrmax) {
      const int mr = static_cast<int>(std::min<int64_t>(mrmax, m1 - m));
      KK::fgemm(mr, p.xf + m * p.ldx, p.ldx, wq, p.Kp, acc);
      KK::epi(p, mr, m, n0, nv, acc, b8);
    }
  }
}

void task_scalar(const Problem& p, int kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  if (kind >= 12) tile_wog<ScalarK>(p, kind == 13, m0, m1, nb0, nb1);
  else if (kind >= 10) tile_wo<ScalarK>(p, kind == 11, m0, m1, nb0, nb1);
  else tile_int<ScalarK>(p, kind, m0, m1, nb0, nb1);
}

#if KQ_X86
KQ_AVX2 void task_avx2(const Problem& p, int kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  if (kind >= 12) tile_wog<Avx2K>(p, kind == 13, m0, m1, nb0, nb1);
  else if (kind >= 10) tile_wo<Avx2K>(p, kind == 11, m0, m1, nb0, nb1);
  else tile_int<Avx2K>(p, kind, m0, m1, nb0, nb1);
}

KQ_AVX2 void task_avx512(const Problem& p, int kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  if (kind >= 12) tile_wog<Avx512K>(p, kind == 13, m0, m1, nb0, nb1);
  else if (kind >= 10) tile_wo<Avx512K>(p, kind == 11, m0, m1, nb0, nb1);
  else tile_int<Avx512K>(p, kind, m0, m1, nb0, nb1);
}
#endif

// Split (M x N) into tasks of MC rows x NC channels; each output element is owned by one
// task and computed in a fixed order, so any thread count gives the same bits.
void run_tasks(const Problem& p, int kind, Isa isa) {
  const int64_t nbt = cdiv(p.N, kNB);
  const bool amx = kind == kAmx8 || kind == kAmx4 || kind == kAmxWo8 || kind == kAmxWo4;
  const int64_t mcap = amx ? kAmxMC : 48;
  const int64_t mc = p.M <= mcap ? p.M : mcap;
  const int64_t ncb = amx ? kAmxNB : 8;  // channel blocks per task
  const int64_t tm = cdiv(p.M, mc), tn = cdiv(nbt, ncb);
  const int64_t nt = tm * tn;
  // the grain keeps problems under ~2M MACs on the calling thread: waking a second
  // thread costs microseconds, more than such a call takes
  const int64_t work = mc * ncb * kNB * p.Kp / (amx ? kAmxSpeedup : 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, work));
  at::parallel_for(0, nt, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mi = t / tn, ni = t % tn;
      const int64_t m0 = mi * mc, m1 = std::min(p.M, m0 + mc);
      const int64_t b0 = ni * ncb, b1 = std::min(nbt, b0 + ncb);
#if KQ_X86
      if (kind >= kAmxWo8) { task_amx_wo(p, kind == kAmxWo4, m0, m1, b0, b1); continue; }
      if (amx) { task_amx(p, kind == kAmx4, m0, m1, b0, b1); continue; }
      if (isa >= Isa::Avx512) { task_avx512(p, kind, m0, m1, b0, b1); continue; }
      if (isa != Isa::Scalar) { task_avx2(p, kind, m0, m1, b0, b1); continue; }
#endif
      task_scalar(p, kind, m0, m1, b0, b1);
    }
  });
}

void quantize(const QuantArgs& qa, int64_t M, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, qa.K));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
#if KQ_X86
    if (isa >= Isa::Avx512) { quant_rows_avx512(qa, m0, m1); return; }
    if (isa != Isa::Scalar) { quant_rows_avx2(qa, m0, m1); return; }
#endif
    quant_rows_scalar(qa, m0, m1);
  });
}

// ----------------------------------------------------------------------------- drivers
OutT out_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return OutT::F32;
    case at::kHalf: return OutT::F16;
    case at::kBFloat16: return OutT::BF16;
    default: TORCH_CHECK(false, "kquant cpu: x must be float32, float16 or bfloat16, got ", t);
  }
  return OutT::F32;
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "kquant cpu: x must be a 2-D CPU tensor, got ", x.sizes());
  out_type(x.scalar_type());
}

// fills weights, scales, groups and bias of p; returns the dtype-ready bias tensor holder
at::Tensor setup_weight(Problem& p, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias, int64_t group_size, bool int4) {
  p.M = x.size(0);
  p.Kp = x.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kFloat, "kquant cpu: scales must be float32 [N, G]");
  p.N = scales.size(0);
  p.G = scales.size(1);
  TORCH_CHECK(p.G >= 1 && p.Kp % p.G == 0, "kquant cpu: scales ", scales.sizes(), " do not divide K=", p.Kp);
  p.gsz = p.Kp / p.G;
  if (p.G > 1)
    TORCH_CHECK(p.gsz == group_size && p.gsz % 32 == 0, "kquant cpu: group size ", group_size,
                " does not match scales ", scales.sizes(), " for K=", p.Kp);
  const int64_t per = int4 ? 8 : 4, width = int4 ? 8 : 16;  // k per row; channels per block
  TORCH_CHECK(w.dim() == 4 && w.size(2) == width && w.size(3) == 4 && w.is_contiguous() &&
                  w.scalar_type() == (int4 ? at::kByte : at::kChar),
              "kquant cpu: weight must be in the blocked layout ", int4 ? "uint8" : "int8", " [N/", width, ", K/",
              per, ", ", width, ", 4], got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.size(0) == cdiv(p.N, width) && w.size(1) == cdiv(p.Kp, 64) * (64 / per), "kquant cpu: blocked weight ",
              w.sizes(), " does not match N=", p.N, " K=", p.Kp);
  p.nblk = w.size(1);
  if (int4) p.w4 = w.data_ptr<uint8_t>();
  else p.w8 = w.data_ptr<int8_t>();
  p.sw = scales.data_ptr<float>();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == p.N, "kquant cpu: bias must have N=", p.N, " elements");
    b = bias->to(at::kFloat).contiguous();
    p.bias = b.data_ptr<float>();
  }
  return b;
}

at::Tensor act_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales_,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                      int64_t group_size, bool int4) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const at::Tensor scales = scales_.contiguous();
  Problem p;
  at::Tensor bkeep = setup_weight(p, x, w, scales, bias, group_size, int4);
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  if (p.M == 0 || p.N == 0) return y;
  p.y = y.data_ptr();
  p.yt = out_type(x.scalar_type());
  const Isa isa = active_isa();
  p.lda = p.nblk * (int4 ? 8 : 4);
  const bool amx = isa == Isa::Amx && p.M >= (int4 ? kAmxMinM4 : kAmxMinM) && p.lda % 64 == 0 &&
                   (p.G == 1 || p.gsz % 64 == 0);
  const int kind = amx ? (int4 ? kAmx4 : kAmx8) : int4 ? kW4 : (p.M <= 3 ? kSign : kI16);
  QuantArgs qa{x.data_ptr(), p.yt, p.Kp, false, 1.f, 1.f, nullptr, nullptr, nullptr, p.lda, nullptr, nullptr,
               p.G, p.gsz};
  if (act_scale.has_value() && act_scale->defined()) {
    TORCH_CHECK(act_scale->numel() == 1, "kquant cpu: act_scale must have one element");
    const float s = act_scale->to(at::kFloat).item<float>();
    qa.is_static = true;
    qa.s_scale = s;
    qa.s_inv = 1.0f / s;
  }
  at::Tensor sx = at::empty({p.M}, x.options().dtype(at::kFloat));
  qa.sx = sx.data_ptr<float>();
  at::Tensor abuf, abs_buf, sums;
  if (kind == kI16) {
    abuf = at::empty({p.M, p.lda}, x.options().dtype(at::kShort));
    qa.q16 = abuf.data_ptr<int16_t>();
  } else {
    // AMX reads whole 16-row tiles: the rows past M are zeros
    const int64_t rows = amx ? cdiv(p.M, 16) * 16 : p.M;
    abuf = at::empty({rows, p.lda}, x.options().dtype(at::kChar));
    qa.tiled = amx;
    if (rows > p.M) abuf.narrow(0, rows - 16, 16).zero_();  // the last 16-row tile block
    qa.q8 = abuf.data_ptr<int8_t>();
  }
  if (kind == kSign) {
    abs_buf = at::empty({p.M, p.lda}, x.options().dtype(at::kByte));
    qa.qabs = abs_buf.data_ptr<uint8_t>();
  }
  if (kind == kW4) {
    sums = at::empty({p.M, p.G}, x.options().dtype(at::kInt));
    qa.asum = sums.data_ptr<int32_t>();
  }
  quantize(qa, p.M, isa);
  p.a8 = qa.q8;
  p.aabs = qa.qabs;
  p.a16 = qa.q16;
  p.sx = qa.sx;
  p.asum = qa.asum;
  run_tasks(p, kind, isa);
  return y;
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                       int64_t group_size) {
  return act_linear(x, w, scales, bias, act_scale, group_size, false);
}

at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                       int64_t group_size) {
  return act_linear(x, w, scales, bias, act_scale, group_size, true);
}

// weight-only strategy by M: <= 2 rows: fused dequant-FMA kernels (no dequantized copy);
// <= 128: per-block dequantization + an AVX2 fp32 GEMM; above: dequantize + at::mm
constexpr int64_t kWeightOnlySmallM = 2;
constexpr int64_t kWeightOnlyMidM = 128;

// Zero points that are all whole numbers: the small-M kernels subtract them in int32, and
// AMX-BF16 puts q - z into the bf16 codes. Others take the dequantizing path (exact float z).
bool whole_numbers(const float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<float>(static_cast<int32_t>(z[i])) != z[i]) return false;  // |z| < 2^31
  return true;
}

at::Tensor wo_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales_,
                     const std::optional<at::Tensor>& zeros_, const std::optional<at::Tensor>& bias,
                     int64_t group_size, bool int4) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const at::Tensor scales = scales_.contiguous();
  Problem p;
  at::Tensor bkeep = setup_weight(p, x, w, scales, bias, group_size, int4);
  at::Tensor zeros;
  if (zeros_.has_value() && zeros_->defined()) {
    zeros = zeros_->contiguous();
    TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kFloat,
                "kquant cpu: zeros must be float32 like scales");
    p.zeros = zeros.data_ptr<float>();
  }
  p.wo_zero = int4 ? 8 : 0;
  p.zfold = !zeros.defined() || whole_numbers(p.zeros, zeros.numel());
  const Isa isa = active_isa();
#if KQ_X86
  if (isa == Isa::Amx && kquant::cpu_has_amx_bf16() && p.M >= kAmxWoMinM) {
    at::Tensor y = at::empty({p.M, p.N}, x.options());
    if (p.N == 0) return y;
    p.y = y.data_ptr();
    p.yt = out_type(x.scalar_type());
    p.ldx = p.nblk * (int4 ? 8 : 4);  // K padded to 64
    // 1024 rows at a time: the three bf16 parts of x (6 bytes per element) stay bounded
    constexpr int64_t kRows = 1024;
    for (int64_t r0 = 0; r0 < p.M; r0 += kRows) {
      Problem q = p;
      q.M = std::min(kRows, p.M - r0);
      q.y = static_cast<char*>(y.data_ptr()) + r0 * p.N * y.element_size();
      const auto hold = split_x_bf16(q, static_cast<const char*>(x.data_ptr()) + r0 * p.Kp * x.element_size(), p.yt);
      run_tasks(q, int4 ? kAmxWo4 : kAmxWo8, isa);
    }
    return y;
  }
#endif
  if (p.M > kWeightOnlyMidM) {
    // large M: dequantize ~8 MiB of channels at a time into W^T and let at::mm
    // (multi-threaded, the best fp32 GEMM on the machine) do the work
    at::Tensor xf = x.to(at::kFloat);
    at::Tensor res = at::empty({p.M, p.N}, xf.options());
    const int64_t kb = p.nblk * (int4 ? 8 : 4);
    const int64_t nbt = cdiv(p.N, kNB);
    const int64_t blk = std::max<int64_t>(1, (int64_t(1) << 21) / (kb * kNB));
    at::Tensor wt = at::empty({kb, std::min(nbt, blk) * kNB}, xf.options());
    float* wd = wt.data_ptr<float>();
    const int64_t ld = wt.size(1);
    for (int64_t b0 = 0; b0 < nbt; b0 += blk) {
      const int64_t b1 = std::min(nbt, b0 + blk);
      const int64_t n0 = b0 * kNB, n1 = std::min(p.N, b1 * kNB);
      at::parallel_for(b0, b1, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t nb = r0; nb < r1; ++nb) {
          const int nv = static_cast<int>(std::min<int64_t>(kNB, p.N - nb * kNB));
#if KQ_X86
          if (isa != Isa::Scalar) { dq_block_avx2(p, int4, nb, nv, wd + (nb - b0) * kNB, ld); continue; }
#endif
          dq_block_scalar(p, int4, nb, nv, wd + (nb - b0) * kNB, ld);
        }
      });
      res.narrow(1, n0, n1 - n0).copy_(at::mm(xf, wt.narrow(0, 0, p.Kp).narrow(1, 0, n1 - n0)));
    }
    if (p.bias) res.add_(bkeep);
    return res.to(x.scalar_type());
  }
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  if (p.M == 0 || p.N == 0) return y;
  p.y = y.data_ptr();
  p.yt = out_type(x.scalar_type());
  p.ldx = p.nblk * (int4 ? 8 : 4);
  at::Tensor xf = at::zeros({p.M, p.ldx}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, p.Kp).copy_(x);
  p.xf = xf.data_ptr<float>();
  run_tasks(p, p.M <= kWeightOnlySmallM && p.zfold ? (int4 ? 11 : 10) : (int4 ? 13 : 12), isa);
  return y;
}

at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                        int64_t group_size) {
  return wo_linear(x, w, scales, zeros, bias, group_size, false);
}

at::Tensor w4a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                        int64_t group_size) {
  return wo_linear(x, w, scales, zeros, bias, group_size, true);
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x_) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M, 1}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  QuantArgs qa{x.data_ptr(), out_type(x.scalar_type()), K, false, 1.f, 1.f, q.data_ptr<int8_t>(), nullptr, nullptr,
               K, s.data_ptr<float>(), nullptr, 1, K};
  quantize(qa, M, active_isa());
  return {q, s};
}

// int8 [M, K] x int8 [N, K] -> int32 [M, N]. Operands may hold -128, so AMX or the int16
// path (both exact for all int8) is used; b is blocked on the fly (K padded to 64).
at::Tensor int8_mm(const at::Tensor& a_, const at::Tensor& b_) {
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && a_.scalar_type() == at::kChar && b_.scalar_type() == at::kChar &&
                  a_.size(1) == b_.size(1),
              "kquant cpu: int8_mm needs int8 [M, K] and [N, K], got ", a_.sizes(), " and ", b_.sizes());
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  at::Tensor y = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  Problem p;
  p.M = M; p.N = N; p.Kp = K; p.G = 1; p.gsz = K;
  p.nblk = cdiv(K, 64) * 16;
  p.lda = p.nblk * 4;
  const Isa isa = active_isa();
  const bool amx = isa == Isa::Amx && M >= kAmxMinM;
  const int64_t nbt = cdiv(N, 16);
  // block b as layout 1 with vectorized ATen copies: [N, K] -> [N/16, 16, Kq, 4] -> [N/16, Kq, 16, 4]
  at::Tensor wb = at::constant_pad_nd(b, {0, p.nblk * 4 - K, 0, nbt * 16 - N}, 0)
                      .view({nbt, 16, p.nblk, 4})
                      .permute({0, 2, 1, 3})
                      .contiguous();
  const int8_t* wd = wb.data_ptr<int8_t>();
  at::Tensor ap = at::zeros({amx ? cdiv(M, 16) * 16 : M, p.lda}, a.options().dtype(amx ? at::kChar : at::kShort));
  ap.narrow(0, 0, M).narrow(1, 0, K).copy_(a);
  if (amx)  // 16 x 64 tiles, as the quantizer writes them for AMX
    ap = ap.view({ap.size(0) / 16, 16, p.lda / 64, 64}).permute({0, 2, 1, 3}).contiguous();
  p.w8 = wd;
  if (amx) p.a8 = ap.data_ptr<int8_t>();
  else p.a16 = ap.data_ptr<int16_t>();
  p.y = y.data_ptr();
  p.yt = OutT::I32;
  run_tasks(p, amx ? kAmx8 : kI16, isa);
  return y;
}

}  // namespace
int64_t active_isa_id() { return static_cast<int64_t>(active_isa()); }
}  // namespace kquant::cpu

TORCH_LIBRARY_FRAGMENT(kquant, m) {
  m.def("_quantize_per_token_cpu(Tensor x) -> (Tensor, Tensor)");
  m.def("_int8_mm_cpu(Tensor a, Tensor b) -> Tensor");
  m.def("_w8a8_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? bias, Tensor? act_scale, int group_size) -> Tensor");
  m.def("_w4a8_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? bias, Tensor? act_scale, int group_size) -> Tensor");
  m.def("_w8a16_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? zeros, Tensor? bias, int group_size) -> Tensor");
  m.def("_w4a16_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? zeros, Tensor? bias, int group_size) -> Tensor");
  m.def("_cpu_isa() -> int", &kquant::cpu::active_isa_id);
}

TORCH_LIBRARY_IMPL(kquant, CPU, m) {
  m.impl("_quantize_per_token_cpu", &kquant::cpu::quantize_per_token);
  m.impl("_int8_mm_cpu", &kquant::cpu::int8_mm);
  m.impl("_w8a8_linear_cpu", &kquant::cpu::w8a8_linear);
  m.impl("_w4a8_linear_cpu", &kquant::cpu::w4a8_linear);
  m.impl("_w8a16_linear_cpu", &kquant::cpu::w8a16_linear);
  m.impl("_w4a16_linear_cpu", &kquant::cpu::w4a16_linear);
}
