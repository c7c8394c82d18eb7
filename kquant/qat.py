"""Quantization-aware training: train through the quantizer, then convert to packed layers.

    kquant.prepare_qat(model, "w4a8")      # every nn.Linear -> FakeQuantLinear
    ...                                    # train with your own loop and optimizer
    kquant.convert(model)                  # FakeQuantLinear -> QuantLinear (packed, integer kernels)

A :class:`FakeQuantLinear` keeps a float weight and computes with it exactly as the packed
layer will: the weight rounded on its grid (codes ``clamp(round(w / s) + z)`` per group,
the canonical format's rule) and, with int8 activations, the input quantized per token as the
kernels do (:func:`kquant.backends.reference.quantize_per_token`). Rounding passes gradients
straight through (zero where a value is clamped); learned scales get the LSQ gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backends import reference
from .config import QuantConfig, resolve
from .format import PER_CHANNEL, SUPPORTED_BITS, group_view, padded_k, qparams_from_range, qrange, quantize_weight
from .nn import QuantLinear, adapter_out, check_has_values, linear_weight, set_module

__all__ = ["prepare_qat", "convert", "FakeQuantLinear", "fake_quantize_weight", "fake_quantize_act", "QAT_BITS"]

QAT_BITS = tuple(range(2, 9))
SCALE_MODES = ("minmax", "fixed", "learned")


def check_qat_bits(bits, where: str = "") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QAT_BITS:
        raise ValueError(f"{where}quantization-aware training fakes weights of 2 to 8 bits, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (exactly: x - x.detach() is 0), identity backward (the straight-through estimator)."""
    return torch.round(x).detach() + (x - x.detach())


def _grouped(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], zero-padded as the packed format pads K."""
    k = w.shape[1]
    return group_view(F.pad(w.float(), (0, padded_k(k, bits, group_size) - k)), group_size)


def minmax_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """The round-to-nearest scales (and zero points) of ``w``: what ``quantize_weight`` picks by default."""
    wg = _grouped(w.detach(), bits, group_size)
    return qparams_from_range(wg.amin(dim=-1), wg.amax(dim=-1), bits, symmetric)


def fake_quantize_weight(w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
                         group_size: int = PER_CHANNEL, symmetric: bool = True,
                         codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w [N, K]`` rounded onto the grid of ``scales``/``zeros`` ``[N, G]`` and back to float:
    the weight a packed layer computes with. Gradients: straight through the rounding to ``w``
    (zero where clamped) and LSQ's to ``scales``. With ``codes [N, Kp]`` (frozen integer codes,
    zero point included) ``w`` is ignored and only the scales move."""
    n, k = (codes.shape[0], None) if w is None else w.shape
    s = scales.unsqueeze(-1)
    z = None if zeros is None else zeros.unsqueeze(-1)
    if codes is not None:
        q = group_view(codes.float(), group_size)
        k = k if k is not None else q.shape[1] * q.shape[2]
    else:
        qmin, qmax = qrange(bits, symmetric)
        u = _grouped(w, bits, group_size) / s
        u = u if z is None else u + z
        # LSQ: inside the range the rounding passes gradients straight through; outside, the
        # clamped code is a constant (no gradient to w; the scale's gradient is the code)
        q = torch.where((u >= qmin) & (u <= qmax), round_ste(u), torch.clamp(torch.round(u), qmin, qmax).detach())
    if z is not None:
        q = q - z
    return (q * s).reshape(n, -1)[:, :k]


