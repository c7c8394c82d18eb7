// kquant's CPU ops: quantize_per_token, int8_mm and the W8A8 / W4A8 / W8A16 / W4A16
// linears on weights in the blocked layouts (common.h). Each driver checks that the
// arguments' shapes agree with the memory its kernels read (argument semantics are checked
// in Python), fills a Problem, asks plan() for a Plan, prepares the activations the plan
// names and runs it. The schemas are registered here (private ops of kquant.backends.cpu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <torch/library.h>

#include "lowbit.h"
#include "plan.h"

namespace kquant::cpu {

OutT out_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return OutT::F32;
    case at::kHalf: return OutT::F16;
    case at::kBFloat16: return OutT::BF16;
    default: TORCH_CHECK(false, "kquant cpu: x must be float32, float16 or bfloat16, got ", t);
  }
  return OutT::F32;
}

static void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "kquant cpu: x must be a 2-D CPU tensor, got ", x.sizes());
  out_type(x.scalar_type());
}

// Checks x, scales and bias against each other and fills p's shapes, groups, scales, bias and
// output (y: [M, N] in x's dtype)
LinearTensors setup_linear_common(Problem& p, const at::Tensor& x_, const at::Tensor& scales_,
                                  const std::optional<at::Tensor>& bias) {
  check_x(x_);
  LinearTensors t{x_.contiguous(), scales_.contiguous()};
  const at::Tensor& x = t.x;
  const at::Tensor& scales = t.scales;
  p.M = x.size(0);
  p.Kp = x.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kFloat, "kquant cpu: scales must be float32 [N, G]");
  p.N = scales.size(0);
  p.G = scales.size(1);
  TORCH_CHECK(p.G >= 1 && p.Kp % p.G == 0, "kquant cpu: scales ", scales.sizes(), " do not divide K=", p.Kp);
  p.gsz = p.Kp / p.G;
  TORCH_CHECK(p.G == 1 || p.gsz % 32 == 0, "kquant cpu: groups of scales ", scales.sizes(), " for K=", p.Kp,
              " are ", p.gsz, " wide; the kernels need a multiple of 32");
  p.sw = scales.data_ptr<float>();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == p.N, "kquant cpu: bias must have N=", p.N, " elements, got ", bias->numel());
    t.bias_f32 = bias->to(at::kFloat).contiguous();
    p.bias = t.bias_f32.data_ptr<float>();
  }
  t.y = at::empty({p.M, p.N}, x.options());
  p.y = t.y.data_ptr();
  p.yt = out_type(x.scalar_type());
  return t;
}

namespace {

// setup_linear_common, and the weight w in layout 1 (int4 = false) or 2
LinearTensors setup_linear(Problem& p, const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales_,
                           const std::optional<at::Tensor>& bias, bool int4) {
  LinearTensors t = setup_linear_common(p, x_, scales_, bias);
  p.int4 = int4;
  const int64_t per = int4 ? 8 : 4, width = int4 ? 8 : 16;  // k per row; channels per block
  TORCH_CHECK(w.dim() == 4 && w.size(2) == width && w.size(3) == 4 && w.is_contiguous() &&
                  w.scalar_type() == (int4 ? at::kByte : at::kChar),
              "kquant cpu: weight must be in the blocked layout ", int4 ? "uint8" : "int8", " [N/", width, ", K/",
              per, ", ", width, ", 4], got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.size(0) == cdiv(p.N, width) && w.size(1) == cdiv(p.Kp, 64) * (64 / per), "kquant cpu: blocked weight ",
              w.sizes(), " does not match N=", p.N, " K=", p.Kp);
  p.kblocks = w.size(1);
  if (int4) p.w4 = w.data_ptr<uint8_t>();
  else p.w8 = w.data_ptr<int8_t>();
  return t;
}

}  // namespace

