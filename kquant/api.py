"""Model conversion: quantize_() swaps nn.Linear layers for QuantLinear in place."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .calibration import make_observer, weight_qparams
from .calibration.methods import Method, describe, parse_methods
from .calibration.sequential import Calibrator
from .config import QuantConfig, resolve
from .nn import QuantLinear, check_has_values, is_conv1d, linear_weight, set_module


def _progress(iterable, **kwargs):
    from tqdm.auto import tqdm  # imported when a model is converted, not with kquant
    return tqdm(iterable, **kwargs)


# Modules whose forward reads these Linear children's weights directly instead of calling
# them: swapping such a child for a QuantLinear would break the parent, so it stays float.
_WEIGHT_READERS = {
    nn.MultiheadAttention: (("out_proj",), "nn.MultiheadAttention passes out_proj.weight to "
                                           "F.multi_head_attention_forward instead of calling out_proj"),
    nn.TransformerEncoderLayer: (("linear1", "linear2"), "nn.TransformerEncoderLayer's fast path passes "
                                                         "linear1/linear2 weights to a fused kernel"),
}


def run_model(model: nn.Module, batch) -> object:
    """Call ``model`` on one calibration/evaluation batch: dict -> **kwargs, tuple/list -> *args."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _kept_float(model: nn.Module, name: str, mod: nn.Module) -> Optional[str]:
    """Why a Linear-like module cannot become a QuantLinear, or None if it can."""
    if is_conv1d(mod):
        return None
    if type(mod).forward is not nn.Linear.forward:
        return f"{type(mod).__name__} overrides nn.Linear.forward; replacing it would drop that behaviour"
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for cls, (children, why) in _WEIGHT_READERS.items():
        if isinstance(parent, cls) and child in children:
            return why
    return None


def select_layers(model: nn.Module, config: QuantConfig, skip: Sequence[str] = ()
                  ) -> Tuple[List[Tuple[str, nn.Module, QuantConfig]], Dict[str, str]]:
    """(name, layer, per-layer config) for every layer that will be converted, and
    {name: reason} for the Linear layers that must stay in float."""
    out, kept = [], {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        cfg = config.for_layer(name)
        if cfg is None:
            continue
        why = _kept_float(model, name, mod)
        if why is not None:
            kept[name] = why
            continue
        out.append((name, mod, cfg))
    return out, kept


def _warn_kept_float(kept: Dict[str, str]) -> None:
    by_reason: Dict[str, List[str]] = {}
    for name, why in kept.items():
        by_reason.setdefault(why, []).append(name)
    lines = [f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)}): {why}"
             for why, names in by_reason.items()]
    warnings.warn("quantize_: left in float (pass their names in skip= to silence this): " + "; ".join(lines),
                  stacklevel=3)


@torch.no_grad()
def calibrate_activations(model: nn.Module, layers: Dict[str, Tuple[nn.Linear, QuantConfig]],
                          calib_data: Iterable, progress: bool = True) -> Dict[str, torch.Tensor]:
    """Run ``calib_data`` through ``model``; return a static per-tensor int8 scale per layer."""
    observers = {name: make_observer(cfg.act_observer, "per_tensor") for name, (_, cfg) in layers.items()}
    hooks = []
    for name, (mod, _) in layers.items():
        obs = observers[name]
        hooks.append(mod.register_forward_pre_hook(lambda m, args, obs=obs: obs.observe(args[0].detach())))
    n = 0
    try:
        total = len(calib_data) if hasattr(calib_data, "__len__") else None
        for batch in _progress(calib_data, desc="kquant: calibrating", total=total, disable=None if progress else True):
            run_model(model, batch)
            n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("calib_data is empty: static activation scales need at least one batch")
    scales = {}
    for name, obs in observers.items():
        if not obs.has_data():
            raise ValueError(f"{name}: no activations seen during calibration (is the layer used in forward?)")
        scales[name] = obs.qparams(8, True)[0].reshape(1)
    return scales


