"""``kquant demo --auto``: the size / accuracy trade-off of all-MiniLM-L6-v2.

Uniform presets (every layer at the same bits) against ``kquant.auto_quantize`` plans at a
range of average-bit budgets, all with one calibration method. Each model embeds the held-out
sentences of the demo's corpus split; the table and a Pareto chart (model MiB against mean
cosine to fp32) show which sizes each approach reaches at which accuracy. The sensitivity
analysis runs once and every budget reuses it.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import demo

DEFAULT_UNIFORM = ("w8a16", "w4a16", "w3a16", "w2a16")
DEFAULT_BUDGETS = (6.0, 5.0, 4.5, 4.0, 3.5, 3.0)
DEFAULT_METHOD = "gptq"
# GPTQ gains from more calibration text than the sensitivity analysis needs (which costs a
# model pass per layer and candidate): the last 384 corpus sentences calibrate, the last 128
# of them rank the layers
CALIB_SENTENCES = 384
SENSITIVITY_SENTENCES = 128


def default_candidates():
    """The demo's candidates: the presets plus finer groups (more accuracy for 0.25 to 1 more
    stored bit per weight), symmetric 3-bit (0.25 bits less than the preset's zero points) and
    2-bit with groups of 128."""
    from .config import PRESETS, QuantConfig
    wo = dict(activations="none")
    return (PRESETS["w8a16"], QuantConfig(weight_bits=4, group_size=32, **wo),
            QuantConfig(weight_bits=4, group_size=64, **wo), PRESETS["w4a16"],
            QuantConfig(weight_bits=3, group_size=64, symmetric=False, **wo), PRESETS["w3a16"],
            QuantConfig(weight_bits=3, group_size=128, symmetric=True, **wo),
            PRESETS["w2a16"], QuantConfig(weight_bits=2, group_size=128, symmetric=False, **wo))


def pareto_front(points: Sequence[Dict[str, float]], x: str = "model_mib", y: str = "cos_mean") -> List[Dict]:
    """The points no other point beats in both size (smaller) and accuracy (larger), by size."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[x], -p[y])):
        if p[y] > best:
            front.append(p)
            best = p[y]
    return front


def on_or_above(point: Dict[str, float], front: Sequence[Dict[str, float]], x: str = "model_mib",
                y: str = "cos_mean") -> bool:
    """Whether ``point`` is on or above the piecewise-linear curve through ``front`` at its size
    (left of the curve: above it only if it beats the smallest point; right of it: the largest)."""
    if not front:
        return True
    pts = sorted(front, key=lambda p: p[x])
    px = point[x]
    if px <= pts[0][x]:
        return point[y] >= pts[0][y] or px < pts[0][x]
    for a, b in zip(pts, pts[1:]):
        if a[x] <= px <= b[x]:
            t = (px - a[x]) / (b[x] - a[x]) if b[x] > a[x] else 1.0
            return point[y] >= a[y] + t * (b[y] - a[y]) - 1e-12
    return point[y] >= pts[-1][y]


def _weights(model) -> int:
    from .nn import QuantLinear
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, (QuantLinear, torch.nn.Linear)))


def _code_bits(model) -> float:
    """The average of the layers' weight bits (codes only), float layers at their dtype's bits."""
    from .nn import QuantLinear
    total = bits = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            n, b = m.in_features * m.out_features, m.bits
        elif isinstance(m, torch.nn.Linear):
            n, b = m.weight.numel(), 8 * m.weight.element_size()
        else:
            continue
        total += n
        bits += n * b
    return bits / total


def _row(kind: str, name: str, model, emb, base_emb, base_nn, seconds: Optional[float], **extra) -> Dict:
    return {"kind": kind, "name": name, "seconds": seconds,
            "model_mib": demo.model_bytes(model) / 2 ** 20,
            "layer_mib": demo.linear_weight_bytes(model) / 2 ** 20,
            "stored_bits": 8 * demo.linear_weight_bytes(model) / _weights(model),
            "code_bits": _code_bits(model),
            **demo.compare(emb, base_emb, base_nn), **extra}


