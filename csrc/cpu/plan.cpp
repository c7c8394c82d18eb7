// The choice of ISA level, kernel kind and work split for an op call (plan), and the
// runner that executes it (run, quantize). See plan.h.
#include "plan.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <string>

namespace kquant::cpu {

namespace {

// ----------------------------------------------------------------------------- thresholds
// W8A8 rows up to which the sign-trick GEMM runs: it needs the fewest weight bytes per MAC,
// what few rows are bound by; with more rows the int16 GEMM's higher MAC rate wins.
constexpr int64_t kSignMaxM = 3;
// Rows from which the int8 GEMMs use AMX tiles: AMX streams the weights at about the same
// speed for 2 rows as for 16, while the vector kernels slow down with every row; one row
// stays on the vector GEMV. W4A8 first unpacks its nibbles per task, which only pays off
// from 4 rows.
constexpr int64_t kAmxMinM = 2;
constexpr int64_t kAmxMinMW4 = 4;
// Weight-only strategy by M: fused dequant-FMA kernels while no dequantized copy pays off;
// then K chunks of 16-channel panels dequantized into L1 and an fp32 GEMM over the task's
// rows; above kWoBlockMaxM rows (not at the AVX2 level), one dequantized W^T slab at a time
// and at::mm. With AMX-BF16, tiles from kAmxBf16MinM rows.
constexpr int64_t kWoFusedMaxM = 2;
constexpr int64_t kWoBlockMaxM = 128;
constexpr int64_t kAmxBf16MinM = 16;
// AMX-BF16 splits x into three bf16 parts (6 bytes per element): this many rows at a time
// keep that copy bounded
constexpr int64_t kAmxBf16RowsPerCall = 1024;

// ----------------------------------------------------------------------------- work split
// Vector tasks: up to kTaskRows rows x 8 blocks (64 channels), fewer rows where L2 is small
// (blocking below); AMX tasks: 256 rows x 32 blocks (256 channels), sized for the AMX
// kernels' K chunks (amx_int8.cpp, amx_bf16.cpp).
constexpr int64_t kTaskRows = 48, kTaskBlocks = 8;
constexpr int64_t kAmxTaskRows = 256, kAmxTaskBlocks = 32;
// Problems under ~2M MACs stay on the calling thread: waking a second thread costs
// microseconds, more than such a call takes. AMX work counts as kAmxSpeedup times less.
constexpr int64_t kSerialMacs = int64_t(1) << 21;
constexpr int64_t kAmxSpeedup = 8;
// WoDequantMm: fp32 elements of one dequantized W^T slab (8 MiB)
constexpr int64_t kSlabFloats = int64_t(1) << 21;

Acts acts_for(Kind kind) {
  switch (kind) {
    case Kind::SignGemm: return Acts::Int8AndAbs;
    case Kind::Int16Gemm: return Acts::Int16;
    case Kind::W4A8Gemm: return Acts::Int8AndSums;
    case Kind::AmxInt8: return Acts::Int8Tiles;
    case Kind::WoFused:
    case Kind::WoBlock: return Acts::Fp32Padded;
    case Kind::WoAmxBf16: return Acts::Bf16Split;
    case Kind::WoDequantMm: return Acts::Fp32;
  }
  return Acts::Int16;
}

// ----------------------------------------------------------------------------- KQUANT_CPU_ISA
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "amx"};

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

// KQUANT_CPU_ISA's value -> the level to run
Isa parse_isa(const std::string& raw) {
  const Isa best = best_isa();
  const size_t b = raw.find_first_not_of(" \t\n\r\f\v"), e = raw.find_last_not_of(" \t\n\r\f\v");
  std::string v = b == std::string::npos ? std::string() : raw.substr(b, e - b + 1);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v.empty()) return best;
  for (int i = 0; i < 4; ++i) {
    if (v != kIsaNames[i]) continue;
    const Isa want = static_cast<Isa>(i);
    if (want <= best) return want;
    // once per distinct value in the process (every thread parses it once)
    static std::mutex mu;
    static std::set<std::string> warned;
    bool first;
    {
      std::lock_guard<std::mutex> lock(mu);
      first = warned.insert(raw).second;
    }
    if (first)
      TORCH_WARN("kquant cpu: KQUANT_CPU_ISA='", raw, "' asks for ", kIsaNames[i], ", above this CPU's best level (",
                 isa_name(best), "): running ", isa_name(best));
    return best;
  }
  TORCH_CHECK(false, "kquant cpu: KQUANT_CPU_ISA='", raw, "' is not an ISA level; accepted: scalar, avx2, ",
              "avx512, amx (any case), or unset for the best this CPU has (", isa_name(best), ")");
  return best;
}

