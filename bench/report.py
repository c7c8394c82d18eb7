"""Turn pytest-benchmark JSON from bench/test_cpu_linear.py into ratio tables and a chart.

    python bench/report.py bench/results.json [more.json ...] [--out bench/RESULTS.md] [--png bench/cpu_speedup.png]

Each JSON is one run (ratios are only formed inside a run). The `## CPU` section of the
output file is replaced; any other section (e.g. `## GPU`) is kept as it is.

In a run where kquant's kernels ran at the AVX2 level (machine_info isa == "avx2", e.g.
bench/run_cpu.sh's third run) every kquant Linear cell also states its GMAC/s as a % of the
ceiling, measured in the same run, of the instruction sequence that ran (AVX2_CEILINGS), M = 1
cells the weight GB/s as a % of the read ceiling, and the AVX2 targets (avx2_targets) are
checked from the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STAT = "min"  # best of the rounds: robust when other processes share the cores
IMPLS = ["fp32", "fbgemm", "int_mm", "kquant_w8a8", "kquant_w4a8", "kquant_w4a16", "kquant_w8a16"]
SHORT = {"fp32": "fp32", "fbgemm": "fbgemm", "int_mm": "_int_mm", "kquant_w8a8": "W8A8", "kquant_w4a8": "W4A8",
         "kquant_w4a16": "W4A16", "kquant_w8a16": "W8A16"}
MINILM_SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # all-MiniLM-L6-v2's Linear (K, N), as in the suite
MINILM_M = 2048
READ_CEILING = "read_16MiB"  # one-core read rate of a buffer the size of these layers' weights
# AVX2 level: the ceiling (bench/test_cpu_linear.py::CEILINGS) of the instruction sequence each
# implementation runs, by impl and M. fp32 (MKL) and fbgemm only where they are held to AVX2 too.
AVX2_CEILINGS = {
    "kquant_w8a8": lambda m: "sign_vpmaddubsw" if m <= 3 else "int16_vpmaddwd",
    "kquant_w4a8": lambda m: "w4a8_vpmaddubsw",
    "kquant_w8a16": lambda m: "fp32_fma_avx2",
    "kquant_w4a16": lambda m: "fp32_fma_avx2",
    "fp32": lambda m: "fp32_fma_avx2",
    "fbgemm": lambda m: "fbgemm_style",
}


def load(path):
    with open(path) as f:
        d = json.load(f)
    lin, mini, ceil, cold = {}, {}, {}, {}
    for b in d["benchmarks"]:
        e = b.get("extra_info", {})
        t = b["stats"][STAT]
        if e.get("kind") == "linear":
            lin[(e["K"], e["N"], e["M"], e["impl"])] = (t, e)
        elif e.get("kind") == "linear_cold":
            cold[e["impl"]] = (t, e)
        elif e.get("kind") == "minilm":
            mini[e["impl"]] = (t, e)
        elif e.get("kind") == "ceiling":
            ceil[e["name"]] = e["value"]
    return d, lin, mini, ceil, cold


def fmt_ms(t):
    return "-" if t is None else (f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.1f}")


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fr(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}x"


def kinfo(d):
    return d.get("machine_info", {}).get("kquant", {})


def run_isa(d):
    """The level kquant's CPU kernels ran at in this run: machine_info's isa, or for JSONs
    written before it was recorded, read from the backend's description."""
    k = kinfo(d)
    if k.get("isa"):
        return k["isa"]
    desc = k.get("kquant_cpu", "")
    for key, isa in (("AMX", "amx"), ("AVX-512", "avx512"), ("AVX2", "avx2"), ("scalar", "scalar")):
        if key in desc:
            return isa
    return "?"


def peer_avx2(d, impl):
    """Whether a peer (fp32 = MKL, fbgemm) ran its AVX2 code in this run: held there, or a CPU
    with nothing above AVX2."""
    k = kinfo(d)
    env = {"fp32": k.get("mkl_isa", ""), "fbgemm": k.get("fbgemm_isa", "")}.get(impl, "")
    return env.upper() == "AVX2" or k.get("best_isa") == "avx2"


def fmt_bytes(v):
    if not isinstance(v, (int, float)):
        return str(v)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if v >= size and v % size == 0 or v >= 4 * size:
            return f"{v / size:g} {unit}"
    return f"{v} B"


