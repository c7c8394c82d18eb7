"""Data-parallel training with quantized gradient all-reduce: ``kquant demo-train --ddp``.

The digits MLP (:func:`kquant.digits.make_mlp`, 64-128-64-10) is trained with
``torch.nn.parallel.DistributedDataParallel`` on ``WORLD_SIZE`` CPU processes (gloo, spawned
with ``torch.multiprocessing``), once per config:

* ``fp32``: DDP's default all-reduce;
* ``fp16``: PyTorch's ``fp16_compress_hook``;
* ``kquant-8bit`` / ``-4bit`` / ``-2bit``: :func:`kquant.distributed.quantized_allreduce_hook`
  with error feedback.

Every config starts from the same weights (``torch.manual_seed(seed)``) and sees the same
batches: a seeded permutation per epoch, cut into global batches of ``GLOBAL_BATCH`` rows, rank
r training on rows r::WORLD_SIZE of each. Rank 0 measures test accuracy after every epoch.
Bytes per step are what one rank sends for gradients: counted by the kquant hook itself, and
for fp32 / fp16 the ring all-reduce volume ``2 (W-1)/W * n * 4`` (fp16: half of it), n being
the number of gradient elements.

All configs run one after another in a single spawn of the processes. The parent waits at most
``timeout`` seconds for each config; on a timeout it kills the processes and raises
:class:`kquant.demo.DemoError`, and an exception in a process is raised as a DemoError holding
its traceback.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .demo import DemoError

WORLD_SIZE = 2
HIDDEN = (128, 64)
GLOBAL_BATCH = 64
LR = 2e-3
EPOCHS = 30
BITS = (8, 4, 2)
CHUNK_SIZE = 256
TIMEOUT = 300.0             # seconds per config
PG_TIMEOUT_S = 60           # gloo collective timeout
CONFIG_COLORS = {"fp32": "#000000", "fp16": "#7f7f7f", "kquant-8bit": "#1f77b4", "kquant-4bit": "#ff7f0e",
                 "kquant-2bit": "#d62728"}


def config_names(bits: Sequence[int] = BITS) -> List[str]:
    return ["fp32", "fp16"] + [f"kquant-{b}bit" for b in bits]


def ring_allreduce_bytes(n_elements: int, element_bytes: float, world_size: int = WORLD_SIZE) -> float:
    """Bytes one rank sends in a ring all-reduce of ``n_elements`` values."""
    return 2 * (world_size - 1) / world_size * n_elements * element_bytes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_options(epochs, bits, seed, timeout) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DemoError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DemoError(f"--seed must be an integer, got {seed!r}")
    bad = [b for b in bits if b not in BITS]
    if bad:
        raise DemoError(f"bits must be among {', '.join(map(str, BITS))}, got {bad[0]!r}")
    if len(set(bits)) != len(tuple(bits)):
        raise DemoError(f"bits repeat: {tuple(bits)}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise DemoError(f"timeout must be a number of seconds > 0, got {timeout!r}")


# ---------------------------------------------------------------------------- one process
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).sum().item() / len(y)
    model.train()
    return acc


def _train_config(name: str, rank: int, data, epochs: int, seed: int) -> Dict[str, object]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .digits import make_mlp

    world = dist.get_world_size()
    torch.manual_seed(seed)
    model = make_mlp(HIDDEN)
    n_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ddp = DDP(model)
    state = None
    if name == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
        ddp.register_comm_hook(None, fp16_compress_hook)
    elif name.startswith("kquant-"):
        from .distributed import QuantizedCommState, quantized_allreduce_hook
        bits = int(name[len("kquant-"):-len("bit")])
        state = QuantizedCommState(process_group=None, bits=bits, chunk_size=CHUNK_SIZE, error_feedback=True,
                                   warmup_steps=0, seed=seed)
        ddp.register_comm_hook(state, quantized_allreduce_hook)
    elif name != "fp32":
        raise ValueError(f"unknown config {name!r}")
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data["train"]
    x_test, y_test = data["test"]
    gen = torch.Generator().manual_seed(seed)
    curve: List[float] = []
    seconds = 0.0
    steps = 0
    ddp.train()
    dist.barrier()
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), GLOBAL_BATCH):
            batch = order[start:start + GLOBAL_BATCH]
            if len(batch) < world:  # a rank would get no rows
                continue
            idx = batch[rank::world]
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp(x[idx]), y[idx]).backward()
            opt.step()
            steps += 1
        seconds += time.perf_counter() - t0
        if rank == 0:
            curve.append(_accuracy(ddp.module, x_test, y_test))
    dist.barrier()
    row: Dict[str, object] = {"config": name, "steps": steps, "seconds": seconds, "gradient_elements": n_grad}
    fp32_step = ring_allreduce_bytes(n_grad, 4, world)
    if state is None:
        row["bytes_per_step"] = fp32_step / (2 if name == "fp16" else 1)
        row["bytes_source"] = "ring all-reduce formula"
    else:
        row["bits"] = int(name[len("kquant-"):-len("bit")])
        row["hook_steps"] = int(state.steps)
        row["bytes_sent"] = int(state.bytes_sent)
        row["hook_fp32_bytes"] = int(state.fp32_bytes)
        row["bytes_per_step"] = state.bytes_sent / max(1, state.steps)
        row["hook_fp32_bytes_per_step"] = state.fp32_bytes / max(1, state.steps)
        row["bytes_source"] = "QuantizedCommState.bytes_sent / steps"
    row["fp32_bytes_per_step"] = fp32_step
    row["ratio_vs_fp32"] = row["bytes_per_step"] / fp32_step
    row["curve"] = curve
    row["accuracy"] = curve[-1] if curve else None
    return row


def _worker(rank: int, world: int, port: int, configs: Sequence[str], data, epochs: int, seed: int,
            out_dir: str) -> None:
    """One process: join the group, train every config, rank 0 writes ``<i>.json`` per config."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        for i, name in enumerate(configs):
            row = _train_config(name, rank, data, epochs, seed)
            if rank == 0:
                tmp = os.path.join(out_dir, f"{i}.json.tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(row, f)
                os.replace(tmp, os.path.join(out_dir, f"{i}.json"))
    finally:
        dist.destroy_process_group()


def _kill(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join(5)


def _launch(configs: Sequence[str], data, epochs: int, seed: int, timeout: float, progress: bool = False,
            world: int = WORLD_SIZE) -> List[Dict[str, object]]:
    """Spawn ``world`` processes that train ``configs`` in turn; return rank 0's rows. At most
    ``timeout`` seconds may pass between the start and the first finished config, and between
    two finished configs."""
    import torch.multiprocessing as mp
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(prefix="kquant-ddp-") as tmp:
        ctx = mp.spawn(_worker, args=(world, free_port(), list(configs), data, epochs, seed, tmp), nprocs=world,
                       join=False, start_method="spawn")
        done = 0
        bar = tqdm(total=len(configs), desc="ddp configs", unit="config", disable=None if progress else True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    finished = ctx.join(timeout=0.2)
                except mp.ProcessRaisedException as e:  # the message holds the child's traceback
                    raise DemoError(f"a DDP training process failed:\n{e}") from None
                except mp.ProcessExitedException as e:
                    raise DemoError(f"a DDP training process died: {e}") from None
                now_done = sum(os.path.exists(os.path.join(tmp, f"{i}.json")) for i in range(len(configs)))
                if now_done > done:
                    bar.update(now_done - done)
                    done = now_done
                    deadline = time.monotonic() + timeout
                if finished:
                    break
                if time.monotonic() > deadline:
                    running = configs[done] if done < len(configs) else "(shutdown)"
                    raise DemoError(f"DDP training timed out: config {running!r} did not finish within "
                                    f"{timeout:g} s; the {world} processes were killed")
        finally:
            bar.close()
            _kill(ctx)
        rows = []
        for i, name in enumerate(configs):
            path = os.path.join(tmp, f"{i}.json")
            if not os.path.exists(path):
                raise DemoError(f"the DDP processes exited without a result for config {name!r}")
            with open(path, encoding="utf-8") as f:
                rows.append(json.load(f))
        return rows


# ---------------------------------------------------------------------------- the job
def run_ddp(epochs: int = EPOCHS, bits: Sequence[int] = BITS, seed: int = 0, progress: bool = False,
            timeout: float = TIMEOUT) -> Dict[str, object]:
    """Train the digits MLP with DDP once per config (fp32, fp16, kquant per ``bits``) and
    return a JSON-ready report. Bad options raise DemoError before any process starts."""
    from .demo import environment
    from .digits import load_data, make_mlp

    bits = tuple(bits)
    check_options(epochs, bits, seed, timeout)
    if bits:
        try:
            import kquant.distributed  # noqa: F401
        except ImportError as e:
            raise DemoError(f"the kquant configs need kquant.distributed ({e})") from None
    try:
        data = load_data(seed)
    except ImportError as e:
        raise DemoError(str(e)) from None
    configs = config_names(bits)
    rows = _launch(configs, data, epochs, seed, timeout, progress)
    fp32 = rows[0]
    for r in rows:
        r["delta_points"] = 100 * (r["accuracy"] - fp32["accuracy"])
    n_params = sum(p.numel() for p in make_mlp(HIDDEN).parameters())
    return {
        "environment": environment(),
        "world_size": WORLD_SIZE,
        "backend": "gloo",
        "dataset": {"name": "sklearn load_digits", "train": len(data["train"][1]), "test": len(data["test"][1])},
        "model": {"hidden": list(HIDDEN), "parameters": n_params},
        "training": {"epochs": epochs, "global_batch": GLOBAL_BATCH, "per_rank_batch": GLOBAL_BATCH // WORLD_SIZE,
                     "optimizer": "Adam", "lr": LR, "seed": seed, "threads_per_process": 1},
        "kquant_hook": {"chunk_size": CHUNK_SIZE, "error_feedback": True, "warmup_steps": 0},
        "rows": rows,
    }


def render_table(report: Dict[str, object]):
    from rich.table import Table

    m, tr = report["model"], report["training"]
    t = Table(title=f"kquant DDP: MLP {'-'.join(str(h) for h in [64, *m['hidden'], 10])} ({m['parameters']} "
                    f"parameters) on digits, {report['world_size']} processes ({report['backend']}), "
                    f"{tr['epochs']} epochs",
              caption=f"global batch {tr['global_batch']}, Adam lr {tr['lr']}, seed {tr['seed']}; bytes/step: "
                      f"gradient bytes one rank sends per optimizer step", title_justify="left")
    for col in ("config", "test accuracy", "vs fp32", "bytes/step", "vs fp32 bytes", "train s"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in report["rows"]:
        t.add_row(r["config"], f"{100 * r['accuracy']:.2f}%", f"{r['delta_points']:+.2f}",
                  f"{r['bytes_per_step']:,.0f}", f"{r['ratio_vs_fp32']:.3f}", f"{r['seconds']:.2f}")
    return t


def write_chart(report: Dict[str, object], path: str) -> None:
    """PNG: test accuracy against the epoch, one line per config."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in report["rows"]:
        epochs = list(range(1, len(r["curve"]) + 1))
        style = "--" if r["config"] == "fp16" else "-"  # fp16 often lies on top of fp32
        ax.plot(epochs, [100 * a for a in r["curve"]], style, marker="." if len(epochs) < 60 else None,
                color=CONFIG_COLORS.get(r["config"], "#555555"),
                label=f"{r['config']} ({r['ratio_vs_fp32']:.3f}x fp32 bytes)", linewidth=1.2, alpha=0.9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits MLP, DDP on {report['world_size']} processes: gradient all-reduce formats", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"kquant demo-train --ddp | {env['cpu']}, torch {env['torch']}", fontsize=10)
    fig.savefig(path, dpi=100)


def write_outputs(report: Dict[str, object], out_dir: str) -> Dict[str, str]:
    """``results.json`` and ``curves.png`` in ``out_dir``."""
    from . import demo
    return demo.write_outputs(report, out_dir, write_chart, "curves.png")


def main(epochs: Optional[int] = None, bits: Sequence[int] = BITS, seed: int = 0, out: str = "kquant-demo-ddp",
         progress: bool = True, timeout: float = TIMEOUT, console=None) -> Dict[str, object]:
    """What ``kquant demo-train --ddp`` does: run, print the table, write JSON + PNG into ``out``."""
    from rich.console import Console

    console = console or Console()
    report = run_ddp(EPOCHS if epochs is None else epochs, bits=bits, seed=seed, progress=progress, timeout=timeout)
    paths = write_outputs(report, out)
    console.print(render_table(report))
    console.print(f"wrote {paths['json']} and {paths['png']}")
    return report