def quantize_(model: nn.Module, config: Union[str, QuantConfig] = "w8a8", *, calib_data: Optional[Iterable] = None,
              method: Union[str, Method, Sequence[Union[str, Method]]] = "rtn",
              skip: Optional[Union[str, Sequence[str]]] = None, progress: bool = True) -> nn.Module:
    """Convert every ``nn.Linear`` (and transformers ``Conv1D``) in ``model`` to
    :class:`QuantLinear`, in place; returns ``model``.

    config: a preset name ("w8a8", "w8a16", "w4a16", "w4a8") or a QuantConfig (whose
    ``overrides`` set per-layer configs by module-name pattern). skip: module-name
    patterns (fnmatch) to leave in float. calib_data: an iterable of model inputs (a dict
    of keyword arguments, a tuple of positional arguments or a tensor per batch), needed
    when any layer uses static activations and by every method but "rtn".

    method: "rtn" (round to nearest, the default), "gptq", "awq", "smoothquant", a method
    object from :mod:`kquant.calibration` carrying its parameters, or a list applied in order
    (an equalization method, then a weight method: ``["awq", "gptq"]``). Every method but
    "rtn" calibrates layer by layer in the order the model runs them, each on inputs that
    come from the already-quantized layers before it; padding tokens (``attention_mask``
    of a dict batch) are left out.

    Every layer is quantized before any is swapped in: on an error (naming the layer) the
    model is left as it was. Layers that cannot be swapped (a Linear subclass with its own
    forward; Linear weights read directly by nn.MultiheadAttention or
    nn.TransformerEncoderLayer) stay in float, with a warning that says why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear) or is_conv1d(model):
        raise TypeError("quantize_ converts the Linear layers inside a model; for one layer use "
                        "kquant.QuantLinear.from_linear(linear, config)")
    cfg = resolve(config)
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    targets, kept = select_layers(model, cfg, skip)
    if kept:
        _warn_kept_float(kept)
    if not targets:
        warnings.warn("quantize_: no nn.Linear layer to convert (none present, or all skipped or kept in float)",
                      stacklevel=2)
        return model
    for name, mod, _ in targets:  # before calibration runs the model: weights with no values
        check_has_values(linear_weight(mod, name), name)
    equalize, weight_method = parse_methods(method)
    if equalize is not None or weight_method.name != "rtn":
        return _calibrated(model, targets, cfg, calib_data, equalize, weight_method, progress)
    static = {name: (mod, c) for name, mod, c in targets if c.activations == "static"}
    act_scales: Dict[str, torch.Tensor] = {}
    if static:
        if calib_data is None:
            names = ", ".join(list(static)[:3]) + ("..." if len(static) > 3 else "")
            raise ValueError(f"layers {names} use activations='static' and need calib_data")
        act_scales = calibrate_activations(model, static, calib_data, progress)
    built = []
    for name, mod, c in _progress(targets, desc=f"kquant: quantizing ({cfg.mode})",
                                  disable=None if progress else True):
        qparams = None
        if c.weight_observer != "minmax":
            qparams = weight_qparams(linear_weight(mod, name).detach(), c.weight_bits, c.group_size, c.symmetric,
                                     c.weight_observer)
        built.append((name, QuantLinear.from_linear(mod, c, name=name, weight_qparams=qparams,
                                                    act_scale=act_scales.get(name))))
    for name, q in built:
        set_module(model, name, q)
    return model


def _calibrated(model, targets, cfg, calib_data, equalize, weight_method, progress) -> nn.Module:
    """quantize_ with a calibration method: check what it needs, then run it layer by layer."""
    name = describe(equalize, weight_method)
    if equalize is not None and equalize.name == "smoothquant" and not any(c.int8_activations for _, _, c in targets):
        raise ValueError(f"method {name}: SmoothQuant moves int8 activation outliers into the weights, but "
                         f"{cfg.mode} keeps activations in float; use it with w8a8 or w4a8 (for weight-only "
                         f"presets use awq)")
    if calib_data is None:
        raise ValueError(f"method {name} needs calib_data: an iterable of model inputs (e.g. 128 tokenized "
                         f"sentences in batches)")
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise TypeError("calib_data must be an iterable of batches (a list of tensors or of dicts), not a single "
                        f"{type(calib_data).__name__}; wrap one batch in a list")
    batches = list(calib_data)
    if not batches:
        raise ValueError(f"method {name}: calib_data is empty; it needs at least one batch of model inputs")
    training = model.training
    model.eval()
    try:
        Calibrator(model, targets, batches, equalize, weight_method, progress, run_model).run()
    finally:
        model.train(training)
    return model