def fmt_caches(c):
    return ", ".join(f"{lvl.upper()} {fmt_bytes(c[lvl])}" for lvl in ("l1", "l2", "l3") if lvl in c)


def machine_line(d, path):
    mi = d.get("machine_info", {})
    k = mi.get("kquant", {})
    isa_env = f" (KQUANT_CPU_ISA={k['kquant_cpu_isa_env']})" if k.get("kquant_cpu_isa_env") else ""
    caches = ""
    if k.get("cache_sizes"):
        env = k.get("kquant_cpu_cache_env")
        det = k.get("cache_sizes_detected")
        caches = f", kquant cache sizes: {fmt_caches(k['cache_sizes'])}"
        if env:
            caches += f" (KQUANT_CPU_CACHE={env}"
            caches += f"; detected {fmt_caches(det)})" if det else ")"
        elif det and det != k["cache_sizes"]:
            caches += f" (detected {fmt_caches(det)})"
    load1 = k.get("load_end", ["?"])[0]

    def lf(v):
        return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)
    dirty = " (+ uncommitted changes)" if k.get("dirty_tree") else ""
    return (f"`{os.path.basename(path)}`: **{k.get('cpu_model', mi.get('cpu', {}).get('brand_raw', '?'))}**, "
            f"{k.get('logical_cpus', '?')} logical CPUs, torch threads {k.get('torch_threads', '?')}, "
            f"torch {k.get('torch', '?')}, commit `{k.get('commit', '?')}`{dirty}, "
            f"date {d.get('datetime', '?')[:19]}, fbgemm ISA: {k.get('fbgemm_isa', '?')}, MKL ISA: "
            f"{k.get('mkl_isa', 'default')}, oneDNN ISA: {k.get('onednn_isa', 'default')}, kquant: "
            f"{k.get('kquant_cpu', '?')}, kquant ISA: **{run_isa(d)}**{isa_env}{caches}, timer {k.get('timer', '?')}, "
            f"1-min load average {lf(load1)} when the run ended")


def gemm_ceiling(d, ceil):
    """(name, GMAC/s) of the int8 multiply-add peak of the instruction kquant's W8A8 GEMM ran in
    this run: full-width tdpbssd where the kernels used AMX, else the AVX2 int16 sequence."""
    name = "amx_tdpbssd" if run_isa(d) == "amx" and "amx_tdpbssd" in ceil else "int16_vpmaddwd"
    return name, ceil.get(name)


