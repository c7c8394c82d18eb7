// int8 tensor-core GEMM: C[M, N] = A[M, K] (int8, row-major) x B[N, K]^T with
//   mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (sm_80+),
// a 4-stage cp.async pipeline into XOR-swizzled shared memory, ldmatrix for the
// fragments, and a fused epilogue:
//   int8_mm:   int32 out
//   per-channel: y = (float(acc) * sw[n]) * sx[m] + bias[n]
//   grouped:   every K-group is summed exactly in int32, then folded into fp32 with
//              sw[n, g]; y = accf * sx[m] + bias[n]
// B is int8 [N, K] (W8A8) or canonical packed int4 [N, K/2] (W4A8, low nibble = even k,
// value = nibble - 8) unpacked to int8 in registers with byte permutes.
#include "kq_cuda.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace kq {
namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 4, THREADS = 256, GROUP_M = 8;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills (out-of-range rows / k)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 4 nibbles (one per byte, 0..15) -> 4 signed bytes nibble - 8:
// x ^ 8 is the 4-bit two's complement of nibble - 8; bit 3 set -> fill the high nibble
__device__ __forceinline__ uint32_t nib_to_s8(uint32_t x) {
  const uint32_t t = x ^ 0x08080808u;
  return t | ((t & 0x08080808u) * 0x1Eu);
}

// Smem byte offsets. A / int8 B rows are 64 bytes (4 x 16-byte chunks): chunk ^= (row>>1)&3
// keeps the 8 rows one ldmatrix phase reads on 8 distinct 16-byte bank groups.
__device__ __forceinline__ int off64(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }
// packed int4 B rows are 32 bytes (2 chunks): chunk ^= (row>>2)&1 spreads rows n and n+4
__device__ __forceinline__ int off32(int row, int chunk) { return row * 32 + ((chunk ^ ((row >> 2) & 1)) << 4); }

template <int WBITS, bool GROUPED>
__global__ void __launch_bounds__(THREADS, GROUPED ? 1 : 2) gemm_i8_kernel(const GemmParams p) {
  constexpr int A_STAGE = BM * BK;                // bytes
  constexpr int B_STAGE = BN * BK * WBITS / 8;    // bytes
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sB = smem + STAGES * A_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;  // 2 x 4 warps, 64 x 32 each
  const int g = lane >> 2, tig = lane & 3;

  // grouped raster: GROUP_M row-tiles share the B tiles they read while in L2
  const int num_m = (p.M + BM - 1) / BM, num_n = (p.N + BN - 1) / BN;
  const int pid = blockIdx.x;
  const int in_group = GROUP_M * num_n;
  const int first_m = (pid / in_group) * GROUP_M;
  const int size_m = min(num_m - first_m, GROUP_M);
  const int pid_m = first_m + (pid % in_group) % size_m;
  const int pid_n = (pid % in_group) / size_m;
  const int m0 = pid_m * BM, n0 = pid_n * BN;

  const int K = p.K;
  const int KT = (K + BK - 1) / BK;
  const int64_t b_row_bytes = WBITS == 8 ? K : K / 2;

  auto load_tile = [&](int kt, int stage) {
    const uint32_t a_base = smem_u32(sA + stage * A_STAGE);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * THREADS;
      const int row = idx >> 2, ch = idx & 3;
      const int gk = kt * BK + ch * 16;
      const int grow = m0 + row;
      const bool ok = grow < p.M && gk < K;
      const int8_t* src = ok ? p.A + (int64_t)grow * K + gk : p.A;
      cp_async16(a_base + off64(row, ch), src, ok);
    }
    const uint32_t b_base = smem_u32(sB + stage * B_STAGE);
    if constexpr (WBITS == 8) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int idx = tid + i * THREADS;
        const int row = idx >> 2, ch = idx & 3;
        const int gk = kt * BK + ch * 16;
        const int grow = n0 + row;
        const bool ok = grow < p.N && gk < K;
        const uint8_t* src = ok ? p.B + (int64_t)grow * b_row_bytes + gk : p.B;
        cp_async16(b_base + off64(row, ch), src, ok);
      }
    } else {
      const int row = tid >> 1, ch = tid & 1;
      const int gk = kt * BK + ch * 32;  // k of the chunk's first nibble (K % 32 == 0)
      const int grow = n0 + row;
      const bool ok = grow < p.N && gk < K;
      const uint8_t* src = ok ? p.B + (int64_t)grow * b_row_bytes + gk / 2 : p.B;
      cp_async16(b_base + off32(row, ch), src, ok);
    }
  };

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  float accf[GROUPED ? 4 : 1][4][4];
  if constexpr (GROUPED) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) accf[i][j][e] = 0.f;
  }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt visible to all; stage (kt-1)%STAGES free for reuse
    {
      const int nk = kt + STAGES - 1;
      if (nk < KT) load_tile(nk, nk % STAGES);
      cp_async_commit();
    }
    const int stage = kt % STAGES;
    const uint8_t* a_st = sA + stage * A_STAGE;
    const uint8_t* b_st = sB + stage * B_STAGE;
