// The tile loops of the scalar, AVX2 and AVX-512 levels: one task's rows [m0, m1) x 8-channel
// blocks [nb0, nb1), written once as templates over a kernel set and inlined into each
// level's target-attributed task function (task_scalar, task_avx2, task_avx512), so every
// level runs the same float operations in the same order.
//
// Work split of a task (tile_int_gemm; the weight-only loops are the same without K chunks):
//
//              8-channel blocks nb0 .. nb1 (n0 = 8 nb)
//            +-------+-------+-------+
//   rows m0  |  mr x |       |       |   row tiles of mr <= max_rows rows x 8 channels:
//   ..       |  8    |       |       |   int32 sums over all of K (or per weight group,
//   m1       +-------+-------+-------+   folded into fp32 with the group's scales), then
//            |       |       |       |   the epilogue writes y
//            +-------+-------+-------+
//
// Kernel set: a struct of static functions (ScalarKernels in scalar.cpp, Avx2Kernels in
// avx2.h, Avx512Kernels in avx512.cpp). Conventions: a tile is mr rows from row m (mr <=
// kMaxRows) x one 8-channel block nb; out / acc / f are [mr][8] (element 8 r + c); nv is the
// number of valid channels of the block (lanes c >= nv are computed, never stored); k-blocks
// [b0, b1) are k-quads of layout 1 (int8 weights) or k-octets of layout 2 (int4).
//
// Integer-activation GEMMs (tile_int_gemm):
//   int_sums(p, kind, mr, m, nb, b0, b1, out)   exact int32 out[8 r + c] = sum over k in
//       k-quads [b0, b1) of a[m + r][k] * w[8 nb + c][k] (int8 weights). kind SignGemm
//       reads p.a8 and p.aabs, Int16Gemm p.a16.
//   kWidens   whether the next two exist (else they are empty and never called)
//   widen(p, nb, q0, q1, dst)   layout-1 block nb / 2 (nb even: both 8-channel halves) as int16
//       for k-quads [q0, q1): dst[half][q - q0][8 channels][4 k]
//   int_sums_widened(p, mr, m, q0, w, n, out)   int_sums (Int16Gemm) against one widened half
//       w, k-quads [q0, q0 + n)
//   w8a8_gemv4(p, m, nb, out) -> bool   int_sums (SignGemm, all of K) of row m for the 4
//       blocks nb .. nb + 3 (nb a multiple of 4): out[8 j + c]. false: no such kernel
//   w4a8_folded(p, mr, m, nb, sT, f)   W4A8 over all groups, f[8 r + c] = sum over g in
//       order of fma(float(acc_g - 8 asum[m + r][g]), sT[8 g + c], .), from f = 0; sT: the
//       block's scales [G][8] (0 past N)
//   w4a8_gemv4(p, m, nb, nv4, f) -> bool   w4a8_folded of row m for the 4 blocks nb ..
//       nb + 3 (nv4[j] valid channels each): f[8 j + c]. false: no such kernel
//   fold_int(mr, acc, s, f)   f = fma(float(acc), s[c], f)   (one group's int32 sums)
//   epilogue_int(p, mr, m, n0, nv, acc, s, b8)   per channel: y = (float(acc) * s[c]) *
//       sx[m + r] + b8[c] (bias only if p.bias), rounded to p.yt; the reference's order
//   epilogue(p, mr, m, n0, nv, f, b8)   y = f * sx[m + r] + b8[c] (no sx if p.sx is null)
// Weight-only GEMMs (tile_wo_fused, tile_wo_dequant; x is p.xf, fp32):
//   wo_sums(p, has_zero, mr, m, nb, b0, b1, z, out)   fp32 out[8 r + c] = sum over k in
//       [b0, b1) of x[m + r][k] * (q - z[c]), lanes summed as (k mod 4) partials then
//       pairwise; z: int32 [8]; has_zero false: every z is 0 (the subtraction may be skipped)
//   wo_gemv4(p, m, nb, nv4, f) -> bool   row m, 4 blocks, all groups: f[8 j + c] = sum_g
//       s[n][g] * sum over k in g of x[k] * (q - z). false: no such kernel
//   fold_float(mr, acc, s, f)   f = fma(acc, s[c], f)
//   dequant_block(p, nb, nv, b0, b1, dst, ld)   k-blocks [b0, b1) of block nb as fp32
//       (q - z) * s, k-major (dst[(k - k0) ld + c])
//   fgemm16(mr, x, ldx, wq, K, f0, f1, init)   f0[8 r + c] (f1: channel 8 + c) = fma chain
//       over k < K in order of x[r][k] * wq[16 k + c], from 0 (init) or from f0 / f1
#pragma once