def fake_quantize_act(x: torch.Tensor, act_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` through int8 activation quantization and back (per token, or per tensor with a
    static ``act_scale``), exactly as the kernels quantize; the gradient passes straight
    through to ``x`` (and, for a static scale that requires grad, LSQ's to it)."""
    if act_scale is None:
        q, s = reference.quantize_per_token(x.detach())
        return (q.float() * s).to(x.dtype) + (x - x.detach())
    q = torch.clamp(round_ste(x.float() * torch.reciprocal(act_scale.float())), -127, 127)
    return (q * act_scale.float()).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """An ``nn.Linear`` that computes as its packed counterpart will, and trains.

    ``scale_mode``: "minmax" (scales follow the weight's range at every step, no state),
    "fixed" (scales from calibration, kept) or "learned" (``log_scales`` is a parameter: the
    optimizer moves scales multiplicatively, whatever their magnitude). With ``codes`` the
    integer codes are frozen (no weight parameter) and only scales, bias and adapter train.
    """

    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], config: QuantConfig, *,
                 bits: Optional[int] = None, scale_mode: str = "minmax", scales: Optional[torch.Tensor] = None,
                 zeros: Optional[torch.Tensor] = None, act_scale: Optional[torch.Tensor] = None,
                 input_scale: Optional[torch.Tensor] = None, codes: Optional[torch.Tensor] = None,
                 in_features: Optional[int] = None, name: str = "FakeQuantLinear"):
        super().__init__()
        cfg = resolve(config)
        self.name = name
        self.bits = check_qat_bits(cfg.weight_bits if bits is None else bits, f"{name}: ")
        self.group_size, self.symmetric, self.activations = cfg.group_size, cfg.symmetric, cfg.activations
        self.config = cfg
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"{name}: scale_mode must be one of {list(SCALE_MODES)}, got {scale_mode!r}")
        if (weight is None) == (codes is None) or (codes is not None and (scales is None or in_features is None)):
            raise ValueError(f"{name}: give a weight, or frozen codes with their scales and in_features")
        self.out_features, self.in_features = (weight.shape if codes is None else (codes.shape[0], in_features))
        if codes is None:
            self.weight = nn.Parameter(weight.detach().clone())
            self.register_buffer("codes", None)
        else:
            self.register_parameter("weight", None)
            self.register_buffer("codes", codes.detach().to(torch.int16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        if scale_mode == "minmax":
            if codes is not None:
                raise ValueError(f"{name}: frozen codes need their scales ('fixed' or 'learned')")
            scales = zeros = None
        elif scales is None:
            scales, zeros = minmax_qparams(weight, self.bits, self.group_size, self.symmetric)
        self.scale_mode = scale_mode
        self.register_buffer("scales", scales.detach().float().clone() if scale_mode == "fixed" else None)
        self.log_scales = (nn.Parameter(scales.detach().float().log()) if scale_mode == "learned" else None)
        self.register_buffer("zeros", None if zeros is None else zeros.detach().float().clone())
        if cfg.activations == "static":
            if act_scale is None:
                raise ValueError(f"{name}: activations='static' needs an act_scale from calibration data")
            a = torch.as_tensor(act_scale).detach().float().reshape(1)
            self.register_buffer("act_scale", a.clone() if scale_mode != "learned" else None)
            self.log_act_scale = nn.Parameter(a.log()) if scale_mode == "learned" else None
        else:
            self.register_buffer("act_scale", None)
            self.log_act_scale = None
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().clone())
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.calibration: Optional[dict] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Module, config: Union[QuantConfig, str] = "w8a8", *, bits: Optional[int] = None,
                    learn_scales: bool = False, weight_qparams=None, act_scale=None,
                    name: str = "FakeQuantLinear") -> "FakeQuantLinear":
        """From an ``nn.Linear`` (or transformers ``Conv1D``): scales from ``weight_qparams``
        (an observer's), else min-max (followed at every step unless ``learn_scales``)."""
        w = linear_weight(linear, name)
        check_has_values(w, name)
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: weight {list(w.shape)} holds NaN or Inf")
        scales, zeros = weight_qparams if weight_qparams is not None else (None, None)
        mode = "learned" if learn_scales else ("fixed" if scales is not None else "minmax")
        return cls(w, linear.bias, config, bits=bits, scale_mode=mode, scales=scales, zeros=zeros,
                   act_scale=act_scale, name=name)

    @classmethod
    def from_quantized(cls, layer: QuantLinear, *, train_weight: bool = True, learn_scales: bool = False
                       ) -> "FakeQuantLinear":
        """From a packed layer: its grid, scales, activation and input scales and adapter.
        ``train_weight``: the weight (its dequantized value) trains and may move to other
        codes; otherwise the codes are frozen and only the scales can move."""
        packed = layer.packed_weight()
        cfg = QuantConfig(weight_bits=layer.bits, group_size=layer.group_size, symmetric=layer.symmetric,
                          activations=layer.activations)
        weight = codes = None
        if train_weight:
            weight = packed.dequantize(torch.float32)
        elif packed.symmetric:
            codes = packed.codes()
        else:  # as stored, zero point included
            codes = packed.stored_codes()
        mod = cls(weight, layer.bias, cfg, scale_mode="learned" if learn_scales else "fixed", scales=packed.scales,
                  zeros=packed.zeros, act_scale=layer.act_scale, input_scale=layer.input_scale, codes=codes,
                  in_features=layer.in_features, name=layer.name)
        if layer.lora_A is not None:
            mod.lora_A = nn.Parameter(layer.lora_A.detach().clone())
            mod.lora_B = nn.Parameter(layer.lora_B.detach().clone())
        mod.calibration = layer.calibration
        return mod.to(layer.scales.device)

    # ------------------------------------------------------------------ the quantizer
    def qparams(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(scales, zeros) [out_features, groups] this step computes with."""
        if self.scale_mode == "minmax":
            return minmax_qparams(self.weight, self.bits, self.group_size, self.symmetric)
        if self.scale_mode == "learned":
            return self.log_scales.exp(), self.zeros
        return self.scales, self.zeros

    def current_act_scale(self) -> Optional[torch.Tensor]:
        return self.log_act_scale.exp() if self.log_act_scale is not None else self.act_scale

    def quantized_weight(self) -> torch.Tensor:
        """The weight [out_features, in_features] on its grid, as the packed layer will hold it."""
        scales, zeros = self.qparams()
        w = fake_quantize_weight(self.weight, scales, zeros, self.bits, self.group_size, self.symmetric,
                                 codes=self.codes)
        return w[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[-1:] != (self.in_features,):
            raise ValueError(f"{self.name}: input must be a float tensor [..., {self.in_features}], got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
        h = x if self.input_scale is None else x * self.input_scale.to(x.dtype)
        if self.activations != "none":
            h = fake_quantize_act(h, self.current_act_scale())
        y = F.linear(h, self.quantized_weight().to(x.dtype), self.bias)
        return y if self.lora_A is None else y + adapter_out(x, self.lora_A, self.lora_B)

    # ------------------------------------------------------------------ conversion
    @torch.no_grad()
    def to_quantized(self) -> QuantLinear:
        """The packed layer computing what this layer computes (to float rounding)."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{self.name}: {self.bits}-bit weights have no packed format (kquant packs "
                             f"{', '.join(map(str, SUPPORTED_BITS))} bits); keep evaluating the fake-quantized "
                             f"model, or train at one of those")
        scales, zeros = self.qparams()
        packed = quantize_weight(self.quantized_weight().float(), self.bits, self.group_size, self.symmetric,
                                 scales, zeros, name=self.name)
        cfg = dataclasses.replace(self.config, weight_bits=self.bits, overrides={})
        dtype = self.bias.dtype if self.bias is not None else (self.weight.dtype if self.weight is not None
                                                               else torch.float32)
        q = QuantLinear.from_packed(packed, cfg, bias=self.bias, act_scale=self.current_act_scale(),
                                    input_scale=self.input_scale, name=self.name, dtype=dtype)
        if self.lora_A is not None:
            q.set_adapter(self.lora_A, self.lora_B)
        q.calibration = self.calibration
        return q

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == PER_CHANNEL else str(self.group_size)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={group}, symmetric={self.symmetric}, activations={self.activations}, "
                f"scales={self.scale_mode}, {'frozen codes, ' if self.codes is not None else ''}"
                f"bias={self.bias is not None}")


# ----------------------------------------------------------------------------- model level
def prepare_qat(model: nn.Module, config: Union[str, QuantConfig] = "w8a8", *, weight_bits: Optional[int] = None,
                learn_scales: bool = False, method="rtn", calib_data: Optional[Iterable] = None,
                skip: Optional[Union[str, Sequence[str]]] = None, progress: bool = True) -> nn.Module:
    """Swap every ``nn.Linear`` (and transformers ``Conv1D``) of ``model`` for a
    :class:`FakeQuantLinear`, in place; returns ``model``. Train it with any loop and optimizer,
    then :func:`convert` it.

    config: a preset or QuantConfig (bits, groups, symmetry, activations, per-layer
    overrides), as for :func:`kquant.quantize_`. weight_bits: 2 to 8, overriding the config's
    (only 4 and 8 bits convert to packed layers). learn_scales: scales (and a static activation
    scale) become parameters (LSQ); otherwise they follow the weight's min-max range at every
    step, or stay where calibration put them. method / calib_data: the starting point, any
    :func:`kquant.quantize_` method ("rtn", "gptq", "awq", ["awq", "gptq"], ...): the model
    is quantized with it and training starts from its weights, scales and input scales.
    """
    from .api import calibrate_activations, quantize_, select_layers, _warn_kept_float
    from .calibration import weight_qparams
    from .calibration.methods import parse_methods

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("prepare_qat converts the Linear layers inside a model; for one layer use "
                        "kquant.qat.FakeQuantLinear.from_linear(linear, config)")
    if weight_bits is not None:
        check_qat_bits(weight_bits, "prepare_qat: ")
    cfg = resolve(config)
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    targets, kept = select_layers(model, cfg, skip)
    if not targets:
        raise ValueError("prepare_qat: the model has no nn.Linear layer to train through quantization (none "
                         "present, or all skipped or kept in float)")
    equalize, weight_method = parse_methods(method)
    bits_of = {name: weight_bits or c.weight_bits for name, _, c in targets}
    if equalize is not None or weight_method.name != "rtn":
        odd = [n for n, b in bits_of.items() if b not in SUPPORTED_BITS]
        if odd:
            raise ValueError(f"prepare_qat: method {method!r} starts from packed layers ({SUPPORTED_BITS} bits), but "
                             f"{odd[0]} trains at {bits_of[odd[0]]} bits; use method='rtn' (with learn_scales=True)")
        if weight_bits is not None:  # every converted layer at these bits (names as exact patterns)
            cfg = dataclasses.replace(cfg, overrides={**cfg.overrides, **{
                n: dataclasses.replace(c, weight_bits=weight_bits, overrides={}) for n, _, c in targets}})
        quantize_(model, cfg, calib_data=calib_data, method=method, skip=skip, progress=progress)
        for name in bits_of:
            layer = model.get_submodule(name)
            fq = FakeQuantLinear.from_quantized(layer, learn_scales=learn_scales)
            fq.calibration = {**(layer.calibration or {}), "qat": {"scales": fq.scale_mode}}
            set_module(model, name, fq)
        return model
    if kept:  # (quantize_ says it on the calibrated path)
        _warn_kept_float(kept)
    static = {name: (mod, c) for name, mod, c in targets if c.activations == "static"}
    act_scales = {}
    if static:
        if calib_data is None:
            raise ValueError(f"layers {', '.join(list(static)[:3])} use activations='static' and need calib_data")
        act_scales = calibrate_activations(model, static, calib_data, progress)
    built = []
    for name, mod, c in targets:
        b = bits_of[name]
        qparams = None
        if c.weight_observer != "minmax":
            qparams = weight_qparams(linear_weight(mod, name).detach(), b, c.group_size, c.symmetric,
                                     c.weight_observer)
        fq = FakeQuantLinear.from_linear(mod, c, bits=b, learn_scales=learn_scales, weight_qparams=qparams,
                                         act_scale=act_scales.get(name), name=name)
        fq.calibration = {"method": "rtn", "qat": {"scales": fq.scale_mode}}
        built.append((name, fq.to(linear_weight(mod, name).device)))
    for name, fq in built:
        set_module(model, name, fq)
    return model


def qat_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def convert(model: nn.Module) -> nn.Module:
    """Replace every :class:`FakeQuantLinear` of a model prepared by :func:`prepare_qat` (and
    trained) with the :class:`~kquant.QuantLinear` that computes the same function on packed
    weights and integer kernels, in place; returns ``model``. All layers are converted before
    any is swapped in, so an error (naming the layer) leaves the model as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = qat_layers(model)
    if not layers:
        hint = (" (it already holds QuantLinear layers: quantize_ output needs no convert)"
                if any(isinstance(m, QuantLinear) for m in model.modules()) else "")
        raise ValueError(f"convert: the model has no FakeQuantLinear layer; prepare it with "
                         f"kquant.prepare_qat(model, config) and train it first{hint}")
    if isinstance(model, FakeQuantLinear):
        return model.to_quantized()
    built = [(name, m.to_quantized()) for name, m in layers]
    for name, q in built:
        set_module(model, name, q)
    return model

