// Per-token int8 activation quantization, bit-identical to the reference definition:
//   amax = max|x| in fp32; scale = amax / 127 (IEEE division; 1 for an all-zero row);
//   inv = (1 / amax) * 127 (IEEE reciprocal, then a multiply: two roundings);
//   q = clamp(rint(x * inv), -127, 127), round half to even.
// Static: scale = act_scale, q = clamp(rint(x * (1 / act_scale)), -127, 127).
// A row holding NaN or Inf gets q = 0 and scale NaN; a row with amax < 2^-64 is multiplied
// by 2^64 (exact) before the reciprocal, which would overflow.
// No fast-math anywhere in this library, so '/' is the IEEE-rounded division.
#include "kq_cuda.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace kq {

int elem_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return KIND_F32;
    case at::kHalf: return KIND_F16;
    case at::kBFloat16: return KIND_BF16;
    default: TORCH_CHECK(false, "kquant CUDA: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return KIND_F32;
}

namespace {

constexpr int QTHREADS = 256;

template <typename T> __device__ __forceinline__ float elem_f(T v);
template <> __device__ __forceinline__ float elem_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float elem_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float elem_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// V consecutive elements as floats; V > 1 means one 16-byte load (row and base aligned)
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = elem_f<T>(p[0]);
  } else {
    static_assert(sizeof(T) * V == 16, "16-byte vectors");
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(T) == 4) {
        f[i] = __uint_as_float(w[i]);
      } else if constexpr (std::is_same_v<T, __half>) {
        f[2 * i] = lo_half_f(w[i]);
        f[2 * i + 1] = hi_half_f(w[i]);
      } else {
        f[2 * i] = lo_bf16_f(w[i]);
        f[2 * i + 1] = hi_bf16_f(w[i]);
      }
    }
  }
}

__device__ __forceinline__ uint32_t q8(float x, float inv) {
  // rint (half to even) of the fp32 product; __fmul_rn keeps the product un-fused
  int v = __float2int_rn(__fmul_rn(x, inv));
  v = max(-127, min(127, v));
  return static_cast<uint32_t>(v) & 0xffu;
}

// one block per row; two passes over the row (the second mostly hits L2)
template <typename T, int V>
__global__ void __launch_bounds__(QTHREADS) quant_rows_kernel(const T* __restrict__ x, int64_t K,
                                                              int8_t* __restrict__ q, float* __restrict__ scale,
                                                              const float* __restrict__ act_scale) {
  __shared__ float red[QTHREADS / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  int8_t* qr = q + row * K;
  const int64_t nv = K / V;
  // pass 1: amax, and whether the row holds NaN or Inf (!(|x| < inf) is true for both)
  float amax = 0.f;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < nv; i += QTHREADS) {
    float f[V];
    load_vec<T, V>(xr + i * V, f);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float a = fabsf(f[j]);
      amax = fmaxf(amax, a);
      bad |= !(a < INFINITY);
    }
  }
  const bool poisoned = __syncthreads_or(bad) != 0;
  amax = warp_max(amax);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = red[0];
#pragma unroll
  for (int w = 1; w < QTHREADS / 32; ++w) amax = fmaxf(amax, red[w]);
  float s, inv, lift = 1.f;
  if (act_scale != nullptr) {
    s = act_scale[0];
    inv = 1.0f / s;
  } else {
    const bool nz = amax > 0.f;
    if (nz && amax < 0x1p-64f) lift = 0x1p64f;
    s = nz ? amax / 127.0f : 1.0f;
    inv = nz ? __fmul_rn(1.0f / __fmul_rn(amax, lift), 127.0f) : 1.0f;
  }
  if (threadIdx.x == 0) scale[row] = poisoned ? __int_as_float(0x7fc00000) : s;
  if (poisoned) {
    for (int64_t i = threadIdx.x; i < K; i += QTHREADS) qr[i] = 0;
    return;
  }
  for (int64_t i = threadIdx.x; i < nv; i += QTHREADS) {
    float f[V];
    load_vec<T, V>(xr + i * V, f);
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = __fmul_rn(f[j], lift);
    if constexpr (V == 1) {
      qr[i] = static_cast<int8_t>(q8(f[0], inv));
    } else {
      uint32_t w[V / 4];
#pragma unroll
      for (int j = 0; j < V / 4; ++j)
        w[j] = q8(f[4 * j], inv) | (q8(f[4 * j + 1], inv) << 8) | (q8(f[4 * j + 2], inv) << 16) |
               (q8(f[4 * j + 3], inv) << 24);
      if constexpr (V == 8) *reinterpret_cast<uint2*>(qr + i * V) = make_uint2(w[0], w[1]);
      else *reinterpret_cast<uint32_t*>(qr + i * V) = w[0];
    }
  }
}

template <typename T>
void launch_quant(const at::Tensor& x, const float* act, at::Tensor& q, at::Tensor& s, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1);
  constexpr int V = 16 / sizeof(T);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  int8_t* qp = q.data_ptr<int8_t>();
  const bool vec = K % V == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(qp) % V == 0;
  if (vec)
    quant_rows_kernel<T, V><<<M, QTHREADS, 0, stream>>>(xp, K, qp, s.data_ptr<float>(), act);
  else
    quant_rows_kernel<T, 1><<<M, QTHREADS, 0, stream>>>(xp, K, qp, s.data_ptr<float>(), act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& act_scale) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "quantize_per_token: x must be a contiguous 2-D CUDA tensor");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M < (int64_t{1} << 31), "quantize_per_token: too many rows (", M, ")");
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto s = at::empty({M, 1}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  at::Tensor act;
  const float* act_p = nullptr;
  if (act_scale.has_value()) {
    act = act_scale->to(x.device(), at::kFloat).contiguous();
    TORCH_CHECK(act.numel() == 1, "quantize_per_token: act_scale must hold one element");
    act_p = act.data_ptr<float>();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (elem_kind(x)) {
    case KIND_F32: launch_quant<float>(x, act_p, q, s, stream); break;
    case KIND_F16: launch_quant<__half>(x, act_p, q, s, stream); break;
    default: launch_quant<__nv_bfloat16>(x, act_p, q, s, stream); break;
  }
  return {q, s};
}

}  // namespace kq
