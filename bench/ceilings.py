"""Machine ceilings for the CPU benchmarks, from csrc/bench/ceilings.cpp.

The C++ is not part of the kquant package: it is compiled on first use as its own
extension (torch.utils.cpp_extension.load, cached in the torch extensions directory,
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) with the flags of kquant._C.

    from ceilings import ceiling
    ceiling(0, 4_000_000)                                   # GMAC/s, all threads
    ceiling(4, 2, torch.ones(2 << 30, dtype=torch.uint8))   # GB/s reading a buffer

kind: int8 multiply-add rate (GMAC/s) of an instruction sequence in registers, on every
thread: 0 vpmaddwd + vpaddd on int16 (the W8A8 GEMM of more rows, int8_mm), 1 the sign
trick vpsignb + vpmaddubsw + vpmaddwd + vpaddd (W8A8, few rows), 2 vpmaddubsw + vpaddw
(W4A8), 3 vpmaddubsw + vpmaddwd + vpaddd as fbgemm runs it (inexact for 8-bit operands;
for scale), 5 AMX tdpbssd on full-width tiles, 6 the per-channel AMX kernel's tile sequence
from L1, 7 tdpbssd on 8-channel tiles (5-7 need AMX-INT8); 8: fp32 multiply-add rate
(G/s, 8 per instruction) of vfmadd231ps ymm in twelve independent chains (the weight-only
kernels' and an fp32 GEMM's instruction); 4: read bandwidth (GB/s) of `buf`, one slice per
thread, read `iters` times.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_module = None


def _load():
    global _module
    if _module is None:
        # at::parallel_for needs OpenMP (without it the loops run on one thread)
        omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        _module = cpp_extension.load(
            name="kquant_bench_ceilings",
            sources=[os.path.join(ROOT, "csrc", "bench", "ceilings.cpp")],
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            extra_cflags=["-O3", "-std=c++20", "-fno-math-errno"] + omp,
            extra_ldflags=omp,
        )
    return _module


def ceiling(kind: int, iters: int, buf: Optional[torch.Tensor] = None) -> float:
    """GMAC/s (kinds 0-3, 5-7; kind 8: fp32 FMA) or GB/s (kind 4, reading ``buf``); builds the extension once."""
    return _load().ceiling(kind, iters, buf)
