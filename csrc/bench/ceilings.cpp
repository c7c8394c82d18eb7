// Machine ceilings for bench/ (not part of the kquant package: bench/ceilings.py builds
// this file on demand as its own extension): the int8 multiply-add peak of each exact AVX2
// instruction sequence the kernels use (register-only loops, no memory traffic), the AMX
// peak (tdpbssd alone) and the AMX kernel's own tile sequence from L1, the AVX2 fp32 FMA
// peak (the weight-only kernels' and fp32 GEMM's instruction), and the read bandwidth of a
// buffer. The empty asm statements keep the compiler from hoisting
// loop-invariant multiplies out of the loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <chrono>
#include <cstring>

#include "cpu/amx.h"

namespace kquant::bench {
namespace {

using namespace kquant::cpu;

#if KQ_X86
#define KQ_OPAQUE(v) asm volatile("" : "+x"(v))

// returns int8 MACs performed
template <int KIND>
KQ_AVX2 inline __m256i step(__m256i acc, __m256i a, __m256i b, __m256i ones) {
  if constexpr (KIND == 0)  // int16 operands: vpmaddwd + vpaddd, 16 MACs
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
  else if constexpr (KIND == 1)  // sign trick: vpsignb + vpmaddubsw + vpmaddwd + vpaddd, 32 MACs
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(b, a)), ones));
  else if constexpr (KIND == 2)  // W4A8: vpmaddubsw + vpaddw (int16 accumulate), 32 MACs
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(a, b));
  else  // fbgemm-style (inexact for full 8-bit operands): vpmaddubsw + vpmaddwd + vpaddd
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
}

// six independent chains with distinct operands (no common subexpressions), in registers
template <int KIND>
KQ_AVX2 double peak_kind(int64_t iters) {
  __m256i c0 = _mm256_set1_epi32(0), c1 = _mm256_set1_epi32(1), c2 = _mm256_set1_epi32(2);
  __m256i c3 = _mm256_set1_epi32(3), c4 = _mm256_set1_epi32(4), c5 = _mm256_set1_epi32(5);
  __m256i a0 = _mm256_set1_epi8(3), a1 = _mm256_set1_epi8(4), a2 = _mm256_set1_epi8(5);
  __m256i a3 = _mm256_set1_epi8(6), a4 = _mm256_set1_epi8(7), a5 = _mm256_set1_epi8(9);
  __m256i b = _mm256_set1_epi8(-5);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t it = 0; it < iters; ++it) {
    KQ_OPAQUE(a0); KQ_OPAQUE(a1); KQ_OPAQUE(a2); KQ_OPAQUE(a3); KQ_OPAQUE(a4); KQ_OPAQUE(a5); KQ_OPAQUE(b);
    c0 = step<KIND>(c0, a0, b, ones);
    c1 = step<KIND>(c1, a1, b, ones);
    c2 = step<KIND>(c2, a2, b, ones);
    c3 = step<KIND>(c3, a3, b, ones);
    c4 = step<KIND>(c4, a4, b, ones);
    c5 = step<KIND>(c5, a5, b, ones);
  }
  KQ_OPAQUE(c0); KQ_OPAQUE(c1); KQ_OPAQUE(c2); KQ_OPAQUE(c3); KQ_OPAQUE(c4); KQ_OPAQUE(c5);
  return double(iters) * 6 * (KIND == 0 ? 16 : 32);
}

// kind 8: fp32 vfmadd231ps on ymm, twelve independent accumulator chains in registers
// (enough to cover a 4-5 cycle FMA latency on two FMA pipes: 8-10 in flight), returns fp32
// multiply-adds (8 per instruction). The accumulators only grow (by 0.5 per step), so no
// denormals or infinities; the opaque operands keep the compiler from folding the steps.
KQ_AVX2 double fma_loop(int64_t iters) {
  __m256 c0 = _mm256_set1_ps(0.f), c1 = _mm256_set1_ps(1.f), c2 = _mm256_set1_ps(2.f);
  __m256 c3 = _mm256_set1_ps(3.f), c4 = _mm256_set1_ps(4.f), c5 = _mm256_set1_ps(5.f);
  __m256 c6 = _mm256_set1_ps(6.f), c7 = _mm256_set1_ps(7.f), c8 = _mm256_set1_ps(8.f);
  __m256 c9 = _mm256_set1_ps(9.f), c10 = _mm256_set1_ps(10.f), c11 = _mm256_set1_ps(11.f);
  __m256 a = _mm256_set1_ps(0.5f), b = _mm256_set1_ps(1.0f);
  for (int64_t it = 0; it < iters; ++it) {
    KQ_OPAQUE(a); KQ_OPAQUE(b);
    c0 = _mm256_fmadd_ps(a, b, c0);
    c1 = _mm256_fmadd_ps(a, b, c1);
    c2 = _mm256_fmadd_ps(a, b, c2);
    c3 = _mm256_fmadd_ps(a, b, c3);
    c4 = _mm256_fmadd_ps(a, b, c4);
    c5 = _mm256_fmadd_ps(a, b, c5);
    c6 = _mm256_fmadd_ps(a, b, c6);
    c7 = _mm256_fmadd_ps(a, b, c7);
    c8 = _mm256_fmadd_ps(a, b, c8);
    c9 = _mm256_fmadd_ps(a, b, c9);
    c10 = _mm256_fmadd_ps(a, b, c10);
    c11 = _mm256_fmadd_ps(a, b, c11);
  }
  KQ_OPAQUE(c0); KQ_OPAQUE(c1); KQ_OPAQUE(c2); KQ_OPAQUE(c3); KQ_OPAQUE(c4); KQ_OPAQUE(c5);
  KQ_OPAQUE(c6); KQ_OPAQUE(c7); KQ_OPAQUE(c8); KQ_OPAQUE(c9); KQ_OPAQUE(c10); KQ_OPAQUE(c11);
  return double(iters) * 12 * 8;
}