#include "common.h"

namespace kquant::cpu {

constexpr int kMaxRows = 8;  // largest row tile (weight-only fp32 GEMM)
constexpr int64_t kSignMaxRows = 3;    // row tile of the sign-trick GEMM
constexpr int64_t kInt16MaxRows = 4;   // row tile of the int16 GEMM (more rows spill its accumulators)
constexpr int64_t kWidenMinRows = 32;  // rows from which a task widens a block once for all its row tiles

#define KQ_TILE __attribute__((always_inline)) inline

// scales and bias of block nb's channels [n0, n0 + 8); channels past nv get 0
KQ_TILE void block_scales(const Problem& p, int64_t n0, int nv, float* s8, float* b8) {
  for (int c = 0; c < kBlockN; ++c) {
    s8[c] = c < nv ? p.sw[n0 + c] : 0.0f;
    b8[c] = p.bias && c < nv ? p.bias[n0 + c] : 0.0f;
  }
}

// valid channels of the 4 blocks from nb (0 past N)
KQ_TILE void valid4(const Problem& p, int64_t nb, int* nv4) {
  for (int j = 0; j < 4; ++j)
    nv4[j] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kBlockN, p.N - (nb + j) * kBlockN)));
}

// W8A8, W4A8 and int8_mm (kind SignGemm, Int16Gemm or W4A8Gemm)
template <class Kernels>
KQ_TILE void tile_int_gemm(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const int max_rows = kind == Kind::SignGemm ? kSignMaxRows : kInt16MaxRows;
  const int64_t per_group = p.G > 1 ? p.gsz / 4 : p.kblocks;  // k-quads per group (int8 weights)
  alignas(32) int32_t acc[kMaxRows * 8] = {};
  alignas(32) float f[kMaxRows * 8];
  alignas(32) float s8[8];  // one group's scales
  alignas(32) float s1[8];  // per-channel scales
  alignas(32) float b8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (kind == Kind::Int16Gemm && p.G == 1) {
    // K in chunks so a row tile of activations and a weight block widened to int16 stay in
    // L1 across the task's row tiles; int32 partial sums wait in a small buffer (exact).
    // Widening once per block and chunk (kernel sets with kWidens, tasks of kWidenMinRows
    // rows or more) takes vpmovsxbw out of the inner loop and reads each 64-byte layout-1
    // line once; with fewer rows the widening does not pay for itself.
    const int64_t kcq = std::max<int64_t>(1, p.kchunk);  // k-quads per chunk (plan.cpp, from L1)
    const int64_t mm = m1 - m0;
    thread_local std::vector<int32_t> part;
    thread_local std::vector<int16_t> widev;
    if (static_cast<int64_t>(part.size()) < mm * (nb1 - nb0) * 8) part.resize(mm * (nb1 - nb0) * 8);
    int16_t* wide = scratch(widev, 2 * kcq * 32);
    const bool widen = Kernels::kWidens && mm >= kWidenMinRows;
    for (int64_t q0 = 0; q0 < p.kblocks; q0 += kcq) {
      const int64_t q1 = std::min(p.kblocks, q0 + kcq);
      for (int64_t nb = nb0; nb < nb1; ++nb) {
        // both halves of a layout-1 block widened in one pass over its lines (nb0 is even)
        if (widen && (nb - nb0) % 2 == 0) Kernels::widen(p, nb, q0, q1, wide);
        const int16_t* wh = wide + ((nb - nb0) % 2) * 32 * (q1 - q0);
        for (int64_t m = m0; m < m1; m += max_rows) {
          const int mr = static_cast<int>(std::min<int64_t>(max_rows, m1 - m));
          int32_t* dst = part.data() + ((nb - nb0) * mm + (m - m0)) * 8;
          if (widen) Kernels::int_sums_widened(p, mr, m, q0, wh, q1 - q0, q0 == 0 ? dst : acc);
          else Kernels::int_sums(p, kind, mr, m, nb, q0, q1, q0 == 0 ? dst : acc);
          if (q0 != 0)
            for (int i = 0; i < 8 * mr; ++i) dst[i] += acc[i];
        }
      }
    }
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = nb * kBlockN;
      const int nv = static_cast<int>(std::min<int64_t>(kBlockN, p.N - n0));
      const int32_t* src = part.data() + (nb - nb0) * mm * 8;
      if (p.yt == OutT::I32) {
        int32_t* y = static_cast<int32_t*>(p.y);
        for (int64_t m = m0; m < m1; ++m) std::memcpy(y + m * p.N + n0, src + (m - m0) * 8, nv * sizeof(int32_t));
        continue;
      }
      block_scales(p, n0, nv, s1, b8);
      for (int64_t m = m0; m < m1; m += max_rows) {
        const int mr = static_cast<int>(std::min<int64_t>(max_rows, m1 - m));
        Kernels::epilogue_int(p, mr, m, n0, nv, src + (m - m0) * 8, s1, b8);
      }
    }
    return;
  }
  int64_t nb_rest = nb0;  // first block the general loop below handles
  if (kind == Kind::SignGemm && p.G == 1 && p.yt != OutT::I32) {
    // one activation row at a time, 4 channel blocks per pass (same int32 sums)
    alignas(32) int32_t acc4[32];
    for (; nb_rest + 4 <= nb1; nb_rest += 4)
      for (int64_t m = m0; m < m1; ++m) {
        if (!Kernels::w8a8_gemv4(p, m, nb_rest, acc4)) goto general;
        for (int j = 0; j < 4; ++j) {
          const int64_t n0 = (nb_rest + j) * kBlockN;
          const int nv = static_cast<int>(std::min<int64_t>(kBlockN, p.N - n0));
          block_scales(p, n0, nv, s1, b8);
          Kernels::epilogue_int(p, 1, m, n0, nv, acc4 + 8 * j, s1, b8);
        }
      }
  }
  if (kind == Kind::W4A8Gemm && m1 - m0 == 1) {
    alignas(32) float f4[32];
    int nv4[4];
    for (; nb_rest + 4 <= nb1; nb_rest += 4) {
      valid4(p, nb_rest, nv4);
      if (!Kernels::w4a8_gemv4(p, m0, nb_rest, nv4, f4)) goto general;
      for (int j = 0; j < 4; ++j) {
        const int64_t n0 = (nb_rest + j) * kBlockN;
        for (int c = 0; c < kBlockN; ++c) b8[c] = p.bias && c < nv4[j] ? p.bias[n0 + c] : 0.0f;
        Kernels::epilogue(p, 1, m0, n0, nv4[j], f4 + 8 * j, b8);
      }
    }
  }
