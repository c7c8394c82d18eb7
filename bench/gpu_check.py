"""One-shot GPU check for kquant's Triton and CUDA kernels (any CUDA machine).

  python bench/gpu_check.py [--out DIR] [--quick] [--backends triton,cuda]

1. Correctness: every GPU kernel through the public ops, forced with KQUANT_BACKEND,
   against the reference on fresh random inputs at LLM shapes. Outputs are poisoned
   first (the caching allocator hands the op a block we filled with NaN), so an
   unwritten element shows up as NaN.
2. Timing: CUDA events, median of many runs, inputs rotated through sets larger than
   L2, against bf16 torch.matmul and torch._int_mm plus its separate dequantization.
   Each is timed twice: as device time per call, replaying a CUDA graph of one call per
   input set (the kernels alone, as a server using CUDA graphs runs them), and eagerly,
   one Python call between two events (includes kquant's per-call host cost).
3. The card's copy bandwidth (device-to-device copy, bytes read + written).
4. A short ratio table printed last; full results in DIR/gpu_check.json and the
   measured per-shape backend preference in DIR/gpu_prefs.json (copy it to
   kquant/backends/gpu_prefs.json to make the router use it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

import kquant
from kquant import backends as router
from kquant import ops as kq_ops
from kquant.backends import reference as ref
from kquant.format import quantize_weight
from kquant.spec import LinearSpec

ops = torch.ops.kquant
DEV = "cuda"
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}


def log(*a):
    print(*a, flush=True)


class forced:
    """Force one backend for the ops called inside (the router reads the env per call)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.old = os.environ.get("KQUANT_BACKEND")
        os.environ["KQUANT_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("KQUANT_BACKEND", None)
        else:
            os.environ["KQUANT_BACKEND"] = self.old


def poison(numel, dtype):
    """Leave a NaN-filled (or 0x7F-filled) block in the caching allocator for the next allocation."""
    t = torch.empty(numel, dtype=dtype, device=DEV)
    t.fill_(float("nan") if dtype.is_floating_point else 0x55)
    del t


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- helpers
def make_weight(op, k, n, group, symmetric=True):
    bits = int(op[1])  # "w3a16_linear" -> 3
    w = torch.randn(n, k, device=DEV) * 0.02
    return quantize_weight(w, bits, group, symmetric)


def spec_of(op, p):
    return LinearSpec(p.bits, p.group_size, p.symmetric, op.endswith("a8_linear"), p.in_features, p.out_features,
                      p.qweight.device)


def implements(backend, op, p):
    """Whether the backend runs this layer at all (the CUDA kernels refuse 3- and 2-bit weights)."""
    return router.get(backend).can_implement(spec_of(op, p))[0]


def prepared(op, p, backend):
    """(data, layout) as the backend would keep it inside a QuantLinear."""
    with forced(backend):
        data, kernel = router.prepare_linear(spec_of(op, p), p.qweight)
    return data, kernel.layout


def call(op, x, data, layout, p, bias, act_scale=None):
    """The public op on canonical weights; the prepared-layer op on another layout."""
    spec = spec_of(op, p)
    if layout == 0:
        return kq_ops.linear(p.bits, spec.int8_activations, x, data, p.scales, p.zeros, bias, act_scale,
                             p.group_size)
    x2 = kq_ops.flatten(x, spec.in_features, spec.padded_in_features)
    return torch.ops.kquant._linear_prepared(x2, data, p.scales, p.zeros, bias, act_scale, p.bits, p.group_size,
                                             spec.in_features, spec.int8_activations, layout)


def oracle(op, x, p, bias, act_scale=None):
    if op.endswith("a8_linear"):
        return ref.act_linear(x, p.qweight, p.scales, bias, act_scale, p.group_size, p.bits)
    return ref.weight_only_linear(x, p.qweight, p.scales, p.zeros, bias, p.group_size, p.bits)


# ----------------------------------------------------------------------------- correctness
def check_exact(backend, results):
    for m, k, n in [(1, 4096, 4096), (33, 4096, 11008), (1024, 14336, 4096), (17, 1025, 17)]:
        name = f"int8_mm M={m} K={k} N={n}"
        try:
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
            b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
            with forced(backend):
                poison(m * n, torch.int32)
                out = ops.int8_mm(a, b)
            ok = torch.equal(out, ref.int8_mm(a, b))
            results.append(dict(backend=backend, case=name, ok=ok, err=0.0 if ok else 1.0))
        except kquant.BackendError as e:  # the backend's can_run refused this shape
            results.append(dict(backend=backend, case=name, ok=None, skipped=str(e)[-200:]))
        except Exception as e:  # noqa: BLE001
            results.append(dict(backend=backend, case=name, ok=False, error=f"{type(e).__name__}: {e}"))
    for m, k in [(1, 4096), (16, 14336), (4096, 4096), (33, 1025)]:
        name = f"quantize_per_token M={m} K={k}"
        try:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * 3
            x[0] = 0
            with forced(backend):
                poison(m * k, torch.int8)
                q, s = ops.quantize_per_token(x)
            rq, rs = ref.quantize_per_token(x)
            ok = torch.equal(q, rq) and torch.equal(s, rs)
            results.append(dict(backend=backend, case=name, ok=ok, err=0.0 if ok else 1.0))
        except Exception as e:  # noqa: BLE001
            results.append(dict(backend=backend, case=name, ok=False, error=f"{type(e).__name__}: {e}"))


LINEAR_CASES = [
    # op, group, symmetric, M list, (K, N) list
    ("w8a8_linear", -1, True, [1, 16, 33, 1024], [(4096, 4096), (4096, 14336), (14336, 4096), (11008, 4096)]),
    ("w8a8_linear", 128, True, [16, 1024], [(4096, 11008)]),
    ("w4a8_linear", 128, True, [1, 33, 1024], [(4096, 4096), (14336, 4096)]),
    ("w4a16_linear", 128, True, [1, 7, 16, 33, 1024], [(4096, 4096), (4096, 14336), (14336, 4096)]),
    ("w4a16_linear", 32, False, [1, 16], [(4096, 11008)]),
    ("w4a16_linear", 64, True, [1, 16], [(11008, 4096)]),
    ("w8a16_linear", -1, True, [1, 16, 33, 1024], [(4096, 4096), (4096, 14336)]),
    ("w8a16_linear", 128, False, [1, 16], [(14336, 4096)]),
    # 3- and 2-bit weights: triton only (cuda refuses them; recorded as refused)
    ("w3a8_linear", 128, True, [1, 33, 1024], [(4096, 4096), (14336, 4096)]),
    ("w2a8_linear", -1, True, [1, 33, 1024], [(4096, 4096)]),
    ("w3a16_linear", 128, True, [1, 7, 16, 33, 1024], [(4096, 4096), (4096, 14336)]),
    ("w3a16_linear", 64, False, [1, 16], [(11008, 4096)]),
    ("w2a16_linear", 128, True, [1, 7, 16, 33, 1024], [(4096, 4096), (14336, 4096)]),
    ("w2a16_linear", 32, False, [1, 16], [(4096, 11008)]),
]


def check_linear(backend, results, quick):
    for op, group, sym, ms, shapes in LINEAR_CASES:
        for k, n in shapes[:1] if quick else shapes:
            p = make_weight(op, k, n, group, sym)
            try:
                data, layout = prepared(op, p, backend)
            except Exception as e:  # noqa: BLE001
                results.append(dict(backend=backend, case=f"{op} prepare K={k} N={n}", ok=False,
                                    error=f"{type(e).__name__}: {e}"))
                continue
            for m in ms:
                for dtype in (torch.bfloat16, torch.float16):
                    name = f"{op} g={group} sym={sym} M={m} K={k} N={n} {str(dtype)[6:]}"
                    try:
                        x = torch.randn(m, k, device=DEV, dtype=dtype)
                        bias = torch.randn(n, device=DEV, dtype=dtype)
                        with forced(backend):
                            poison(m * n, dtype)
                            try:
                                y = call(op, x, data, layout, p, bias)
                            except kquant.BackendError as e:  # the backend's can_run refused this shape
                                results.append(dict(backend=backend, case=name, ok=None, skipped=str(e)[-200:]))
                                continue
                        torch.cuda.synchronize()
                        expect = oracle(op, x, p, bias)
                        err = rel_err(y, expect)
                        ok = bool(torch.isfinite(y).all()) and err <= TOL[dtype]
                        results.append(dict(backend=backend, case=name, ok=ok, err=err))
                    except Exception as e:  # noqa: BLE001
                        results.append(dict(backend=backend, case=name, ok=False, error=f"{type(e).__name__}: {e}"))


# ----------------------------------------------------------------------------- timing
def bench(fn_sets, reps=100, warmup=10):
    """Median microseconds of fn over rotating argument sets (fn_sets: list of thunks)."""
    for i in range(warmup):
        fn_sets[i % len(fn_sets)]()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn_sets[i % len(fn_sets)]()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000.0)
    return statistics.median(times)