// x quantized into the int8 forms pl.acts names (per token, or with the static act_scale)
ActBuffers quantize_acts(const Plan& pl, Problem& p, const at::Tensor& x, const std::optional<at::Tensor>& act_scale) {
  QuantArgs qa{x.data_ptr(), p.yt, p.Kp, false, 1.f, 1.f, nullptr, nullptr, nullptr, p.lda, nullptr, nullptr,
               p.G, p.gsz};
  if (act_scale.has_value() && act_scale->defined()) {
    TORCH_CHECK(act_scale->numel() == 1, "kquant cpu: act_scale must have one element, got ", act_scale->numel());
    const float s = act_scale->to(at::kFloat).item<float>();
    qa.is_static = true;
    qa.s_scale = s;
    qa.s_inv = 1.0f / s;
  }
  ActBuffers h;
  h.scales = at::empty({p.M}, x.options().dtype(at::kFloat));
  qa.sx = h.scales.data_ptr<float>();
  if (pl.acts == Acts::Int16) {
    h.codes = at::empty({p.M, p.lda}, x.options().dtype(at::kShort));
    qa.q16 = h.codes.data_ptr<int16_t>();
  } else {
    // AMX reads whole 16-row tiles: the rows past M are zeros
    qa.tiled = pl.acts == Acts::Int8Tiles;
    const int64_t rows = qa.tiled ? cdiv(p.M, 16) * 16 : p.M;
    h.codes = at::empty({rows, p.lda}, x.options().dtype(at::kChar));
    if (rows > p.M) h.codes.narrow(0, rows - 16, 16).zero_();  // the last 16-row tile block
    qa.q8 = h.codes.data_ptr<int8_t>();
  }
  if (pl.acts == Acts::Int8AndAbs) {
    h.abs_codes = at::empty({p.M, p.lda}, x.options().dtype(at::kByte));
    qa.qabs = h.abs_codes.data_ptr<uint8_t>();
  }
  if (pl.acts == Acts::Int8AndSums) {
    h.group_sums = at::empty({p.M, p.G}, x.options().dtype(at::kInt));
    qa.asum = h.group_sums.data_ptr<int32_t>();
  }
  quantize(qa, p.M, pl.isa);
  p.a8 = qa.q8;
  p.aabs = qa.qabs;
  p.a16 = qa.q16;
  p.sx = qa.sx;
  p.asum = qa.asum;
  return h;
}

// x (the rows of q) in the float form pl.acts names
ActBuffers float_acts(const Plan& pl, Problem& q, const at::Tensor& x) {
  const int64_t padded = q.kblocks * (q.int4 ? 8 : 4);  // K padded to 64
  ActBuffers h;
  switch (pl.acts) {
#if KQ_X86
    case Acts::Bf16Split:
      q.ldx = padded;
      std::tie(h.x, h.x_sums) = split_x_bf16(q, x.data_ptr(), q.yt);
      return h;
#endif
    case Acts::Fp32:
      h.x = x.to(at::kFloat);
      q.xf = h.x.data_ptr<float>();
      q.ldx = q.Kp;
      return h;
    default:  // Fp32Padded
      q.ldx = padded;
      h.x = at::zeros({q.M, q.ldx}, x.options().dtype(at::kFloat));
      h.x.narrow(1, 0, q.Kp).copy_(x);
      q.xf = h.x.data_ptr<float>();
      return h;
  }
}

// Zero points that are all whole numbers: WoFused subtracts them in int32, and AMX-BF16 puts
// q - z into the bf16 codes. Others take the dequantizing paths (exact float z).
bool whole_numbers(const float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<float>(static_cast<int32_t>(z[i])) != z[i]) return false;  // |z| < 2^31
  return true;
}

namespace {

// W8A8 (Int4 = false) and W4A8. group_size is the schema's: the groups are the scales' columns.
template <bool Int4>
at::Tensor act_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales_,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_scale,
                      int64_t group_size) {
  (void)group_size;
  Problem p;
  const LinearTensors t = setup_linear(p, x_, w, scales_, bias, Int4);
  if (p.M == 0 || p.N == 0) return t.y;
  p.lda = p.kblocks * (Int4 ? 8 : 4);
  const Plan pl = plan(Op::QuantActLinear, p, active_isa());
  const ActBuffers acts = quantize_acts(pl, p, t.x, act_scale);
  run(pl, p);
  return t.y;
}