def targets(d, lin, mini, ceil, cold):
    """The CPU speed targets checked on one run: (target, measured, met) rows."""
    rows = []
    t = lambda k, n, m, i: lin.get((k, n, m, i), (None,))[0]  # noqa: E731
    shapes = sorted({(k, n) for (k, n, _, _) in lin})
    big = [r for r in ((ratio(t(k, n, m, "fbgemm"), t(k, n, m, "kquant_w8a8")), k, n, m)
                       for (k, n) in shapes for m in (16, 128, 512)) if r[0] is not None]
    if big:
        worst = min(big)
        rows.append(("W8A8 >= 1.1x fbgemm, every shape, M >= 16",
                     f"min {worst[0]:.2f}x ({worst[1]}x{worst[2]}, M={worst[3]}), max {max(big)[0]:.2f}x",
                     worst[0] >= 1.1))
    avx2 = run_isa(d) == "avx2"  # avx2_targets states W8A8's efficiency, W4A16 M=1 and MiniLM vs fp32
    cname, cval = gemm_ceiling(d, ceil)
    if cval and not avx2:
        effs = [(k * n * 512 / t(k, n, 512, "kquant_w8a8") / 1e9 / cval, k, n) for (k, n) in shapes
                if t(k, n, 512, "kquant_w8a8")]
        if effs:
            rows.append((f"W8A8 M=512 >= 70% of the int8 ceiling ({cname})",
                         ", ".join(f"{k}x{n}: {100 * e:.0f}%" for e, k, n in effs), min(effs)[0] >= 0.7))
    m1 = [(ratio(t(k, n, 1, "fbgemm"), t(k, n, 1, "kquant_w8a8")), k, n) for (k, n) in shapes]
    m1 = [r for r in m1 if r[0] is not None]  # both measured
    if m1:
        rows.append(("W8A8 M=1, weights in LLC: >= 1.1x fbgemm",
                     ", ".join(f"{k}x{n}: {r:.2f}x" for r, k, n in m1), min(r for r, _, _ in m1) >= 1.1))
    dram = ceil.get("read_dram_2GiB")
    if cold and dram and "kquant_w8a8" in cold:
        tt, e = cold["kquant_w8a8"]
        pct = e["weight_bytes"] / tt / 1e9 / dram
        rows.append(("W8A8 M=1, weights from DRAM: >= 80% of the DRAM read ceiling", f"{100 * pct:.0f}%", pct >= 0.8))
    # at the AVX2 level W4A16 decode has its own target (avx2_targets: >= 1.0x W8A8)
    for impl, lab in (("kquant_w4a8", "W4A8"),) + (() if avx2 else (("kquant_w4a16", "W4A16"),)):
        rs = [(ratio(t(k, n, 1, "kquant_w8a8"), t(k, n, 1, impl)), f"{k}x{n}") for (k, n) in shapes]
        if cold and impl in cold and "kquant_w8a8" in cold:
            rs.append((ratio(cold["kquant_w8a8"][0], cold[impl][0]), "cold 4096x4096"))
        rs = [r for r in rs if r[0] is not None]
        if rs:
            rows.append((f"{lab} M=1 >= 1.6x kquant W8A8", ", ".join(f"{w}: {r:.2f}x" for r, w in rs),
                         min(r for r, _ in rs) >= 1.6))
    if "kquant_w8a8" in mini and "fp32" in mini:
        tw, e = mini["kquant_w8a8"]
        vs32 = ratio(mini["fp32"][0], tw)
        vsfb = ratio(mini.get("fbgemm", (None,))[0], tw)
        if not avx2:
            rows.append(("MiniLM W8A8 >= 2.0x fp32", f"{vs32:.2f}x", vs32 >= 2.0))
        if vsfb:
            rows.append(("MiniLM W8A8 >= 1.1x fbgemm", f"{vsfb:.2f}x", vsfb >= 1.1))
        rows.append(("MiniLM W8A8 mean cosine >= 0.997", f"{e['mean_cosine']:.5f}", e["mean_cosine"] >= 0.997))
    return rows


def spread(vals, thr, fmt):
    """vals [(value, label)] -> (measured text, every value >= thr): the worst and the best
    value, and each one below thr."""
    worst, best = min(vals), max(vals)
    if len(vals) == 1:
        return f"{worst[1]}: {fmt(worst[0])}", worst[0] >= thr
    txt = f"min {fmt(worst[0])} ({worst[1]}), max {fmt(best[0])} ({best[1]})"
    low = [f"{lab} {fmt(v)}" for v, lab in sorted(vals) if v < thr]
    txt += f"; below: {', '.join(low)}" if low else f"; all {len(vals)} >= {fmt(thr)}"
    return txt, not low