general:
  thread_local std::vector<float> stv;
  float* sT = nullptr;
  for (int64_t nb = nb_rest; nb < nb1; ++nb) {
    const int64_t n0 = nb * kBlockN;
    const int nv = static_cast<int>(std::min<int64_t>(kBlockN, p.N - n0));
    if (p.bias)
      for (int c = 0; c < nv; ++c) b8[c] = p.bias[n0 + c];
    if (p.G == 1 && p.sw)
      for (int c = 0; c < kBlockN; ++c) s1[c] = c < nv ? p.sw[n0 + c] : 0.0f;
    if (kind == Kind::W4A8Gemm) {  // the block's scales [G][8], read by every row tile
      sT = scratch(stv, p.G * 8);
      for (int64_t g = 0; g < p.G; ++g)
        for (int c = 0; c < kBlockN; ++c) sT[g * 8 + c] = c < nv ? p.sw[(n0 + c) * p.G + g] : 0.0f;
    }
    for (int64_t m = m0; m < m1; m += max_rows) {
      const int mr = static_cast<int>(std::min<int64_t>(max_rows, m1 - m));
      if (p.yt == OutT::I32) {  // int8_mm: raw int32
        Kernels::int_sums(p, kind, mr, m, nb, 0, p.kblocks, acc);
        int32_t* y = static_cast<int32_t*>(p.y);
        for (int r = 0; r < mr; ++r) std::memcpy(y + (m + r) * p.N + n0, acc + 8 * r, nv * sizeof(int32_t));
        continue;
      }
      if (kind == Kind::W4A8Gemm) {
        Kernels::w4a8_folded(p, mr, m, nb, sT, f);
        Kernels::epilogue(p, mr, m, n0, nv, f, b8);
        continue;
      }
      if (p.G == 1) {  // per channel: fma(acc, s, 0) == acc * s, skip the fold buffer
        Kernels::int_sums(p, kind, mr, m, nb, 0, p.kblocks, acc);
        Kernels::epilogue_int(p, mr, m, n0, nv, acc, s1, b8);
        continue;
      }
      std::memset(f, 0, sizeof(f));
      for (int64_t g = 0; g < p.G; ++g) {
        Kernels::int_sums(p, kind, mr, m, nb, g * per_group, p.G > 1 ? (g + 1) * per_group : p.kblocks, acc);
        for (int c = 0; c < kBlockN; ++c) s8[c] = c < nv ? p.sw[(n0 + c) * p.G + g] : 0.0f;
        Kernels::fold_int(mr, acc, s8, f);
      }
      Kernels::epilogue(p, mr, m, n0, nv, f, b8);
    }
  }
}