// W8A16 (Int4 = false) and W4A16; group_size as in act_linear. path (W4A16): 0 picks, 1 runs
// lowbit.cpp's decode kernels where they take the call, 2 the plan's kinds (w4_decode)
template <bool Int4>
at::Tensor wo_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales_,
                     const std::optional<at::Tensor>& zeros_, const std::optional<at::Tensor>& bias,
                     int64_t group_size, int64_t path) {
  (void)group_size;
  TORCH_CHECK(path >= 0 && path <= 2, "kquant cpu: path must be 0 (auto), 1 (decode) or 2 (plan), got ", path);
  Problem p;
  const LinearTensors t = setup_linear(p, x_, w, scales_, bias, Int4);
  at::Tensor zeros;
  if (zeros_.has_value() && zeros_->defined()) {
    zeros = zeros_->contiguous();
    TORCH_CHECK(zeros.sizes() == t.scales.sizes() && zeros.scalar_type() == at::kFloat,
                "kquant cpu: zeros must be float32 like scales ", t.scales.sizes(), ", got ", zeros.scalar_type(),
                " ", zeros.sizes());
    p.zeros = zeros.data_ptr<float>();
  }
  p.wo_zero = Int4 ? 8 : 0;
  if (p.M == 0 || p.N == 0) return t.y;
  if (Int4 && w4_decode(p, t.x, path)) return t.y;  // lowbit.cpp's decode kernels
  p.whole_zeros = !zeros.defined() || whole_numbers(p.zeros, zeros.numel());
  const Plan pl = plan(Op::WeightOnlyLinear, p, active_isa());
  for (int64_t r0 = 0; r0 < p.M; r0 += pl.rows_per_call) {
    Problem q = p;
    q.M = std::min(pl.rows_per_call, p.M - r0);
    q.y = static_cast<char*>(p.y) + r0 * p.N * t.y.element_size();
    const ActBuffers acts = float_acts(pl, q, q.M == p.M ? t.x : t.x.narrow(0, r0, q.M));
    run(pl, q);
  }
  return t.y;
}

at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                        int64_t group_size) {
  return wo_linear<false>(x, w, scales, zeros, bias, group_size, 0);
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

// int8 [M, K] x int8 [N, K] -> int32 [M, N]; b is blocked on the fly (K padded to 64)
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
  p.kblocks = cdiv(K, 64) * 16;
  p.lda = p.kblocks * 4;
  const Plan pl = plan(Op::Int8Mm, p, active_isa());
  const bool tiles = pl.acts == Acts::Int8Tiles;
  const int64_t nbt = cdiv(N, 16);
  // block b as layout 1 with vectorized ATen copies: [N, K] -> [N/16, 16, Kq, 4] -> [N/16, Kq, 16, 4]
  const at::Tensor wb = at::constant_pad_nd(b, {0, p.kblocks * 4 - K, 0, nbt * 16 - N}, 0)
                            .view({nbt, 16, p.kblocks, 4})
                            .permute({0, 2, 1, 3})
                            .contiguous();
  // a as int16 codes, or int8 in 16 x 64 tiles (as the quantizer writes them for AMX)
  at::Tensor ap = at::zeros({tiles ? cdiv(M, 16) * 16 : M, p.lda}, a.options().dtype(tiles ? at::kChar : at::kShort));
  ap.narrow(0, 0, M).narrow(1, 0, K).copy_(a);
  if (tiles) ap = ap.view({ap.size(0) / 16, 16, p.lda / 64, 64}).permute({0, 2, 1, 3}).contiguous();
  p.w8 = wb.data_ptr<int8_t>();
  if (tiles) p.a8 = ap.data_ptr<int8_t>();
  else p.a16 = ap.data_ptr<int16_t>();
  p.y = y.data_ptr();
  p.yt = OutT::I32;
  run(pl, p);
  return y;
}