// ----------------------------------------------------------------------------- caches
// "32K", "512 KiB", "32M", "1g", "49152" -> bytes; -1 if not a size
int64_t parse_size(std::string v) {
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.pop_back();
  size_t i = 0;
  while (i < v.size() && std::isspace(static_cast<unsigned char>(v[i]))) ++i;
  size_t d = i;
  while (d < v.size() && std::isdigit(static_cast<unsigned char>(v[d]))) ++d;
  if (d == i || d - i > 12) return -1;
  int64_t n = std::stoll(v.substr(i, d - i));
  std::string u;
  for (size_t j = d; j < v.size(); ++j)
    if (!std::isspace(static_cast<unsigned char>(v[j]))) u += static_cast<char>(std::tolower(static_cast<unsigned char>(v[j])));
  if (u == "" || u == "b") return n;
  const int64_t mult = u[0] == 'k' ? 1 << 10 : u[0] == 'm' ? 1 << 20 : u[0] == 'g' ? int64_t(1) << 30 : 0;
  const std::string rest = u.substr(1);
  if (!mult || !(rest == "" || rest == "b" || rest == "ib")) return -1;
  return n * mult;
}

// level 1 (data), 2 or 3 of cpu0 from /sys, or 0
int64_t sys_cache(int level) {
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lf(dir + "level"), tf(dir + "type"), sf(dir + "size");
    int lv = 0;
    std::string type, size;
    if (!(lf >> lv) || !(tf >> type) || !(sf >> size)) continue;
    if (lv == level && type != "Instruction") return std::max<int64_t>(0, parse_size(size));
  }
  return 0;
}

Caches parse_caches(const std::string& raw, const Caches& base) {
  Caches c = base;
  std::string item;
  std::stringstream ss(raw);
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(" \t") == std::string::npos) continue;
    const size_t eq = item.find('=');
    std::string key = eq == std::string::npos ? item : item.substr(0, eq);
    key.erase(std::remove_if(key.begin(), key.end(), [](unsigned char ch) { return std::isspace(ch); }), key.end());
    for (char& ch : key) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    const int64_t v = eq == std::string::npos ? -1 : parse_size(item.substr(eq + 1));
    int64_t* dst = key == "l1" ? &c.l1 : key == "l2" ? &c.l2 : key == "l3" ? &c.l3 : nullptr;
    TORCH_CHECK(dst && v >= (4 << 10) && v <= (int64_t(1) << 40), "kquant cpu: KQUANT_CPU_CACHE='", raw,
                "': '", item, "' is not a cache size; expected l1=, l2= or l3= with a size from 4K to 1T, e.g. ",
                "KQUANT_CPU_CACHE=\"l2=512K,l3=32M\" (K, M, G: KiB, MiB, GiB)");
    *dst = v;
  }
  return c;
}

}  // namespace

Caches detected_caches() {
  static const Caches found = [] {
    Caches c;
    const int64_t l1 = sys_cache(1), l2 = sys_cache(2), l3 = sys_cache(3);
#ifdef _SC_LEVEL1_DCACHE_SIZE
    const long s1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), s2 = sysconf(_SC_LEVEL2_CACHE_SIZE),
               s3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#else
    const long s1 = 0, s2 = 0, s3 = 0;
#endif
    // /sys first: in virtual machines sysconf's L3 can be the whole package's
    c.l1 = l1 > 0 ? l1 : s1 > 0 ? s1 : c.l1;
    c.l2 = l2 > 0 ? l2 : s2 > 0 ? s2 : c.l2;
    c.l3 = l3 > 0 ? l3 : s3 > 0 ? s3 : c.l3;
    return c;
  }();
  return found;
}

Caches active_caches() {
  const char* env = std::getenv("KQUANT_CPU_CACHE");
  const char* value = env ? env : "";
  thread_local std::string last;
  thread_local Caches caches;
  thread_local bool parsed = false;
  if (!parsed || last != value) {
    caches = parse_caches(value, detected_caches());  // raises for a bad value: nothing is kept
    last = value;
    parsed = true;
  }
  return caches;
}

Isa best_isa() {
  static const Isa best = kquant::cpu_has_amx_int8()      ? Isa::Amx
                          : kquant::cpu_has_avx512_vnni() ? Isa::Avx512
                          : kquant::cpu_has_avx2_fma()    ? Isa::Avx2
                                                          : Isa::Scalar;
  return best;
}

