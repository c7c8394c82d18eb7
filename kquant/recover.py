"""Fine-tuning a quantized model to win back what quantization cost: knowledge distillation
from the float model on unlabelled inputs.

    kquant.quantize_(model_q, "w4a16", calib_data=calib, method=["awq", "gptq"])
    result = kquant.recover(model_q, teacher, data, steps=300, trainable=("scales", "lora"))

The student (the quantized model) learns to reproduce the teacher's outputs on ``data``. It
trains only what ``trainable`` names:

* ``"scales"``: the quantization scales of every packed layer, integer codes frozen
  (EfficientQAT's end-to-end step); learned in the log domain, so one learning rate fits
  scales of any magnitude;
* ``"weights"``: the weights themselves through the quantizer (straight-through rounding:
  codes may change), as in quantization-aware training;
* ``"lora"``: a low-rank adapter beside each frozen packed weight (QLoRA style), kept
  separate (saved in checkpoints) or merged into the packed weight (``merge_lora=True``);
* ``"norms"``: LayerNorm/RMSNorm weights and biases; ``"biases"``: the packed layers' biases.

Then every layer is packed again: with frozen codes that is exact (the codes do not change,
only the scales). A model prepared by :func:`kquant.prepare_qat` trains the same way
(``trainable=("weights", "scales")`` is quantization-aware training by distillation) and
stays fake-quantized for :func:`kquant.convert`. The teacher is never changed. Runs are
deterministic for a given seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .api import run_model
from .calibration.equalize import is_norm
from .calibration.sequential import _first_tensor, _with_hidden, capture_block_inputs, find_blocks
from .nn import QuantLinear, is_conv1d, set_module
from .qat import FakeQuantLinear

__all__ = ["recover", "RecoveryResult", "TRAINABLE", "DEFAULT_LR", "distill_loss"]

TRAINABLE = ("scales", "weights", "lora", "norms", "biases")
DEFAULT_LR = {"scales": 1e-3, "weights": 1e-5, "lora": 1e-3, "norms": 1e-4, "biases": 1e-4}


class RecoveryError(ValueError):
    pass


@dataclasses.dataclass
class RecoveryResult:
    """What :func:`recover` did: the distillation loss per step (relative squared error of the
    student's output against the teacher's), before and after, and how long it took."""

    losses: List[float]
    initial_loss: float
    final_loss: float
    steps: int
    seconds: float
    stopped_early: bool
    trainable: Tuple[str, ...]
    trained_parameters: int
    block_losses: List[float] = dataclasses.field(default_factory=list)  # the block-by-block phase

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def distill_loss(student_out, teacher_out, batch) -> torch.Tensor:
    """Relative squared error ``sum((s - t)^2) / sum(t^2)`` of the first output tensors (a
    transformer's last hidden state, a classifier's logits), over real tokens only when the
    batch has an ``attention_mask``."""
    s, t = _first_tensor(student_out).float(), _first_tensor(teacher_out).float()
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and s.dim() == 3 and tuple(mask.shape) == tuple(s.shape[:2]):
        m = mask.to(s.device, torch.bool)
        s, t = s[m], t[m]
    return ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)


def _check_architecture(model: nn.Module, teacher: nn.Module) -> List[str]:
    """Names of the packed layers; raises unless the teacher has the same modules and shapes."""
    if teacher is model:
        raise RecoveryError("recover: the teacher must be the float model, not the quantized model itself")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"recover: teacher must be an nn.Module, got {type(teacher).__name__}")
    layers = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, FakeQuantLinear))]
    if not layers:
        raise RecoveryError("recover: the model has no QuantLinear layer; quantize it first with "
                            "kquant.quantize_(model, config)")
    mine = [n for n, _ in model.named_modules()]
    theirs = dict(teacher.named_modules())
    missing = [n for n in mine if n not in theirs]
    extra = [n for n in theirs if n not in set(mine)]
    if missing or extra:
        raise RecoveryError(f"recover: the teacher ({type(teacher).__name__}) is not the same architecture as the "
                            f"model ({type(model).__name__}): modules only in the model {missing[:4]}, only in "
                            f"the teacher {extra[:4]}")
    for n in layers:
        q, t = model.get_submodule(n), theirs[n]
        if not (isinstance(t, nn.Linear) or is_conv1d(t)):
            raise RecoveryError(f"recover: teacher module {n} is a {type(t).__name__}, expected the float Linear "
                                f"the model's {n} was quantized from")
        shape = (t.out_features, t.in_features) if isinstance(t, nn.Linear) else (t.nf, t.weight.shape[0])
        if shape != (q.out_features, q.in_features):
            raise RecoveryError(f"recover: {n} is [{q.out_features}, {q.in_features}] in the model but "
                                f"{list(shape)} in the teacher")
    return layers


def _check_trainable(trainable) -> Tuple[str, ...]:
    if isinstance(trainable, str):
        trainable = (trainable,)
    trainable = tuple(trainable)
    bad = [t for t in trainable if t not in TRAINABLE]
    if bad or not trainable:
        raise ValueError(f"recover: trainable must name some of {list(TRAINABLE)}, got {list(trainable)}")
    return trainable


def _learning_rates(lr) -> Dict[str, float]:
    if lr is None:
        return dict(DEFAULT_LR)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return {k: float(lr) for k in DEFAULT_LR}
    if isinstance(lr, dict) and set(lr) <= set(DEFAULT_LR):
        return {**DEFAULT_LR, **{k: float(v) for k, v in lr.items()}}
    raise ValueError(f"recover: lr must be a number or a dict over {list(DEFAULT_LR)}, got {lr!r}")


def _setup(model: nn.Module, layers: List[str], trainable: Tuple[str, ...], lora_rank: int,
           gen: torch.Generator) -> Dict[Tuple[str, int], List[nn.Parameter]]:
    """Swap the packed layers for trainable ones as ``trainable`` asks; the parameters per
    (kind, bits): an 8-bit scale moves a code-127 weight 16 times further than a 4-bit one
    moves a code-7 weight, so its learning rate is scaled by ``2^(4 - bits)``."""
    groups: Dict[Tuple[str, int], List[nn.Parameter]] = {}

    def add(kind, params, bits=4):
        groups.setdefault((kind, bits), []).extend(p for p in params if p is not None)

    for name in layers:
        layer = model.get_submodule(name)
        if "lora" in trainable:
            if isinstance(layer, FakeQuantLinear):
                raise RecoveryError(f"recover: {name} is a QAT layer; adapters go beside packed layers (convert the "
                                    f"model first with kquant.convert)")
            if layer.lora_A is None:
                layer.add_adapter(lora_rank, generator=gen)
            add("lora", [layer.lora_A, layer.lora_B])
        if ("scales" in trainable or "weights" in trainable) and isinstance(layer, QuantLinear):
            layer = FakeQuantLinear.from_quantized(layer, train_weight="weights" in trainable,
                                                   learn_scales="scales" in trainable)
            set_module(model, name, layer)
        if "scales" in trainable:
            add("scales", [layer.log_scales, layer.log_act_scale], layer.bits)
        if "weights" in trainable:
            add("weights", [layer.weight])
        if "biases" in trainable:
            add("biases", [layer.bias])
    if "norms" in trainable:
        norms = [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and is_norm(m, m.weight.shape[-1])]
        add("norms", [p for m in norms for p in m.parameters(recurse=False)])
    return groups


def _pack(model: nn.Module, layers: List[str], merge_lora: bool) -> None:
    """Pack again the layers that arrived packed."""
    for name in layers:
        layer = model.get_submodule(name)
        if isinstance(layer, FakeQuantLinear):
            layer = layer.to_quantized()
            set_module(model, name, layer)
        if merge_lora and layer.lora_A is not None:
            layer.merge_adapter()
        if layer.lora_A is not None:
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)


def recover(model: nn.Module, teacher: nn.Module, data: Sequence, *, steps: int = 300,
            trainable: Union[str, Sequence[str]] = ("scales", "norms", "biases"),
            lr: Union[None, float, Dict[str, float]] = None, block_steps: int = 0, lora_rank: int = 8,
            merge_lora: bool = False,
            loss: Optional[Callable] = None, patience: Optional[int] = None, seed: int = 0,
            progress: bool = True) -> RecoveryResult:
    """Distil ``teacher`` (the float model) into ``model`` (quantized with
    :func:`kquant.quantize_`) on ``data``, training what ``trainable`` names (see the module
    docstring), then pack every layer again, in place.

    data: a list of model inputs (dicts of keyword arguments, tuples or tensors), no labels.
    steps: optimizer steps (one batch each, batches reshuffled every pass) of the end-to-end
    phase. block_steps: steps per block of a first, block-by-block phase (EfficientQAT's
    Block-AP): each repeated block (a transformer layer) learns to reproduce the teacher block's
    output from its own inputs, which come from the blocks already trained. lr: a number, or a
    dict per kind overriding :data:`DEFAULT_LR` (Adam; an 8-bit layer's scales use it times 1/16,
    as their codes are 16 times larger than 4-bit codes). loss: ``f(student_out, teacher_out,
    batch) -> scalar``, :func:`distill_loss` by default. patience: stop when the running loss has
    not improved by 0.1% for this many steps. The model runs in eval mode (no dropout).
    Returns a :class:`RecoveryResult` with the loss curve.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"recover: model must be an nn.Module, got {type(model).__name__}")
    layers = _check_architecture(model, teacher)
    trainable = _check_trainable(trainable)
    rates = _learning_rates(lr)
    for name, v in (("steps", steps), ("block_steps", block_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"recover: {name} must be an int >= 0, got {v!r}")
    if steps + block_steps == 0:
        raise ValueError("recover: steps and block_steps are both 0: nothing to train")
    if isinstance(data, (torch.Tensor, dict)) or not hasattr(data, "__len__"):
        raise TypeError("recover: data must be a list of batches (model inputs); wrap a single batch in a list")
    data = list(data)
    if not data:
        raise ValueError("recover: data is empty; it needs at least one batch of model inputs")
    loss_fn = loss or distill_loss
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    training, teacher_training = model.training, teacher.training
    model.eval()
    teacher.eval()
    with torch.no_grad():
        targets = [run_model(teacher, b) for b in data]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    t0 = time.perf_counter()
    packed = [n for n in layers if isinstance(model.get_submodule(n), QuantLinear)]
    try:
        groups = _setup(model, layers, trainable, lora_rank, gen)
        params = [p for ps in groups.values() for p in ps]
        if not params:
            raise RecoveryError(f"recover: nothing to train for {list(trainable)} in this model")
        for p in params:
            p.requires_grad_(True)
        initial = _mean_loss(model, data, targets, loss_fn)
        block_losses = _blockwise(model, teacher, layers, data, groups, rates, block_steps, gen, progress, tqdm)
        opt = _optimizer(groups, rates)
        losses = _train(model, data, targets, loss_fn, opt, steps, patience, gen, progress, tqdm)
    finally:
        _pack(model, packed, merge_lora)
        for p, rg in frozen.items():
            p.requires_grad_(rg)
        model.train(training)
        teacher.train(teacher_training)
    final = _mean_loss(model, data, targets, loss_fn)
    return RecoveryResult(losses, initial, final, len(losses), time.perf_counter() - t0, len(losses) < steps,
                          trainable, sum(p.numel() for p in params), block_losses)


@torch.no_grad()
def _mean_loss(model, data, targets, loss_fn) -> float:
    return sum(float(loss_fn(run_model(model, b), t, b)) for b, t in zip(data, targets)) / len(data)


def _optimizer(groups, rates: Dict[str, float], only=None):
    chosen = {k: [p for p in ps if only is None or id(p) in only] for k, ps in groups.items()}
    return torch.optim.Adam([{"params": ps, "lr": rates[kind] * 2.0 ** (4 - bits)}
                             for (kind, bits), ps in chosen.items() if ps])


def _step(opt, value: torch.Tensor, where: str) -> float:
    if not torch.isfinite(value):
        raise RecoveryError(f"recover: the loss became {float(value)} {where}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    value.backward()
    opt.step()
    return value.item()


def _batches(n: int, gen: torch.Generator):
    """Batch indices forever, reshuffled every pass."""
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


def _blockwise(model, teacher, layers, data, groups, rates, block_steps, gen, progress, tqdm) -> List[float]:
    """Block by block: each block's trainable parameters fit the teacher block's output."""
    _, blocks = find_blocks(model, layers)
    if block_steps == 0 or not blocks:
        return []
    run_s = capture_block_inputs([b for _, b in blocks], lambda i: run_model(model, data[i]), len(data))
    run_t = capture_block_inputs([teacher.get_submodule(n) for n, _ in blocks],
                                 lambda i: run_model(teacher, data[i]), len(data))
    (s_in, s_extra), (t_in, t_extra) = run_s, run_t
    ids = {id(p) for ps in groups.values() for p in ps}
    losses: List[float] = []
    order = _batches(len(data), gen)
    bar = tqdm(total=block_steps * len(blocks), desc="kquant: recovering block by block", unit="step",
               disable=None if progress else True)
    for j, (name, block) in enumerate(blocks):
        tblock = teacher.get_submodule(name)
        args = [_with_hidden(*s_extra[j][i], s_in[i]) for i in range(len(data))]
        with torch.no_grad():
            t_in = [_first_tensor(tblock(*a, **k)) for a, k in
                    (_with_hidden(*t_extra[j][i], t_in[i]) for i in range(len(data)))]
        mine = {id(p) for p in block.parameters()} & ids
        if mine:
            opt = _optimizer(groups, rates, mine)
            for _ in range(block_steps):
                i = next(order)
                losses.append(_step(opt, distill_loss(block(*args[i][0], **args[i][1]), t_in[i], data[i]),
                                    f"in block {name}"))
                bar.update(1)
        with torch.no_grad():
            s_in = [_first_tensor(block(*a, **k)) for a, k in args]
    bar.close()
    return losses


def _train(model, data, targets, loss_fn, opt, steps, patience, gen, progress, tqdm) -> List[float]:
    """The end-to-end loop: the loss of every step."""
    losses: List[float] = []
    order = _batches(len(data), gen)
    best, since, ema = math.inf, 0, None
    bar = tqdm(range(steps), desc="kquant: recovering", unit="step", disable=None if progress else True)
    for _ in bar:
        i = next(order)
        losses.append(_step(opt, loss_fn(run_model(model, data[i]), targets[i], data[i]), f"at step {len(losses)}"))
        ema = losses[-1] if ema is None else 0.95 * ema + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{ema:.3g}", refresh=False)
        if patience is not None:
            if ema < best * 0.999:
                best, since = ema, 0
            else:
                since += 1
                if since >= patience:
                    break
    bar.close()
    return losses
