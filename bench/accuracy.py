"""Accuracy of each preset and calibration method on the real all-MiniLM-L6-v2 (no latency).

    python bench/accuracy.py [--methods rtn,gptq,awq+gptq] [--presets w8a8 w4a16] [--out bench/results/accuracy]

The model, the corpus split (the last 128 sentences of kquant/data/corpus.txt calibrate, the
others are evaluated), the embeddings and the comparison are those of ``kquant demo``
(kquant/demo.py), so the numbers are the demo's accuracy columns without its timing passes.
Methods: names joined by commas, "+" applying an equalization method before a weight method
("awq+gptq"), or "all" (the default: every method that applies to each preset). A pair asked
for by name that does not apply (SmoothQuant on a weight-only preset) is skipped with a note.

Writes into --out: accuracy.json (everything), accuracy.md (a section to paste into
bench/RESULTS.md: preset, method, mean/min cosine, NN agreement, calibration seconds) and
accuracy.png (mean cosine per preset, one bar per method). When ``kquant.digits`` exists, its
digits network check runs with the same presets and methods and is added to both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from kquant import demo  # noqa: E402
from kquant.nn import QuantLinear  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "accuracy")


def run_minilm(presets: Sequence[str], methods: Optional[Sequence[str]], sentences: Optional[int] = None,
               batch_size: int = 64, progress: bool = True) -> Dict[str, object]:
    """Quantize a copy of MiniLM per (preset, method), embed the evaluation sentences and compare
    with fp32; one model is kept at a time."""
    from tqdm.auto import tqdm

    pairs, notes = demo.plan_rows(presets, methods)
    load_before = demo.loadavg()
    ev = demo.eval_set(sentences, batch_size)
    rows: List[Dict[str, object]] = []
    bar = tqdm(pairs, desc="bench/accuracy", unit="model", disable=None if progress else True)
    for preset, method in bar:
        bar.set_postfix_str(f"{preset} {method}")
        model, seconds = demo.quantize_row(ev.fp_model, preset, method, ev.calib_batches)
        rows.append({"preset": preset, "method": method, "calib_s": seconds,
                     **demo.compare(demo.embed(model, ev.batches, ev.order), ev.base_emb, ev.base_nn),
                     "quantized_layers": sum(isinstance(m, QuantLinear) for m in model.modules()),
                     "weight_bytes": demo.linear_weight_bytes(model)})
        del model
    bar.close()
    return {
        "model": demo.MODEL_NAME,
        "corpus": ev.corpus,
        "calibration": ev.calibration,
        "methods": list(dict.fromkeys(m for _, m in pairs)),
        "skipped": notes,
        "calib_note": "calib_s: wall time of kquant.quantize_ (calibration and quantization; rtn: quantization only)",
        "environment": {**demo.environment(), "load_avg_1m_before": load_before,
                        "load_avg_1m_after": demo.loadavg()},
        "results": rows,
    }


def run_digits(presets: Sequence[str], methods: Sequence[str]) -> Optional[Dict[str, object]]:
    """The digits network check of ``kquant.digits`` (its report, plus the file it came from), or
    None (with a message) without it."""
    try:
        from kquant import digits
    except ImportError as e:
        print(f"digits network check skipped: kquant.digits is not available ({e})")
        return None
    try:
        report = digits.run(list(presets), list(methods))
    except ImportError as e:  # e.g. its data set's package is missing
        print(f"digits network check skipped: {e}")
        return None
    return {**report, "module_file": os.path.abspath(digits.__file__)}


# ---------------------------------------------------------------------------- output
def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def markdown(report: Dict[str, object]) -> str:
    """The section for bench/RESULTS.md."""
    m = report["minilm"]
    env, corpus, calib = m["environment"], m["corpus"], m["calibration"]
    lines = [
        "## Accuracy by preset and calibration method",
        "",
        f"{m['model']}: each row quantizes a fresh copy of the fp32 model (`kquant.quantize_`) and embeds "
        f"{corpus['sentences']} sentences of `kquant/data/corpus.txt` (mean pooling, L2 normalized); "
        f"the {calib['sentences']} sentences after them ({calib['tokens']} tokens) are the calibration set and "
        f"are never evaluated. Cosine: similarity to the fp32 embedding of the same sentence. NN agreement: "
        f"sentences whose nearest neighbour is the fp32 one. Calib s: wall time of `quantize_` "
        f"(calibration + quantization; RTN only quantizes). Reproduce with `python bench/accuracy.py`.",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} "
        f"thread{'' if env['torch_threads'] == 1 else 's'}), "
        f"commit {env['git_commit'] or 'n/a'}, load average {env['load_avg_1m_before']} -> "
        f"{env['load_avg_1m_after']} (a load above the thread count means other jobs shared the cores, and "
        f"calibration seconds grow with it).",
        "",
        "| preset | method | mean cosine | min cosine | NN agreement | calib s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in m["results"]:
        lines.append(f"| {r['preset']} | {r['method']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
                     f"{100 * r['nn_agreement']:.1f}% | {r['calib_s']:.1f} |")
    if m["skipped"]:
        lines += ["", "Not run:", ""] + [f"- {note}" for note in m["skipped"]]
    digits = report.get("digits")
    if isinstance(digits, dict):
        lines += ["", "### Digits network (`kquant.digits`)", ""]
        lines += [f"- {k}: {_cell(v)}" for k, v in digits.items()
                  if isinstance(v, (int, float, str)) and k != "module_file"]
        rows = [r for r in digits.get("results", []) if isinstance(r, dict)]
        cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
        if rows:
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_chart(report: Dict[str, object], path: str) -> None:
    """Grouped bars: mean cosine to fp32 per preset (groups), one bar per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = report["minilm"]
    res = m["results"]
    presets = list(dict.fromkeys(r["preset"] for r in res))
    methods = list(dict.fromkeys(r["method"] for r in res))
    cell = {(r["preset"], r["method"]): r for r in res}
    palette = ["#7f7f7f", "#1f77b4", "#2ca02c", "#17becf", "#ff7f0e", "#d62728", "#9467bd", "#8c564b"]
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(9.0, 1.1 * len(presets) * len(methods) / 2 + 3), 5.5), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for j, method in enumerate(methods):
        xs = [i - 0.4 + width * (j + 0.5) for i, p in enumerate(presets) if (p, method) in cell]
        ys = [cell[(p, method)]["cos_mean"] for p in presets if (p, method) in cell]
        bars = ax.bar(xs, ys, width=width * 0.95, label=method, color=palette[j % len(palette)])
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.4f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7,
                        rotation=90)
    lo = min(r["cos_mean"] for r in res)
    ax.set_ylim(max(0.0, lo - (1 - lo) * 0.3 - 1e-4), 1.0 + (1 - lo) * 0.25 + 1e-4)
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("mean cosine similarity to fp32")
    ax.legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    env = m["environment"]
    ax.set_title(f"{m['model']}: {m['corpus']['sentences']} evaluation sentences, {m['calibration']['sentences']} "
                 f"calibration sentences\n{env['cpu']}, torch {env['torch']}, commit {env['git_commit'] or 'n/a'}",
                 fontsize=9)
    fig.savefig(path, dpi=110)