#pragma unroll
    for (int ks = 0; ks < BK / 32; ++ks) {
      uint32_t af[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = warp_m * 64 + i * 16 + (lane & 15);
        const int ch = ks * 2 + (lane >> 4);
        ldmatrix_x4(af[i], smem_u32(a_st + off64(row, ch)));
      }
      uint32_t bf[4][2];
      if constexpr (WBITS == 8) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int row = warp_n * 32 + jj * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int ch = ks * 2 + ((lane >> 3) & 1);
          uint32_t r[4];
          ldmatrix_x4(r, smem_u32(b_st + off64(row, ch)));
          bf[2 * jj][0] = r[0];
          bf[2 * jj][1] = r[1];
          bf[2 * jj + 1][0] = r[2];
          bf[2 * jj + 1][1] = r[3];
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = warp_n * 32 + j * 8 + g;
          const uint8_t* base = b_st + off32(row, ks);
          // bytes tig*2, tig*2+1 hold k = tig*4..+3; bytes 8+tig*2.. hold k = 16+tig*4..+3
          const uint32_t w = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(base + tig * 2)) |
                             (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(base + 8 + tig * 2)) << 16);
          const uint32_t lo = nib_to_s8(w & 0x0F0F0F0Fu);         // k 0, 2, 16, 18 (+tig*4)
          const uint32_t hi = nib_to_s8((w >> 4) & 0x0F0F0F0Fu);  // k 1, 3, 17, 19
          bf[j][0] = __byte_perm(lo, hi, 0x5140);  // k 0, 1, 2, 3
          bf[j][1] = __byte_perm(lo, hi, 0x7362);  // k 16, 17, 18, 19
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], af[i], bf[j]);

      if constexpr (GROUPED) {
        const int kk = kt * BK + ks * 32;
        if (kk < K && (kk + 32) % p.group == 0) {  // a K-group ends: fold it into fp32
          const int grp = kk / p.group;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int n = n0 + warp_n * 32 + j * 8 + tig * 2 + e;
              const float s = n < p.N ? __ldg(p.sw + (int64_t)n * p.G + grp) : 0.f;
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                accf[i][j][e] = fmaf(static_cast<float>(acc[i][j][e]), s, accf[i][j][e]);
                accf[i][j][e + 2] = fmaf(static_cast<float>(acc[i][j][e + 2]), s, accf[i][j][e + 2]);
                acc[i][j][e] = 0;
                acc[i][j][e + 2] = 0;
              }
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing may be in flight when the block exits

  // ------------------------------------------------------------------ epilogue
  const bool pair_ok = (p.N & 1) == 0;  // (row*N + even col) stays 2-element aligned
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_m * 64 + i * 16 + g + h * 8;
      if (row >= p.M) continue;
      const float sxr = p.sx != nullptr ? p.sx[row] : 1.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = n0 + warp_n * 32 + j * 8 + tig * 2;
        if (col >= p.N) continue;
        const bool two = col + 1 < p.N;
        const int64_t idx = (int64_t)row * p.N + col;
        if (p.out_kind == KIND_I32) {
          int* o = static_cast<int*>(p.out);
          if (two && pair_ok) {
            *reinterpret_cast<int2*>(o + idx) = make_int2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
          } else {
            o[idx] = acc[i][j][2 * h];
            if (two) o[idx + 1] = acc[i][j][2 * h + 1];
          }
          continue;
        }
        float v[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = two ? col + e : col;
          float y;
          if constexpr (GROUPED) {
            y = __fmul_rn(accf[i][j][2 * h + e], sxr);
          } else {
            y = __fmul_rn(__fmul_rn(static_cast<float>(acc[i][j][2 * h + e]), p.sw[n]), sxr);
          }
          if (p.bias != nullptr) y = __fadd_rn(y, p.bias[n]);
          v[e] = y;
        }
        if (two && pair_ok) {
          store2_kind(p.out, p.out_kind, idx, v[0], v[1]);
        } else {
          store1_kind(p.out, p.out_kind, idx, v[0]);
          if (two) store1_kind(p.out, p.out_kind, idx + 1, v[1]);
        }
      }
    }
  }
}