double peak_loop(int kind, int64_t iters) {
  switch (kind) {
    case 0: return peak_kind<0>(iters);
    case 1: return peak_kind<1>(iters);
    case 2: return peak_kind<2>(iters);
    case 8: return fma_loop(iters);
    default: return peak_kind<3>(iters);
  }
}

// AMX. kind 5: tdpbssd alone at full width (C tiles of 16 rows x 16 channels), four
// independent C chains on register tiles: the machine's int8 peak. kind 7: the same with
// 8-channel tiles (half the MACs per instruction: what full-width tiles gain). kind 6: what
// the per-channel W8A8 kernel issues per 512-k chunk of a 32-row x 32-channel block
// (task_amx_per_channel in csrc/cpu/amx_int8.cpp): load the 4 C tiles, 8 steps of {2 A + 2 B
// tile loads, 4 tdpbssd}, store the 4 C tiles, every operand in L1.
KQ_AMX double amx_loop(int kind, int64_t iters) {
  const int bw = kind == 7 ? 32 : 64;  // B and C bytes per row
  alignas(64) static thread_local int8_t a[2][1024], b[2][1024];
  alignas(64) static thread_local int32_t c[4][256];
  std::memset(a, 1, sizeof(a));
  std::memset(b, 1, sizeof(b));
  std::memset(c, 0, sizeof(c));
  amx_config(bw);
  _tile_loadd(4, a[0], 64);
  _tile_loadd(5, a[1], 64);
  _tile_loadd(6, b[0], bw);
  _tile_loadd(7, b[1], bw);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  int64_t steps = 0;
  for (int64_t it = 0; it < iters; it += 8) {
    if (kind == 6) {
      _tile_loadd(0, c[0], bw);
      _tile_loadd(1, c[1], bw);
      _tile_loadd(2, c[2], bw);
      _tile_loadd(3, c[3], bw);
    }
    for (int s = 0; s < 8; ++s) {
      if (kind == 6) {
        _tile_loadd(4, a[0], 64);
        _tile_loadd(5, a[1], 64);
        _tile_loadd(6, b[0], bw);
        _tile_loadd(7, b[1], bw);
      }
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    if (kind == 6) {
      _tile_stored(0, c[0], bw);
      _tile_stored(1, c[1], bw);
      _tile_stored(2, c[2], bw);
      _tile_stored(3, c[3], bw);
    }
    steps += 8;
  }
  _tile_stored(0, c[0], bw);
  _tile_release();
  return double(steps) * 4 * 16 * (bw / 4) * 64;
}

KQ_AVX2 int64_t read_loop(const uint8_t* p, int64_t n) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    s0 = _mm256_xor_si256(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    s1 = _mm256_xor_si256(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    s2 = _mm256_xor_si256(s2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    s3 = _mm256_xor_si256(s3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  s0 = _mm256_xor_si256(_mm256_xor_si256(s0, s1), _mm256_xor_si256(s2, s3));
  alignas(32) int64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), s0);
  return t[0] ^ t[1] ^ t[2] ^ t[3];
}
#endif

// kind 0..3, 5-7: int8 GMAC/s of the instruction sequence on all threads; kind 8: fp32
// FMA multiply-adds (G/s) of vfmadd231ps ymm on all threads; kind 4: GB/s reading `buf` (one slice per thread), repeated `iters` times.
double ceiling(int64_t kind, int64_t iters, const std::optional<at::Tensor>& buf) {
#if KQ_X86
  TORCH_CHECK(kquant::cpu_has_avx2_fma(), "ceilings need AVX2");
  const int64_t nt = at::get_num_threads();
  std::vector<double> work(nt, 0.0);
  int64_t sink = 0;
  const auto t0 = std::chrono::steady_clock::now();
  if (kind >= 5 && kind <= 7) {
    TORCH_CHECK(kquant::cpu_has_amx_int8(), "the AMX ceilings need AMX-INT8");
    at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) work[i] = amx_loop(static_cast<int>(kind), iters);
    });
  } else if (kind < 4 || kind == 8) {
    at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) work[i] = peak_loop(static_cast<int>(kind), iters);
    });
  } else {
    TORCH_CHECK(kind == 4, "kquant ceilings: unknown kind ", kind, " (0-8)");
    TORCH_CHECK(buf.has_value() && buf->is_contiguous(), "kind 4 needs a contiguous buffer");
    const uint8_t* p = static_cast<const uint8_t*>(buf->data_ptr());
    const int64_t n = buf->nbytes(), per = (n / nt) & ~int64_t(127);
    std::vector<int64_t> sinks(nt, 0);
    at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        for (int64_t r = 0; r < iters; ++r) {
          sinks[i] ^= read_loop(p + i * per, per);
          work[i] += double(per);
        }
    });
    for (auto s : sinks) sink ^= s;
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0;
  for (double w : work) total += w;
  return total / sec / 1e9 + (sink == 0x5eed ? 1e-12 : 0.0);
#else
  (void)kind; (void)iters; (void)buf;
  TORCH_CHECK(false, "ceilings need x86-64 AVX2");
  return 0;
#endif
}

}  // namespace
}  // namespace kquant::bench

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ceiling", &kquant::bench::ceiling, py::arg("kind"), py::arg("iters"), py::arg("buf") = py::none(),
        "kind 0-3, 5-7: int8 GMAC/s of an instruction sequence on all threads; kind 8: fp32 FMA G/s (8 per "
        "vfmadd231ps ymm); kind 4: GB/s reading buf");
}