// Weight-only, 1-2 rows with whole zero points (kind WoFused): the weights are converted
// inside the FMA loop, no dequantized copy. One row takes 4 channel blocks per pass where
// the kernel set has such a kernel.
template <class Kernels>
KQ_TILE void tile_wo_fused(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  constexpr int max_rows = 2;
  const int64_t per_group = p.G > 1 ? p.gsz / (p.int4 ? 8 : 4) : p.kblocks;
  const bool has_zero = p.zeros != nullptr || p.wo_zero != 0;
  alignas(32) float acc[kMaxRows * 8];
  alignas(32) float f[kMaxRows * 8];
  alignas(32) float s8[8];
  alignas(32) float b8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  alignas(32) int32_t z8[8];
  int64_t nb_rest = nb0;
  if (m1 - m0 == 1) {
    alignas(64) float f4[32];
    int nv4[4];
    for (; nb_rest + 4 <= nb1; nb_rest += 4) {
      valid4(p, nb_rest, nv4);
      if (!Kernels::wo_gemv4(p, m0, nb_rest, nv4, f4)) break;
      for (int j = 0; j < 4; ++j) {
        const int64_t n0 = (nb_rest + j) * kBlockN;
        for (int c = 0; c < kBlockN; ++c) b8[c] = p.bias && c < nv4[j] ? p.bias[n0 + c] : 0.0f;
        Kernels::epilogue(p, 1, m0, n0, nv4[j], f4 + 8 * j, b8);
      }
    }
  }
  for (int64_t nb = nb_rest; nb < nb1; ++nb) {
    const int64_t n0 = nb * kBlockN;
    const int nv = static_cast<int>(std::min<int64_t>(kBlockN, p.N - n0));
    if (p.bias)
      for (int c = 0; c < nv; ++c) b8[c] = p.bias[n0 + c];
    for (int64_t m = m0; m < m1; m += max_rows) {
      const int mr = static_cast<int>(std::min<int64_t>(max_rows, m1 - m));
      std::memset(f, 0, sizeof(f));
      for (int64_t g = 0; g < p.G; ++g) {
        for (int c = 0; c < kBlockN; ++c) {
          const bool ok = c < nv;
          s8[c] = ok ? p.sw[(n0 + c) * p.G + g] : 0.0f;
          z8[c] = p.zeros ? (ok ? static_cast<int32_t>(p.zeros[(n0 + c) * p.G + g]) : 0) : p.wo_zero;
        }
        Kernels::wo_sums(p, has_zero, mr, m, nb, g * per_group, p.G > 1 ? (g + 1) * per_group : p.kblocks, z8, acc);
        Kernels::fold_float(mr, acc, s8, f);
      }
      Kernels::epilogue(p, mr, m, n0, nv, f, b8);
    }
  }
}