def run(budgets: Sequence[float] = DEFAULT_BUDGETS, uniform: Sequence[str] = DEFAULT_UNIFORM,
        method: str = DEFAULT_METHOD, candidates: Optional[Sequence] = None, sentences: Optional[int] = None,
        batch_size: int = 64, progress: bool = True, calib_sentences: int = CALIB_SENTENCES,
        sensitivity_sentences: int = SENSITIVITY_SENTENCES) -> Dict[str, object]:
    """Uniform presets and auto plans at ``budgets`` (average stored bits per weight), all
    calibrated with ``method`` on ``calib_sentences`` sentences, the plans' sensitivities measured
    on the last ``sensitivity_sentences`` of them; one report dict (JSON-ready)."""
    from tqdm.auto import tqdm

    from .auto import auto_quantize, config_name

    method = demo.method_name(method)
    if not budgets and not uniform:
        raise demo.DemoError("nothing to run: give at least one budget or uniform preset")
    bad = [b for b in budgets if not (isinstance(b, (int, float)) and b > 0)]
    if bad:
        raise demo.DemoError(f"budgets must be positive numbers of bits per weight, got {bad}")
    demo.plan_rows(uniform or ["w8a16"], [method])  # checks preset names and the method
    cands = tuple(candidates or default_candidates())
    load_before = demo.loadavg()
    ev = demo.eval_set(sentences, batch_size, calib=calib_sentences, subset=sensitivity_sentences)
    fp_model, batches, order, calib_batches = ev.fp_model, ev.batches, ev.order, ev.calib_batches
    base_emb, base_nn = ev.base_emb, ev.base_nn
    rows = [_row("fp32", "fp32", fp_model, base_emb, base_emb, base_nn, None)]
    bar = tqdm(total=len(uniform) + len(budgets), desc="kquant demo --auto", unit="model",
               disable=None if progress else True)
    try:
        for preset in uniform:
            bar.set_postfix_str(f"{preset} {method}")
            model, secs = demo.quantize_row(fp_model, preset, method, calib_batches)
            rows.append(_row("uniform", preset, model, demo.embed(model, batches, order), base_emb, base_nn, secs))
            bar.update()
            del model
        sensitivity = None
        for b in budgets:
            bar.set_postfix_str(f"auto {b:g} bits")
            model = copy.deepcopy(fp_model)
            t0 = time.perf_counter()
            plan = auto_quantize(model, calib_batches, budget=b, candidates=cands, method=method.split("+"),
                                 sensitivity=sensitivity, sensitivity_data=ev.subset_batches, progress=False)
            secs = time.perf_counter() - t0
            sensitivity = plan.sensitivity
            counts: Dict[str, int] = {}
            for r in plan.rows:
                counts[r.config] = counts.get(r.config, 0) + 1
            rows.append(_row("auto", f"auto {b:g}", model, demo.embed(model, batches, order), base_emb, base_nn,
                             secs, budget_bits=b, plan_bits=plan.avg_bits, layer_configs=counts,
                             predicted_error=plan.predicted_error, measured_error=plan.measured_error,
                             sensitivity_s=plan.seconds.get("sensitivity"), plan=plan.to_dict()))
            bar.update()
            del model
    finally:
        bar.close()
    front = pareto_front([r for r in rows if r["kind"] in ("uniform", "fp32")])
    for r in rows:
        if r["kind"] == "auto":
            r["on_or_above_uniform_front"] = on_or_above(r, front)
    return {
        "model": demo.MODEL_NAME, "method": method, "candidates": [config_name(c) for c in cands],
        "budgets": list(budgets),
        "corpus": ev.corpus, "calibration": ev.calibration,
        "note": "stored_bits: 8 x (codes + scales + zeros bytes) / weights of the Linear layers (float layers at "
                "their dtype); code_bits: the average of the layers' weight bits; model_mib: every parameter and "
                "buffer; cos: cosine to the fp32 embedding of each held-out sentence",
        "environment": {**demo.environment(), "load_avg_1m_before": load_before, "load_avg_1m_after": demo.loadavg()},
        "results": rows,
    }


# ---------------------------------------------------------------------------- output
def table_rows(report: Dict[str, object]) -> List[List[str]]:
    """The table's cells: name, bits, MiB, accuracy, and the plan's layer configs."""
    out = []
    for r in report["results"]:
        configs = ", ".join(f"{n} {c}" for c, n in r.get("layer_configs", {}).items())
        above = {True: "yes", False: "no"}.get(r.get("on_or_above_uniform_front"), "")
        out.append([r["name"], f"{r['code_bits']:.2f}", f"{r['stored_bits']:.2f}", f"{r['layer_mib']:.2f}",
                    f"{r['model_mib']:.2f}", f"{r['cos_mean']:.5f}", f"{r['cos_min']:.5f}",
                    f"{100 * r['nn_agreement']:.1f}%", "" if r["seconds"] is None else f"{r['seconds']:.0f}",
                    above, configs])
    return out


