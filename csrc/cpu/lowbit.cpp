// The 2- and 3-bit linear ops (_w3a8, _w2a8, _w3a16, _w2a16_linear_cpu) on layouts 3 and 4
// (lowbit.h), their driver and the scalar kernels; and the 4-bit weight-only calls of a few
// rows (w4_decode, from _w4a16_linear_cpu) on the same driver's float decode kernels.
//
// Two ways to run a call (unpacked() picks one):
//  * decode kernels that read the packed codes, in tiles of one or two rows (int8 activations;
//    float activations with small whole zero points and x the scaling keeps exact), a chunk of
//    blocks at a time so that its weights stay in L2 for every tile of rows after the first;
//  * unpacked: a chunk of output channels at a time unpacked into layout 1, sized to stay in L2,
//    and run by the int8 or weight-only plan of plan.h: symmetric codes as u - z (the int8 GEMMs
//    stay exact), asymmetric weight-only codes as u with the float zero points, which the
//    weight-only kernels apply.
// Activations are prepared once per call, not per chunk.
#include "lowbit.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace kquant::cpu {

// ----------------------------------------------------------------------------- scalar kernels
namespace {

// code of channel c of block nb at k (unsigned, zero point not removed)
inline int code_at(const LowBit& lb, int64_t nb, int c, int64_t k) {
  const uint8_t* r = lb.block(nb) + (k / low_unit_k(lb.bits)) * lb.unit_bytes() + 4 * c + (k & 3);  // (row A)
  const int t = static_cast<int>((k >> 2) & 7);
  if (lb.bits == 2) return (r[0] >> (2 * (t & 3))) & 3;
  if (lb.bits == 4) return (r[0] >> (4 * (t & 1))) & 15;
  if (t < 6) return (r[32 * (t >> 1)] >> (3 * (t & 1))) & 7;
  return (r[32 * (t - 6)] >> 6) | (((r[64] >> t) & 1) << 2);
}

// y of rows [0, M) x channel n: the operation order of the AVX2 kernels (lowbit.h)
void low_channel_scalar(const Problem& p, const LowBit& lb, bool a8, int64_t n) {
  const int64_t nb = n / kBlockN, uk = low_unit_k(lb.bits);
  const int c = static_cast<int>(n % kBlockN);
  float field[32];  // 2^(p - 7) for the field bit p of k (period 32)
  for (int k = 0; k < 32; ++k) field[k] = std::ldexp(1.0f, low_field_bit(lb.bits, k) - 7);
  for (int64_t m = 0; m < p.M; ++m) {
    float f = 0.0f;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t u0 = g * lb.per_group, u1 = std::min(u0 + lb.per_group, lb.units);
      const float s = p.sw[n * p.G + g];
      if (a8) {
        const int8_t* a = p.a8 + m * p.lda;
        int32_t acc = 0;
        for (int64_t k = u0 * uk; k < u1 * uk; ++k) acc += code_at(lb, nb, c, k) * a[k];
        f = std::fma(float(acc - lb.zero * p.asum[m * p.G + g]), s, f);
      } else {
        const float* x = p.xf + m * p.ldx;  // scaled by 2^(7 - p)
        const float z = p.zeros ? p.zeros[n * p.G + g] : float(lb.zero);
        float acc[kLowChains] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t u = u0; u < u1; ++u)
          for (int i = 0; i < uk; ++i) {
            const int64_t k = u * uk + low_order_k(lb.bits, i);
            const float wv = (float(code_at(lb, nb, c, k)) - z) * field[k & 31];  // exact
            acc[i % kLowChains] = std::fma(x[k], wv, acc[i % kLowChains]);
          }
        f = std::fma((acc[0] + acc[1]) + (acc[2] + acc[3]), s, f);
      }
    }
    float v = f;
    if (a8) v = v * p.sx[m];
    if (p.bias) v = v + p.bias[n];
    store_f(p.y, p.yt, m * p.N + n, v);
  }
}