def avx2_targets(d, lin, mini, ceil, cold):
    """The targets of a run at the AVX2 level, computed from its JSON: (target, measured, met)
    rows. A target whose cases or ceiling the run lacks is reported as not measured, not met."""
    rows = []
    t = lambda k, n, m, i: lin.get((k, n, m, i), (None,))[0]  # noqa: E731
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    times = lambda v: f"{v:.2f}x"  # noqa: E731
    shapes = sorted({(k, n) for (k, n, _, _) in lin}, key=lambda s: (s[0] * s[1] < 1e6, s))

    # (a) W8A8, M >= 128: >= 70% of the int16 vpmaddwd ceiling, every shape incl. MiniLM's at M = 2048
    lab = "W8A8 M >= 128 >= 70% of the int16_vpmaddwd ceiling, every shape incl. the 3 MiniLM shapes at M=2048"
    i16 = ceil.get("int16_vpmaddwd")
    cells = sorted((k, n, m) for (k, n, m, i) in lin if i == "kquant_w8a8" and m >= 128)
    missing = [f"{k}x{n} M={MINILM_M}" for k, n in MINILM_SHAPES if (k, n, MINILM_M) not in cells]
    if not i16 or not cells:
        rows.append((lab, "not measured (" + ("no int16_vpmaddwd ceiling" if not i16 else "no W8A8 case at M >= 128")
                     + " in this run)", False))
    else:
        txt, ok = spread([(m * k * n / t(k, n, m, "kquant_w8a8") / 1e9 / i16, f"{k}x{n} M={m}")
                          for k, n, m in cells], 0.7, pct)
        if missing:
            txt += "; not measured: " + ", ".join(missing)
        rows.append((lab, txt, ok and not missing))

    # (b) MiniLM end to end against fp32
    for impl, thr in (("kquant_w8a8", 2.0), ("kquant_w4a8", 2.3)):
        lab = f"MiniLM {SHORT[impl]} >= {thr:.1f}x fp32"
        r = ratio(mini.get("fp32", (None,))[0], mini.get(impl, (None,))[0])
        rows.append((lab, f"{r:.2f}x" if r else "not measured", r is not None and r >= thr))

    # (c) weight-only at 2 <= M <= 128 at least as fast as fp32, every shape
    for impl in ("kquant_w8a16", "kquant_w4a16"):
        lab = f"{SHORT[impl]} 2 <= M <= 128 >= 1.0x fp32, every shape"
        vals = [(ratio(t(k, n, m, "fp32"), t(k, n, m, impl)), f"{k}x{n} M={m}")
                for (k, n, m, i) in sorted(lin) if i == impl and 2 <= m <= 128]
        vals = [v for v in vals if v[0] is not None]
        rows.append((lab, *spread(vals, 1.0, times)) if vals else (lab, "not measured", False))

    # (d) W4A16 decode at least as fast as W8A8 decode
    lab = "W4A16 M=1 >= 1.0x kquant W8A8 M=1 (speed)"
    vals = [(ratio(t(k, n, 1, "kquant_w8a8"), t(k, n, 1, "kquant_w4a16")), f"{k}x{n}") for k, n in shapes]
    if cold and "kquant_w4a16" in cold and "kquant_w8a8" in cold:
        vals.append((ratio(cold["kquant_w8a8"][0], cold["kquant_w4a16"][0]), "cold 4096x4096"))
    vals = [v for v in vals if v[0] is not None]
    rows.append((lab, *spread(vals, 1.0, times)) if vals else (lab, "not measured", False))
    return rows


def efficiency(d, impl, m, t, e, ceil):
    """A Linear cell's ' (GMAC/s, % of its ceiling)' (+ '; weight GB/s, % of the read ceiling'
    at M = 1) in an AVX2 run; '' where the sequence that ran has no ceiling here."""
    if t is None or e is None or impl not in AVX2_CEILINGS:
        return ""
    if impl in ("fp32", "fbgemm") and not peer_avx2(d, impl):
        return ""
    g = e["macs"] / t / 1e9
    cv = ceil.get(AVX2_CEILINGS[impl](m))
    txt = (f"{g:.0f}" if g >= 10 else f"{g:.1f}") + (f", {100 * g / cv:.0f}%" if cv else "")
    rd = ceil.get(READ_CEILING)
    if m == 1 and impl.startswith("kquant") and rd:
        gb = e["weight_bytes"] / t / 1e9
        txt += f"; {gb:.1f} GB/s, {100 * gb / rd:.0f}%"
    return f" ({txt})"