TABLE_COLUMNS = ["model", "weight bits", "stored bits", "layers MiB", "model MiB", "cos mean", "cos min",
                 "NN agree", "s", "on/above uniform", "layers per config"]


def markdown(report: Dict[str, object]) -> str:
    env = report["environment"]
    lines = [f"{report['model']}, method {report['method']}, {report['corpus']['sentences']} held-out sentences, "
             f"{report['calibration']['sentences']} calibration sentences (sensitivities on the last "
             f"{report['calibration'].get('sensitivity_sentences', report['calibration']['sentences'])}); "
             f"{env['cpu']}, {env['cores']} cores, "
             f"torch {env['torch']}, commit {env['git_commit'] or 'n/a'}.", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---:|" * (len(TABLE_COLUMNS) - 3) + "---|---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    return "\n".join(lines) + "\n"


def render_table(report: Dict[str, object]):
    from rich.table import Table
    t = Table(title=f"kquant demo --auto: {report['model']}, method {report['method']}, "
                    f"{report['corpus']['sentences']} held-out sentences",
              caption=report["note"])
    for col in TABLE_COLUMNS:
        t.add_column(col, justify="left" if col in ("model", "layers per config") else "right")
    for cells in table_rows(report):
        t.add_row(*cells)
    return t


def write_chart(report: Dict[str, object], path: str) -> None:
    """Pareto chart: mean cosine against model MiB (left) and stored bits per weight (right);
    uniform presets joined by their front, auto plans labelled with their budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = report["results"]
    fig = Figure(figsize=(13, 5.5), tight_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, x, label in ((axes[0], "model_mib", "model size, MiB (all parameters and buffers)"),
                         (axes[1], "stored_bits", "Linear layers: stored bits per weight (codes + scales + zeros)")):
        uni = [r for r in res if r["kind"] in ("uniform", "fp32")]
        front = pareto_front(uni, x=x)
        ax.plot([p[x] for p in front], [p["cos_mean"] for p in front], "-", color="#7f7f7f", lw=1,
                label="uniform presets' Pareto front")
        ax.scatter([r[x] for r in uni], [r["cos_mean"] for r in uni], color="#1f77b4", zorder=3,
                   label=f"uniform presets ({report['method']})")
        for r in uni:
            ax.annotate(r["name"], (r[x], r["cos_mean"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        auto = [r for r in res if r["kind"] == "auto"]
        ax.plot([r[x] for r in auto], [r["cos_mean"] for r in auto], "o--", color="#d62728", zorder=4,
                label="auto_quantize plans (budget: bits per weight)")
        for r in auto:
            ax.annotate(f"{r['budget_bits']:g}", (r[x], r["cos_mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color="#d62728")
        ax.set_xlabel(label)
        ax.set_ylabel("mean cosine to fp32 (held-out sentences)")
        lo = min(r["cos_mean"] for r in res)
        ax.set_ylim(max(lo - 0.02, 0.0), 1.002)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    env = report["environment"]
    fig.suptitle(f"{report['model']}: size against accuracy, {report['corpus']['sentences']} held-out sentences, "
                 f"{report['calibration']['sentences']} calibration sentences; {env['cpu']}, commit "
                 f"{env['git_commit'] or 'n/a'}", fontsize=9)
    fig.savefig(path, dpi=110)


def main(budgets: Sequence[float] = DEFAULT_BUDGETS, uniform: Sequence[str] = DEFAULT_UNIFORM,
         method: str = DEFAULT_METHOD, sentences: Optional[int] = None, batch_size: int = 64,
         out: str = "kquant-demo-auto", progress: bool = True, threads: Optional[int] = None, console=None,
         calib_sentences: int = CALIB_SENTENCES, sensitivity_sentences: int = SENSITIVITY_SENTENCES
         ) -> Dict[str, object]:
    """What ``kquant demo --auto`` does: run, print the table, write results.json + pareto.png."""
    from rich.console import Console
    console = console or Console()
    if threads is not None:
        if threads < 1:
            raise demo.DemoError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    report = run(budgets, uniform, method, sentences=sentences, batch_size=batch_size, progress=progress,
                 calib_sentences=calib_sentences, sensitivity_sentences=sensitivity_sentences)
    paths = demo.write_outputs(report, out, chart=write_chart, png="pareto.png")
    console.print(render_table(report))
    console.print(f"wrote {paths['json']} and {paths['png']}")
    return report