// 4-bit weights, float activations (lowbit.h): chains per lane half h and field q
void low4_channel_scalar(const Problem& p, const LowBit& lb, int64_t n) {
  const int64_t nb = n / kBlockN;
  const int c = static_cast<int>(n % kBlockN);
  const float field[4] = {0x1p-7f, 0x1p-3f, 0x1p1f, 0x1p5f};  // 2^(p - 7) for p = 4 q
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.xf + m * p.ldx;  // scaled, at low4_slot
    float f = 0.0f;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t u0 = g * lb.per_group, u1 = std::min(u0 + lb.per_group, lb.units);
      const float z = p.zeros ? p.zeros[n * p.G + g] : float(lb.zero);
      float acc[2][4] = {};
      for (int64_t u = u0; u < u1; ++u)
        for (int h = 0; h < 2; ++h)
          for (int q = 0; q < 4; ++q) {
            const int r = 2 * h + (q >> 1) + 4 * (q & 1);
            const float wv = (float(code_at(lb, nb, c, 8 * u + r)) - z) * field[q];  // exact
            acc[h][q] = std::fma(x[8 * u + low4_slot(r)], wv, acc[h][q]);
          }
      const float half0 = (acc[0][0] + acc[0][1]) + (acc[0][2] + acc[0][3]);
      const float half1 = (acc[1][0] + acc[1][1]) + (acc[1][2] + acc[1][3]);
      f = std::fma(half0 + half1, p.sw[n * p.G + g], f);
    }
    float v = f;
    if (p.bias) v = v + p.bias[n];
    store_f(p.y, p.yt, m * p.N + n, v);
  }
}

}  // namespace

void low_task_scalar(const Problem& p, const LowBit& lb, bool a8, int64_t nb0, int64_t nb1) {
  for (int64_t n = nb0 * kBlockN; n < std::min(p.N, nb1 * kBlockN); ++n) {
    if (lb.bits == 4) low4_channel_scalar(p, lb, n);
    else low_channel_scalar(p, lb, a8, n);
  }
}

void low_unpack_scalar(const LowBit& lb, int64_t nb, int sub, int8_t* dst) {
  const int64_t kpad = lb.units * low_unit_k(lb.bits);
  for (int64_t k = 0; k < kpad; ++k)
    for (int c = 0; c < kBlockN; ++c)
      dst[kW8Row * (k >> 2) + 4 * c + (k & 3)] = static_cast<int8_t>(code_at(lb, nb, c, k) - sub);
}

// ----------------------------------------------------------------------------- driver
namespace {

// Which kernels run a call. The decode kernels unpack each weight once per pair of rows, from
// L2 after the first pair; measured on AVX2 they beat the unpacked layout-1 GEMMs at every M for
// int8 activations (those fold every group in fp32) and up to a few hundred rows for float ones
// (at::mm on dequantized slabs, above). The AMX tiles take over from a few rows.
constexpr int64_t kAmxUnpackMinM = 8;     // int8 activations on AMX-INT8 tiles
constexpr int64_t kWoAmxUnpackMinM = 16;  // float activations on AMX-BF16 tiles (plan.cpp's kAmxBf16MinM)
constexpr int64_t kWoDecodeMaxM = 256;   // 2/3-bit float activations, AVX-512 level
// Float activations at the scalar and AVX2 levels, 2- to 4-bit: the decode kernels up to this
// many rows, WoBlock's panels (after an in-cache unpack for 2/3 bits; plan.cpp) beyond. The
// decode kernels stay near 23 GMAC/s (one AVX2 core) from two rows on; the panels pass them
// from about 12 rows (bench/RESULTS.md). Calls the decode kernels do not take (zero points
// that are not small whole numbers, x the scaling would not keep exact) run unpacked. 4-bit at
// the AVX-512 and AMX levels keeps its own kernels (the one-row GEMV, AMX-BF16 tiles).
constexpr int64_t kAvx2DecodeMaxM = 8;
// Problems under ~2M MACs stay on the calling thread (as plan.cpp's)
constexpr int64_t kSerialMacs = int64_t(1) << 21;

inline bool use_avx2(Isa isa) { return KQ_X86 && isa != Isa::Scalar; }

void low_task(Isa isa, const Problem& p, const LowBit& lb, bool a8, int64_t nb0, int64_t nb1) {
#if KQ_X86
  if (use_avx2(isa)) return low_task_avx2(p, lb, a8, nb0, nb1);
#endif
  low_task_scalar(p, lb, a8, nb0, nb1);
}

// Whether x * 2^e is exact for |e| <= 7 for all n values of x (lowbit.h): none NaN or infinite,
// none of magnitude 2^120 or more, none but zeros below 2^-119
bool scalable(const float* x, int64_t n) {
  int32_t bad = 0;  // on the bits, which vectorizes: |x| >= 2^120 (NaN, Inf too), 0 < |x| < 2^-119
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7FFFFFFF;
    bad |= (b >= ((127 + 120) << 23)) | ((b > 0) & (b < ((127 - 119) << 23)));
  }
  return !bad;
}

