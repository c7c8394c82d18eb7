"""Command line: ``kquant demo`` (the main job), ``kquant info`` (what this machine can run),
``kquant quantize`` (model folder -> safetensors checkpoint) and ``kquant digits`` (a small
network trained on handwritten digits, accuracy per preset and calibration method).

Also runnable as ``python -m kquant.cli``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from typing import Dict, List, Optional

# distributions that provide the `triton` module (upstream, and PyTorch's own builds)
TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu")


# ---------------------------------------------------------------------------- info
def gather_info() -> Dict[str, object]:
    """Backends, CPU features, torch, CUDA and Triton status as a JSON-ready dict."""
    import torch

    import kquant
    from kquant import _native

    info: Dict[str, object] = {"kquant": kquant.__version__, "backends": kquant.backends()}
    native = _native.load("_C", warn=False)
    if native is None:
        info["native"] = {"built": False, "reason": f"native extension not built: {_native.error('_C') or 'unknown'}"}
    else:
        try:
            info["native"] = {"built": True, "cpu_features": dict(native.cpu_features()),
                              "build_info": dict(native.build_info())}
        except Exception as e:  # a stale .so from an older build: report it, don't crash
            info["native"] = {"built": False, "reason": f"native extension unusable: {type(e).__name__}: {e}"}
    if info["native"]["built"]:
        info["native"]["isa"] = cpu_level()
    info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                     "interop_threads": torch.get_num_interop_threads()}

    cuda: Dict[str, object] = {"torch_cuda": torch.version.cuda, "available": False, "devices": []}
    try:
        cuda["available"] = torch.cuda.is_available()
        if cuda["available"]:
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                cuda["devices"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                        "capability": f"sm_{major}{minor}"})
    except Exception as e:  # a broken driver must not break `kquant info`
        cuda["error"] = f"{type(e).__name__}: {e}"
    cuda_native = _native.load("_C_cuda", warn=False)
    if cuda_native is not None:
        cuda["native"] = {"built": True}
    else:
        why = _native.error("_C_cuda") or "unknown"
        cuda["native"] = {"built": False, "reason": f"native extension not built: {why}"}
    info["cuda"] = cuda

    triton: Dict[str, object] = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET") or None}
    # the version from the package metadata: importing triton costs time and can fail in ways
    # the backends table already reports
    for dist in TRITON_DISTRIBUTIONS:
        try:
            triton.update(installed=True, version=importlib.metadata.version(dist))
            break
        except importlib.metadata.PackageNotFoundError:
            pass
    else:
        triton.update(installed=False, reason=f"not installed (none of {', '.join(TRITON_DISTRIBUTIONS)})")
    info["triton"] = triton
    info["KQUANT_BACKEND"] = os.environ.get("KQUANT_BACKEND") or None
    info["routing"] = routing(["cpu"] + (["cuda"] if cuda["available"] else []))
    return info


def cpu_level() -> Dict[str, Optional[str]]:
    """The CPU level the kernels run at, the best this CPU has, and what KQUANT_CPU_ISA asks for."""
    from kquant.backends import cpu

    level: Dict[str, Optional[str]] = {"requested": os.environ.get("KQUANT_CPU_ISA") or None,
                                       "best": cpu.best_isa(), "running": None}
    try:
        level["running"] = cpu.isa()
    except Exception as e:  # an unknown KQUANT_CPU_ISA value
        level["error"] = str(e).splitlines()[0]
    return level


def routing(devices: List[str]) -> Dict[str, Dict[str, str]]:
    """Which backend the router picks per op and device: the linear ops for a 4096 x 4096
    layer in each preset, the other ops for a small input."""
    import torch

    from kquant import backends as router
    from kquant.config import PRESETS
    from kquant.spec import LinearSpec
    out: Dict[str, Dict[str, str]] = {}
    for dev in devices:
        out[dev] = {}
        device = torch.device(dev)
        for preset, cfg in PRESETS.items():
            spec = LinearSpec(cfg.weight_bits, cfg.group_size, cfg.symmetric, cfg.int8_activations, 4096, 4096,
                              device)
            out[dev][f"{spec.op} ({preset})"] = router.choose(spec)
        x = torch.zeros(1, 64, device=device)
        a = torch.zeros(1, 64, dtype=torch.int8, device=device)
        for op, args in (("quantize_per_token", (x,)), ("int8_mm", (a, a))):
            out[dev][op] = router.choose_op(op, *args)
    return out


def print_info(info: Dict[str, object], console) -> None:
    from rich.table import Table

    t = Table(title=f"kquant {info['kquant']} backends", title_justify="left")
    t.add_column("backend")
    t.add_column("available")
    t.add_column("reason")
    for name, st in info["backends"].items():
        t.add_row(name, "[green]yes[/]" if st["available"] else "[red]no[/]", str(st["reason"]))
    console.print(t)
    r = Table(title="router picks", title_justify="left")
    r.add_column("op")
    devices = list(info["routing"])
    for dev in devices:
        r.add_column(dev)
    for op in info["routing"][devices[0]]:
        r.add_row(op, *(info["routing"][dev][op] for dev in devices))
    console.print(r)
    if info.get("KQUANT_BACKEND"):
        console.print(f"KQUANT_BACKEND={info['KQUANT_BACKEND']} (forced)")

    native = info["native"]
    if native["built"]:
        feats = ", ".join(f"{k}={v}" for k, v in native["cpu_features"].items())
        build = ", ".join(f"{k}={v}" for k, v in native["build_info"].items())
        console.print(f"CPU features: {feats}")
        lv = native["isa"]
        line = f"CPU kernels: running {lv['running'] or 'nothing'} (the best this CPU has: {lv['best']})"
        if lv["requested"]:
            line += f"; KQUANT_CPU_ISA={lv['requested']!r}"
            if lv.get("error"):
                line += f": [red]{lv['error']}[/]"
            elif lv["running"] != lv["requested"].strip().lower():
                line += " asks for a level this CPU does not have"
        console.print(line)
        console.print(f"native build: {build}")
    else:
        console.print(f"CPU features: {native['reason']}")
    tor = info["torch"]
    console.print(f"torch {tor['version']}: {tor['threads']} threads ({tor['interop_threads']} inter-op)")
    cuda = info["cuda"]
    line = f"CUDA: torch built with {cuda['torch_cuda'] or 'no CUDA'}, available={cuda['available']}"
    if cuda["devices"]:
        line += "; " + "; ".join(f"{d['index']}: {d['name']} ({d['capability']})" for d in cuda["devices"])
    if cuda.get("error"):
        line += f"; error: {cuda['error']}"
    console.print(line)
    console.print("CUDA native: " + ("built" if cuda["native"]["built"] else cuda["native"]["reason"]))
    tr = info["triton"]
    if tr["installed"]:
        console.print(f"Triton {tr['version']}, TRITON_INTERPRET={tr['TRITON_INTERPRET'] or 'unset'}")
    else:
        console.print(f"Triton: {tr['reason']}")


# ---------------------------------------------------------------------------- quantize
def quantize_command(args, console) -> int:
    """Quantize a Hugging Face model folder (default: the packaged MiniLM), save it as a
    safetensors checkpoint, reload it into a fresh float model and check the outputs match.

    The output paths, the options and the model are checked before the work starts. The
    checkpoint is written to a temp file beside ``--out`` and renamed to ``--out`` only once it
    has reloaded to the same outputs: a failed run leaves no new file there."""
    import copy

    import torch

    import kquant
    from .checkpoint import check_save_path, temp_file_beside
    from .demo import (DemoError, encoder_batch, load_corpus, load_model, make_batches, model_bytes, sentences_text,
                       split_corpus)

    if args.report_json is not None:
        check_save_path(args.report_json)
    tmp = temp_file_beside(args.out)
    try:
        sentences = load_corpus(args.sentences)
        name = args.model or "all-MiniLM-L6-v2"
        tok, fp_model = load_model(args.model)
        batch = encoder_batch(tok, fp_model, sentences, name)
        method = args.method.split("+")
        calib = None
        if method != ["rtn"]:  # calibrate on the corpus sentences the checks never use
            calib = make_batches(tok, split_corpus()[1], 32)[0]
        q_model = kquant.quantize_(copy.deepcopy(fp_model), args.preset, skip=args.skip or None, calib_data=calib,
                                   method=method)
        n_quant = sum(isinstance(m, kquant.QuantLinear) for m in q_model.modules())
        if n_quant == 0:
            raise DemoError("no Linear layer was quantized (check --skip)")
        kquant.save_quantized(q_model, tmp)
        # the file must rebuild the same model: load into a fresh float copy and compare outputs
        reloaded = kquant.load_quantized(copy.deepcopy(fp_model), tmp)
        with torch.inference_mode():
            a = q_model(**batch).last_hidden_state
            b = reloaded(**batch).last_hidden_state
        diff = (a - b).abs().max().item()
        checked = sentences_text(len(sentences), args.sentences)
        console.print(f"quantized {n_quant} Linear layers of {name} with {args.preset} ({args.method}): "
                      f"model {model_bytes(fp_model) / 2**20:.2f} MiB -> {model_bytes(q_model) / 2**20:.2f} MiB")
        console.print(f"reload check on {checked}: max |difference| = {diff:.3g}")
        if diff != 0.0:
            console.print(f"[red]the reloaded model differs from the quantized one: {args.out} not written[/]")
            return 1
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    console.print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB)")
    if args.report or args.report_json:
        rep = kquant.error_report(fp_model, q_model, batch)
        if args.report:
            console.print(rep.rich_table(title=f"kquant error report ({args.preset}, {checked})"))
        if args.report_json:
            rep.to_json(args.report_json)
            console.print(f"wrote {args.report_json}")
    return 0


# ---------------------------------------------------------------------------- parser
def _presets(values: List[str]) -> List[str]:
    # accept both `--presets w8a8 w4a16` and `--presets w8a8,w4a16` (and the same for --method)
    return [p for v in values for p in v.split(",") if p]


def build_parser() -> argparse.ArgumentParser:
    from .demo import ALL_METHODS, CALIB_SENTENCES, DEFAULT_METHODS, DEFAULT_PRESETS

    ap = argparse.ArgumentParser(prog="kquant", description="Integer quantization for PyTorch.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="quantize all-MiniLM-L6-v2 in each preset and method; table + JSON + PNG",
                       description="Quantize the pretrained all-MiniLM-L6-v2 in each preset with each calibration "
                                   "method, embed a fixed English corpus and compare with fp32: size, calibration "
                                   f"time, latency, cosine, NN agreement. The last {CALIB_SENTENCES} corpus "
                                   "sentences calibrate; the others are evaluated.")
    from .demo_auto import CALIB_SENTENCES as AUTO_CALIB
    from .demo_auto import DEFAULT_BUDGETS, DEFAULT_METHOD, DEFAULT_UNIFORM
    from .demo_auto import SENSITIVITY_SENTENCES as AUTO_SENS
    d.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                   help=f"presets to run (default: {' '.join(DEFAULT_PRESETS)}; with --auto the uniform presets "
                        f"{' '.join(DEFAULT_UNIFORM)})")
    d.add_argument("--auto", action="store_true",
                   help="the size / accuracy trade-off: uniform presets against kquant.auto_quantize plans at "
                        f"--budgets, one calibration method (default {DEFAULT_METHOD}); table, results.json and "
                        "pareto.png (model MiB against mean cosine)")
    d.add_argument("--budgets", nargs="+", type=float, default=None, metavar="BITS",
                   help=f"with --auto: average stored bits per weight of each plan (default: "
                        f"{' '.join(f'{b:g}' for b in DEFAULT_BUDGETS)})")
    d.add_argument("--method", "--methods", dest="methods", nargs="+", default=None, metavar="METHOD",
                   help=f"calibration methods, comma separated: {', '.join(ALL_METHODS)}, or all (every one that "
                        f"applies); '+' applies an equalization method before a weight method (default: "
                        f"{','.join(DEFAULT_METHODS)}; smoothquant only runs on w8a8 and w4a8)")
    d.add_argument("--sentences", type=int, default=None, metavar="N",
                   help=f"evaluate only the first N corpus sentences, N >= 2 (default: all but the last "
                        f"{CALIB_SENTENCES}, which calibrate)")
    d.add_argument("--calib-sentences", type=int, default=None, metavar="N",
                   help=f"the last N corpus sentences calibrate (default {CALIB_SENTENCES}; with --auto "
                        f"{AUTO_CALIB})")
    d.add_argument("--sensitivity-sentences", type=int, default=None, metavar="N",
                   help=f"with --auto: the sensitivity analysis runs on the last N calibration sentences "
                        f"(default {AUTO_SENS})")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--repeats", type=int, default=3, help="timed passes per row; the median is reported")
    d.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    d.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    d.add_argument("--out", default=None, help="output directory for results.json and results.png (default: "
                                                 "kquant-demo; with --auto kquant-demo-auto and pareto.png)")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    q = sub.add_parser("quantize", help="quantize a model folder and save a safetensors checkpoint",
                       description="Quantize a Hugging Face model folder (default: the packaged "
                                   "all-MiniLM-L6-v2), save it with kquant.save_quantized and check that "
                                   "the file reloads to the same outputs.")
    q.add_argument("--preset", default="w8a8", help="w8a8 (default), w8a16, w4a16 or w4a8")
    q.add_argument("--model", default=None, metavar="FOLDER",
                   help="local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2) holding "
                        "config.json, the weights and the tokenizer's files (tokenizer.json or its vocabulary "
                        "files); AutoModel must load it as a text model whose output has last_hidden_state "
                        "(an encoder such as BERT, or a base model without a head), and the tokenizer must pad")
    q.add_argument("--method", default="rtn",
                   help="calibration method: rtn (default), gptq, awq, smoothquant or a +-joined pair such as "
                        "awq+gptq; calibrated on the last 128 sentences of the shipped corpus")
    q.add_argument("--skip", nargs="+", default=None, metavar="PATTERN", help="module-name patterns kept in float")
    q.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    q.add_argument("--sentences", type=int, default=16, metavar="N",
                   help="corpus sentences for the reload check and the error report, N >= 1 (default 16; "
                        "a larger N than the corpus holds uses all of it)")
    q.add_argument("--report", action="store_true", help="print the per-layer error report")
    q.add_argument("--report-json", default=None, metavar="PATH", help="write the error report as JSON")

    from .digits import DEFAULT_METHODS
    g = sub.add_parser("digits", help="train a small MLP on handwritten digits; accuracy per preset and method",
                       description="Train a small MLP on scikit-learn's bundled handwritten digits (a few "
                                   "seconds), quantize it with each preset and calibration method and compare "
                                   "test accuracy with fp32.")
    g.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), metavar="PRESET",
                   help=f"presets to run (default: {' '.join(DEFAULT_PRESETS)})")
    g.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods, '+' joining a list applied in order (default: {' '.join(DEFAULT_METHODS)})")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, the weights and the batch order")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the matrices are tiny, more threads mostly wait)")
    g.add_argument("--out", default="kquant-digits", help="output directory for results.json")

    from . import demo_train as dtr
    t = sub.add_parser("demo-train", help="training with quantization (QAT, recovery) vs PTQ on the digits MLP and "
                                          "MiniLM; table + JSON + PNG of the loss curves",
                       description="Train through quantization: on a narrow MLP for scikit-learn's digits (test "
                                   "accuracy) and on all-MiniLM-L6-v2 (cosine to fp32 embeddings on held-out "
                                   "sentences), compare fp32, post-training quantization (ptq), quantization-aware "
                                   "training (qat: prepare_qat, train, convert) and distillation (recover).")
    t.add_argument("--part", choices=dtr.PARTS, default="all", help="which model(s) to run (default: all)")
    t.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"MiniLM qat and recover steps (default: {dtr.QAT_STEPS} and {dtr.RECOVER_STEPS})")
    t.add_argument("--qat-epochs", type=int, default=None, metavar="N",
                   help=f"digits qat epochs (default {dtr.DIGITS_QAT_EPOCHS})")
    t.add_argument("--train-sentences", type=int, default=None, metavar="N",
                   help=f"MiniLM: the first N evaluation sentences are the distillation data, the others are "
                        f"evaluated (default {dtr.TRAIN_SENTENCES})")
    t.add_argument("--eval-sentences", type=int, default=None, metavar="N",
                   help="MiniLM: evaluate only the first N held-out sentences, N >= 2 (default: all)")
    t.add_argument("--threads", type=int, default=None,
                   help=f"torch intra-op threads (default: {dtr.DIGITS_THREADS} for digits, {dtr.MINILM_THREADS} "
                        f"for MiniLM)")
    t.add_argument("--seed", type=int, default=0, help="seed for the data split, the weights and the batch order")
    t.add_argument("--out", default=None,
                   help="output directory for results.json and curves.png (default: kquant-demo-train, with "
                        "--ddp kquant-demo-ddp)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    t.add_argument("--ddp", action="store_true",
                   help="instead: train the digits MLP with DistributedDataParallel on 2 CPU processes (gloo), "
                        "gradients all-reduced in fp32, fp16 and kquant 8/4/2-bit; accuracy and bytes per step")
    t.add_argument("--epochs", type=int, default=None, metavar="N", help="--ddp: training epochs (default 30)")

    i = sub.add_parser("info", help="backends, CPU features, CUDA and Triton status")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    if args.command == "info" and args.json:
        print(json.dumps(gather_info(), indent=2))
        return 0
    from rich.console import Console
    # rich wraps at 80 columns when piped (make demo | tee): keep the table on one line per row
    console = Console() if sys.stdout.isatty() else Console(width=140)

    if args.command == "info":
        print_info(gather_info(), console)
        return 0

    if args.command == "digits":
        from .digits import main as digits_main
        try:
            digits_main(presets=_presets(args.presets), methods=_presets(args.methods), out=args.out, seed=args.seed,
                        threads=args.threads, console=console)
        except (ValueError, ImportError) as e:  # an unknown preset or method, a bad --threads, no scikit-learn
            print(f"kquant digits: error: {e}", file=sys.stderr)
            return 2
        return 0

    if args.command == "demo-train":
        from .demo import DemoError
        if args.epochs is not None and not args.ddp:
            print("kquant demo-train: error: --epochs is for --ddp (the digits qat epochs are --qat-epochs)",
                  file=sys.stderr)
            return 2
        if args.ddp:
            from .demo_ddp import main as demo_ddp_main
            try:
                demo_ddp_main(epochs=args.epochs, seed=args.seed, out=args.out or "kquant-demo-ddp",
                              progress=not args.no_progress, console=console)
            except DemoError as e:  # a bad option, a failed or timed-out training process
                print(f"kquant demo-train --ddp: error: {e}", file=sys.stderr)
                return 2
            return 0
        from .demo_train import main as demo_train_main
        try:
            demo_train_main(part=args.part, steps=args.steps, qat_epochs=args.qat_epochs,
                            train_sentences=args.train_sentences, threads=args.threads,
                            out=args.out or "kquant-demo-train",
                            seed=args.seed, progress=not args.no_progress, console=console,
                            minilm_kwargs=None if args.eval_sentences is None else
                            {"eval_sentences": args.eval_sentences})
        except (DemoError, ValueError, ImportError) as e:  # a bad option, no scikit-learn / model package
            print(f"kquant demo-train: error: {e}", file=sys.stderr)
            return 2
        return 0

    from .demo import DEFAULT_PRESETS, DemoError
    from .demo import main as demo_main
    if args.command == "quantize":
        try:
            return quantize_command(args, console)
        except (DemoError, ValueError, TypeError, OSError) as e:  # bad preset / pattern / path: say which
            print(f"kquant quantize: error: {e}", file=sys.stderr)
            return 2
    if args.auto:
        return _demo_auto(args, console)
    for flag, value in (("--budgets", args.budgets), ("--sensitivity-sentences", args.sensitivity_sentences)):
        if value is not None:
            print(f"kquant demo: error: {flag} is for --auto", file=sys.stderr)
            return 2
    try:
        demo_main(presets=_presets(args.presets or list(DEFAULT_PRESETS)), sentences=args.sentences,
                  batch_size=args.batch_size, repeats=args.repeats, out=args.out or "kquant-demo",
                  progress=not args.no_progress, threads=args.threads,
                  device=args.device, console=console, calib_sentences=args.calib_sentences,
                  methods=None if args.methods is None else _presets(args.methods))
    except DemoError as e:
        print(f"kquant demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def _demo_auto(args, console) -> int:
    from .demo import DemoError
    from .demo_auto import CALIB_SENTENCES, DEFAULT_BUDGETS, DEFAULT_METHOD, DEFAULT_UNIFORM, SENSITIVITY_SENTENCES
    from .demo_auto import main as auto_main
    methods = _presets(args.methods or [DEFAULT_METHOD])
    if len(methods) != 1 or args.device != "cpu":
        print("kquant demo --auto: error: it takes one --method (e.g. gptq or awq+gptq) and runs on cpu",
              file=sys.stderr)
        return 2
    try:
        auto_main(budgets=args.budgets or DEFAULT_BUDGETS, uniform=_presets(args.presets or list(DEFAULT_UNIFORM)),
                  method=methods[0], sentences=args.sentences, batch_size=args.batch_size,
                  out=args.out or "kquant-demo-auto", progress=not args.no_progress, threads=args.threads,
                  console=console, calib_sentences=args.calib_sentences or CALIB_SENTENCES,
                  sensitivity_sentences=args.sensitivity_sentences or SENSITIVITY_SENTENCES)
    except DemoError as e:
        print(f"kquant demo --auto: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
