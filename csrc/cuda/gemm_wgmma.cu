// sm_90a int8 GEMM on the warpgroup tensor-core instruction (wgmma.mma_async m64n128k32 s8):
// 128x128x64 tiles, two warpgroups (each 64 rows x 128 columns), a 4-stage cp.async pipeline
// into the canonical no-swizzle K-major layout of 8x16-byte core matrices, and the same fused
// per-channel epilogue as gemm_i8.cu. Used for int8 weights with per-channel scales (and
// int8_mm) on compute capability 9.0; gemm_i8.cu checks it once per device against the
// mma.sync kernel before trusting it. Other targets compile an empty body (never launched:
// wgmma_compiled() probes for the sm_90a code on the device).
#include "kq_cuda.cuh"

#include <mutex>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KQ_WGMMA 1
#endif

namespace kq {
namespace {

constexpr int WBM = 128, WBN = 128, WBK = 64, WSTAGES = 4, WTHREADS = 256;
constexpr int W_STAGE = WBM * WBK;  // bytes per operand per stage (A and B alike)

#ifdef KQ_WGMMA
constexpr int WGROUP_M = 8;

// byte offset of (row, k byte) in a 64-byte-K tile: core matrices of 8 rows x 16 bytes
// (128 contiguous bytes); along K 128 bytes apart (LBO), 8-row groups 512 bytes apart (SBO)
__device__ __forceinline__ int core_off(int row, int kb) {
  return (row >> 3) * 512 + (kb >> 4) * 128 + (row & 7) * 16 + (kb & 15);
}

__device__ __forceinline__ uint32_t smem_u32w(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16w(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// shared-memory matrix descriptor: start, LBO, SBO (>> 4), no swizzle, base offset 0
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// cp.async writes are generic-proxy writes; wgmma reads through the async proxy
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// D += A * B^T for a 64x128 tile, k = 32; A and B from shared memory through descriptors
__device__ __forceinline__ void wgmma_m64n128k32_s8(int (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}
#endif

__global__ void __launch_bounds__(WTHREADS, 2) gemm_wgmma_kernel(const GemmParams p) {
#ifdef KQ_WGMMA
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sB = smem + WSTAGES * W_STAGE;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;  // warpgroup (64-row half), warp within it
  const int g = lane >> 2, tig = lane & 3;

  const int num_m = (p.M + WBM - 1) / WBM, num_n = (p.N + WBN - 1) / WBN;
  const int pid = blockIdx.x;
  const int in_group = WGROUP_M * num_n;
  const int first_m = (pid / in_group) * WGROUP_M;
  const int size_m = min(num_m - first_m, WGROUP_M);
  const int pid_m = first_m + (pid % in_group) % size_m;
  const int pid_n = (pid % in_group) / size_m;
  const int m0 = pid_m * WBM, n0 = pid_n * WBN;
  const int K = p.K;
  const int KT = (K + WBK - 1) / WBK;

  auto load_tile = [&](int kt, int stage) {
    const uint32_t a_base = smem_u32w(sA + stage * W_STAGE), b_base = smem_u32w(sB + stage * W_STAGE);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * WTHREADS;
      const int row = idx >> 2, ch = idx & 3;
      const int gk = kt * WBK + ch * 16;
      const bool oka = m0 + row < p.M && gk < K;
      cp_async16w(a_base + core_off(row, ch * 16), oka ? p.A + (int64_t)(m0 + row) * K + gk : p.A, oka);
      const bool okb = n0 + row < p.N && gk < K;
      cp_async16w(b_base + core_off(row, ch * 16), okb ? p.B + (int64_t)(n0 + row) * K + gk : p.B, okb);
    }
  };

  int d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0;

#pragma unroll
  for (int s = 0; s < WSTAGES - 1; ++s) {
    if (s < KT) load_tile(s, s);
    cp_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_wait<WSTAGES - 2>();
    fence_proxy_async();
    __syncthreads();  // tile kt in shared memory, visible to the async proxy
    const int stage = kt % WSTAGES;
    const uint32_t a_base = smem_u32w(sA + stage * W_STAGE) + wg * (64 / 8) * 512;
    const uint32_t b_base = smem_u32w(sB + stage * W_STAGE);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < WBK / 32; ++ks)
      wgmma_m64n128k32_s8(d, make_desc(a_base + ks * 256, 128, 512), make_desc(b_base + ks * 256, 128, 512));
    wgmma_commit();
    wgmma_wait<1>();  // this warpgroup's tile kt-1 products are done
    __syncthreads();  // ... and everyone's: stage (kt-1) % WSTAGES may be refilled
    const int nk = kt + WSTAGES - 1;
    if (nk < KT) load_tile(nk, nk % WSTAGES);
    cp_commit();
  }
  wgmma_wait<0>();
  // keep the compiler from reading the accumulators before the wait (it cannot see wgmma's asynchrony)
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
  cp_wait<0>();

  const bool pair_ok = (p.N & 1) == 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = m0 + wg * 64 + wq * 16 + g + h * 8;
    if (row >= p.M) continue;
    const float sxr = p.sx != nullptr ? p.sx[row] : 1.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = n0 + j * 8 + tig * 2;
      if (col >= p.N) continue;
      const bool two = col + 1 < p.N;
      const int64_t idx = (int64_t)row * p.N + col;
      const int v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
      if (p.out_kind == KIND_I32) {
        int* o = static_cast<int*>(p.out);
        if (two && pair_ok) {
          *reinterpret_cast<int2*>(o + idx) = make_int2(v0, v1);
        } else {
          o[idx] = v0;
          if (two) o[idx + 1] = v1;
        }
        continue;
      }
      float y0 = __fmul_rn(__fmul_rn(static_cast<float>(v0), p.sw[col]), sxr);
      float y1 = two ? __fmul_rn(__fmul_rn(static_cast<float>(v1), p.sw[col + 1]), sxr) : 0.f;
      if (p.bias != nullptr) {
        y0 = __fadd_rn(y0, p.bias[col]);
        if (two) y1 = __fadd_rn(y1, p.bias[col + 1]);
      }
      if (two && pair_ok) {
        store2_kind(p.out, p.out_kind, idx, y0, y1);
      } else {
        store1_kind(p.out, p.out_kind, idx, y0);
        if (two) store1_kind(p.out, p.out_kind, idx + 1, y1);
      }
    }
  }
#endif
}

__global__ void wgmma_probe_kernel(int* out) {
#ifdef KQ_WGMMA
  *out = 1;
#else
  *out = 0;
#endif
}

}  // namespace

bool wgmma_compiled(int device) {
  static std::mutex mu;
  static int state[256] = {};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= 256) return false;
  std::lock_guard<std::mutex> lock(mu);
  if (state[device] == 0) {
    auto flag = at::zeros({1}, at::TensorOptions().device(at::kCUDA, device).dtype(at::kInt));
    wgmma_probe_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream(device)>>>(flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    state[device] = flag.item<int>() == 1 ? 1 : 2;
  }
  return state[device] == 1;
}

void launch_wgmma_i8(const GemmParams& p, cudaStream_t stream) {
  constexpr int smem = WSTAGES * 2 * W_STAGE;
  set_smem_limit_once(gemm_wgmma_kernel, smem);
  const int64_t blocks = (int64_t)((p.M + WBM - 1) / WBM) * ((p.N + WBN - 1) / WBN);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "kquant CUDA GEMM: problem too large");
  gemm_wgmma_kernel<<<static_cast<unsigned>(blocks), WTHREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kq
