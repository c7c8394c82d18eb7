"""2- and 3-bit against 4-bit weights on the CPU: decode (M = 1) with the weights streamed from
DRAM, at the same group size, for int8 activations (W{4,3,2}A8) and weight-only (W{4,3,2}A16).

Each pass runs --layers distinct N x K layers once, each call timed (their weights together
well over the last-level cache, so every weight byte comes from DRAM, as in
bench/test_cpu_linear.py's cold mode). The kernels are called through their private ops on
weights already in the CPU layouts. ms per layer: each layer's best call of --rounds passes,
averaged over the layers; ratios > 1 mean the fewer bits are faster. M = 16 and 128 run the same
way (fewer layers), for information.

    python bench/gemv_lowbit.py [--threads 2] [--groups 128,64] [--layers 48] [--md]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's kquant
import kquant  # noqa: E402,F401  (loads the ops)
from kquant.backends import cpu  # noqa: E402
from kquant.format import quantize_weight  # noqa: E402

BITS = (4, 3, 2)


def make_layers(bits, gs, a8, n, k, layers, seed=0):
    """`layers` distinct copies of one quantized layer, each a callable of x."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = torch.randn(n, generator=g) * 0.1
    pw = quantize_weight(w, bits, gs, symmetric=True)
    wb = cpu._blocked(pw.qweight, bits, pw.padded_in_features)
    op = getattr(torch.ops.kquant, f"_w{bits}a{8 if a8 else 16}_linear_cpu")
    fns = []
    for _ in range(layers):
        wl, sl = wb.clone(), pw.scales.clone()  # distinct memory per layer
        if a8:
            fns.append(lambda x, wl=wl, sl=sl: op(x, wl, sl, bias, None, gs))
        else:
            fns.append(lambda x, wl=wl, sl=sl: op(x, wl, sl, None, bias, gs))
    return fns, pw.nbytes


def best_ms(fns, x, rounds):
    """ms per layer: each layer's best call over `rounds` passes over all layers (each call reads
    its layer cold at M = 1), averaged over the layers. Wall clock (several threads); the best per
    layer drops calls that another process on the machine delayed."""
    for f in fns:  # warm up: pages touched, thread pool started
        f(x)
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f(x)
            best[i] = min(best[i], time.perf_counter() - t0)
    return sum(best) / len(best) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", default="128,64", help="group sizes (-1: per channel)")
    ap.add_argument("--layers", type=int, default=48, help="distinct layers per timed call (M = 1)")
    ap.add_argument("--shape", default="4096x4096", help="KxN")
    ap.add_argument("--ms", default="1,16,128", help="rows per call; M = 1 is the decode target")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--md", action="store_true", help="also print a markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k, n = map(int, args.shape.split("x"))
    ms = [int(m) for m in args.ms.split(",")]
    print(f"kquant from {os.path.dirname(kquant.__file__)}; torch {torch.__version__}; {args.threads} threads; "
          f"cpu level {cpu.isa()}; K x N = {k} x {n}; {args.layers} distinct layers per call; fp32 x")
    rows = []
    with torch.no_grad():
        for gs in (int(s) for s in args.groups.split(",")):
            for a8 in (True, False):
                res, mib = {}, {}
                for bits in BITS:
                    fns, nbytes = make_layers(bits, gs, a8, n, k, args.layers)
                    mib[bits] = nbytes / 2 ** 20
                    for m in ms:
                        x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
                        # more rows take longer: fewer layers keep the run short (weights stay cold at M = 1)
                        use = fns if m == 1 else fns[: max(4, len(fns) // m)]
                        res[(bits, m)] = best_ms(use, x, args.rounds if m == 1 else max(3, args.rounds // 2))
                    del fns
                for m in ms:
                    t = {b: res[(b, m)] for b in BITS}
                    row = dict(group=gs, act="A8" if a8 else "A16", m=m, ms=t, gbs={b: mib[b] * 2 ** 20 / t[b] / 1e6
                                                                                     for b in BITS},
                               r3=t[4] / t[3], r2=t[4] / t[2])
                    rows.append(row)
                    print(f"g{gs:<4} {row['act']:>3} M={m:<4} " + "  ".join(f"{b}-bit {t[b]:8.3f} ms" for b in BITS)
                          + f"   4/3-bit {row['r3']:.2f}x  4/2-bit {row['r2']:.2f}x"
                          + ("   (weights " + ", ".join(f"{row['gbs'][b]:.1f}" for b in BITS) + " GB/s)"
                             if m == 1 else ""), flush=True)
    if args.md:
        print()
        print(f"2/3-bit vs 4-bit, K x N = {k} x {n}, {args.threads} threads, fp32 x; M = 1 streams the weights "
              f"from DRAM ({args.layers} distinct layers per pass). ms per layer, each layer's best of "
              f"{args.rounds} passes; ratios > 1: fewer bits faster (targets at M = 1: 2-bit >= 1.6x, "
              f"3-bit >= 1.25x).")
        print()
        print("| group | act | M | 4-bit ms | 3-bit ms | 2-bit ms | 4/3-bit | 4/2-bit | weight GB/s (4/3/2) |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            gbs = " / ".join(f"{r['gbs'][b]:.1f}" for b in BITS) if r["m"] == 1 else ""
            print(f"| {r['group']} | {r['act']} | {r['m']} | {r['ms'][4]:.3f} | {r['ms'][3]:.3f} | {r['ms'][2]:.3f} "
                  f"| {r['r3']:.2f}x | {r['r2']:.2f}x | {gbs} |")


if __name__ == "__main__":
    main()
