"""Training with quantization, shown on two models: what quantization-aware training (QAT) and
distillation-based recovery win back over post-training quantization (PTQ).

* **digits**: a narrow MLP (64-32-32-32-10) trained in fp32 on scikit-learn's handwritten digits
  (see :mod:`kquant.digits`). Per config (W8A8, W4A16, W4A8, per-channel weights because the
  layers are narrow): "ptq" (round to nearest), "qat" (:func:`kquant.prepare_qat` with learned
  scales, trained with cross-entropy on the labels, then :func:`kquant.convert`) and "recover"
  (:func:`kquant.recover` distilling the fp32 network into the PTQ model on the unlabelled
  training images). W3A8 and W2A8 stay fake-quantized in this demo: "ptq" is the untrained
  fake-quantized model, its "qat" the trained one, not converted. Metric: test accuracy.
* **minilm**: the pretrained all-MiniLM-L6-v2 (see :mod:`kquant.demo`). The first
  ``train_sentences`` evaluation sentences of the corpus are the (unlabelled) distillation
  data, the other evaluation sentences are held out and embedded; the 128 calibration
  sentences and the distillation sentences calibrate PTQ. Per preset and ``PTQ_METHODS`` entry:
  "ptq" and "recover" (from that PTQ model); for the last entry also "qat" (started from it,
  learned scales, trained by distillation from fp32, then converted). Metric:
  cosine similarity to the fp32 embeddings and nearest-neighbour agreement.

Every QAT row also records the metric of the fake-quantized model before conversion: the
packed model must compute the same thing ("converted = fake-quant" in the table).

``kquant demo-train`` runs :func:`main`: prints a table per model and writes ``results.json``
and ``curves.png`` (the training losses) into ``--out``. The recipe constants below are the
knobs to tune.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .demo import DemoError

# ---------------------------------------------------------------------------- recipe: digits
DIGITS_HIDDEN = (32, 32, 32)
DIGITS_EPOCHS = 60            # fp32 training
DIGITS_LR = 2e-3
DIGITS_WEIGHT_DECAY = 0.0
DIGITS_BATCH = 32
DIGITS_QAT_EPOCHS = 60
DIGITS_QAT_LR = 1e-3          # Adam, every parameter (weights, biases, log-scales)
DIGITS_RECOVER_STEPS = 300
DIGITS_RECOVER_BATCH = 64     # unlabelled training images per distillation step
DIGITS_RECOVER_TRAINABLE = ("scales", "lora", "norms", "biases")
DIGITS_LORA_RANK = 4
DIGITS_THREADS = 1
# label -> (QuantConfig arguments, weight_bits for prepare_qat: None packs, 3 and 2 stay fake-quantized here)
DIGITS_CONFIGS = {
    "W8A8": (dict(weight_bits=8, group_size=-1, activations="dynamic"), None),
    "W4A16": (dict(weight_bits=4, group_size=-1, activations="none"), None),
    "W4A8": (dict(weight_bits=4, group_size=-1, activations="dynamic"), None),
    "W3A8": (dict(weight_bits=4, group_size=-1, activations="dynamic"), 3),  # kept fake-quantized
    "W2A8": (dict(weight_bits=4, group_size=-1, activations="dynamic"), 2),
}

# ---------------------------------------------------------------------------- recipe: MiniLM
MINILM_PRESETS = ("w8a8", "w4a16", "w4a8")
# PTQ rows per preset ("+" joins methods); recovery starts from each, QAT from the last
PTQ_METHODS = {"w8a8": ("rtn", "smoothquant+gptq"), "w4a16": ("rtn", "awq+gptq"), "w4a8": ("rtn", "awq+gptq")}
TRAIN_SENTENCES = 256         # the first evaluation sentences: distillation data, never evaluated
TRAIN_BATCH = 16
EVAL_BATCH = 64
QAT_STEPS = 300
# quantization-aware training by distillation: kquant.recover on the prepare_qat model
QAT_TRAINABLE = ("weights", "scales", "norms", "biases")
QAT_LR = {"weights": 1e-5, "scales": 1e-3}
RECOVER_STEPS = 300
RECOVER_TRAINABLE = ("scales", "lora", "norms", "biases")
RECOVER_LR = None             # None: kquant.recover.DEFAULT_LR
RECOVER_LORA_RANK = 8
RECOVER_BLOCK_STEPS = 0       # > 0: kquant.recover's block-by-block phase first (passed only when > 0)
MINILM_THREADS = 2

PARTS = ("digits", "minilm", "all")
CE_LOSS = "cross-entropy (labels)"
DISTILL_LOSS = "distillation: relative squared error vs fp32"


def _bar(iterable=None, progress: bool = False, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=None if progress else True, **kw)


def _check_int(value, name: str, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DemoError(f"{name} must be an integer >= {low}, got {value!r}")


# ---------------------------------------------------------------------------- digits
def _digits_config(label: str):
    from .config import QuantConfig
    kwargs, bits = DIGITS_CONFIGS[label]
    return QuantConfig(**kwargs), bits


def _qat_digits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool
                ) -> Tuple[List[float], List[int]]:
    """Train a prepared model with cross-entropy; (mean loss per epoch, step at each epoch's end)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=DIGITS_QAT_LR)
    loss_fn = nn.CrossEntropyLoss()
    curve, steps, step = [], [], 0
    model.train()
    for _ in _bar(range(epochs), progress, desc="kquant demo-train: digits qat", unit="epoch", leave=False):
        order = torch.randperm(len(x), generator=gen)
        total, n = 0.0, 0
        for start in range(0, len(x), DIGITS_BATCH):
            idx = order[start:start + DIGITS_BATCH]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
            step += 1
        curve.append(total / n)
        steps.append(step)
    model.eval()
    return curve, steps


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def _digits_defaults(epochs, qat_epochs, recover_steps, configs):
    # read at call time, so the recipe constants can be tuned on the module
    return (DIGITS_EPOCHS if epochs is None else epochs, DIGITS_QAT_EPOCHS if qat_epochs is None else qat_epochs,
            DIGITS_RECOVER_STEPS if recover_steps is None else recover_steps,
            tuple(DIGITS_CONFIGS) if configs is None else tuple(configs))


def check_digits_options(epochs: Optional[int] = None, qat_epochs: Optional[int] = None,
                         recover_steps: Optional[int] = None, threads: Optional[int] = DIGITS_THREADS,
                         configs: Optional[Sequence[str]] = None, **_) -> None:
    """Raise a DemoError for a bad argument of :func:`run_digits` (the others are ignored)."""
    epochs, qat_epochs, recover_steps, configs = _digits_defaults(epochs, qat_epochs, recover_steps, configs)
    for value, name in ((epochs, "epochs"), (qat_epochs, "--qat-epochs"), (recover_steps, "recover steps")):
        _check_int(value, name)
    if threads is not None:
        _check_int(threads, "--threads")
    bad = [c for c in configs if c not in DIGITS_CONFIGS]
    if bad or not configs:
        raise DemoError(f"unknown digits config(s) {bad or list(configs)}; configs: {list(DIGITS_CONFIGS)}")


def run_digits(seed: int = 0, epochs: Optional[int] = None, qat_epochs: Optional[int] = None,
               recover_steps: Optional[int] = None, threads: Optional[int] = DIGITS_THREADS,
               configs: Optional[Sequence[str]] = None, progress: bool = False) -> Dict[str, object]:
    """fp32, then ptq / qat / recover per config in ``configs`` (labels of DIGITS_CONFIGS, None:
    all) on the digits MLP; a JSON-ready dict with one row per (config, stage). None:
    DIGITS_EPOCHS, DIGITS_QAT_EPOCHS, DIGITS_RECOVER_STEPS."""
    import kquant
    from . import digits

    check_digits_options(epochs, qat_epochs, recover_steps, threads, configs)
    epochs, qat_epochs, recover_steps, configs = _digits_defaults(epochs, qat_epochs, recover_steps, configs)
    data = digits.load_data(seed)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    t0 = time.perf_counter()
    fp = digits.train_mlp(data, hidden=DIGITS_HIDDEN, epochs=epochs, batch_size=DIGITS_BATCH, lr=DIGITS_LR,
                          weight_decay=DIGITS_WEIGHT_DECAY, seed=seed)
    fp_s = time.perf_counter() - t0
    fp_acc = digits.accuracy(fp, x_test, y_test)
    unlabelled = [x_train[i:i + DIGITS_RECOVER_BATCH] for i in range(0, len(x_train), DIGITS_RECOVER_BATCH)]

    def row(label, stage, model, seconds, seconds_kind, **extra):
        acc = digits.accuracy(model, x_test, y_test)
        r = {"config": label, "stage": stage, "accuracy": acc, "delta_points": 100 * (acc - fp_acc),
             "seconds": seconds, "seconds_kind": seconds_kind, "converted": None, "fake_quant_accuracy": None,
             "prediction_mismatches": None, "matches_fake_quant": None, "curve": None, "curve_steps": None,
             "curve_loss": None}
        r.update(extra)
        return r

    rows = [row("fp32", "fp32", fp, fp_s, "train")]
    with digits.torch_threads(threads):
        used_threads = torch.get_num_threads()
        bar = _bar(configs, progress, desc="kquant demo-train: digits", unit="config")
        for label in bar:
            cfg, bits = _digits_config(label)
            packs = bits is None
            bar.set_postfix_str(f"{label} ptq")
            t0 = time.perf_counter()
            if packs:
                ptq = kquant.quantize_(copy.deepcopy(fp), cfg, method="rtn", progress=False)
            else:
                ptq = kquant.prepare_qat(copy.deepcopy(fp), cfg, weight_bits=bits, progress=False).eval()
            rows.append(row(label, "ptq", ptq, time.perf_counter() - t0, "quantize", converted=packs))

            bar.set_postfix_str(f"{label} qat")
            qat = kquant.prepare_qat(copy.deepcopy(fp), cfg, weight_bits=bits, learn_scales=True, progress=False)
            t0 = time.perf_counter()
            curve, steps = _qat_digits(qat, x_train, y_train, qat_epochs, seed, progress)
            seconds = time.perf_counter() - t0
            fake_acc, fake_pred = digits.accuracy(qat, x_test, y_test), _predict(qat, x_test)
            extra = dict(curve=curve, curve_steps=steps, curve_loss=CE_LOSS, fake_quant_accuracy=fake_acc,
                         converted=packs)
            if packs:
                kquant.convert(qat)
                extra["prediction_mismatches"] = int((_predict(qat, x_test) != fake_pred).sum())
                # the same function: the same accuracy, to one test image
                extra["matches_fake_quant"] = abs(digits.accuracy(qat, x_test, y_test) - fake_acc) * len(y_test) \
                    <= 1 + 1e-9
            rows.append(row(label, "qat", qat, seconds, "train", **extra))

            if packs:
                bar.set_postfix_str(f"{label} recover")
                rec = copy.deepcopy(ptq)
                res = kquant.recover(rec, fp, unlabelled, steps=recover_steps, trainable=DIGITS_RECOVER_TRAINABLE,
                                     lora_rank=DIGITS_LORA_RANK, seed=seed, progress=False)
                rows.append(row(label, "recover", rec, res.seconds, "train", converted=True, curve=res.losses,
                                curve_steps=list(range(1, len(res.losses) + 1)), curve_loss=DISTILL_LOSS,
                                initial_loss=res.initial_loss, final_loss=res.final_loss,
                                trained_parameters=res.trained_parameters))
        bar.close()
    return {
        "dataset": {"name": "sklearn load_digits", "train": len(y_train), "test": len(y_test)},
        "model": {"hidden": list(DIGITS_HIDDEN), "epochs": epochs, "lr": DIGITS_LR,
                  "weight_decay": DIGITS_WEIGHT_DECAY, "seed": seed,
                  "parameters": sum(p.numel() for p in fp.parameters())},
        "recipe": {"qat_epochs": qat_epochs, "qat_lr": DIGITS_QAT_LR, "qat_batch": DIGITS_BATCH,
                   "recover_steps": recover_steps, "recover_batch": DIGITS_RECOVER_BATCH,
                   "recover_trainable": list(DIGITS_RECOVER_TRAINABLE), "lora_rank": DIGITS_LORA_RANK,
                   "configs": {k: {**DIGITS_CONFIGS[k][0], "qat_weight_bits": DIGITS_CONFIGS[k][1]}
                               for k in configs}},
        "threads": used_threads,
        "fp32_accuracy": fp_acc,
        "rows": rows,
    }


# ---------------------------------------------------------------------------- MiniLM
def _minilm_qat(fp, preset, method, calib_batches, train_batches, steps, seed, progress, row, embed, base):
    """QAT by distillation from the ``method`` PTQ start: its row, with the fake-quantized
    model's mean cosine beside the converted one's."""
    import kquant
    qat = copy.deepcopy(fp)
    kquant.prepare_qat(qat, preset, learn_scales=True, method=method.split("+"), calib_data=calib_batches,
                       progress=False)
    res = kquant.recover(qat, fp, train_batches, steps=steps, trainable=QAT_TRAINABLE, lr=QAT_LR, seed=seed,
                         progress=progress)
    fake = embed(qat)
    fake_cos = (fake * base).sum(dim=1).mean().item()
    kquant.convert(qat)
    conv = embed(qat)
    return row(preset, "qat", qat, res.seconds, "train", conv, method=method, converted=True, curve=res.losses,
               curve_steps=list(range(1, len(res.losses) + 1)), curve_loss=DISTILL_LOSS,
               fake_quant_cos_mean=fake_cos, matches_fake_quant=same_quality(fake_cos, conv, base),
               fake_quant_cos_to_converted=(fake * conv).sum(dim=1).min().item())


def same_quality(fake_cos_mean: float, converted: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether the converted model embeds as well as its fake-quantized self: mean cosine to
    fp32 within a tenth of the quantization loss (``1 - cos``; at least 1e-4).

    Not bit for bit: with int8 activations a float rounding difference of 1e-7 between the fake
    and the packed layer (different summation order) flips some activation codes, and the
    flips grow layer by layer, so the two models hold different (equally large) quantization
    noise: the fake-quantized model run in float64 differs from itself in float32 as much.
    Each layer alone agrees with its packed counterpart to float rounding."""
    cos = (converted * base).sum(dim=1).mean().item()
    return abs(cos - fake_cos_mean) <= max(1e-4, 0.1 * (1.0 - fake_cos_mean))


def check_minilm_options(steps: Optional[int] = None, train_sentences: Optional[int] = None,
                         eval_sentences: Optional[int] = None, presets: Optional[Sequence[str]] = None,
                         threads: Optional[int] = MINILM_THREADS, qat_steps: Optional[int] = None,
                         recover_steps: Optional[int] = None, **_) -> Tuple[int, int]:
    """(qat steps, recover steps) for arguments of :func:`run_minilm`; a DemoError for a bad one."""
    from . import demo
    from .config import PRESETS

    if steps is not None:
        _check_int(steps, "--steps")
    train_sentences = TRAIN_SENTENCES if train_sentences is None else train_sentences
    presets = MINILM_PRESETS if presets is None else tuple(presets)
    qat_steps = qat_steps if qat_steps is not None else (steps or QAT_STEPS)
    recover_steps = recover_steps if recover_steps is not None else (steps or RECOVER_STEPS)
    _check_int(qat_steps, "qat steps")
    _check_int(recover_steps, "recover steps")
    _check_int(train_sentences, "--train-sentences")
    if eval_sentences is not None:
        _check_int(eval_sentences, "--eval-sentences", 2)
    if threads is not None:
        _check_int(threads, "--threads")
    bad = [p for p in presets if p not in PRESETS]
    if bad or not presets:
        raise DemoError(f"unknown preset(s) {bad or list(presets)}; presets: {sorted(PRESETS)}")
    n = len(demo.split_corpus()[0])
    if train_sentences > n - 2:
        raise DemoError(f"--train-sentences must leave at least 2 of the {n} evaluation sentences held out, got "
                        f"{train_sentences}")
    return qat_steps, recover_steps


def run_minilm(seed: int = 0, steps: Optional[int] = None, train_sentences: Optional[int] = None,
               eval_sentences: Optional[int] = None, presets: Optional[Sequence[str]] = None,
               threads: Optional[int] = MINILM_THREADS, progress: bool = False,
               qat_steps: Optional[int] = None, recover_steps: Optional[int] = None) -> Dict[str, object]:
    """fp32, then ptq / qat / recover per preset on all-MiniLM-L6-v2; a JSON-ready dict.
    ``steps`` sets both ``qat_steps`` and ``recover_steps`` (defaults QAT_STEPS, RECOVER_STEPS);
    ``eval_sentences``: evaluate only that many held-out sentences (None: all)."""
    import kquant
    from . import demo
    from .digits import torch_threads

    qat_steps, recover_steps = check_minilm_options(steps, train_sentences, eval_sentences, presets, threads,
                                                    qat_steps, recover_steps)
    train_sentences = TRAIN_SENTENCES if train_sentences is None else train_sentences
    presets = MINILM_PRESETS if presets is None else tuple(presets)
    corpus, calib = demo.split_corpus()
    train_text = corpus[:train_sentences]
    held_out = corpus[train_sentences:]
    held_out = held_out if eval_sentences is None else held_out[:eval_sentences]

    tok, fp = demo.load_model()
    train_batches = demo.make_batches(tok, train_text, TRAIN_BATCH)[0]
    eval_batches, order, eval_tokens = demo.make_batches(tok, held_out, EVAL_BATCH)
    # every unlabelled sentence calibrates PTQ: the calibration set and the distillation data
    calib_batches = demo.make_batches(tok, calib + train_text, TRAIN_BATCH)[0]

    rows: List[Dict[str, object]] = []
    with torch_threads(threads):
        used_threads = torch.get_num_threads()
        base = demo.embed(fp, eval_batches, order)
        base_nn = demo.nearest_neighbours(base)

        def row(preset, stage, model, seconds, seconds_kind, emb=None, **extra):
            emb = demo.embed(model, eval_batches, order) if emb is None else emb
            r = {"config": preset, "stage": stage, "method": None, **demo.compare(emb, base, base_nn),
                 "seconds": seconds, "seconds_kind": seconds_kind, "converted": None, "fake_quant_cos_mean": None,
                 "fake_quant_cos_to_converted": None, "matches_fake_quant": None, "curve": None, "curve_steps": None,
                 "curve_loss": None}
            r.update(extra)
            return r

        rows.append(row("fp32", "fp32", fp, None, None))
        bar = _bar(presets, progress, desc="kquant demo-train: minilm", unit="preset")
        for preset in bar:
            for method in PTQ_METHODS[preset]:
                bar.set_postfix_str(f"{preset} ptq {method}")
                ptq, calib_s = demo.quantize_row(fp, preset, method, calib_batches)
                rows.append(row(preset, "ptq", ptq, calib_s, "quantize", method=method, converted=True))
                if method == PTQ_METHODS[preset][-1]:
                    bar.set_postfix_str(f"{preset} qat")
                    rows.append(_minilm_qat(fp, preset, method, calib_batches, train_batches, qat_steps, seed,
                                            progress, row, lambda m: demo.embed(m, eval_batches, order), base))
                bar.set_postfix_str(f"{preset} recover {method}")
                blocks = {"block_steps": RECOVER_BLOCK_STEPS} if RECOVER_BLOCK_STEPS else {}
                res = kquant.recover(ptq, fp, train_batches, steps=recover_steps, trainable=RECOVER_TRAINABLE,
                                     lr=RECOVER_LR, lora_rank=RECOVER_LORA_RANK, seed=seed, progress=progress,
                                     **blocks)  # the PTQ row is measured: recover it in place
                rows.append(row(preset, "recover", ptq, res.seconds, "train", method=method, converted=True,
                                curve=res.losses, curve_steps=list(range(1, len(res.losses) + 1)),
                                curve_loss=DISTILL_LOSS, initial_loss=res.initial_loss, final_loss=res.final_loss,
                                trained_parameters=res.trained_parameters, block_losses=res.block_losses))
                del ptq
        bar.close()
    return {
        "model": {"name": demo.MODEL_NAME},
        "data": {"train_sentences": len(train_text), "train_batch": TRAIN_BATCH, "train_batches": len(train_batches),
                 "eval_sentences": len(held_out), "eval_batch": EVAL_BATCH, "eval_tokens": eval_tokens,
                 "calib_sentences": len(calib) + len(train_text),
                 "split": "the first train_sentences evaluation sentences of the corpus distil (never evaluated), "
                          "the following ones are evaluated; PTQ calibrates on the distillation sentences and the "
                          "last 128 of the corpus"},
        "recipe": {"ptq_methods": {p: list(PTQ_METHODS[p]) for p in presets}, "qat_steps": qat_steps,
                   "qat_lr": QAT_LR, "qat_trainable": list(QAT_TRAINABLE),
                   "recover_steps": recover_steps, "recover_trainable": list(RECOVER_TRAINABLE),
                   "recover_lr": RECOVER_LR, "recover_block_steps": RECOVER_BLOCK_STEPS,
                   "lora_rank": RECOVER_LORA_RANK, "seed": seed},
        "threads": used_threads,
        "rows": rows,
    }


# ---------------------------------------------------------------------------- the job
def run(part: str = "all", seed: int = 0, steps: Optional[int] = None, qat_epochs: Optional[int] = None,
        train_sentences: Optional[int] = None, threads: Optional[int] = None, progress: bool = False,
        digits_kwargs: Optional[Dict[str, object]] = None, minilm_kwargs: Optional[Dict[str, object]] = None
        ) -> Dict[str, object]:
    """The report for ``part`` ("digits", "minilm" or "all"). ``threads``: torch threads for
    both parts (None: DIGITS_THREADS for digits, MINILM_THREADS for MiniLM). ``digits_kwargs``
    / ``minilm_kwargs``: further arguments of :func:`run_digits` / :func:`run_minilm` (quick
    settings for tests). Options are checked before any work."""
    from . import demo

    if part not in PARTS:
        raise DemoError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
    if threads is not None:
        _check_int(threads, "--threads")
    dkw = {"seed": seed, "qat_epochs": qat_epochs, "progress": progress, "threads": threads or DIGITS_THREADS,
           **(digits_kwargs or {})}
    mkw = {"seed": seed, "steps": steps, "train_sentences": train_sentences, "progress": progress,
           "threads": threads or MINILM_THREADS, **(minilm_kwargs or {})}
    # every option of the parts that will run is checked before the first one starts
    if part in ("digits", "all"):
        check_digits_options(**dkw)
    if part in ("minilm", "all"):
        check_minilm_options(**mkw)
    report: Dict[str, object] = {"environment": demo.environment(), "part": part}
    if part in ("digits", "all"):
        report["digits"] = run_digits(**dkw)
    if part in ("minilm", "all"):
        report["minilm"] = run_minilm(**mkw)
    return report


# ---------------------------------------------------------------------------- output
SECONDS_NOTE = "s: training seconds (fp32, qat, recover) or quantize_ seconds (ptq)"


def _seconds(r) -> str:
    return "-" if r["seconds"] is None else f"{r['seconds']:.2f}"


def _digits_check(r, n_test: int) -> str:
    if r["stage"] != "qat":
        return ""
    if not r["converted"]:
        return f"n/a ({r['config'][1]}-bit: kept fake-quantized)"
    return (f"{'yes' if r['matches_fake_quant'] else 'NO'}: {100 * r['fake_quant_accuracy']:.2f}% fake-quant, "
            f"{r['prediction_mismatches']}/{n_test} predictions differ")


def _minilm_check(r) -> str:
    if r["stage"] != "qat":
        return ""
    return (f"{'yes' if r['matches_fake_quant'] else 'NO'}: cos {r['fake_quant_cos_mean']:.5f} fake-quant, "
            f"{r['cos_mean'] - r['fake_quant_cos_mean']:+.5f}")


_TEXT_COLUMNS = ("config", "stage", "method", "converted = fake-quant")


def _columns(table, names) -> None:
    for col in names:  # text left, numbers right
        table.add_column(col, justify="left" if col in _TEXT_COLUMNS else "right")


def render_tables(report: Dict[str, object]) -> list:
    """A rich Table per model in the report."""
    from rich.table import Table

    tables = []
    env = report["environment"]
    foot = f"{env['cpu']}, torch {env['torch']}, commit {env['git_commit'] or 'n/a'}"
    d = report.get("digits")
    if d:
        m, rc = d["model"], d["recipe"]
        t = Table(title=f"kquant demo-train: digits MLP {'-'.join(str(h) for h in [64, *m['hidden'], 10])}, "
                        f"fp32 test accuracy {100 * d['fp32_accuracy']:.2f}% on {d['dataset']['test']} images",
                  caption=f"per-channel weights; qat: {rc['qat_epochs']} epochs Adam lr {rc['qat_lr']:g}, learned "
                          f"scales; recover: {rc['recover_steps']} steps, {'+'.join(rc['recover_trainable'])}, "
                          f"LoRA rank {rc['lora_rank']}; vs fp32 in points; {SECONDS_NOTE}; {d['threads']} "
                          f"thread(s); {foot}")
        _columns(t, ("config", "stage", "accuracy", "vs fp32", "s", "converted = fake-quant"))
        for r in d["rows"]:
            t.add_row(r["config"], r["stage"], f"{100 * r['accuracy']:.2f}%",
                      "" if r["stage"] == "fp32" else f"{r['delta_points']:+.2f}", _seconds(r),
                      _digits_check(r, d["dataset"]["test"]))
        tables.append(t)
    mm = report.get("minilm")
    if mm:
        da, rc = mm["data"], mm["recipe"]
        t = Table(title=f"kquant demo-train: {mm['model']['name']}, {da['eval_sentences']} held-out sentences "
                        f"embedded, {da['train_sentences']} distil, {da['calib_sentences']} calibrate",
                  caption=f"qat: {rc['qat_steps']} steps, {'+'.join(rc['qat_trainable'])}; "
                          f"recover: {rc['recover_steps']} steps, {'+'.join(rc['recover_trainable'])}; "
                          f"{SECONDS_NOTE}; converted = fake-quant: the same mean cosine within a tenth of "
                          f"1 - cos (int8 activations amplify float rounding: not bit for bit); "
                          f"{mm['threads']} thread(s); {foot}")
        _columns(t, ("config", "stage", "method", "cos mean", "cos min", "NN agree", "s", "converted = fake-quant"))
        for r in mm["rows"]:
            t.add_row(r["config"], r["stage"], r["method"] or "-", f"{r['cos_mean']:.5f}", f"{r['cos_min']:.5f}",
                      f"{100 * r['nn_agreement']:.1f}%", _seconds(r), _minilm_check(r))
        tables.append(t)
    return tables


def render_table(report: Dict[str, object]):
    """All tables of the report as one renderable."""
    from rich.console import Group
    return Group(*render_tables(report))


CONFIG_COLORS = {"W8A8": "#1f77b4", "w8a8": "#1f77b4", "W4A16": "#ff7f0e", "w4a16": "#ff7f0e",
                 "W4A8": "#d62728", "w4a8": "#d62728", "W3A8": "#8c564b", "W2A8": "#9467bd"}


def write_chart(report: Dict[str, object], path: str) -> None:
    """PNG of the training losses: one panel per model, a line per qat (solid) / recover
    (dashed) run against the optimizer step, log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = [(k, report[k]) for k in ("digits", "minilm") if report.get(k)]
    fig = Figure(figsize=(7 * max(1, len(parts)), 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(parts)), squeeze=False)[0]
    for ax, (name, part) in zip(axes, parts):
        for r in part["rows"]:
            if not r["curve"]:
                continue
            style = "-" if r["stage"] == "qat" else "--"
            loss = "CE" if r["curve_loss"] == CE_LOSS else "distill"
            color, x, y = CONFIG_COLORS.get(r["config"], "#555555"), r["curve_steps"], r["curve"]
            if len(y) > 60:  # one loss per batch: faint, with a moving mean over it
                ax.plot(x, y, style, color=color, alpha=0.2, linewidth=0.6)
                w = max(2, len(y) // 30)
                y = [sum(y[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(y))]
            label = " ".join(str(v) for v in (r["config"], r["stage"], r.get("method")) if v)
            ax.plot(x, y, style, color=color, label=f"{label} ({loss})", alpha=0.9, linewidth=1.2,
                    marker="." if len(y) < 60 else None)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title("digits MLP: qat = cross-entropy per epoch, recover = distillation" if name == "digits"
                     else "all-MiniLM-L6-v2: distillation loss (relative squared error vs fp32)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"kquant demo-train | {env['cpu']}, torch {env['torch']}", fontsize=10)
    fig.savefig(path, dpi=100)


def write_outputs(report: Dict[str, object], out_dir: str) -> Dict[str, str]:
    """``results.json`` and ``curves.png`` in ``out_dir``."""
    from . import demo
    return demo.write_outputs(report, out_dir, write_chart, "curves.png")


def main(part: str = "all", steps: Optional[int] = None, qat_epochs: Optional[int] = None,
         train_sentences: Optional[int] = None, threads: Optional[int] = None, out: str = "kquant-demo-train",
         seed: int = 0, progress: bool = True, console=None, digits_kwargs: Optional[Dict[str, object]] = None,
         minilm_kwargs: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """What ``kquant demo-train`` does: run, print the tables, write JSON + PNG into ``out``."""
    from rich.console import Console

    console = console or Console()
    report = run(part, seed=seed, steps=steps, qat_epochs=qat_epochs, train_sentences=train_sentences,
                 threads=threads, progress=progress, digits_kwargs=digits_kwargs, minilm_kwargs=minilm_kwargs)
    paths = write_outputs(report, out)
    for t in render_tables(report):
        console.print(t)
    console.print(f"wrote {paths['json']} and {paths['png']}")
    return report
