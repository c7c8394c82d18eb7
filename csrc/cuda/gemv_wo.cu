// Weight-only decode GEMV (W4A16 / W8A16) for small M: y[m, n] = sum_k x[m, k] * (q[n, k] - z) * s[n, g] + bias.
//
// The weights dominate the bytes, so the kernel is built to stream them at memory speed:
// * each lane loads 16 contiguous weight bytes per load (32 int4 / 16 int8 values of one
//   row), a warp keeps R rows x NSTEP such loads in flight before using any;
// * split-K: block (bx, by) owns rows [bx*RPB, ...) and a K-slice of KS = NSTEP*WSTEP;
//   the slice of x (M <= MT rows) is converted to fp32 once into XOR-swizzled shared
//   memory so that the lanes' float4 reads are conflict-free;
// * codes become floats with the 0x4B000000 trick: float(2^23 + u) - (2^23 + zero) is exact;
//   the 16-byte chunk never straddles a group (groups are >= 32 and chunk-aligned), so each
//   chunk's partial dot product is scaled once;
// * partial sums of the slices land in a fp32 workspace; the last block of each row block
//   (counted with an atomic ticket, counters reset by that block) adds them in slice order,
//   so the result is deterministic and no second launch is needed.
#include "kq_cuda.cuh"

#include <cstdlib>
#include <map>
#include <mutex>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace kq {
namespace {

constexpr int GV_THREADS = 256, GV_WARPS = 8, NSTEP = 2;

template <int BITS>
struct GemvCfg {
  static constexpr int KPL = BITS == 4 ? 32 : 16;  // k per lane per 16-byte load
  static constexpr int U = KPL / 4;                // float4 units of x per load
  static constexpr int WSTEP = 32 * KPL;           // k per warp-wide load
  static constexpr int KS = NSTEP * WSTEP;         // k per block slice
  static constexpr int KS4 = KS / 4;
};

template <int MT>
struct RowsPerWarp {
  static constexpr int R = MT <= 4 ? 4 : 2;  // rows per warp: 4-8 loads of 16 B in flight per lane, regs for 2+ blocks/SM
};

struct GemvParams {
  const void* x;        // [M, Kp] (this launch's rows)
  const uint8_t* w;     // [N, Kp] int8 or [N, Kp/2] packed int4
  const float* scales;  // [N, G]
  const float* zeros;   // [N, G] or null
  const float* bias;    // [N] or null
  void* out;            // [M, N] (this launch's rows)
  float* ws;            // [S, M, N] when S > 1
  int* counters;        // [gridDim.x], zero on entry, left zero on exit
  int M, N, Kp, G, gs, S, loops, kind;
};

// swizzle of a lane's float4 unit: lanes sharing a bank group get different units
template <int U>
__device__ __forceinline__ int unit_swz(int lane) {
  return U == 8 ? (lane & 7) : ((lane >> 1) & 3);
}

__device__ __forceinline__ uint32_t u4get(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// byte i of v (0..255) as float(2^23 + byte)
__device__ __forceinline__ float magic_byte(uint32_t v, int i) {
  return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7540u | static_cast<uint32_t>(i)));
}

__device__ __forceinline__ uint4 ld_stream(const uint8_t* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// split-K: the last block to finish row block blockIdx.x sums the slices in order (+ bias)
__device__ __forceinline__ void splitk_finish(const GemvParams& p, int rpb) {
  __shared__ int last_flag;
  const int tid = threadIdx.x;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int ticket = atomicAdd(p.counters + blockIdx.x, 1);
    last_flag = ticket == p.S - 1;
  }
  __syncthreads();
  if (!last_flag) return;
  __threadfence();
  const int n_begin = blockIdx.x * rpb;
  for (int idx = tid; idx < rpb * p.M; idx += blockDim.x) {
    const int m = idx / rpb, n = n_begin + idx % rpb;
    if (n >= p.N) continue;
    float v = 0.f;
    for (int s = 0; s < p.S; ++s) v += __ldcg(p.ws + ((int64_t)s * p.M + m) * p.N + n);
    if (p.bias != nullptr) v += p.bias[n];
    store1_kind(p.out, p.kind, (int64_t)m * p.N + n, v);
  }
  if (tid == 0) p.counters[blockIdx.x] = 0;  // ready for the next launch on this stream
}