Isa active_isa() {
  // read on every op call (so tests and users can switch levels between calls), parsed only
  // when the value changed; each thread keeps the last value it parsed
  const char* env = std::getenv("KQUANT_CPU_ISA");
  const char* value = env ? env : "";
  thread_local std::string last;
  thread_local Isa isa = Isa::Scalar;
  thread_local bool parsed = false;
  if (!parsed || last != value) {
    isa = parse_isa(value);  // raises for an unknown value: nothing is kept
    last = value;
    parsed = true;
  }
  return isa;
}

// ----------------------------------------------------------------------------- plan
Plan plan(Op op, const Problem& p, Isa isa) {
  Plan pl;
  switch (op) {
    case Op::Int8Mm:  // operands may hold -128: the int16 GEMM or AMX (both exact for all int8)
      pl.kind = isa == Isa::Amx && p.M >= kAmxMinM ? Kind::AmxInt8 : Kind::Int16Gemm;
      break;
    case Op::QuantActLinear: {
      const bool amx = isa == Isa::Amx && p.M >= (p.int4 ? kAmxMinMW4 : kAmxMinM) && p.lda % 64 == 0 &&
                       (p.G == 1 || p.gsz % 64 == 0);
      pl.kind = amx ? Kind::AmxInt8 : p.int4 ? Kind::W4A8Gemm : p.M <= kSignMaxM ? Kind::SignGemm : Kind::Int16Gemm;
      break;
    }
    case Op::WeightOnlyLinear:
      if (isa == Isa::Amx && kquant::cpu_has_amx_bf16() && p.M >= kAmxBf16MinM) pl.kind = Kind::WoAmxBf16;
      // AVX2: the panel kernel beats dequantize-then-at::mm at every M (8-lane FMAs, as MKL's
      // there); other levels hand many rows to at::mm (AVX-512 sgemm, or a better scalar GEMM)
      else if (p.M > kWoBlockMaxM && isa != Isa::Avx2) pl.kind = Kind::WoDequantMm;
      else pl.kind = p.M <= kWoFusedMaxM && p.whole_zeros ? Kind::WoFused : Kind::WoBlock;
      break;
  }
  const bool amx = pl.kind == Kind::AmxInt8 || pl.kind == Kind::WoAmxBf16;
  // the AMX level adds only the AMX kinds: the other kinds run the AVX-512 level's kernels
  pl.isa = amx ? Isa::Amx : std::min(isa, Isa::Avx512);
  pl.acts = acts_for(pl.kind);
  pl.rows_per_call = pl.kind == Kind::WoAmxBf16 ? kAmxBf16RowsPerCall : p.M;
  if (pl.kind == Kind::WoDequantMm) {
    const int64_t kb = p.kblocks * (p.int4 ? 8 : 4);
    pl.rows_per_task = p.M;
    pl.blocks_per_task = std::max<int64_t>(1, kSlabFloats / (kb * kBlockN));
    return pl;
  }
  // Blocking from the caches: a K chunk's working set in L1 (Int16Gemm: a widened 8-channel
  // half, 64 bytes per k-quad, and 4 rows of int16 codes; WoBlock: a [k][16] fp32 panel and 6
  // rows of x, 88 bytes per k), a task's rows of that chunk in half of L2.
  const Caches cc = active_caches();
  int64_t task_rows = amx ? kAmxTaskRows : kTaskRows;
  if (pl.kind == Kind::Int16Gemm) {
    pl.kchunk = std::max<int64_t>(16, cc.l1 * 3 / 4 / (64 + 4 * 8) / 16 * 16);
    task_rows = std::clamp<int64_t>(cc.l2 / 2 / (pl.kchunk * 8) / 4 * 4, 16, kTaskRows);
  } else if (pl.kind == Kind::WoBlock) {
    const int64_t per = p.int4 ? 8 : 4;
    const int64_t kc = std::max<int64_t>(32, cc.l1 * 3 / 4 / 88 / 32 * 32);
    pl.kchunk = kc / per;
    task_rows = std::max<int64_t>(12, cc.l2 / 2 / (kc * 4) / 6 * 6);  // the rows of x a panel serves
  }
  pl.rows_per_task = std::min(std::min(p.M, pl.rows_per_call), task_rows);
  pl.blocks_per_task = amx ? kAmxTaskBlocks : kTaskBlocks;
  const int64_t work = pl.rows_per_task * pl.blocks_per_task * kBlockN * p.Kp / (amx ? kAmxSpeedup : 1);
  pl.grain = std::max<int64_t>(1, kSerialMacs / std::max<int64_t>(1, work));
  return pl;
}

