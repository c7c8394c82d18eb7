// Scalar level: portable C++ for every kernel kind of the tile loops, and the per-token
// quantizer's row routine that every level uses for the rows its vector loop leaves out.
// These functions fix the operation order the other levels reproduce: the same int32 sums,
// and for the float results the same fma chains (std::fma), lane partials and epilogue
// order as the AVX2 kernels, so KQUANT_CPU_ISA=scalar and avx2 give the same bits.
#include "tiles.h"

namespace kquant::cpu {

// ----------------------------------------------------------------------------- quantizer
void quant_row_scalar(const QuantArgs& a, int64_t m, float amax, bool nonfinite) {
  if (nonfinite) {
    poison_row(a, m);
    return;
  }
  const RowScale rs = row_scale(a, amax);
  a.sx[m] = rs.scale;
  end_row(a, m, 0, rs.inv, rs.lift, false);  // static mode finds NaN / Inf here
}

void quant_rows_scalar(const QuantArgs& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float amax = 0.0f;
    const bool nonfinite = !a.is_static && amax_tail(a, m * a.K, 0, &amax);
    quant_row_scalar(a, m, amax, nonfinite);
  }
}

// ----------------------------------------------------------------------------- kernels
void dequant_block_scalar(const Problem& p, int64_t nb, int nv, int64_t b0, int64_t b1, float* dst, int64_t ld) {
  const bool int4 = p.int4;
  const int64_t per = int4 ? 8 : 4;
  for (int c = 0; c < 8; ++c) {
    const int64_t n = nb * kBlockN + c;
    for (int64_t k = b0 * per; k < b1 * per; ++k) {
      const int64_t g = p.G > 1 ? std::min(k / p.gsz, p.G - 1) : 0;
      const float s = c < nv ? p.sw[n * p.G + g] : 0.0f;
      const float z = c < nv && p.zeros ? p.zeros[n * p.G + g] : float(p.wo_zero);
      int32_t q;
      if (int4) {
        const uint8_t v = p.w4[(nb * p.kblocks + k / 8) * 32 + 4 * c + (k & 3)];
        q = (k & 4) ? (v >> 4) : (v & 15);
      } else {
        q = w8_block(p, nb)[(k / 4) * kW8Row + 4 * c + (k & 3)];
      }
      dst[(k - b0 * per) * ld + c] = (float(q) - z) * s;
    }
  }
}

namespace {

void fgemm16_scalar(int mr, const float* x, int64_t ldx, const float* wq, int64_t K, float* f0, float* f1, bool init) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < 16; ++c) {
      float* f = (c < 8 ? f0 : f1) + 8 * r + c % 8;
      float acc = init ? 0.0f : *f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[r * ldx + k], wq[16 * k + c], acc);
      *f = acc;
    }
}

// exact int32 sums of mr rows x block nb over k-blocks [b0, b1): kind W4A8Gemm against the
// unsigned nibbles (k-octets), SignGemm int8 codes, Int16Gemm int16 codes (k-quads)
void int_sums_scalar(const Problem& p, Kind kind, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1,
                     int32_t* out) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < kBlockN; ++c) {
      int32_t s = 0;
      if (kind == Kind::W4A8Gemm) {
        const uint8_t* w = p.w4 + (nb * p.kblocks) * 32;
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
            const int32_t av =
                kind == Kind::SignGemm ? p.a8[(m + r) * p.lda + 4 * q + j] : p.a16[(m + r) * p.lda + 4 * q + j];
            s += av * w[kW8Row * q + 4 * c + j];
          }
      }
      out[8 * r + c] = s;
    }
}