template <int WBITS, bool GROUPED>
void launch_gemm(const GemmParams& p, cudaStream_t stream) {
  constexpr int smem = STAGES * (BM * BK + BN * BK * WBITS / 8);
  auto kernel = gemm_i8_kernel<WBITS, GROUPED>;
  set_smem_limit_once(kernel, smem);
  const int64_t blocks = (int64_t)((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "kquant CUDA GEMM: problem too large");
  kernel<<<static_cast<unsigned>(blocks), THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The sm_90a wgmma kernel is opt-in (KQUANT_CUDA_WGMMA=1): it is exact, but slower than the
// mma.sync kernel on an H100 (bench/RESULTS.md). When asked for, it is used on compute capability 9.0 once
// it has reproduced the mma.sync kernel's exact int32 result on a small problem on this
// device (a wrong descriptor layout would give wrong numbers, never a crash: its shared
// memory reads stay inside the tile).
bool use_wgmma(int dev, cudaStream_t stream) {
  static std::mutex mu;
  static int state[256] = {};  // 0 unknown, 1 on, 2 off
  if (dev < 0 || dev >= 256) return false;
  const char* env = std::getenv("KQUANT_CUDA_WGMMA");
  if (env == nullptr || env[0] != '1') return false;
  std::lock_guard<std::mutex> lock(mu);
  if (state[dev] != 0) return state[dev] == 1;
  const auto* prop = at::cuda::getDeviceProperties(dev);
  if (prop->major != 9 || prop->minor != 0) {
    state[dev] = 2;
    return false;
  }
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &cap));
  if (cap != cudaStreamCaptureStatusNone) return false;  // no synchronizing self-check inside a graph capture
  if (!wgmma_compiled(dev)) {
    state[dev] = 2;
    return false;
  }
  // self-check: fixed pseudo-random int8 data (no global RNG use), ragged M/N/K edges
  const int M = 200, N = 136, K = 336;
  std::vector<int8_t> host((M + N) * K);
  uint32_t r = 12345u;
  for (auto& v : host) {
    r = r * 1664525u + 1013904223u;
    v = static_cast<int8_t>(static_cast<int>((r >> 16) % 255u) - 127);
  }
  auto cpu = at::from_blob(host.data(), {M + N, K}, at::TensorOptions().dtype(at::kChar));
  auto both = cpu.to(at::TensorOptions().device(at::kCUDA, dev), /*non_blocking=*/false, /*copy=*/true);
  auto a = both.narrow(0, 0, M).contiguous(), b = both.narrow(0, M, N).contiguous();
  auto o1 = at::full({M, N}, -1, a.options().dtype(at::kInt)), o2 = at::full({M, N}, -2, a.options().dtype(at::kInt));
  GemmParams p1{a.data_ptr<int8_t>(), reinterpret_cast<const uint8_t*>(b.data_ptr()), nullptr, nullptr, nullptr,
                o1.data_ptr(), M, N, K, 1, K, KIND_I32};
  GemmParams p2 = p1;
  p2.out = o2.data_ptr();
  launch_gemm<8, false>(p1, stream);
  launch_wgmma_i8(p2, stream);
  const bool same = at::equal(o1, o2);
  state[dev] = same ? 1 : 2;
  if (!same)
    TORCH_WARN("kquant: the sm_90a wgmma int8 GEMM did not reproduce the mma.sync result on device ", dev,
               "; using the mma.sync kernel");
  return same;
}

