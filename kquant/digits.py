"""A small end-to-end check: train an MLP on scikit-learn's handwritten digits, quantize it with
every preset and calibration method, and compare test accuracy with fp32.

The data is ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes, bundled with
scikit-learn: nothing is downloaded). A fixed stratified split gives 60% train, 10%
calibration and 30% test rows; features are standardized with the training statistics. The
network trains in a few seconds on a CPU and everything is seeded, so a run is reproducible on
a given machine.

``kquant digits`` runs :func:`run`, prints :func:`render_table` and writes ``results.json``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

DEFAULT_PRESETS = ("w8a8", "w8a16", "w4a16", "w4a8")
DEFAULT_METHODS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant", "smoothquant+gptq")
DEFAULT_HIDDEN = (128, 64)
CALIB_BATCH = 64

Split = Tuple[torch.Tensor, torch.Tensor]  # features float32 [N, 64], labels int64 [N]


def load_data(seed: int = 0) -> Dict[str, Split]:
    """``{"train", "calib", "test"}`` -> (features, labels): a stratified 60/10/30 split of the
    digits, standardized with the training split's per-pixel mean and standard deviation
    (pixels that are constant in the training split are only centred)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(f"the digits data ships with scikit-learn ({e}); `pip install scikit-learn`") from None

    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    # 10% of the whole set is 1/7 of the remaining 70%
    x_train, x_calib, y_train, y_calib = train_test_split(x_rest, y_rest, test_size=1 / 7, stratify=y_rest,
                                                          random_state=seed)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0

    def split(a, b) -> Split:
        return (torch.tensor((a - mean) / std, dtype=torch.float32), torch.tensor(b, dtype=torch.int64))

    return {"train": split(x_train, y_train), "calib": split(x_calib, y_calib), "test": split(x_test, y_test)}


def make_mlp(hidden: Sequence[int] = DEFAULT_HIDDEN, in_features: int = 64, classes: int = 10) -> nn.Sequential:
    """Linear + ReLU blocks of widths ``hidden``, then a Linear classifier head."""
    layers: List[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run torch on ``n`` intra-op threads inside the block (restored after; None: unchanged).
    The matrices here are tiny: more threads mostly add synchronization, and on a busy machine
    threads that spin waiting for each other make the work many times slower."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_mlp(data: Dict[str, Split], hidden: Sequence[int] = DEFAULT_HIDDEN, epochs: int = 30,
              batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0) -> nn.Sequential:
    """Train :func:`make_mlp` on ``data["train"]`` with Adam on shuffled minibatches and return it
    in eval mode. The initial weights come from ``torch.manual_seed(seed)`` and the batch order
    from a generator seeded with ``seed``, so the same arguments give the same network. It
    trains on one thread (see :func:`torch_threads`)."""
    with torch_threads(1):
        return _train(data, hidden, epochs, batch_size, lr, weight_decay, seed)


