// Shared pieces of kquant's CUDA kernels: host entry points (registered as private
// torch ops in register.cu) and small device helpers. Kernels need sm_80+ (cp.async,
// ldmatrix, int8 mma.sync); setup.py builds sm_80 and sm_90a machine code.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/core/Tensor.h>  // not ATen.h: every .cu parses its headers 3 times (host + 2 archs)
#include <c10/cuda/CUDAException.h>

namespace kq {

// output / activation element kinds, chosen at run time (uniform branches in the
// epilogues keep template instantiations, and so compile time, small)
enum ElemKind : int { KIND_I32 = 0, KIND_F32 = 1, KIND_F16 = 2, KIND_BF16 = 3 };

int elem_kind(const at::Tensor& t);  // float32/float16/bfloat16 -> KIND_*

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& act_scale);
at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b);
at::Tensor w8a8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                            int64_t group_size);
at::Tensor w4a8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                            int64_t group_size);
at::Tensor w8a16_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                             int64_t group_size);
at::Tensor w4a16_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                             int64_t group_size);

// Arguments of the int8 GEMM kernels (gemm_i8.cu: mma.sync, gemm_wgmma.cu: sm_90a wgmma)
struct GemmParams {
  const int8_t* A;    // [M, K]
  const uint8_t* B;   // [N, K] int8 or [N, K/2] packed int4
  const float* sx;    // [M] per-token activation scale (null for int8_mm)
  const float* sw;    // [N, G] weight scales (null for int8_mm)
  const float* bias;  // [N] fp32 or null
  void* out;          // [M, N]
  int M, N, K, G, group;  // group: K-group size (grouped kernels only)
  int out_kind;
};

// sm_90a wgmma GEMM for int8 weights with per-channel scales (or int32 out); false when the
// library holds no sm_90a code for it (probed once per device on the device itself)
bool wgmma_compiled(int device);
bool wgmma_enabled(int64_t device);  // the op _cuda_wgmma_enabled: wgmma path in use on this device
void launch_wgmma_i8(const GemmParams& p, cudaStream_t stream);

// Raise a kernel's dynamic shared-memory limit once per (kernel, device), keeping the driver
// call off the per-launch path.
template <typename Kernel>
inline void set_smem_limit_once(Kernel kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

// ------------------------------------------------------------------ device helpers
// torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ etc., so only intrinsics here.
__device__ __forceinline__ float lo_half_f(uint32_t w) { return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu))); }
__device__ __forceinline__ float hi_half_f(uint32_t w) { return __half2float(__ushort_as_half((unsigned short)(w >> 16))); }
__device__ __forceinline__ float lo_bf16_f(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf16_f(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// 4 consecutive elements of a float32/float16/bfloat16 array as float4
// (idx % 4 == 0; the base must be 16-byte aligned for float32, 8-byte for 16-bit kinds)
__device__ __forceinline__ float4 load4_kind(const void* base, int kind, int64_t idx) {
  if (kind == KIND_F32) return __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(base) + idx));
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + idx));
  if (kind == KIND_F16) return make_float4(lo_half_f(raw.x), hi_half_f(raw.x), lo_half_f(raw.y), hi_half_f(raw.y));
  return make_float4(lo_bf16_f(raw.x), hi_bf16_f(raw.x), lo_bf16_f(raw.y), hi_bf16_f(raw.y));
}

__device__ __forceinline__ void store1_kind(void* base, int kind, int64_t idx, float v) {
  if (kind == KIND_F32) static_cast<float*>(base)[idx] = v;
  else if (kind == KIND_F16) static_cast<__half*>(base)[idx] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(v);
}

// two adjacent floats (idx even, base aligned to two elements)
__device__ __forceinline__ void store2_kind(void* base, int kind, int64_t idx, float v0, float v1) {
  if (kind == KIND_F32) *reinterpret_cast<float2*>(static_cast<float*>(base) + idx) = make_float2(v0, v1);
  else if (kind == KIND_F16) *reinterpret_cast<__half2*>(static_cast<__half*>(base) + idx) = __floats2half2_rn(v0, v1);
  else *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(base) + idx) = __floats2bfloat162_rn(v0, v1);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace kq