// Weight-only, moderate M (kind WoBlock): K in chunks of p.kchunk k-blocks; per chunk, each
// pair of 8-channel blocks is dequantized once into a [k][16] panel that stays in L1, and
// every row tile of the task runs over it (fgemm16), the fp32 sums carried from chunk to
// chunk in a [blocks][rows][8] buffer. Each output is one fma chain over k in order, so the
// chunk size (the cache sizes) never changes the bits.
template <class Kernels>
KQ_TILE void tile_wo_dequant(const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  constexpr int max_rows = 6;
  const int64_t per = p.int4 ? 8 : 4, mm = m1 - m0;
  const int64_t chunk = std::max<int64_t>(1, p.kchunk);
  thread_local std::vector<float> wbuf, fbuf;
  float* wq = scratch(wbuf, chunk * per * 16);
  float* f = scratch(fbuf, (nb1 - nb0 + 1) * mm * 8);  // + 1: the idle half of an odd last pair
  for (int64_t b0 = 0; b0 < p.kblocks; b0 += chunk) {
    const int64_t b1 = std::min(p.kblocks, b0 + chunk), kn = (b1 - b0) * per;
    for (int64_t nb = nb0; nb < nb1; nb += 2) {
      for (int h = 0; h < 2; ++h) {
        const int nv = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kBlockN, p.N - (nb + h) * kBlockN)));
        if (nb + h < nb1) Kernels::dequant_block(p, nb + h, nv, b0, b1, wq + 8 * h, 16);
        else
          for (int64_t k = 0; k < kn; ++k) std::memset(wq + 16 * k + 8, 0, 8 * sizeof(float));
      }
      float* f0 = f + (nb - nb0) * mm * 8;
      // row tiles of even height (16 rows: 6, 5, 5, not 6, 6, 4): 10 or more FMA chains each
      const int64_t tiles = cdiv(mm, max_rows);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = m0 + mm * t / tiles;
        const int mr = static_cast<int>(m0 + mm * (t + 1) / tiles - m);
        Kernels::fgemm16(mr, p.xf + m * p.ldx + b0 * per, p.ldx, wq, kn, f0 + (m - m0) * 8, f0 + (mm + m - m0) * 8,
                         b0 == 0);
      }
    }
  }
  alignas(32) float b8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int64_t n0 = nb * kBlockN;
    const int nv = static_cast<int>(std::min<int64_t>(kBlockN, p.N - n0));
    if (p.bias)
      for (int c = 0; c < nv; ++c) b8[c] = p.bias[n0 + c];
    for (int64_t m = m0; m < m1; m += kMaxRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, m1 - m));
      Kernels::epilogue(p, mr, m, n0, nv, f + ((nb - nb0) * mm + m - m0) * 8, b8);
    }
  }
}

// One task of a tile kind, the body of each level's task function
template <class Kernels>
KQ_TILE void tile_task(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  if (kind == Kind::WoBlock) tile_wo_dequant<Kernels>(p, m0, m1, nb0, nb1);
  else if (kind == Kind::WoFused) tile_wo_fused<Kernels>(p, m0, m1, nb0, nb1);
  else tile_int_gemm<Kernels>(p, kind, m0, m1, nb0, nb1);
}

#undef KQ_TILE

}  // namespace kquant::cpu