template <int BITS, int MT>
__global__ void __launch_bounds__(GV_THREADS) wo_gemv_kernel(const GemvParams p) {
  using C = GemvCfg<BITS>;
  constexpr int R = RowsPerWarp<MT>::R;
  constexpr int U = C::U;
  extern __shared__ float4 xs[];  // [MT][KS4] swizzled

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int k0 = blockIdx.y * C::KS;
  const int rpb = GV_WARPS * R * p.loops;  // rows per block

  // x slice -> fp32 smem (rows >= M and k >= Kp are zeros)
  for (int u = tid; u < MT * C::KS4; u += GV_THREADS) {
    const int m = u / C::KS4, F = u % C::KS4;
    const int k = k0 + 4 * F;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (m < p.M && k < p.Kp) v = load4_kind(p.x, p.kind, (int64_t)m * p.Kp + k);
    const int rem = F % (C::WSTEP / 4);
    const int c = rem % U, ln = rem / U;
    xs[m * C::KS4 + (F - c + (c ^ unit_swz<U>(ln)))] = v;
  }
  __syncthreads();

  const int64_t row_bytes = BITS == 4 ? p.Kp / 2 : p.Kp;
  const float base_off = 8388608.f + (BITS == 8 ? 128.f : 0.f);  // 2^23 (+128: int8 codes are xor 0x80)
  const int sw = unit_swz<U>(lane);

  for (int it = 0; it < p.loops; ++it) {
    const int nbase = blockIdx.x * rpb + (it * GV_WARPS + warp) * R;
    uint4 wv[R][NSTEP];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int st = 0; st < NSTEP; ++st) {
        const int n = nbase + r;
        const int k = k0 + st * C::WSTEP + lane * C::KPL;
        if (n < p.N && k < p.Kp)
          wv[r][st] = ld_stream(p.w + (int64_t)n * row_bytes + (BITS == 4 ? k / 2 : k));
        else
          wv[r][st] = make_uint4(0u, 0u, 0u, 0u);
      }

    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

#pragma unroll
    for (int st = 0; st < NSTEP; ++st) {
      const int k = k0 + st * C::WSTEP + lane * C::KPL;
      if (k >= p.Kp) continue;
      const int grp = k / p.gs;
      float scl[R], off[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int n = nbase + r;
        const int64_t si = (int64_t)min(n, p.N - 1) * p.G + grp;
        scl[r] = n < p.N ? __ldg(p.scales + si) : 0.f;
        const float z = p.zeros != nullptr ? __ldg(p.zeros + si) : (BITS == 4 ? 8.f : 0.f);
        off[r] = base_off + z;
      }
      float part[R][MT];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) part[r][m] = 0.f;
#pragma unroll
      for (int c = 0; c < U; ++c) {
        float4 xv[MT];
        const int fp = st * (C::WSTEP / 4) + lane * U + (c ^ sw);
#pragma unroll
        for (int m = 0; m < MT; ++m) xv[m] = xs[m * C::KS4 + fp];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wf[4];
          if constexpr (BITS == 4) {
            // word c/2 holds k 8*(c/2)..+7: low nibbles = even k, high = odd k
            const uint32_t word = u4get(wv[r][st], c >> 1);
            const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
            const int b = (c & 1) * 2;
            wf[0] = magic_byte(lo, b) - off[r];
            wf[1] = magic_byte(hi, b) - off[r];
            wf[2] = magic_byte(lo, b + 1) - off[r];
            wf[3] = magic_byte(hi, b + 1) - off[r];
          } else {
            const uint32_t word = u4get(wv[r][st], c) ^ 0x80808080u;
#pragma unroll
            for (int i = 0; i < 4; ++i) wf[i] = magic_byte(word, i) - off[r];
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            float a = part[r][m];
            a = fmaf(xv[m].x, wf[0], a);
            a = fmaf(xv[m].y, wf[1], a);
            a = fmaf(xv[m].z, wf[2], a);
            a = fmaf(xv[m].w, wf[3], a);
            part[r][m] = a;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(part[r][m], scl[r], acc[r][m]);
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float v = warp_sum(acc[r][m]);
        const int n = nbase + r;
        if (lane == 0 && n < p.N && m < p.M) {
          if (p.S == 1) {
            store1_kind(p.out, p.kind, (int64_t)m * p.N + n, p.bias != nullptr ? v + p.bias[n] : v);
          } else {
            p.ws[((int64_t)blockIdx.y * p.M + m) * p.N + n] = v;
          }
        }
      }
    }
  }

  if (p.S == 1) return;
  splitk_finish(p, rpb);
}

