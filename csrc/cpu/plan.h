// The plan of one op call: which ISA level and kernel kind run it, in what form the
// activations must be prepared, and how the work splits into tasks; and the runner that
// executes a plan. The op drivers (ops.cpp) fill a Problem, ask plan() for a Plan, prepare
// the activations it names and call run().
//
// Work split of run() (every kind but WoDequantMm):
//
//                 N channels, in 8-channel blocks
//            |<- blocks_per_task ->|
//          --+---------------------+---------------------+--
//   M rows   |  task 0             |  task 1             |  ...   one task: rows_per_task
//   rows_per |  (level's task fn:  |                     |         rows x blocks_per_task
//   _task    |   tiles.h / AMX)    |                     |         blocks, all of K
//          --+---------------------+---------------------+--
//            |  task tn            |  ...
//
// Each output element belongs to one task and is computed in a fixed order, so any thread
// count gives the same bits. at::parallel_for hands each thread at least `grain` tasks.
#pragma once

#include <optional>

#include "common.h"

namespace kquant::cpu {

// The best level this CPU has (KQUANT_CPU_ISA ignored)
Isa best_isa();
// The level to run: best_isa(), or KQUANT_CPU_ISA=scalar|avx2|avx512|amx (any case, spaces
// around ignored) capped at best_isa() with a warning. An unknown value raises.
Isa active_isa();

// The cache sizes the blocking comes from (bytes): L1 data and L2 of one core, L3 of its
// cache domain. Read once from the OS (Linux: /sys/devices/system/cpu/cpu0/cache, else
// sysconf); KQUANT_CPU_CACHE="l1=32K,l2=512K,l3=32M" (any of the three, K/M/G = KiB/MiB/GiB)
// overrides them, read on every call like KQUANT_CPU_ISA, so that a machine with large caches
// runs a small-cache CPU's blocking. Blocking never changes results (tests check the bits).
struct Caches {
  int64_t l1 = 32 << 10, l2 = 512 << 10, l3 = 8 << 20;
};
Caches detected_caches();
Caches active_caches();

enum class Op {
  Int8Mm,            // int8 [M, K] x int8 [N, K] -> int32
  QuantActLinear,    // W8A8, W4A8: activations quantized per token (or a static scale)
  WeightOnlyLinear,  // W8A16, W4A16
};

// The form the activations must be in before run()
enum class Acts {
  Int8AndAbs,   // SignGemm: int8 codes [M][lda] (p.a8) and their absolute values (p.aabs)
  Int16,        // Int16Gemm: codes as int16 [M][lda] (p.a16)
  Int8AndSums,  // W4A8Gemm: int8 codes and their sums per row and weight group (p.asum)
  Int8Tiles,    // AmxInt8: int8 codes in 16-row x 64-k tiles, rows padded to 16 with zeros
  Fp32Padded,   // WoFused, WoBlock: x as fp32 [M][ldx], K zero-padded to whole k-blocks (p.xf)
  Fp32,         // WoDequantMm: x as fp32 [M][Kp] (p.xf, ldx = Kp)
  Bf16Split,    // WoAmxBf16: x as three bf16 parts in tiles and its group sums (split_x_bf16)
};

struct Plan {
  Isa isa = Isa::Scalar;  // the level whose kernels run (and quantize the activations)
  Kind kind = Kind::Int16Gemm;
  Acts acts = Acts::Int16;
  int64_t rows_per_call = 0;    // rows prepared and run at once (AMX-BF16 bounds its copy of x)
  int64_t rows_per_task = 0;    // WoDequantMm: all rows (at::mm)
  int64_t blocks_per_task = 0;  // 8-channel blocks; WoDequantMm: blocks per dequantized slab
  int64_t grain = 1;            // tasks per thread at least: small problems stay on the caller
  int64_t kchunk = 0;           // Int16Gemm, WoBlock: k-blocks per K chunk (Problem::kchunk)
};

// The plan for op on p (M, N, Kp, G, gsz, int4, lda, whole_zeros set) at level isa
Plan plan(Op op, const Problem& p, Isa isa);

// Runs plan pl on p, whose activations are prepared as pl.acts names
void run(const Plan& pl, const Problem& p);

// Quantizes rows [0, rows) of a with the level's row routine (quantize_per_token and the
// int8-activation linears)
void quantize(const QuantArgs& a, int64_t rows, Isa isa);

// ----------------------------------------------------------------------------- op driver helpers
// ops.cpp, shared by the drivers of lowbit.cpp

OutT out_type(at::ScalarType t);

// The tensors of a linear op that p points into
struct LinearTensors {
  at::Tensor x, scales, bias_f32, y;
};
LinearTensors setup_linear_common(Problem& p, const at::Tensor& x, const at::Tensor& scales,
                                  const std::optional<at::Tensor>& bias);

// Buffers behind the prepared activations of one call (the Problem points into them)
struct ActBuffers {
  at::Tensor scales, codes, abs_codes, group_sums;  // int8 forms
  at::Tensor x, x_sums;                             // float forms
};
// x quantized into the int8 forms pl.acts names (per token, or with the static act_scale;
// p.M, Kp, G, gsz, lda and yt set)
ActBuffers quantize_acts(const Plan& pl, Problem& p, const at::Tensor& x, const std::optional<at::Tensor>& act_scale);
// x (the rows of q) in the float form pl.acts names (q.kblocks, int4 give the padded K)
ActBuffers float_acts(const Plan& pl, Problem& q, const at::Tensor& x);
// whether the n values are all whole numbers
bool whole_numbers(const float* z, int64_t n);

}  // namespace kquant::cpu