// The decode kernels over all channels, 4 blocks per task. Float activations that the scaling
// would not keep exact (scalable) are left to the caller: returns false, y untouched.
bool run_decode(Problem& p, const LowBit& lb, bool a8, Isa isa, const at::Tensor& x,
                const std::optional<at::Tensor>& act_scale) {
  Plan pl;
  pl.isa = isa;
  pl.acts = a8 ? Acts::Int8AndSums : Acts::Fp32Padded;
  const ActBuffers acts = a8 ? quantize_acts(pl, p, x, act_scale) : float_acts(pl, p, x);
  if (!a8) {  // x[k] * 2^(7 - p) for the field bit p of k's codes (exact)
    float* xf = acts.x.data_ptr<float>();
    if (!scalable(xf, p.M * p.ldx)) return false;
    float scale[32];
    for (int k = 0; k < 32; ++k) scale[k] = std::ldexp(1.0f, 7 - low_field_bit(lb.bits, k));
    if (lb.bits == 4) {  // and each unit's 8 values put in low4_slot order
      for (int64_t i = 0; i < p.M * p.ldx; i += 8) {
        float t[8];
        for (int r = 0; r < 8; ++r) t[low4_slot(r)] = xf[i + r] * scale[r];
        std::memcpy(xf + i, t, sizeof(t));
      }
    } else {
      for (int64_t i = 0; i < p.M * p.ldx; ++i) xf[i] *= scale[i & 31];  // ldx: a multiple of 64
    }
  }
  const int64_t nbt = cdiv(p.N, kBlockN), tasks = cdiv(nbt, 4);
  const int64_t grain = std::max<int64_t>(1, kSerialMacs / std::max<int64_t>(1, 4 * kBlockN * p.Kp * p.M));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    low_task(isa, p, lb, a8, 4 * t0, std::min(nbt, 4 * t1));
  });
  return true;
}

// Channels [n0, n0 + nc) (n0 a multiple of 16) of lb as layout 1 at dst, codes minus sub
void unpack_chunk(Isa isa, const LowBit& lb, int64_t n0, int64_t nc, int sub, int8_t* dst, int64_t kq) {
  const int64_t b0 = n0 / kBlockN, b1 = b0 + cdiv(nc, kBlockN);
  for (int64_t nb = b0; nb < b1; ++nb) {
    int8_t* d = dst + ((nb - b0) >> 1) * kq * kW8Row + ((nb - b0) & 1) * 32;
#if KQ_X86
    if (use_avx2(isa)) {
      low_unpack_avx2(lb, nb, sub, d);
      continue;
    }
#endif
    low_unpack_scalar(lb, nb, sub, d);
  }
  if ((b1 - b0) & 1)  // the unused half of the last 16-channel block
    for (int64_t q = 0; q < kq; ++q) std::memset(dst + ((b1 - b0) >> 1) * kq * kW8Row + q * kW8Row + 32, 0, 32);
}