// ----------------------------------------------------------------------------- run
namespace {

void run_task(const Plan& pl, const Problem& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
#if KQ_X86
  if (pl.kind == Kind::AmxInt8) return task_amx_int8(p, m0, m1, nb0, nb1);
  if (pl.kind == Kind::WoAmxBf16) return task_amx_bf16(p, m0, m1, nb0, nb1);
  if (pl.isa >= Isa::Avx512) return task_avx512(p, pl.kind, m0, m1, nb0, nb1);
  if (pl.isa == Isa::Avx2) return task_avx2(p, pl.kind, m0, m1, nb0, nb1);
#endif
  task_scalar(p, pl.kind, m0, m1, nb0, nb1);
}

at::ScalarType float_type(OutT t) {
  return t == OutT::F16 ? at::kHalf : t == OutT::BF16 ? at::kBFloat16 : at::kFloat;
}

// WoDequantMm: y = x . W^T + bias with W^T dequantized a slab of pl.blocks_per_task channel
// blocks at a time (in parallel over blocks) and multiplied by at::mm, in fp32 and rounded
// to y's dtype at the end
void dequant_mm(const Plan& pl, const Problem& p) {
  const at::Tensor xf = at::from_blob(const_cast<float*>(p.xf), {p.M, p.Kp}, {p.ldx, 1}, at::kFloat);
  at::Tensor res = p.yt == OutT::F32 ? at::from_blob(p.y, {p.M, p.N}, at::kFloat) : at::empty({p.M, p.N}, xf.options());
  const int64_t kb = p.kblocks * (p.int4 ? 8 : 4);
  const int64_t nbt = cdiv(p.N, kBlockN);
  const int64_t blk = pl.blocks_per_task;
  at::Tensor wt = at::empty({kb, std::min(nbt, blk) * kBlockN}, xf.options());
  float* wd = wt.data_ptr<float>();
  const int64_t ld = wt.size(1);
  for (int64_t b0 = 0; b0 < nbt; b0 += blk) {
    const int64_t b1 = std::min(nbt, b0 + blk);
    const int64_t n0 = b0 * kBlockN, n1 = std::min(p.N, b1 * kBlockN);
    at::parallel_for(b0, b1, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t nb = r0; nb < r1; ++nb) {
        const int nv = static_cast<int>(std::min<int64_t>(kBlockN, p.N - nb * kBlockN));
#if KQ_X86
        if (pl.isa != Isa::Scalar) {
          dequant_block_avx2(p, nb, nv, 0, p.kblocks, wd + (nb - b0) * kBlockN, ld);
          continue;
        }
#endif
        dequant_block_scalar(p, nb, nv, 0, p.kblocks, wd + (nb - b0) * kBlockN, ld);
      }
    });
    res.narrow(1, n0, n1 - n0).copy_(at::mm(xf, wt.narrow(0, 0, p.Kp).narrow(1, 0, n1 - n0)));
  }
  if (p.bias) res.add_(at::from_blob(const_cast<float*>(p.bias), {p.N}, at::kFloat));
  if (p.yt != OutT::F32) at::from_blob(p.y, {p.M, p.N}, float_type(p.yt)).copy_(res);
}

}  // namespace

void run(const Plan& pl, const Problem& prob) {
  if (prob.M == 0 || prob.N == 0) return;
  if (pl.kind == Kind::WoDequantMm) return dequant_mm(pl, prob);
  Problem p = prob;
  p.kchunk = pl.kchunk;
  const int64_t nbt = cdiv(p.N, kBlockN);
  const int64_t mc = std::min(pl.rows_per_task, p.M), ncb = pl.blocks_per_task;
  const int64_t tn = cdiv(nbt, ncb), nt = cdiv(p.M, mc) * tn;
  at::parallel_for(0, nt, pl.grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mi = t / tn, ni = t % tn;
      const int64_t m0 = mi * mc, m1 = std::min(p.M, m0 + mc);
      const int64_t b0 = ni * ncb, b1 = std::min(nbt, b0 + ncb);
      run_task(pl, p, m0, m1, b0, b1);
    }
  });
}

void quantize(const QuantArgs& a, int64_t rows, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.K));  // ~16k values per thread
  at::parallel_for(0, rows, grain, [&](int64_t m0, int64_t m1) {
#if KQ_X86
    if (isa >= Isa::Avx512) return quant_rows_avx512(a, m0, m1);
    if (isa != Isa::Scalar) return quant_rows_avx2(a, m0, m1);
#endif
    quant_rows_scalar(a, m0, m1);
  });
}

}  // namespace kquant::cpu