// weight-only sums: the lane order and fma sequence of the AVX2 kernels (lane l sums
// k = l mod 4, then the lanes pairwise), so the results are identical
void wo_sums_scalar(const Problem& p, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1, const int32_t* z,
                    float* out) {
  for (int r = 0; r < mr; ++r) {
    const float* x = p.xf + (m + r) * p.ldx;
    for (int c = 0; c < kBlockN; ++c) {
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t b = b0; b < b1; ++b)
        for (int l = 0; l < 4; ++l) {
          if (p.int4) {
            const uint8_t v = p.w4[(nb * p.kblocks + b) * 32 + 4 * c + l];
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

// The kernel set of tiles.h in plain C++ (the one-row 4-block kernels are absent)
struct ScalarKernels {
  static void int_sums(const Problem& p, Kind kind, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1,
                       int32_t* out) {
    int_sums_scalar(p, kind, mr, m, nb, b0, b1, out);
  }
  static void wo_sums(const Problem& p, bool has_zero, int mr, int64_t m, int64_t nb, int64_t b0, int64_t b1,
                      const int32_t* z, float* out) {
    (void)has_zero;
    wo_sums_scalar(p, mr, m, nb, b0, b1, z, out);
  }
  static constexpr bool kWidens = false;
  static void widen(const Problem&, int64_t, int64_t, int64_t, int16_t*) {}
  static void int_sums_widened(const Problem&, int, int64_t, int64_t, const int16_t*, int64_t, int32_t*) {}
  static bool w8a8_gemv4(const Problem&, int64_t, int64_t, int32_t*) { return false; }
  static bool w4a8_gemv4(const Problem&, int64_t, int64_t, const int*, float*) { return false; }
  static bool wo_gemv4(const Problem&, int64_t, int64_t, const int*, float*) { return false; }
  static void dequant_block(const Problem& p, int64_t nb, int nv, int64_t b0, int64_t b1, float* dst, int64_t ld) {
    dequant_block_scalar(p, nb, nv, b0, b1, dst, ld);
  }
  static void fgemm16(int mr, const float* x, int64_t ldx, const float* wq, int64_t K, float* f0, float* f1,
                      bool init) {
    fgemm16_scalar(mr, x, ldx, wq, K, f0, f1, init);
  }
  static void w4a8_folded(const Problem& p, int mr, int64_t m, int64_t nb, const float* sT, float* f) {
    alignas(32) int32_t acc[kMaxRows * 8];
    const int64_t per_group = p.G > 1 ? p.gsz / 8 : p.kblocks;
    std::memset(f, 0, sizeof(float) * 8 * mr);
    for (int64_t g = 0; g < p.G; ++g) {
      int_sums_scalar(p, Kind::W4A8Gemm, mr, m, nb, g * per_group, p.G > 1 ? (g + 1) * per_group : p.kblocks, acc);
      for (int r = 0; r < mr; ++r)
        for (int c = 0; c < kBlockN; ++c) {
          f[8 * r + c] = std::fma(float(acc[8 * r + c] - 8 * p.asum[(m + r) * p.G + g]), sT[g * 8 + c], f[8 * r + c]);
        }
    }
  }
  static void fold_int(int mr, const int32_t* acc, const float* s, float* f) {
    for (int r = 0; r < mr; ++r)
      for (int c = 0; c < kBlockN; ++c) f[8 * r + c] = std::fma(float(acc[8 * r + c]), s[c], f[8 * r + c]);
  }
  static void fold_float(int mr, const float* acc, const float* s, float* f) {
    for (int r = 0; r < mr; ++r)
      for (int c = 0; c < kBlockN; ++c) f[8 * r + c] = std::fma(acc[8 * r + c], s[c], f[8 * r + c]);
  }
  static void epilogue_int(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const int32_t* acc,
                           const float* s, const float* b8) {
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
  static void epilogue(const Problem& p, int mr, int64_t m, int64_t n0, int nv, const float* f, const float* b8) {
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

}  // namespace

void task_scalar(const Problem& p, Kind kind, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  tile_task<ScalarKernels>(p, kind, m0, m1, nb0, nb1);
}

}  // namespace kquant::cpu