// Gradient chunks for kquant.distributed: per chunk, 2^bits levels (code - half) * scale
// spanning [-max|x|, max|x|], stochastic rounding with the given uniforms u, codes packed
// 8 / bits per byte, low bits first. The same float operations, in the same order, as the
// PyTorch definition in kquant/distributed.py, so the codes are identical.
std::tuple<at::Tensor, at::Tensor> grad_quantize(const at::Tensor& x, const at::Tensor& u, int64_t bits,
                                                 int64_t chunk) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "_grad_quantize_cpu: bits must be 8, 4 or 2, got ", bits);
  TORCH_CHECK(x.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.sizes() == u.sizes(),
              "_grad_quantize_cpu: x and u must be float32 [R, n] of the same shape");
  const int64_t per = 8 / bits, rows = x.size(0), n = x.size(1);
  TORCH_CHECK(chunk > 0 && n % chunk == 0 && chunk % per == 0, "_grad_quantize_cpu: chunk ", chunk,
              " must divide the row length ", n, " and be a multiple of ", per);
  const at::Tensor xc = x.contiguous(), uc = u.contiguous();
  at::Tensor codes = at::empty({rows, n / per}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({rows, n / chunk}, x.options());
  const float half = static_cast<float>((1 << bits) - 1) / 2.0f;
  const float* xp = xc.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, rows * n / chunk, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float* xs = xp + c * chunk;
      const float* us = up + c * chunk;
      float amax = 0.0f;
      for (int64_t i = 0; i < chunk; ++i) amax = std::max(amax, std::fabs(xs[i]));
      const float s = amax > 0.0f ? amax / half : 1.0f;
      sp[c] = s;
      uint8_t* out = cp + c * (chunk / per);
      for (int64_t i = 0; i < chunk / per; ++i) {
        unsigned v = 0;
        for (int64_t j = 0; j < per; ++j) {
          const int64_t k = i * per + j;
          const float q = std::min(std::max(std::floor((xs[k] / s + half) + us[k]), 0.0f), 2.0f * half);
          v |= static_cast<unsigned>(q) << (bits * j);
        }
        out[i] = static_cast<uint8_t>(v);
      }
    }
  });
  return {codes, scales};
}

int64_t cpu_isa() { return static_cast<int64_t>(active_isa()); }
int64_t cpu_isa_best() { return static_cast<int64_t>(best_isa()); }
// [l1, l2, l3] in bytes: the sizes the blocking uses (KQUANT_CPU_CACHE applied), or detected
std::vector<int64_t> cpu_caches(bool detected) {
  const Caches c = detected ? detected_caches() : active_caches();
  return {c.l1, c.l2, c.l3};
}

}  // namespace
}  // namespace kquant::cpu

TORCH_LIBRARY_FRAGMENT(kquant, m) {
  m.def("_quantize_per_token_cpu(Tensor x) -> (Tensor, Tensor)");
  m.def("_int8_mm_cpu(Tensor a, Tensor b) -> Tensor");
  m.def("_w8a8_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? bias, Tensor? act_scale, int group_size) -> Tensor");
  m.def("_w4a8_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? bias, Tensor? act_scale, int group_size) -> Tensor");
  m.def("_w8a16_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? zeros, Tensor? bias, int group_size) -> Tensor");
  m.def("_w4a16_linear_cpu(Tensor x, Tensor w, Tensor scales, Tensor? zeros, Tensor? bias, int group_size, "
        "int path=0) -> Tensor");
  m.def("_grad_quantize_cpu(Tensor x, Tensor u, int bits, int chunk) -> (Tensor, Tensor)");
  m.def("_cpu_isa() -> int", &kquant::cpu::cpu_isa);
  m.def("_cpu_isa_best() -> int", &kquant::cpu::cpu_isa_best);
  m.def("_cpu_caches(bool detected=False) -> int[]", &kquant::cpu::cpu_caches);
}

TORCH_LIBRARY_IMPL(kquant, CPU, m) {
  m.impl("_quantize_per_token_cpu", &kquant::cpu::quantize_per_token);
  m.impl("_grad_quantize_cpu", &kquant::cpu::grad_quantize);
  m.impl("_int8_mm_cpu", &kquant::cpu::int8_mm);
  m.impl("_w8a8_linear_cpu", &kquant::cpu::act_linear<false>);
  m.impl("_w4a8_linear_cpu", &kquant::cpu::act_linear<true>);
  m.impl("_w8a16_linear_cpu", &kquant::cpu::w8a16_linear);
  m.impl("_w4a16_linear_cpu", &kquant::cpu::wo_linear<true>);
}