// ---------------------------------------------------------------------------------------
// Tensor-core variant for int4 weights with fp16/bf16 activations and one scale per 128 k
// (group 128, or per channel with K % 128 == 0), any M <= 16 in one pass:
//   mma.sync m16n8k16 (f32 accumulate), A = x (rows >= M are zeros), B = (nibble - zero)
//   made exact in f16/bf16 registers from the canonical bytes (prmt + lop3 magic + hsub2).
// Lane (g, tig) of a warp loads 16 canonical bytes of row n0 + g at k = kr + 32 * tig and
// uses its elements 4s..4s+3 as the mma k-slots {2tig, 2tig+1, 2tig+8, 2tig+9} of k-step s;
// its A fragment is read from the same 4 k of x, so the dot product is unchanged. A round
// of 128 k lies in one scale group: the round's fp32 partial is scaled by the column's scale.
constexpr int TC_NT = 2;                    // n-tiles (8 rows) per warp
constexpr int TC_NR = 4;                    // rounds of 128 k per block slice
constexpr int TC_KS = TC_NR * 128;          // k per block slice
constexpr int TC_ROWS = GV_WARPS * TC_NT * 8;  // rows per block
constexpr int TC_XSTRIDE = TC_KS + 8;       // x row stride in smem (16-bit elements)

template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// (lo nibble, hi nibble) of byte `b` of w as an exact 16-bit pair (value - zero):
// magic | nibble is 1024 + u (f16 0x6400) or 128 + u (bf16 0x4300); subtract magic + zero
template <bool BF16>
__device__ __forceinline__ uint32_t nib_pair(uint32_t w, uint32_t w_sh4, int b, uint32_t zz) {
  const uint32_t t = __byte_perm(w, w_sh4, static_cast<uint32_t>(b) | (static_cast<uint32_t>(4 + b) << 8));
  const uint32_t v = (t & 0x000F000Fu) | (BF16 ? 0x43004300u : 0x64006400u);
  uint32_t r;
  if constexpr (BF16) {
    const __nv_bfloat162 d = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v),
                                     *reinterpret_cast<const __nv_bfloat162*>(&zz));
    r = *reinterpret_cast<const uint32_t*>(&d);
  } else {
    const __half2 d = __hsub2(*reinterpret_cast<const __half2*>(&v), *reinterpret_cast<const __half2*>(&zz));
    r = *reinterpret_cast<const uint32_t*>(&d);
  }
  return r;
}

template <bool BF16>
__global__ void __launch_bounds__(GV_THREADS) wo_mma_kernel(const GemvParams p) {
  __shared__ __align__(16) uint16_t xs[16 * TC_XSTRIDE];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int k0 = blockIdx.y * TC_KS;

  // x slice (16-bit, as given) -> smem; rows >= M and k >= Kp are zeros
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  for (int u = tid; u < 16 * (TC_KS / 8); u += GV_THREADS) {
    const int m = u / (TC_KS / 8), c8 = u % (TC_KS / 8);
    const int k = k0 + 8 * c8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (m < p.M && k < p.Kp) v = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)m * p.Kp + k));
    *reinterpret_cast<uint4*>(xs + m * TC_XSTRIDE + 8 * c8) = v;
  }
  __syncthreads();

  const int nb = blockIdx.x * TC_ROWS + warp * (TC_NT * 8);
  const int64_t row_bytes = p.Kp / 2;
  uint4 wv[TC_NT][TC_NR];
#pragma unroll
  for (int j = 0; j < TC_NT; ++j)
#pragma unroll
    for (int r = 0; r < TC_NR; ++r) {
      const int n = nb + 8 * j + g;
      const int k = k0 + r * 128 + tig * 32;
      wv[j][r] = (n < p.N && k < p.Kp) ? ld_stream(p.w + (int64_t)n * row_bytes + k / 2)
                                       : make_uint4(0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u);
    }

  float acc[TC_NT][4];