void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "kquant CUDA: ", name,
              " must be 16-byte aligned");
}

at::Tensor act_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                      int64_t group_size, int bits) {
  const char* op = bits == 8 ? "w8a8_linear" : "w4a8_linear";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D CUDA tensor");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  TORCH_CHECK(qweight.is_cuda() && qweight.is_contiguous() && qweight.dim() == 2 && qweight.size(0) == N,
              op, ": qweight must be a contiguous [N, ...] CUDA tensor");
  if (bits == 8) {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == K && K % 16 == 0, op,
                ": needs int8 qweight [N, K] with K % 16 == 0");
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(1) * 2 == K && K % 32 == 0, op,
                ": needs packed uint8 qweight [N, K/2] with K % 32 == 0");
  }
  TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == at::kFloat && scales.is_contiguous(), op,
              ": scales must be contiguous float32");
  const bool grouped = G > 1;
  if (grouped) {
    TORCH_CHECK((group_size == 32 || group_size == 64 || group_size == 128) && K == G * group_size, op,
                ": group_size ", group_size, " does not match K=", K, " and ", G, " groups");
  }
  TORCH_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 30) && K < (int64_t{1} << 30), op, ": shape too large");
  check_aligned(qweight, "qweight");
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  auto [q, sx] = quantize_per_token_cuda(x, act_scale);
  check_aligned(q, "quantized activations");
  at::Tensor bias_f;
  if (bias.has_value()) {
    bias_f = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.is_cuda() && bias_f.numel() == N, op, ": bias must have N elements");
  }
  GemmParams p{q.data_ptr<int8_t>(), reinterpret_cast<const uint8_t*>(qweight.data_ptr()), sx.data_ptr<float>(),
               scales.data_ptr<float>(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr(),
               static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(G),
               grouped ? static_cast<int>(group_size) : static_cast<int>(K), elem_kind(x)};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (bits == 8) {
    if (grouped) launch_gemm<8, true>(p, stream);
    else if (use_wgmma(x.get_device(), stream)) launch_wgmma_i8(p, stream);
    else launch_gemm<8, false>(p, stream);
  } else {
    if (grouped) launch_gemm<4, true>(p, stream); else launch_gemm<4, false>(p, stream);
  }
  return out;
}

}  // namespace

bool wgmma_enabled(int64_t device) {
  const at::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return use_wgmma(static_cast<int>(device), at::cuda::getCurrentCUDAStream());
}

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && a.dim() == 2 && b.dim() == 2 && a.is_contiguous() &&
                  b.is_contiguous() && a.scalar_type() == at::kChar && b.scalar_type() == at::kChar,
              "int8_mm: a and b must be contiguous 2-D int8 CUDA tensors");
  const at::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(b.size(1) == K, "int8_mm: a [M, K] and b [N, K] must share K");
  TORCH_CHECK(K % 16 == 0, "int8_mm: the CUDA kernel needs K % 16 == 0, got K=", K);
  TORCH_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 30) && K < (int64_t{1} << 30), "int8_mm: shape too large");
  auto out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  check_aligned(a, "a");
  check_aligned(b, "b");
  GemmParams p{a.data_ptr<int8_t>(), reinterpret_cast<const uint8_t*>(b.data_ptr()), nullptr, nullptr, nullptr,
               out.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1,
               static_cast<int>(K), KIND_I32};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (use_wgmma(a.get_device(), stream)) launch_wgmma_i8(p, stream);
  else launch_gemm<8, false>(p, stream);
  return out;
}

at::Tensor w8a8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                            int64_t group_size) {
  return act_linear(x, qweight, scales, bias, act_scale, group_size, 8);
}

at::Tensor w4a8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                            int64_t group_size) {
  return act_linear(x, qweight, scales, bias, act_scale, group_size, 4);
}

}  // namespace kq