def bench_graph(fn_sets, reps=20):
    """Median device microseconds per call, from a CUDA graph that replays one call per
    argument set back to back: the kernels' own time, without Python's per-call launch
    cost (what a server running CUDA graphs sees). None if the calls cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for fn in fn_sets:  # warm-up on the side stream, as capture requires
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for fn in fn_sets:
                fn()
    except Exception as e:  # noqa: BLE001
        log(f"graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None
    return bench([g.replay], reps=reps, warmup=1) / len(fn_sets)


def timed(row, key, fn_sets):
    """row[key] = device time per call (graph replay, eager if capture fails); row[key_eager]."""
    row[key.replace("_us", "_eager_us")] = bench(fn_sets)
    row[key] = bench_graph(fn_sets) or row[key.replace("_us", "_eager_us")]
    return row[key]


def copy_bandwidth():
    n = 1 << 28  # 1 GiB of fp32 per buffer
    a = torch.empty(n, device=DEV)
    b = torch.empty(n, device=DEV)
    a.normal_()
    us = bench([lambda: b.copy_(a)], reps=20, warmup=3)
    return 2 * a.numel() * 4 / (us * 1e-6) / 1e9  # GB/s, read + write


def n_sets(bytes_per_set, l2=None):
    l2 = l2 or getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(16, int(3 * l2 // max(1, bytes_per_set)) + 1))


def time_cases(backends, quick, bw):
    rows = []
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
    if quick:
        shapes = shapes[:1]
    plan = [("w8a8_linear", -1, [1024, 4096]), ("w4a8_linear", 128, [1024, 4096]),
            ("w4a16_linear", 128, [1, 16]), ("w8a16_linear", -1, [1, 16]), ("w8a8_linear", -1, [1, 16]),
            ("w3a16_linear", 128, [1, 16]), ("w2a16_linear", 128, [1, 16]), ("w3a8_linear", 128, [1024]),
            ("w2a8_linear", -1, [1024])]
    for op, group, ms in plan:
        for k, n in shapes:
            for m in ms:
                p0 = make_weight(op, k, n, group)
                wbytes = p0.qweight.numel() + m * k * 2
                sets = n_sets(wbytes)
                ps = [p0] + [make_weight(op, k, n, group) for _ in range(sets - 1)]
                xs = [torch.randn(m, k, device=DEV, dtype=torch.bfloat16) for _ in range(sets)]
                wbf = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(n_sets(n * k * 2))]
                row = dict(op=op, M=m, K=k, N=n, group=group)
                timed(row, "bf16_matmul_us", [(lambda i=i: torch.matmul(xs[i % sets], wbf[i % len(wbf)].T))
                                              for i in range(max(sets, len(wbf)))])
                if op.startswith("w8a8") and m > 16:
                    qx = [torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV) for _ in range(sets)]
                    wt = [p.qweight.T for p in ps]  # [K, N] column-major view, what _int_mm wants
                    sx = torch.rand(m, 1, device=DEV)
                    sw = ps[0].scales.T

                    def int_mm_deq(i):
                        acc = torch._int_mm(qx[i], wt[i])
                        return (acc.float() * sx * sw).to(torch.bfloat16)
                    try:
                        timed(row, "int_mm_deq_us", [(lambda i=i: int_mm_deq(i)) for i in range(sets)])
                    except Exception as e:  # noqa: BLE001
                        row["int_mm_error"] = str(e)
                for be in backends:
                    if not implements(be, op, p0):
                        continue
                    try:
                        prep = [prepared(op, p, be) for p in ps]
                        with forced(be):
                            fns = [(lambda i=i: call(op, xs[i], prep[i][0], prep[i][1], ps[i], None))
                                   for i in range(sets)]
                            fns[0]()
                            us = timed(row, f"{be}_us", fns)
                            if be == "cuda" and op == "w8a8_linear" and group == -1 and m > 16:
                                os.environ["KQUANT_CUDA_WGMMA"] = "1"  # the opt-in wgmma kernel, for comparison
                                try:
                                    timed(row, "cuda_wgmma_us", fns)
                                finally:
                                    del os.environ["KQUANT_CUDA_WGMMA"]
                        row[f"{be}_vs_bf16"] = row["bf16_matmul_us"] / us
                        if "int_mm_deq_us" in row:
                            row[f"{be}_vs_int_mm"] = row["int_mm_deq_us"] / us
                        moved = ps[0].qweight.numel() + ps[0].scales.numel() * 4 + m * k * 2 + m * n * 2
                        row[f"{be}_bw_frac"] = moved / (us * 1e-6) / 1e9 / bw
                    except Exception as e:  # noqa: BLE001
                        row[f"{be}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                log(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}))
                del ps, xs, wbf
                torch.cuda.empty_cache()
    return rows


def prefs_from(rows, backends):
    """{op: {M: fastest backend}} from the measured rows (used by the router on CUDA)."""
    prefs = {}
    for r in rows:
        best = [(r[f"{b}_us"], b) for b in backends if f"{b}_us" in r]
        if best:
            prefs.setdefault(r["op"], {}).setdefault(str(r["M"]), []).append(min(best)[1])
    return {op: {m: max(set(v), key=v.count) for m, v in d.items()} for op, d in prefs.items()}


def markdown(res) -> str:
    """Ratio table (markdown) of a gpu_check.json: device times from graph replay."""
    info = res["info"]
    out = [f"Device: **{info['device']}** ({info.get('sms')} SMs), torch {info.get('torch')}, "
           f"Triton {info.get('triton', '-')}, Python {info.get('python')}, commit `{info.get('commit')}`; "
           f"copy bandwidth {res['copy_bw_gbs']:.0f} GB/s (read + write).", "",
           "| op | M | K | N | bf16 matmul | `_int_mm`+deq | triton | cuda | best vs bf16 | best vs `_int_mm`+deq "
           "| best % copy bw | eager per call: bf16 / triton / cuda |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def us(v):
        return "" if v is None else f"{v:.1f}"
    for r in res["timings"]:
        best = min((r[f"{b}_us"], b) for b in ("triton", "cuda") if f"{b}_us" in r)
        intmm = r.get("int_mm_deq_us")
        cuda = us(r.get("cuda_us")) + (f" (wgmma {r['cuda_wgmma_us']:.1f})" if "cuda_wgmma_us" in r else "")
        eager = " / ".join(us(r.get(k)) or "-" for k in ("bf16_matmul_eager_us", "triton_eager_us", "cuda_eager_us"))
        out.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {us(r['bf16_matmul_us'])} | {us(intmm)} "
                   f"| {us(r.get('triton_us'))} | {cuda} | {r['bf16_matmul_us'] / best[0]:.2f}x ({best[1]}) "
                   f"| {'' if intmm is None else f'{intmm / best[0]:.2f}x'} "
                   f"| {100 * r[f'{best[1]}_bw_frac']:.0f}% | {eager} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check"))
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--markdown", metavar="JSON", help="print the ratio table of a saved gpu_check.json and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)), end="")
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    info = dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                backends=kquant.backends())
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    log(json.dumps(info, default=str))
    bes = [b for b in args.backends.split(",") if router.status(b)[0]]
    for b in args.backends.split(","):
        if b not in bes:
            log(f"backend {b} unavailable: {router.status(b)[1]}")
    results = []
    for be in bes:
        check_exact(be, results)
        check_linear(be, results, args.quick)
    bad = [r for r in results if r.get("ok") is False]
    for r in results:
        if r.get("ok") is not True:
            log("CHECK", json.dumps(r))
    log(f"correctness: {sum(r.get('ok') is True for r in results)} ok, {len(bad)} failed, "
        f"{sum(r.get('ok') is None for r in results)} refused by can_run ({time.time() - t0:.0f}s)")
    bw = copy_bandwidth()
    log(f"copy bandwidth: {bw:.0f} GB/s (read + write)")
    rows = [] if args.skip_timing else time_cases(bes, args.quick, bw)
    prefs = prefs_from(rows, bes)
    out = dict(info=info, copy_bw_gbs=bw, correctness=results, timings=rows, prefs=prefs,
               seconds=time.time() - t0)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    if rows:
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(markdown(out))
    with open(os.path.join(args.out, "gpu_prefs.json"), "w") as f:
        json.dump(dict(device=info["device"], commit=info.get("commit"), prefs=prefs), f, indent=1)
    log(f"\n{info['device']}  copy {bw:.0f} GB/s  commit {info.get('commit')}")
    log("device time per call from CUDA graph replay; 'eager' is one Python call per timed launch")
    hdr = f"{'op':14} {'M':>5} {'K':>6} {'N':>6} {'bf16 us':>8} {'int_mm us':>9}"
    for b in bes:
        hdr += f" | {b + ' us':>10} {'eager':>6} {'xbf16':>6} {'xintmm':>6} {'%bw':>5}"
    log(hdr)
    for r in rows:
        line = f"{r['op']:14} {r['M']:>5} {r['K']:>6} {r['N']:>6} {r['bf16_matmul_us']:>8.1f} " \
               f"{r.get('int_mm_deq_us', float('nan')):>9.1f}"
        for b in bes:
            if f"{b}_us" in r:
                line += f" | {r[f'{b}_us']:>10.1f} {r[f'{b}_eager_us']:>6.0f} {r[f'{b}_vs_bf16']:>6.2f} " \
                        f"{r.get(f'{b}_vs_int_mm', float('nan')):>6.2f} {100 * r[f'{b}_bw_frac']:>5.0f}"
            else:
                line += f" | {'ERR':>10} {'':>6} {'':>6} {'':>6} {'':>5}"
        if "cuda_wgmma_us" in r:
            line += f"  (wgmma {r['cuda_wgmma_us']:.1f})"
        log(line)
    log(f"correctness failures: {len(bad)}; total {time.time() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