// More rows: chunks of channels unpacked into layout 1 (p: the layout-1 problem of all channels,
// activations prepared), each run by the plan with its outputs gathered into y
void run_chunks(const Plan& pl, const Problem& p, const LowBit& lb, int sub, Isa isa) {
  const int64_t kq = p.kblocks, elem = p.yt == OutT::F32 ? 4 : 2;
  // each thread gets chunks; at::mm multiplies one big slab at a time across all threads
  const bool slab = pl.kind == Kind::WoDequantMm;
  // unpacked layout-1 weights of a chunk in half of L2 while the chunk's rows run
  int64_t nc = std::max<int64_t>(16, active_caches().l2 / 2 / (kq * 4) / 16 * 16);
  if (slab) nc = std::max<int64_t>(16, pl.blocks_per_task * kBlockN / 16 * 16);
  else nc = std::min(nc, cdiv(cdiv(p.N, at::get_num_threads()), 16) * 16);
  const int64_t chunks = cdiv(p.N, nc);
  auto one = [&](int64_t ci, std::vector<int8_t>& wbuf, std::vector<char>& ybuf) {
    const int64_t n0 = ci * nc, n = std::min(nc, p.N - n0);
    int8_t* w = scratch(wbuf, cdiv(n, 16) * kq * kW8Row);
    unpack_chunk(isa, lb, n0, n, sub, w, kq);
    char* y = scratch(ybuf, p.M * n * elem);
    Problem q = p;
    q.N = n;
    q.w8 = w;
    q.sw = p.sw + n0 * p.G;
    q.zeros = p.zeros ? p.zeros + n0 * p.G : nullptr;
    q.bias = p.bias ? p.bias + n0 : nullptr;
    q.y = y;
    run(pl, q);  // within a parallel region: on this thread
    for (int64_t m = 0; m < p.M; ++m)
      std::memcpy(static_cast<char*>(p.y) + (m * p.N + n0) * elem, y + m * n * elem, n * elem);
  };
  if (slab) {
    std::vector<int8_t> wbuf;
    std::vector<char> ybuf;
    for (int64_t ci = 0; ci < chunks; ++ci) one(ci, wbuf, ybuf);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    thread_local std::vector<int8_t> wbuf;
    thread_local std::vector<char> ybuf;
    for (int64_t ci = c0; ci < c1; ++ci) one(ci, wbuf, ybuf);
  });
}

// Zero points the decode kernels take: whole numbers small enough that 2^16 + z 2^(p - 7) is exact
bool small_whole(const float* z, int64_t n) {
  int32_t bad = 0;  // one branch-free pass, which vectorizes (the 4-bit decode calls check each call)
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(z[i]);
    bad |= !(a <= 1024.0f) | ((a + 0x1p23f) - 0x1p23f != a);  // rounded to a whole number: unchanged
  }
  return !bad;
}

// Whether a call runs on unpacked layout-1 weights (path 0: the faster; 1: the decode kernels
// where they can, 2: unpacked). Zero points that are not small whole numbers always do, and so
// do float activations that the decode kernels' scaling would not keep exact (run_decode).
bool unpacked(const Problem& p, bool a8, Isa isa, bool zeros_ok, int64_t path) {
  if (!zeros_ok) return true;
  if (path != 0) return path == 2;
  if (a8) return isa == Isa::Amx && p.M >= kAmxUnpackMinM;
  return (isa == Isa::Amx && kquant::cpu_has_amx_bf16() && p.M >= kWoAmxUnpackMinM) ||
         p.M > (isa > Isa::Avx2 ? kWoDecodeMaxM : kAvx2DecodeMaxM);
}

