"""Decode-style (M = 1) timings of kquant's four linear ops at one thread, AVX2 vs AVX-512
kernels (KQUANT_CPU_ISA caps the level per call, so both run in this one process), with
fbgemm (torch.ao quantize_dynamic) alongside. Weights are warm in the LLC (each call reads
the same weights). ms per call, best of several rounds of >= 0.15 s of process time.

    python bench/gemv_m1.py [--isas avx2,avx512] [--shapes 4096x4096,...]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's kquant
import kquant  # noqa: E402,F401  (loads the ops)
from kquant.backends import cpu  # noqa: E402
from kquant.format import padded_k, quantize_weight  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (384, 1536)]


def best_ms(fn, rounds=7, min_s=0.15):
    fn()
    best = float("inf")
    for _ in range(rounds):
        n, t0 = 0, time.process_time()
        while True:
            fn()
            n += 1
            dt = time.process_time() - t0
            if dt >= min_s:
                break
        best = min(best, dt / n)
    return best * 1e3


def ops_for(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) * 0.1
    x = torch.randn(1, k, generator=g)
    out = {}
    for name, bits, gs, op in (("W8A8", 8, -1, "_w8a8_linear_cpu"), ("W4A8", 4, 128, "_w4a8_linear_cpu"),
                               ("W4A16", 4, 128, "_w4a16_linear_cpu"), ("W8A16", 8, -1, "_w8a16_linear_cpu")):
        pw = quantize_weight(w, bits, gs, symmetric=True)
        xp = torch.nn.functional.pad(x, (0, padded_k(k, bits, gs) - k))
        wb = cpu.int8_to_blocked(pw.qweight) if bits == 8 else cpu.int4_to_blocked(pw.qweight)
        f = getattr(torch.ops.kquant, op)
        if name in ("W8A8", "W4A8"):
            out[name] = (lambda f=f, xp=xp, wb=wb, pw=pw: f(xp, wb, pw.scales, b, None, pw.group_size))
        else:
            out[name] = (lambda f=f, xp=xp, wb=wb, pw=pw: f(xp, wb, pw.scales, pw.zeros, b, pw.group_size))
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
        q = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    out["fbgemm"] = lambda: q(x)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--isas", default="avx2,avx512")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    isas = args.isas.split(",")
    names = ["W8A8", "W4A8", "W4A16", "W8A16"]
    print(f"kquant from {os.path.dirname(kquant.__file__)}")
    print(f"torch {torch.__version__}, 1 thread, M=1, fp32 x, ms per call (best of rounds)")
    hdr = f"{'KxN':>12} {'fbgemm':>7} " + " ".join(f"{n + '/' + i:>13}" for i in isas for n in names)
    print(hdr)
    with torch.no_grad():
        for s in args.shapes.split(","):
            k, n = map(int, s.split("x"))
            fns = ops_for(k, n)
            res = {"fbgemm": best_ms(fns["fbgemm"])}
            for i in isas:
                os.environ["KQUANT_CPU_ISA"] = i
                assert torch.ops.kquant._cpu_isa() == {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}[i]
                for nm in names:
                    res[(nm, i)] = best_ms(fns[nm])
            print(f"{s:>12} {res['fbgemm']:7.3f} " + " ".join(f"{res[(nm, i)]:13.3f}" for i in isas for nm in names))
            for i in isas:
                w8 = res[("W8A8", i)]
                print(f"{'':>12} {i}: W8A8 vs fbgemm {res['fbgemm'] / w8:.2f}x, W4A8 {w8 / res[('W4A8', i)]:.2f}x "
                      f"W8A8, W4A16 {w8 / res[('W4A16', i)]:.2f}x W8A8, W8A16 {w8 / res[('W8A16', i)]:.2f}x W8A8")


if __name__ == "__main__":
    main()