#pragma unroll
  for (int j = 0; j < TC_NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

#pragma unroll
  for (int r = 0; r < TC_NR; ++r) {
    const int kr = k0 + r * 128;
    if (kr >= p.Kp) break;  // same for the whole warp
    const int grp = kr / p.gs;
    // A fragments of the 8 k-steps: rows g and g+8, k = r*128 + tig*32 + 4s .. +3
    uint32_t af[8][4];
#pragma unroll
    for (int st = 0; st < 8; ++st) {
      const int col = r * 128 + tig * 32 + 4 * st;
      const uint2 lo = *reinterpret_cast<const uint2*>(xs + g * TC_XSTRIDE + col);
      const uint2 hi = *reinterpret_cast<const uint2*>(xs + (g + 8) * TC_XSTRIDE + col);
      af[st][0] = lo.x;
      af[st][1] = hi.x;
      af[st][2] = lo.y;
      af[st][3] = hi.y;
    }
#pragma unroll
    for (int j = 0; j < TC_NT; ++j) {
      const int nrow = nb + 8 * j + g;  // this lane's B row
      const float z = p.zeros != nullptr ? __ldg(p.zeros + (int64_t)min(nrow, p.N - 1) * p.G + grp) : 8.f;
      uint32_t zz;
      if constexpr (BF16) {
        const __nv_bfloat162 t = __float2bfloat162_rn(128.f + z);
        zz = *reinterpret_cast<const uint32_t*>(&t);
      } else {
        const __half2 t = __float2half2_rn(1024.f + z);
        zz = *reinterpret_cast<const uint32_t*>(&t);
      }
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int st = 0; st < 8; ++st) {
        const uint32_t w = u4get(wv[j][r], st >> 1);
        const int b = (st & 1) * 2;
        mma_16816<BF16>(c, af[st], nib_pair<BF16>(w, w >> 4, b, zz), nib_pair<BF16>(w, w >> 4, b + 1, zz));
      }
      const int col = nb + 8 * j + 2 * tig;
      const float s0 = col < p.N ? __ldg(p.scales + (int64_t)col * p.G + grp) : 0.f;
      const float s1 = col + 1 < p.N ? __ldg(p.scales + (int64_t)(col + 1) * p.G + grp) : 0.f;
      acc[j][0] = fmaf(c[0], s0, acc[j][0]);
      acc[j][1] = fmaf(c[1], s1, acc[j][1]);
      acc[j][2] = fmaf(c[2], s0, acc[j][2]);
      acc[j][3] = fmaf(c[3], s1, acc[j][3]);
    }
  }

#pragma unroll
  for (int j = 0; j < TC_NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = g + (e >> 1) * 8;
      const int n = nb + 8 * j + 2 * tig + (e & 1);
      if (m >= p.M || n >= p.N) continue;
      if (p.S == 1) {
        store1_kind(p.out, p.kind, (int64_t)m * p.N + n, p.bias != nullptr ? acc[j][e] + p.bias[n] : acc[j][e]);
      } else {
        p.ws[((int64_t)blockIdx.y * p.M + m) * p.N + n] = acc[j][e];
      }
    }
  }
  if (p.S == 1) return;
  splitk_finish(p, TC_ROWS);
}

// Split-K tickets: one zeroed int buffer per (device, stream), kept zero by the kernels.
// Per stream, so concurrent launches on different streams never share counters.
int* counters_for(int64_t n, const at::Device& dev, cudaStream_t stream) {
  static std::mutex mu;
  static auto* bufs = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();  // never freed: no exit-time CUDA frees
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = (*bufs)[{dev.index(), stream}];
  if (!t.defined() || t.numel() < n)
    t = at::zeros({std::max<int64_t>(n, 4096)}, at::TensorOptions().device(dev).dtype(at::kInt));
  return t.data_ptr<int>();
}