template <int Bits, bool A8>
at::Tensor low_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales_,
                      const std::optional<at::Tensor>& zeros_, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& act_scale, int64_t path) {
  Problem p;
  const LinearTensors t = setup_linear_common(p, x_, scales_, bias);
  const int64_t kpad = cdiv(p.Kp, 64) * 64, uk = low_unit_k(Bits);
  LowBit lb;
  lb.bits = Bits;
  lb.units = kpad / uk;
  lb.per_group = p.G > 1 ? p.gsz / uk : lb.units;
  lb.zero = 1 << (Bits - 1);
  const int64_t rows = lb.units * low_unit_rows(Bits), width = kBlockN;
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) == cdiv(p.N, width) &&
                  w.size(1) == rows && w.size(2) == width && w.size(3) == 4,
              "kquant cpu: ", Bits, "-bit weight must be in layout ", Bits == 2 ? kLayoutInt2 : kLayoutInt3,
              ", uint8 [", cdiv(p.N, width), ", ", rows, ", ", width, ", 4] for N=", p.N, " K=", p.Kp, ", got ",
              w.scalar_type(), " ", w.sizes());
  lb.w = w.data_ptr<uint8_t>();
  at::Tensor zeros;
  if (!A8 && zeros_.has_value() && zeros_->defined()) {
    zeros = zeros_->contiguous();
    TORCH_CHECK(zeros.sizes() == t.scales.sizes() && zeros.scalar_type() == at::kFloat,
                "kquant cpu: zeros must be float32 like scales ", t.scales.sizes(), ", got ", zeros.scalar_type(),
                " ", zeros.sizes());
    p.zeros = zeros.data_ptr<float>();
  }
  if (p.M == 0 || p.N == 0) return t.y;
  const Isa isa = active_isa();
  p.kblocks = kpad / 4;  // the k-quads of layout 1 (the activations' padded K)
  p.lda = kpad;
  TORCH_CHECK(path >= 0 && path <= 2, "kquant cpu: path must be 0 (auto), 1 (decode) or 2 (unpacked), got ", path);
  if (!unpacked(p, A8, isa, !p.zeros || small_whole(p.zeros, zeros.numel()), path) &&
      run_decode(p, lb, A8, isa, t.x, act_scale))
    return t.y;
  // layout 1 of u - z (symmetric) or of u with the zero points applied by the kernels
  const int sub = p.zeros ? 0 : lb.zero;
  p.whole_zeros = !p.zeros || whole_numbers(p.zeros, zeros.numel());
  const Plan pl = plan(A8 ? Op::QuantActLinear : Op::WeightOnlyLinear, p, isa);
  if (A8) {
    const ActBuffers acts = quantize_acts(pl, p, t.x, act_scale);
    run_chunks(pl, p, lb, sub, isa);
    return t.y;
  }
  for (int64_t r0 = 0; r0 < p.M; r0 += pl.rows_per_call) {
    Problem q = p;
    q.M = std::min(pl.rows_per_call, p.M - r0);
    q.y = static_cast<char*>(p.y) + r0 * p.N * t.y.element_size();
    const ActBuffers acts = float_acts(pl, q, q.M == p.M ? t.x : t.x.narrow(0, r0, q.M));
    run_chunks(pl, q, lb, sub, isa);
  }
  return t.y;
}

}  // namespace

bool w4_decode(Problem& p, const at::Tensor& x, int64_t path) {
  const Isa isa = active_isa();
  if (path == 2 || (path == 0 && (isa > Isa::Avx2 || p.M > kAvx2DecodeMaxM))) return false;
  if (p.zeros && !small_whole(p.zeros, p.N * p.G)) return false;
  LowBit lb;
  lb.bits = 4;
  lb.w = p.w4;
  lb.units = p.kblocks;  // k-octets
  lb.per_group = p.G > 1 ? p.gsz / low_unit_k(4) : lb.units;
  lb.zero = 8;
  return run_decode(p, lb, false, isa, x, std::nullopt);
}

namespace {

// the op schemas of the int8 / weight-only linears (group_size: the scales' columns decide;
// path: see unpacked())
template <int Bits>
at::Tensor a8_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale, int64_t,
                 int64_t path) {
  return low_linear<Bits, true>(x, w, scales, std::nullopt, bias, act_scale, path);
}

template <int Bits>
at::Tensor a16_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t,
                  int64_t path) {
  return low_linear<Bits, false>(x, w, scales, zeros, bias, std::nullopt, path);
}

}  // namespace
}  // namespace kquant::cpu

TORCH_LIBRARY_FRAGMENT(kquant, m) {
  m.def("_w3a8_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? bias, Tensor? act_scale, int group_size, "
        "int path=0) -> Tensor");
  m.def("_w2a8_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? bias, Tensor? act_scale, int group_size, "
        "int path=0) -> Tensor");
  m.def("_w3a16_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? zeros, Tensor? bias, int group_size, "
        "int path=0) -> Tensor");
  m.def("_w2a16_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? zeros, Tensor? bias, int group_size, "
        "int path=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(kquant, CPU, m) {
  m.impl("_w3a8_linear_cpu", &kquant::cpu::a8_op<3>);
  m.impl("_w2a8_linear_cpu", &kquant::cpu::a8_op<2>);
  m.impl("_w3a16_linear_cpu", &kquant::cpu::a16_op<3>);
  m.impl("_w2a16_linear_cpu", &kquant::cpu::a16_op<2>);
}
