"""Mixed precision chosen automatically: which layers can go to fewer bits?

    plan = kquant.auto_quantize(model, calib_batches, budget=4.5)           # 4.5 bits per weight
    plan = kquant.auto_quantize(model, calib_batches, budget=kquant.Budget(mib=30), method="gptq")
    print(plan.table())

Three steps.

1. **Sensitivity.** For every quantizable layer and every candidate config, the model's output
   error on the calibration batches when that layer alone is quantized (with the given method)
   and every other layer stays in float: ``||y_q - y||^2 / ||y||^2`` summed over the batches, on
   the first floating-point tensor of the output (``last_hidden_state`` of a Hugging Face
   encoder, logits of a classifier), padding tokens left out when a dict batch carries an
   ``attention_mask``; ``error_fn`` replaces it. Keeping a layer in float costs nothing and is
   not measured.

   Work is shared. The float outputs are computed once. When the model has repeated blocks
   (the ``nn.ModuleList`` holding most layers), their inputs are captured once and a layer in
   block ``b`` re-runs only blocks ``b..end`` from block ``b``'s float inputs; what the model
   computes after its blocks is either the last block's output itself or is replayed by running
   the model with every block answering that output. Both shortcuts are checked against the
   float outputs first, and the whole model runs instead when they do not reproduce them. The
   statistics a method needs (GPTQ's Hessian, AWQ's activation statistics) are collected once
   per layer, from its float inputs, and reused for every candidate. A weight-only candidate of
   a float32 layer is evaluated as a float weight equal to the packed one dequantized (the same
   numbers as the ``QuantLinear`` up to float rounding, on any backend); other candidates swap
   in a ``QuantLinear``. The layer is restored before the next one.

2. **Plan.** Pick one candidate (or float) per layer so that the budget holds and the predicted
   error, the sum of the chosen sensitivities (an additive model), is smallest; or, for an
   error budget, the model is smallest. This is a multiple-choice knapsack, solved exactly by
   dynamic programming over the Pareto front of (size, error) of partial plans, pruned by the
   budget; sizes are exact byte counts, so the result never exceeds the budget. (A front larger
   than ``_MAX_FRONT`` points is thinned, and the plan says ``exact=False``.)

3. **Quantize.** ``quantize_`` applies the plan (per-layer ``overrides`` of exact names) with
   the method, then the quantized model's error on the calibration batches is measured.

Sizes count what a checkpoint stores: codes, scales and zeros (an equalization method may hold
an input scale per layer, counted too; a static activation scale). ``Budget(bits=...)`` is the
average stored bits per weight over the layers considered (float layers count their dtype's
bits); ``Budget(mib=...)`` is the whole model (every parameter and buffer after quantization);
``Budget(error=...)`` is the largest predicted error tolerated, then the size is minimized.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .api import _warn_kept_float, quantize_, run_model, select_layers
from .calibration.methods import SmoothQuant, describe, parse_methods
from .calibration.sensitivity import Runner, sensitivities
from .config import PRESETS, QuantConfig, resolve
from .format import PER_CHANNEL
from .nn import QuantLinear, check_has_values, linear_weight
from .spec import LinearSpec

__all__ = ["auto_quantize", "AutoPlan", "Budget", "PlanRow", "config_name", "DEFAULT_CANDIDATES"]

DEFAULT_CANDIDATES = ("w8a16", "w4a16", "w3a16", "w2a16")
FLOAT = "float"
MIB = 1 << 20
_MAX_FRONT = 200_000


# ----------------------------------------------------------------------------- budget
@dataclasses.dataclass(frozen=True)
class Budget:
    """What ``auto_quantize`` must meet; exactly one is set. ``bits``: average stored bits per
    weight of the layers considered; ``mib``: the whole model's size in MiB; ``error``: the
    largest predicted output error (then the smallest model is chosen)."""

    bits: Optional[float] = None
    mib: Optional[float] = None
    error: Optional[float] = None

    def __post_init__(self):
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"Budget needs exactly one of bits, mib or error, got {given or 'none'}")
        (kind, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Budget {kind} must be a finite number, got {value!r}")
        if value < 0 or (value == 0 and kind != "error"):
            raise ValueError(f"Budget {kind} must be {'>= 0' if kind == 'error' else '> 0'}, got {value!r}")

    @property
    def kind(self) -> str:
        return next(k for k in ("bits", "mib", "error") if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.kind)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def _as_budget(budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Budget(bits=budget)
    raise TypeError(f"budget must be a kquant.Budget or a number (average bits per weight), got "
                    f"{type(budget).__name__} {budget!r}")


# ----------------------------------------------------------------------------- candidates
def config_name(cfg: Optional[QuantConfig]) -> str:
    """'w3a16 g128 asym', 'w8a8 per-channel sym', ... ('float' for None)."""
    if cfg is None:
        return FLOAT
    group = "per-channel" if cfg.group_size == PER_CHANNEL else f"g{cfg.group_size}"
    parts = [cfg.mode, group, "sym" if cfg.symmetric else "asym"]
    if cfg.activations == "static":
        parts.append("static")
    if cfg.weight_observer != "minmax":
        parts.append(cfg.weight_observer)
    return " ".join(parts)


def _candidates(candidates, allow_float: bool, equalize) -> Dict[str, Optional[QuantConfig]]:
    """name -> config (None: float), in the order given, duplicates dropped."""
    if isinstance(candidates, (str, QuantConfig)) or candidates is None:
        candidates = [candidates]
    out: Dict[str, Optional[QuantConfig]] = {}
    for c in candidates:
        if c is None:
            if not allow_float:
                raise ValueError("candidates hold None (keep in float) but allow_float=False")
            out[FLOAT] = None
            continue
        if not isinstance(c, (str, QuantConfig)):
            raise TypeError(f"candidate {c!r}: expected a preset name, a kquant.QuantConfig or None, got "
                            f"{type(c).__name__}")
        if isinstance(c, str) and c.lower() not in PRESETS:
            raise ValueError(f"unknown candidate {c!r}; presets: {sorted(PRESETS)} (or a kquant.QuantConfig)")
        cfg = resolve(c)
        if cfg.overrides:
            raise ValueError(f"candidate {config_name(cfg)!r} has overrides; a candidate is one layer's config")
        if isinstance(equalize, SmoothQuant) and not cfg.int8_activations:
            raise ValueError(f"candidate {c if isinstance(c, str) else config_name(cfg)!r} keeps activations in "
                             f"float, but smoothquant moves int8 activation outliers into the weights: use int8 "
                             f"activation candidates (w8a8, w4a8) with it, or awq")
        out.setdefault(config_name(cfg), cfg)
    if allow_float:
        out.setdefault(FLOAT, None)
    if not any(c is not None for c in out.values()):
        raise ValueError("no candidate config to quantize with (candidates hold only None)")
    return out


def _escape(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _plan_config(chosen: Dict[str, Optional[QuantConfig]]) -> QuantConfig:
    """Every layer float but those named (overrides match by fnmatch; the last match wins)."""
    over: Dict[str, Optional[QuantConfig]] = {"*": None}
    over.update({_escape(name): cfg for name, cfg in chosen.items() if cfg is not None})
    return QuantConfig(overrides=over)


def _layer_bytes(n: int, k: int, cfg: Optional[QuantConfig], dtype: torch.dtype, equalize) -> int:
    """Stored bytes of an [n, k] layer's weight in ``cfg`` (codes, scales, zeros; an input scale
    when an equalization method may hold one; a static activation scale)."""
    if cfg is None:
        return n * k * torch.empty((), dtype=dtype).element_size()
    spec = LinearSpec(cfg.weight_bits, cfg.group_size, cfg.symmetric, False, k, n)
    rows, row_bytes = spec.qweight_shape()[1]
    total = rows * row_bytes + n * spec.groups * 4 * (1 if cfg.symmetric else 2)
    return total + (4 * k if equalize is not None else 0) + (4 if cfg.activations == "static" else 0)


def _state_bytes(model: nn.Module, skip_keys=()) -> Tuple[int, set]:
    """Bytes of the state_dict (what a checkpoint holds), storage shared by several entries
    counted once, leaving out ``skip_keys``; and the identities of what was counted."""
    seen, total = set(), 0
    for key, t in model.state_dict(keep_vars=True).items():
        if key in skip_keys or not isinstance(t, torch.Tensor):
            continue
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else key
        if ident not in seen:
            seen.add(ident)
            total += t.numel() * t.element_size()
    return total, seen


# ----------------------------------------------------------------------------- the knapsack
def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], *, size_cap: Optional[int] = None,
          error_cap: Optional[float] = None, max_points: int = _MAX_FRONT) -> Tuple[List[int], bool]:
    """One option per layer: with ``size_cap``, the smallest summed error whose summed cost is
    at most the cap; with ``error_cap``, the smallest summed cost whose summed error is at most
    that. Returns (option index per layer, exact). Exact unless the Pareto front of partial
    plans grew past ``max_points`` and was thinned. Raises ValueError when nothing fits."""
    n = len(costs)
    c_rest = np.zeros(n + 1, np.int64)
    e_rest = np.zeros(n + 1)
    for li in range(n - 1, -1, -1):
        c_rest[li] = c_rest[li + 1] + min(costs[li])
        e_rest[li] = e_rest[li + 1] + min(errors[li])
    if size_cap is not None and c_rest[0] > size_cap:
        raise ValueError(f"no plan fits size {size_cap}; the smallest is {int(c_rest[0])}")
    sizes, errs, back, exact = np.zeros(1, np.int64), np.zeros(1), [], True
    for li in range(n):
        c = np.asarray(costs[li], np.int64)
        e = np.asarray(errors[li], np.float64)
        s2 = (sizes[:, None] + c[None, :]).ravel()
        e2 = (errs[:, None] + e[None, :]).ravel()
        parent = np.repeat(np.arange(len(sizes)), len(c))
        choice = np.tile(np.arange(len(c)), len(sizes))
        keep = np.ones(len(s2), bool)
        if size_cap is not None:
            keep &= s2 + c_rest[li + 1] <= size_cap
        if error_cap is not None:  # the margin covers the order of float sums
            keep &= e2 + e_rest[li + 1] <= error_cap * (1 + 1e-9) + 1e-300
        s2, e2, parent, choice = s2[keep], e2[keep], parent[keep], choice[keep]
        if not len(s2):
            raise ValueError("no plan meets the budget")
        order = np.lexsort((e2, s2))
        s2, e2, parent, choice = s2[order], e2[order], parent[order], choice[order]
        best_before = np.minimum.accumulate(e2)
        front = np.ones(len(e2), bool)
        front[1:] = e2[1:] < best_before[:-1]  # dominated: no smaller error than a smaller plan
        s2, e2, parent, choice = s2[front], e2[front], parent[front], choice[front]
        if len(s2) > max_points:  # keep each size bucket's smallest and most accurate plan
            exact = False
            edges = np.linspace(s2[0], s2[-1], max_points // 2)
            bucket = np.searchsorted(edges, s2, side="right")
            thin = np.zeros(len(s2), bool)
            thin[np.r_[True, bucket[1:] != bucket[:-1]]] = True
            thin[np.r_[bucket[1:] != bucket[:-1], True]] = True
            s2, e2, parent, choice = s2[thin], e2[thin], parent[thin], choice[thin]
        sizes, errs = s2, e2
        back.append((parent, choice))
    if error_cap is not None:
        ok = np.nonzero(errs <= error_cap)[0]
        if not len(ok):
            raise ValueError("no plan meets the error budget")
        idx = int(ok[0])
    else:
        idx = len(sizes) - 1
    picks = [0] * n
    for li in range(n - 1, -1, -1):
        parent, choice = back[li]
        picks[li] = int(choice[idx])
        idx = int(parent[idx])
    return picks, exact


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class PlanRow:
    """One layer of a plan: the config chosen ("float" to keep it), its stored bits per weight
    and bytes, and its predicted error (its sensitivity in that config)."""

    layer: str
    config: str
    bits: float
    bytes: int
    weights: int
    predicted_error: float


@dataclasses.dataclass
class AutoPlan:
    """What :func:`auto_quantize` chose and measured. ``sensitivity[layer][config]`` is the
    output error with only that layer quantized; ``candidates`` maps each config name to its
    :class:`QuantConfig` fields (None for float). Sizes are after quantization: ``avg_bits``
    over the layers in the plan, ``layer_mib`` their stored weights, ``model_mib`` the whole
    model. ``predicted_error`` is the sum of the rows' errors, ``measured_error`` the quantized
    model's error on the batches the sensitivities were measured on (``sensitivity_batches`` of
    them; ``calib_rows`` output rows), ``calib_batches`` what the method calibrated on."""

    rows: List[PlanRow]
    budget: Budget
    method: str
    candidates: Dict[str, Optional[Dict[str, object]]]
    sensitivity: Dict[str, Dict[str, float]]
    avg_bits: float
    layer_mib: float
    model_mib: float
    predicted_error: float
    measured_error: Optional[float]
    seconds: Dict[str, float]
    exact: bool = True
    calib_batches: int = 0
    calib_rows: int = 0
    shared: str = "full"
    sensitivity_batches: int = 0

    def configs(self) -> Dict[str, Optional[QuantConfig]]:
        """layer -> its QuantConfig (None: kept in float)."""
        return {r.layer: None if r.config == FLOAT else QuantConfig(**self.candidates[r.config]) for r in self.rows}

    def quant_config(self) -> QuantConfig:
        """The QuantConfig that applies this plan with ``quantize_`` (layers outside it stay float)."""
        return _plan_config(self.configs())

    def table(self, sensitivity: bool = False) -> str:
        """A markdown table, one row per layer (with ``sensitivity``, every candidate's error), and the totals."""
        names = [c for c in self.candidates if c != FLOAT]
        head = ["layer", "config", "bits", "bytes", "predicted error"] + (names if sensitivity else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        for r in self.rows:
            cells = [r.layer, r.config, f"{r.bits:.2f}", f"{r.bytes:,}", f"{r.predicted_error:.3e}"]
            if sensitivity:
                cells += [f"{self.sensitivity[r.layer].get(c, float('nan')):.3e}" for c in names]
            lines.append("| " + " | ".join(cells) + " |")
        measured = "n/a" if self.measured_error is None else f"{self.measured_error:.3e}"
        lines.append(f"\nbudget {self.budget}, method {self.method}: {self.avg_bits:.3f} bits per weight, layers "
                     f"{self.layer_mib:.2f} MiB, model {self.model_mib:.2f} MiB; error predicted "
                     f"{self.predicted_error:.3e}, measured {measured}; "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> Dict[str, object]:
        """Plain JSON-ready data (a non-finite number becomes None)."""
        d = dataclasses.asdict(self)
        d["budget"] = dataclasses.asdict(self.budget)
        return _finite(d)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "AutoPlan":
        if not isinstance(d, dict):
            raise ValueError(f"an AutoPlan dict is expected, got {type(d).__name__}")
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            kw = {k: v for k, v in d.items() if k in fields}
            kw["rows"] = [PlanRow(**r) for r in d["rows"]]
            kw["budget"] = Budget(**d["budget"])
            plan = cls(**kw)
            for r in plan.rows:
                if r.config != FLOAT and r.config not in plan.candidates:
                    raise ValueError(f"layer {r.layer}: config {r.config!r} is not among the candidates")
            plan.configs()
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a valid AutoPlan: {type(e).__name__}: {e}") from None
        return plan


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


# ----------------------------------------------------------------------------- entry point
def auto_quantize(model: nn.Module, calib_data: Iterable, *, budget: Union[Budget, float],
                  candidates: Sequence[Union[str, QuantConfig, None]] = DEFAULT_CANDIDATES,
                  method="rtn", allow_float: bool = True, skip: Optional[Union[str, Sequence[str]]] = None,
                  error_fn: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
                  sensitivity: Optional[Dict[str, Dict[str, float]]] = None,
                  sensitivity_data: Optional[Iterable] = None, progress: bool = True) -> "AutoPlan":
    """Choose a config per layer within ``budget``, quantize ``model`` in place with it, and
    return the :class:`AutoPlan` (also set as ``model.kquant_plan``; ``save_quantized`` stores
    it). See the module docstring for the method.

    calib_data: model inputs (a dict of keyword arguments, a tuple or a tensor per batch).
    budget: a :class:`Budget`, or a number = ``Budget(bits=number)``. candidates: preset names
    or QuantConfigs, ``None`` for float; float is always allowed unless ``allow_float=False``.
    method: as for ``quantize_`` ("rtn", "gptq", ["awq", "gptq"], ...), used both to measure
    sensitivities and to quantize. skip: module-name patterns left in float and out of the
    plan. error_fn: ``f(y_q, y_ref) -> float`` on the output rows of all batches (padding
    removed), replacing the normalized squared error. sensitivity: a previous plan's
    ``sensitivity`` table for the same model, data, candidates and method, to try another
    budget without measuring again. sensitivity_data: the inputs the sensitivity analysis and
    the plan's measured error run on, when they should be fewer than ``calib_data`` (the
    analysis costs a model pass per layer and candidate; the method's calibration of the final
    model gains from more data): e.g. 128 of 384 calibration sentences.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = _as_budget(budget)
    equalize, weight_method = parse_methods(method)
    cands = _candidates(candidates, allow_float, equalize)
    if calib_data is None:
        raise ValueError("auto_quantize needs calib_data: an iterable of model inputs (e.g. 64-128 tokenized "
                         "sentences in batches), to measure each layer's sensitivity")
    batches = _batches(calib_data, "calib_data")
    sens_batches = batches if sensitivity_data is None else _batches(sensitivity_data, "sensitivity_data")
    if error_fn is not None and not callable(error_fn):
        raise TypeError(f"error_fn must be callable, got {type(error_fn).__name__}")
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    targets, kept = select_layers(model, QuantConfig(), skip)
    if kept:
        _warn_kept_float(kept)
    if not targets:
        raise ValueError("auto_quantize: the model has no nn.Linear layer to quantize (none present, or all "
                         "skipped or kept in float)")
    for name, mod, _ in targets:
        check_has_values(linear_weight(mod, name), name)
    names = [n for n, _, _ in targets]

    # sizes: known before anything runs, so an impossible size budget fails fast
    cnames = list(cands)
    fixed, weights, costs, model_costs = _sizes(model, targets, cands, equalize)
    total_w = sum(weights)
    size_costs = model_costs if budget.kind in ("mib", "error") else costs
    size_cap = None
    if budget.kind == "bits":
        size_cap = _largest(lambda b: 8 * b / total_w <= budget.bits, int(budget.bits * total_w / 8))
    elif budget.kind == "mib":
        size_cap = _largest(lambda b: (fixed + b) / MIB <= budget.mib, int(budget.mib * MIB) - fixed)
    if size_cap is not None:
        least = sum(min(r) for r in size_costs)
        if least > size_cap:
            small_bits = 8 * sum(min(r) for r in costs) / total_w
            small_mib = (fixed + sum(min(r) for r in model_costs)) / MIB
            raise ValueError(f"budget {budget} cannot be met: the smallest plan (every layer in its smallest "
                             f"candidate) is {small_bits:.3f} bits per weight and {small_mib:.3f} MiB for the "
                             f"model ({len(names)} layers, {total_w:,} weights)")

    training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            runner = Runner(model, sens_batches, names, error_fn, run_model)
            if sensitivity is None:
                sens = sensitivities(runner, targets, cands, equalize, weight_method, progress)
            else:
                sens = _given(sensitivity, names, cands)
        t_sens = time.perf_counter() - t0

        t0 = time.perf_counter()
        errs = [[sens[n].get(c, 0.0) for c in cnames] for n in names]  # float: 0
        if budget.kind == "error":
            least = sum(min(r) for r in errs)
            if least > budget.error:
                raise ValueError(f"budget {budget} cannot be met: the smallest predicted error reachable with "
                                 f"these candidates is {least:.4g}"
                                 f"{' (allow_float=False)' if not allow_float else ''}")
            picks, exact = solve(size_costs, errs, error_cap=budget.error)
        else:
            picks, exact = solve(size_costs, errs, size_cap=size_cap)
        t_plan = time.perf_counter() - t0

        chosen = {n: cands[cnames[p]] for n, p in zip(names, picks)}
        t0 = time.perf_counter()
        if any(c is not None for c in chosen.values()):
            quantize_(model, _plan_config(chosen), calib_data=batches, method=method, skip=skip + list(kept),
                      progress=progress)
        t_quant = time.perf_counter() - t0
        t0 = time.perf_counter()
        measured = runner.error()
        t_measure = time.perf_counter() - t0
    finally:
        model.train(training)

    rows = []
    for li, (name, p) in enumerate(zip(names, picks)):
        mod = model.get_submodule(name)
        if isinstance(mod, QuantLinear):
            nbytes = mod.weight_nbytes + (4 if mod.act_scale is not None else 0)
        else:
            nbytes = costs[li][p]
        rows.append(PlanRow(name, cnames[p], 8 * nbytes / weights[li], nbytes, weights[li], float(errs[li][p])))
    layer_bytes = sum(r.bytes for r in rows)
    plan = AutoPlan(
        rows=rows, budget=budget, method=describe(equalize, weight_method),
        candidates={c: (None if cfg is None else cfg.to_dict()) for c, cfg in cands.items()},
        sensitivity={n: dict(sens[n]) for n in names},
        avg_bits=8 * layer_bytes / total_w, layer_mib=layer_bytes / MIB, model_mib=_state_bytes(model)[0] / MIB,
        predicted_error=float(sum(r.predicted_error for r in rows)), measured_error=measured,
        seconds={"sensitivity": t_sens, "plan": t_plan, "quantize": t_quant, "measure": t_measure,
                 "total": time.perf_counter() - t_start},
        exact=exact, calib_batches=len(batches), calib_rows=runner.rows, shared=runner.mode,
        sensitivity_batches=len(sens_batches))
    model.kquant_plan = plan
    return plan


def _batches(data, what: str) -> list:
    """``data`` (an iterable of model inputs) as a non-empty list of batches."""
    if isinstance(data, (torch.Tensor, dict)):
        raise TypeError(f"{what} must be an iterable of batches (a list of tensors or of dicts), not a single "
                        f"{type(data).__name__}; wrap one batch in a list")
    batches = list(data)
    if not batches:
        raise ValueError(f"auto_quantize: {what} is empty; it needs at least one batch of model inputs")
    return batches


def _sizes(model: nn.Module, targets, cands, equalize):
    """(bytes of everything but the layers' weights, weights per layer, stored bytes per layer
    and candidate, and what each adds to the model: a float weight shared with a tensor that
    stays, such as a tied embedding, adds nothing)."""
    fixed, counted = _state_bytes(model, {f"{name}.weight" for name, _, _ in targets})
    weights, costs, model_costs = [], [], []
    for name, mod, _ in targets:
        n_out, k = linear_weight(mod, name).shape
        p = mod.weight
        weights.append(n_out * k)
        costs.append([_layer_bytes(n_out, k, cfg, p.dtype, equalize) for cfg in cands.values()])
        tied = (p.device, p.data_ptr(), p.dtype, tuple(p.shape), tuple(p.stride())) in counted
        model_costs.append([0 if (tied and cfg is None) else b for cfg, b in zip(cands.values(), costs[-1])])
    return fixed, weights, costs, model_costs


def _given(sensitivity, names: List[str], cands) -> Dict[str, Dict[str, float]]:
    """A sensitivity table passed in, checked to cover every layer and candidate."""
    if not isinstance(sensitivity, dict):
        raise TypeError(f"sensitivity must be a dict (a plan's .sensitivity), got {type(sensitivity).__name__}")
    for name in names:
        for c, cfg in cands.items():
            v = sensitivity.get(name, {}).get(c) if cfg is not None else 0.0
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"sensitivity has no valid error for layer {name} in candidate {c!r} (got {v!r}); "
                                 f"pass the table of a plan made with the same candidates")
    return {name: {c: float(sensitivity[name][c]) for c, cfg in cands.items() if cfg is not None} for name in names}


def _largest(ok: Callable[[int], bool], guess: int) -> int:
    """The largest integer ``b`` with ``ok(b)`` near ``guess`` (``ok`` monotone), exact in float."""
    b = guess
    while not ok(b):
        b -= 1
    while ok(b + 1):
        b += 1
    return b