template <int BITS, int MT>
void launch_gemv(GemvParams p, int sms, const at::Device& dev, cudaStream_t stream) {
  using C = GemvCfg<BITS>;
  constexpr int R = RowsPerWarp<MT>::R;
  const int rows_per_pass = GV_WARPS * R;
  const int S = (p.Kp + C::KS - 1) / C::KS;
  const int groups = (p.N + rows_per_pass - 1) / rows_per_pass;
  // enough blocks for ~3 per SM; beyond that, let blocks loop to reuse their x slice
  int loops = static_cast<int>(std::min<int64_t>(8, std::max<int64_t>(1, (int64_t)groups * S / (3 * sms))));
  loops = std::min(loops, groups);
  const int rpb = rows_per_pass * loops;
  const int bx = (p.N + rpb - 1) / rpb;
  p.S = S;
  p.loops = loops;
  at::Tensor ws;
  if (S > 1) {
    ws = at::empty({S, p.M, p.N}, at::TensorOptions().device(dev).dtype(at::kFloat));
    p.ws = ws.data_ptr<float>();
    p.counters = counters_for(bx, dev, stream);
  }
  constexpr int smem = MT * C::KS * 4;
  auto kernel = wo_gemv_kernel<BITS, MT>;
  set_smem_limit_once(kernel, smem);
  TORCH_CHECK(S < 65536, "kquant CUDA GEMV: K too large");
  kernel<<<dim3(bx, S), GV_THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_mma(GemvParams p, const at::Device& dev, cudaStream_t stream) {
  const int S = (p.Kp + TC_KS - 1) / TC_KS;
  const int bx = (p.N + TC_ROWS - 1) / TC_ROWS;
  TORCH_CHECK(S < 65536, "kquant CUDA GEMV: K too large");
  p.S = S;
  p.loops = 1;
  at::Tensor ws;
  if (S > 1) {
    ws = at::empty({S, p.M, p.N}, at::TensorOptions().device(dev).dtype(at::kFloat));
    p.ws = ws.data_ptr<float>();
    p.counters = counters_for(bx, dev, stream);
  }
  if (p.kind == KIND_BF16) wo_mma_kernel<true><<<dim3(bx, S), GV_THREADS, 0, stream>>>(p);
  else wo_mma_kernel<false><<<dim3(bx, S), GV_THREADS, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int BITS>
void launch_rows(GemvParams p, int sms, const at::Device& dev, cudaStream_t stream) {
  if (p.M <= 1) launch_gemv<BITS, 1>(p, sms, dev, stream);
  else if (p.M <= 2) launch_gemv<BITS, 2>(p, sms, dev, stream);
  else if (p.M <= 4) launch_gemv<BITS, 4>(p, sms, dev, stream);
  else launch_gemv<BITS, 8>(p, sms, dev, stream);
}

at::Tensor wo_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                     int64_t group_size, int bits) {
  const char* op = bits == 8 ? "w8a16_linear" : "w4a16_linear";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D CUDA tensor");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), Kp = x.size(1), N = scales.size(0), G = scales.size(1);
  TORCH_CHECK(qweight.is_cuda() && qweight.is_contiguous() && qweight.dim() == 2 && qweight.size(0) == N, op,
              ": qweight must be a contiguous [N, ...] CUDA tensor");
  if (bits == 8) {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == Kp && Kp % 16 == 0, op,
                ": needs int8 qweight [N, K] with K % 16 == 0");
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(1) * 2 == Kp && Kp % 32 == 0, op,
                ": needs packed uint8 qweight [N, K/2] with K % 32 == 0");
  }
  TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == at::kFloat && scales.is_contiguous(), op,
              ": scales must be contiguous float32");
  const int64_t gs = G == 1 ? Kp : group_size;
  TORCH_CHECK(G == 1 || ((gs == 32 || gs == 64 || gs == 128) && gs * G == Kp), op, ": group_size ", group_size,
              " does not match K=", Kp, " and ", G, " groups");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              op, ": x and qweight must be 16-byte aligned");
  TORCH_CHECK(N < (int64_t{1} << 30) && Kp < (int64_t{1} << 30) && M < (int64_t{1} << 31), op, ": shape too large");
  at::Tensor zf;
  if (zeros.has_value()) {
    zf = zeros->to(at::kFloat).contiguous();
    TORCH_CHECK(zf.is_cuda() && zf.sizes() == scales.sizes(), op, ": zeros must match scales");
  }
  at::Tensor bf;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.is_cuda() && bf.numel() == N, op, ": bias must have N elements");
  }
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const int kind = elem_kind(x);
  const size_t esz = x.element_size();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // int4, 16-bit x, one scale per 128 k: tensor cores, 16 rows of x per launch
  const char* env = std::getenv("KQUANT_CUDA_GEMV_MMA");
  const bool tc = bits == 4 && kind != KIND_F32 && gs % 128 == 0 && !(env != nullptr && env[0] == '0');
  // otherwise up to 8 rows of x per launch (the fp32 x slice lives in shared memory)
  const int rows_per_launch = tc ? 16 : 8;
  for (int64_t m0 = 0; m0 < M; m0 += rows_per_launch) {
    const int mc = static_cast<int>(std::min<int64_t>(rows_per_launch, M - m0));
    GemvParams p{static_cast<const uint8_t*>(x.data_ptr()) + m0 * Kp * esz,
                 reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
                 scales.data_ptr<float>(),
                 zf.defined() ? zf.data_ptr<float>() : nullptr,
                 bf.defined() ? bf.data_ptr<float>() : nullptr,
                 static_cast<uint8_t*>(out.data_ptr()) + m0 * N * esz,
                 nullptr, nullptr, mc, static_cast<int>(N), static_cast<int>(Kp), static_cast<int>(G),
                 static_cast<int>(gs), 1, 1, kind};
    if (tc) launch_mma(p, x.device(), stream);
    else if (bits == 8) launch_rows<8>(p, sms, x.device(), stream);
    else launch_rows<4>(p, sms, x.device(), stream);
  }
  return out;
}

}  // namespace

at::Tensor w8a16_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                             int64_t group_size) {
  return wo_linear(x, qweight, scales, zeros, bias, group_size, 8);
}

at::Tensor w4a16_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                             int64_t group_size) {
  return wo_linear(x, qweight, scales, zeros, bias, group_size, 4);
}

}  // namespace kq