def section(path, d, lin, mini, ceil, cold, png_rel):
    out = [f"### Run {machine_line(d, path)}", ""]
    rows = targets(d, lin, mini, ceil, cold)
    if rows:
        out += ["CPU targets in this run:", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {a} | {b} | {'yes' if c else '**no**'} |" for a, b, c in rows]
        out.append("")
    avx2 = run_isa(d) == "avx2"
    if avx2 and (lin or mini):
        out += ["AVX2 targets in this run (kquant at the AVX2 level; percentages of the ceilings measured in "
                "this run):", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {a} | {b} | {'yes' if c else '**no**'} |" for a, b, c in avx2_targets(d, lin, mini, ceil, cold)]
        out.append("")
    cname, cval = gemm_ceiling(d, ceil)
    dram = ceil.get("read_dram_2GiB")
    llc = ceil.get(READ_CEILING)  # these layers' weights stay in the LLC between calls
    if ceil:
        out += ["Ceilings (all threads of the run; int8 GMAC/s of register-only loops of each instruction "
                "sequence, the AMX kernel's tile sequence from L1, fp32 multiply-adds of AVX2 FMA, "
                "GB/s of AVX2 reads):", "",
                "| ceiling | value |", "|---|---|"]
        for name, v in ceil.items():
            unit = "GB/s" if name.startswith("read") else "GMAC/s (fp32)" if "fma" in name else "GMAC/s"
            out.append(f"| {name} | {v:.1f} {unit} |")
        out.append("")
    if lin:
        out += ["Linear layers, best-of-rounds (min) ms per call (x: fp32 [M, K]; weights [N, K]); "
                "ratios > 1 mean kquant is faster."]
        if avx2:
            peers = [f"{SHORT[i]} against {AVX2_CEILINGS[i](2)}" for i in ("fp32", "fbgemm") if peer_avx2(d, i)]
            out.append("`W8A8/fbgemm` = fbgemm time / kquant W8A8 time. kquant ran at the AVX2 level, so each kquant "
                       "cell reads `ms (GMAC/s, % of the ceiling measured in this run of the sequence that ran)`: "
                       "W8A8 at M <= 3 against sign_vpmaddubsw, at M > 3 int16_vpmaddwd; W4A8 w4a8_vpmaddubsw; "
                       "W8A16 and W4A16 fp32_fma_avx2 (fp32 multiply-adds)"
                       + (f"; {' and '.join(peers)} too" if peers else "") +
                       f". M = 1 cells add `; weight GB/s, % of {READ_CEILING}` (the one-core read ceiling of a "
                       "buffer the size of these layers' weights; 384x1536's weights sit in L2, above it).")
        else:
            out.append(f"`W8A8/fbgemm` = fbgemm time / kquant W8A8 time. `eff` = kquant W8A8 GMAC/s as % of the "
                       f"{cname} ceiling (M > 1) or weight GB/s as % of the one-core read ceiling from the LLC, "
                       f"{READ_CEILING} (M = 1; 384x1536's weights sit in L2, above it).")
        impls = [i for i in IMPLS if any(key[3] == i for key in lin)]  # those this run measured
        out += ["", "| K x N | M | " + " | ".join(SHORT[i] for i in impls) +
                " | W8A8/fbgemm | W8A8/fp32 | W4A8/W8A8 | W4A16/W8A8 |" + ("" if avx2 else " eff |"),
                "|---|---:|" + "---:|" * len(impls) + "---:|---:|---:|---:|" + ("" if avx2 else "---:|")]
        shapes = sorted({(k, n) for (k, n, _, _) in lin}, key=lambda s: (s[0] * s[1] < 1e6, s))
        for k, n in shapes:
            for m in sorted({m for (kk, nn, m, _) in lin if (kk, nn) == (k, n)}):
                te = {i: lin.get((k, n, m, i), (None, None)) for i in IMPLS}
                t = {i: v[0] for i, v in te.items()}
                w8 = t["kquant_w8a8"]
                if avx2:
                    cells = [fmt_ms(t[i]) + efficiency(d, i, m, *te[i], ceil) for i in impls]
                    eff = ""
                else:
                    cells = [fmt_ms(t[i]) for i in impls]
                    eff = " - |"
                    if w8:
                        if m == 1 and llc:
                            eff = f" {k * n / w8 / 1e9:.1f} GB/s = {100 * k * n / w8 / 1e9 / llc:.0f}% |"
                        elif m > 1 and cval:
                            eff = f" {m * k * n / w8 / 1e9:.0f} GMAC/s = {100 * m * k * n / w8 / 1e9 / cval:.0f}% |"
                out.append(f"| {k}x{n} | {m} | " + " | ".join(cells) +
                           f" | {fr(ratio(t['fbgemm'], w8))} | {fr(ratio(t['fp32'], w8))} | "
                           f"{fr(ratio(w8, t['kquant_w4a8']))} | {fr(ratio(w8, t['kquant_w4a16']))} |" + eff)
        out.append("")
        if png_rel:
            out += [f"![kquant W8A8 / W4A8 speed-up over fbgemm]({png_rel})", ""]
    if cold:
        e0 = next(iter(cold.values()))[1]
        w8 = cold.get("kquant_w8a8", (None,))[0]
        fb = cold.get("fbgemm", (None,))[0]
        out += [f"M = 1 with cold weights: each timed call runs {e0.get('copies')} distinct "
                f"{e0['K']}x{e0['N']} layers once ({e0['K'] * e0['N'] * e0.get('copies', 1) / 2**20:.0f} MiB of int8, "
                "more than the last-level cache), so the weights stream from DRAM.", "",
                "| impl | ms per layer | weight GB/s | % of DRAM read ceiling | vs kquant W8A8 | vs fbgemm |",
                "|---|---:|---:|---:|---:|---:|"]
        for impl, (t, e) in cold.items():
            per = t / e.get("copies", 1)
            gbs = e["weight_bytes"] / t / 1e9
            pct = f"{100 * gbs / dram:.0f}%" if dram else "-"
            out.append(f"| {impl} | {per * 1e3:.3f} | {gbs:.1f} | {pct} | {fr(ratio(w8, t))} | {fr(ratio(fb, t))} |")
        out.append("")
    if mini:
        base = mini.get("fp32", (None, {}))[0]
        fb = mini.get("fbgemm", (None, {}))[0]
        e0 = next(iter(mini.values()))[1]
        out += [f"all-MiniLM-L6-v2 end to end: {e0.get('sentences')} English sentences of kquant/data/corpus.txt, "
                f"batch {e0.get('batch_size')}, {e0.get('tokens')} tokens, mean pooling + L2 norm; cosine to the "
                "fp32 embeddings.", "",
                "| model | min ms | vs fp32 | vs fbgemm | mean cosine | min cosine |",
                "|---|---:|---:|---:|---:|---:|"]
        for impl, (t, e) in mini.items():
            out.append(f"| {impl} | {t * 1e3:.1f} | {fr(ratio(base, t))} | {fr(ratio(fb, t))} | "
                       f"{e.get('mean_cosine', float('nan')):.5f} | {e.get('min_cosine', float('nan')):.5f} |")
        out.append("")
    return out


def chart(runs, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return False
    runs = [r for r in runs if r[2]]  # runs with Linear cases
    if not runs:
        return False
    from matplotlib.ticker import FormatStrFormatter
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False)
    for ax, (path, d, lin, _mini, _ceil, _cold) in zip(axes[0], runs):
        keys = sorted({(k, n, m) for (k, n, m, _) in lin}, key=lambda x: (x[0] * x[1] < 1e6, x))
        labels = [f"{k}x{n}\nM={m}" for k, n, m in keys]
        series = {"W8A8": "kquant_w8a8", "W4A8": "kquant_w4a8", "W4A16": "kquant_w4a16"}
        w = 0.8 / len(series)
        for j, (lab, impl) in enumerate(series.items()):
            vals = [ratio(lin.get((k, n, m, "fbgemm"), (None,))[0], lin.get((k, n, m, impl), (None,))[0]) or 0
                    for k, n, m in keys]
            ax.bar([i + j * w for i in range(len(keys))], vals, w, label=lab)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.1, color="r", lw=0.8, ls="--", label="target 1.1x")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(keys))])
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("speed-up over fbgemm quantize_dynamic")
        k = d.get("machine_info", {}).get("kquant", {})
        ax.set_title(f"{os.path.basename(path)}: {k.get('torch_threads', '?')} thread(s), kquant {run_isa(d)}, "
                     f"fbgemm ISA {k.get('fbgemm_isa', '?')}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def write_section(md_path, lines):
    text = open(md_path).read() if os.path.exists(md_path) else ""
    new = "\n".join(lines).rstrip() + "\n"
    m = re.search(r"^## CPU\b.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if m:
        text = text[:m.start()] + new + ("\n" if text[m.end():] else "") + text[m.end():]
    else:
        text = new + ("\n" + text if text else "")
    with open(md_path, "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--png", default=os.path.join(HERE, "cpu_speedup.png"))
    ap.add_argument("--preamble", default=None, help="markdown file inserted under the ## CPU heading")
    ap.add_argument("--print", action="store_true", help="print the section instead of writing files")
    args = ap.parse_args(argv)
    runs = [(p, *load(p)) for p in args.json]
    lines = ["## CPU", ""]
    if args.preamble:
        with open(args.preamble) as f:
            lines += [f.read().rstrip(), ""]
    png_ok = False if args.print else chart(runs, args.png)
    rel = os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.out))) if png_ok else None
    for i, (p, d, lin, mini, ceil, cold) in enumerate(runs):
        lines += section(p, d, lin, mini, ceil, cold, rel if i == 0 else None)
    if args.print:
        print("\n".join(lines))
    else:
        write_section(args.out, lines)
        print(f"wrote the ## CPU section of {args.out}" + (f" and {args.png}" if png_ok else ""))


if __name__ == "__main__":
    main()