def write_outputs(report: Dict[str, object], out: str) -> Dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"accuracy.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(report))
    write_chart(report, paths["png"])
    return paths


def run_auto(args) -> int:
    """``--auto``: kquant.demo_auto's trade-off, written as auto.json, auto.md and pareto.png."""
    from kquant import demo_auto
    methods = _split(args.methods)
    method = demo_auto.DEFAULT_METHOD if methods == ["all"] else methods[0]
    presets = demo_auto.DEFAULT_UNIFORM if args.presets == list(demo.DEFAULT_PRESETS) else _split(args.presets)
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        report = demo_auto.run(args.budgets or demo_auto.DEFAULT_BUDGETS, presets, method, sentences=args.sentences,
                               progress=not args.no_progress)
    except demo.DemoError as e:
        print(f"bench/accuracy.py: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "auto.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "auto.md"), "w", encoding="utf-8") as f:
        f.write(demo_auto.markdown(report))
    demo_auto.write_chart(report, os.path.join(args.out, "pareto.png"))
    print(demo_auto.markdown(report))
    print(f"wrote auto.json, auto.md and pareto.png in {args.out}")
    return 0


def _split(values: Optional[List[str]]) -> Optional[List[str]]:
    return None if values is None else [v for s in values for v in s.split(",") if v]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", "--method", nargs="+", default=["all"], metavar="METHOD",
                    help=f"comma separated: {', '.join(demo.ALL_METHODS)} or all (default: all)")
    ap.add_argument("--presets", nargs="+", default=list(demo.DEFAULT_PRESETS), metavar="PRESET",
                    help=f"default: {' '.join(demo.DEFAULT_PRESETS)}")
    ap.add_argument("--sentences", type=int, default=None, metavar="N",
                    help=f"evaluate the first N sentences (default: all but the last {demo.CALIB_SENTENCES})")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: bench/results/accuracy)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--auto", action="store_true",
                    help="the size / accuracy trade-off instead: uniform presets (--presets, default "
                         "w8a16 w4a16 w3a16 w2a16) against kquant.auto_quantize plans at --budgets, one method "
                         "(default gptq); writes auto.json, auto.md and pareto.png (as kquant demo --auto)")
    ap.add_argument("--budgets", nargs="+", type=float, default=None, metavar="BITS",
                    help="with --auto: stored bits per weight of each plan")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.auto:
        return run_auto(args)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise demo.DemoError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        report: Dict[str, object] = {"minilm": run_minilm(_split(args.presets), _split(args.methods),
                                                          args.sentences, progress=not args.no_progress)}
    except demo.DemoError as e:
        print(f"bench/accuracy.py: error: {e}", file=sys.stderr)
        return 2
    report["digits"] = run_digits(_split(args.presets), report["minilm"]["methods"])
    report["total_s"] = time.perf_counter() - t0
    paths = write_outputs(report, args.out)
    print(markdown(report))
    print(f"wrote {paths['json']}, {paths['md']} and {paths['png']} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
