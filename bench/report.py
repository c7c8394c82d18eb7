"""Turn pytest-benchmark JSON from bench/test_cpu_linear.py into ratio tables and a chart.

    python bench/report.py bench/results.json [more.json ...] [--out bench/RESULTS.md] [--png bench/cpu_speedup.png]

Each JSON is one run (ratios are only formed inside a run). The `## CPU` section of the
output file is replaced; any other section (e.g. `## GPU`) is kept as it is.
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


def machine_line(d, path):
    mi = d.get("machine_info", {})
    k = mi.get("kquant", {})
    load1 = k.get("load_end", ["?"])[0]
    lf = (lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else str(v))
    dirty = " (+ uncommitted changes)" if k.get("dirty_tree") else ""
    return (f"`{os.path.basename(path)}`: **{k.get('cpu_model', mi.get('cpu', {}).get('brand_raw', '?'))}**, "
            f"{k.get('logical_cpus', '?')} logical CPUs, torch threads {k.get('torch_threads', '?')}, "
            f"torch {k.get('torch', '?')}, commit `{k.get('commit', '?')}`{dirty}, "
            f"date {d.get('datetime', '?')[:19]}, fbgemm ISA: {k.get('fbgemm_isa', '?')}, MKL ISA: "
            f"{k.get('mkl_isa', 'default')}, oneDNN ISA: {k.get('onednn_isa', 'default')}, kquant: "
            f"{k.get('kquant_cpu', '?')}, timer {k.get('timer', '?')}, "
            f"1-min load average {lf(load1)} when the run ended")


def gemm_ceiling(d, ceil):
    """(name, GMAC/s) of the int8 multiply-add peak of the instruction kquant's W8A8 GEMM ran in
    this run: full-width tdpbssd where the kernels used AMX, else the AVX2 int16 sequence."""
    amx = "AMX" in d.get("machine_info", {}).get("kquant", {}).get("kquant_cpu", "")
    name = "amx_tdpbssd" if amx and "amx_tdpbssd" in ceil else "int16_vpmaddwd"
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
    cname, cval = gemm_ceiling(d, ceil)
    if cval:
        effs = [(k * n * 512 / t(k, n, 512, "kquant_w8a8") / 1e9 / cval, k, n) for (k, n) in shapes
                if t(k, n, 512, "kquant_w8a8")]
        if effs:
            rows.append((f"W8A8 M=512 >= 70% of the int8 ceiling ({cname})",
                         ", ".join(f"{k}x{n}: {100 * e:.0f}%" for e, k, n in effs), min(effs)[0] >= 0.7))
    m1 = [(ratio(t(k, n, 1, "fbgemm"), t(k, n, 1, "kquant_w8a8")), k, n) for (k, n) in shapes
          if t(k, n, 1, "kquant_w8a8")]
    if m1:
        rows.append(("W8A8 M=1, weights in LLC: >= 1.1x fbgemm",
                     ", ".join(f"{k}x{n}: {r:.2f}x" for r, k, n in m1 if r), min(r for r, _, _ in m1 if r) >= 1.1))
    dram = ceil.get("read_dram_2GiB")
    if cold and dram and "kquant_w8a8" in cold:
        tt, e = cold["kquant_w8a8"]
        pct = e["weight_bytes"] / tt / 1e9 / dram
        rows.append(("W8A8 M=1, weights from DRAM: >= 80% of the DRAM read ceiling", f"{100 * pct:.0f}%", pct >= 0.8))
    for impl, lab in (("kquant_w4a8", "W4A8"), ("kquant_w4a16", "W4A16")):
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
        rows.append(("MiniLM W8A8 >= 2.0x fp32", f"{vs32:.2f}x", vs32 >= 2.0))
        if vsfb:
            rows.append(("MiniLM W8A8 >= 1.1x fbgemm", f"{vsfb:.2f}x", vsfb >= 1.1))
        rows.append(("MiniLM W8A8 mean cosine >= 0.997", f"{e['mean_cosine']:.5f}", e["mean_cosine"] >= 0.997))
    return rows


def section(path, d, lin, mini, ceil, cold, png_rel):
    out = [f"### Run {machine_line(d, path)}", ""]
    rows = targets(d, lin, mini, ceil, cold)
    if rows:
        out += ["CPU targets in this run:", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {a} | {b} | {'yes' if c else '**no**'} |" for a, b, c in rows]
        out.append("")
    cname, cval = gemm_ceiling(d, ceil)
    dram = ceil.get("read_dram_2GiB")
    llc = ceil.get("read_16MiB")  # these layers' weights stay in the LLC between calls
    if ceil:
        out += ["Ceilings (all threads of the run; int8 GMAC/s of register-only loops of each instruction "
                "sequence, the AMX kernel's tile sequence from L1, GB/s of AVX2 reads):", "",
                "| ceiling | value |", "|---|---|"]
        for name, v in ceil.items():
            unit = "GB/s" if name.startswith("read") else "GMAC/s"
            out.append(f"| {name} | {v:.1f} {unit} |")
        out.append("")
    if lin:
        out += ["Linear layers, best-of-rounds (min) ms per call (x: fp32 [M, K]; weights [N, K]); "
                "ratios > 1 mean kquant is faster.",
                f"`W8A8/fbgemm` = fbgemm time / kquant W8A8 time. `eff` = kquant W8A8 GMAC/s as % of the {cname} "
                "ceiling (M > 1) or weight GB/s as % of the one-core read ceiling from the LLC, read_16MiB (M = 1; "
                "384x1536's weights sit in L2, above it).", "",
                "| K x N | M | " + " | ".join(SHORT[i] for i in IMPLS) +
                " | W8A8/fbgemm | W8A8/fp32 | W4A8/W8A8 | W4A16/W8A8 | eff |",
                "|---|---:|" + "---:|" * len(IMPLS) + "---:|---:|---:|---:|---:|"]
        shapes = sorted({(k, n) for (k, n, _, _) in lin}, key=lambda s: (s[0] * s[1] < 1e6, s))
        for k, n in shapes:
            for m in sorted({m for (kk, nn, m, _) in lin if (kk, nn) == (k, n)}):
                t = {i: lin.get((k, n, m, i), (None, None))[0] for i in IMPLS}
                w8 = t["kquant_w8a8"]
                eff = "-"
                if w8:
                    if m == 1 and llc:
                        eff = f"{k * n / w8 / 1e9:.1f} GB/s = {100 * k * n / w8 / 1e9 / llc:.0f}%"
                    elif m > 1 and cval:
                        eff = f"{m * k * n / w8 / 1e9:.0f} GMAC/s = {100 * m * k * n / w8 / 1e9 / cval:.0f}%"
                out.append(f"| {k}x{n} | {m} | " + " | ".join(fmt_ms(t[i]) for i in IMPLS) +
                           f" | {fr(ratio(t['fbgemm'], w8))} | {fr(ratio(t['fp32'], w8))} | "
                           f"{fr(ratio(w8, t['kquant_w4a8']))} | {fr(ratio(w8, t['kquant_w4a16']))} | {eff} |")
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
        ax.set_title(f"{os.path.basename(path)}: {k.get('torch_threads', '?')} thread(s), "
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