def _train(data, hidden, epochs, batch_size, lr, weight_decay, seed) -> nn.Sequential:
    torch.manual_seed(seed)
    model = make_mlp(hidden)
    x, y = data["train"]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``x`` whose highest logit is the label in ``y``."""
    return (model(x).argmax(dim=1) == y).sum().item() / len(y)


def calib_batches(data: Dict[str, Split], batch_size: int = CALIB_BATCH) -> List[torch.Tensor]:
    """The calibration split as a list of feature batches (what ``quantize_`` takes)."""
    x = data["calib"][0]
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def method_steps(method: str) -> List[str]:
    """"awq+gptq" -> ["awq", "gptq"]: how the report names a method list."""
    return [m.strip().lower() for m in method.split("+") if m.strip()]


def run(presets: Sequence[str] = DEFAULT_PRESETS, methods: Sequence[str] = DEFAULT_METHODS, seed: int = 0,
        hidden: Sequence[int] = DEFAULT_HIDDEN, epochs: int = 30, threads: Optional[int] = 1,
        progress: bool = False) -> Dict[str, object]:
    """Train the network, then quantize a fresh copy of it per (preset, method) and measure test
    accuracy; returns a JSON-ready dict. ``methods`` are names, "+" joining a list applied in
    order ("awq+gptq"). SmoothQuant on a weight-only preset is recorded as not applicable
    instead of run. ``calib_seconds`` is the wall time of ``quantize_`` (calibration and
    quantization). ``threads``: torch intra-op threads for the run, 1 by default (see
    :func:`torch_threads`; None keeps torch's setting); training always uses one. Unknown
    presets or methods and a bad ``threads`` raise ValueError before any work."""
    import kquant
    from .calibration.methods import applicable, parse_methods
    from .config import resolve

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for preset in presets:
        resolve(preset)
    for method in methods:
        parse_methods(method_steps(method))
    data = load_data(seed)
    t0 = time.perf_counter()
    fp_model = train_mlp(data, hidden=hidden, epochs=epochs, seed=seed)
    train_s = time.perf_counter() - t0
    x_test, y_test = data["test"]
    fp_acc = accuracy(fp_model, x_test, y_test)
    batches = calib_batches(data)
    results = []
    with torch_threads(threads):
        used_threads = torch.get_num_threads()
        for preset in presets:
            for method in methods:
                row: Dict[str, object] = {"preset": preset, "method": method}
                if not applicable(method_steps(method), preset):
                    row.update(applicable=False, reason="smoothquant needs int8 activations (w8a8, w4a8)")
                    results.append(row)
                    continue
                model = copy.deepcopy(fp_model)
                steps = method_steps(method)
                t0 = time.perf_counter()
                kquant.quantize_(model, preset, method=steps, calib_data=None if steps == ["rtn"] else batches,
                                 progress=progress)
                seconds = time.perf_counter() - t0
                acc = accuracy(model, x_test, y_test)
                n_quant = sum(isinstance(m, kquant.QuantLinear) for m in model.modules())
                row.update(applicable=True, accuracy=acc, delta_points=100 * (acc - fp_acc), calib_seconds=seconds,
                           quantized_layers=n_quant)
                results.append(row)
    return {
        "dataset": {"name": "sklearn load_digits", "train": len(data["train"][1]), "calib": len(data["calib"][1]),
                    "test": len(y_test), "calib_batch": CALIB_BATCH},
        "model": {"hidden": list(hidden), "epochs": epochs, "seed": seed, "train_seconds": train_s,
                  "parameters": sum(p.numel() for p in fp_model.parameters())},
        "torch": {"version": torch.__version__, "threads": used_threads},
        "fp32_accuracy": fp_acc,
        "results": results,
    }


def render_table(report: Dict[str, object]):
    """The report as a rich Table: one row per (preset, method)."""
    from rich.table import Table

    ds, m = report["dataset"], report["model"]
    t = Table(title=f"kquant digits: MLP {'-'.join(str(h) for h in [64, *m['hidden'], 10])}, "
                    f"fp32 test accuracy {100 * report['fp32_accuracy']:.2f}% on {ds['test']} images",
              caption=f"trained in {m['train_seconds']:.1f} s (seed {m['seed']}); {ds['calib']} calibration "
                      f"images; torch {report['torch']['version']} ({report['torch']['threads']} "
                      f"thread{'' if report['torch']['threads'] == 1 else 's'})")
    for col in ("preset", "method", "accuracy", "vs fp32", "calib s"):
        t.add_column(col, justify="left" if col in ("preset", "method") else "right")
    for r in report["results"]:
        if not r["applicable"]:
            t.add_row(r["preset"], r["method"], "n/a", "", "", style="dim")
            continue
        t.add_row(r["preset"], r["method"], f"{100 * r['accuracy']:.2f}%", f"{r['delta_points']:+.2f}",
                  f"{r['calib_seconds']:.2f}")
    return t


def main(presets: Sequence[str] = DEFAULT_PRESETS, methods: Sequence[str] = DEFAULT_METHODS,
         out: Optional[str] = "kquant-digits", seed: int = 0, threads: Optional[int] = 1, progress: bool = False,
         console=None) -> Dict[str, object]:
    """What ``kquant digits`` does: run, print the table, write ``results.json`` into ``out``."""
    from rich.console import Console

    console = console or Console()
    report = run(presets, methods, seed=seed, threads=threads, progress=progress)
    console.print(render_table(report))
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "results.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        console.print(f"wrote {path}")
    return report
