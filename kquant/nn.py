"""QuantLinear: a drop-in nn.Linear that holds a packed weight and a kernel prepared once."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import backends
from .config import QuantConfig, resolve
from .format import CANONICAL, PER_CHANNEL, PackedWeight, quantize_weight, to_canonical
from .ops import flatten, scale_input
from .spec import FLOAT_DTYPES, LinearSpec, check_input_scale

_FLOAT_BUFFERS = ("scales", "zeros", "act_scale", "input_scale")


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored packed (int8 or int4) in the canonical format.

    Build one with :meth:`from_linear`; ``kquant.quantize_`` does it for a whole model.
    When the layer is built, moved or loaded, the router picks its backend and the backend
    may re-lay the weight out once for its kernels; ``state_dict`` and :meth:`packed_weight`
    always return the canonical form. Inputs get a gradient (the dequantized weight's); the
    packed weight is frozen.

    A layer calibrated with AWQ or SmoothQuant may hold ``input_scale`` (fp32 ``[in_features]``):
    its input is multiplied by it per channel before the packed weight is applied (saved and
    loaded with the layer). When the equalization scale was folded into the module feeding the
    layer instead, ``folded_scale`` records it (informational: ``dequantize_weight() *
    folded_scale`` is comparable to the original float weight); it is not saved.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Union[QuantConfig, str] = "w8a8", *, name: str = "QuantLinear",
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = resolve(config)
        self.name = name
        try:
            spec = LinearSpec(cfg.weight_bits, cfg.group_size, cfg.symmetric, cfg.int8_activations,
                              in_features, out_features, torch.device(device or "cpu"))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {dtype} layers are not supported; kquant runs float32, float16 and bfloat16 "
                            f"(convert the model first, e.g. model.float())")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = cfg.weight_bits, cfg.group_size, cfg.symmetric
        self.activations = cfg.activations
        self.padded_in_features = spec.padded_in_features
        qdtype, qshape = spec.qweight_shape()
        # code 0 (int8) and nibble 8 (symmetric int4) are the value 0
        fill = 0x88 if (self.bits == 4 and self.symmetric) else 0
        self.register_buffer("qweight", torch.full(qshape, fill, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, spec.groups, device=device))
        self.register_buffer("zeros", None if self.symmetric else torch.zeros(out_features, spec.groups, device=device))
        self.register_buffer("act_scale", torch.ones(1, device=device) if self.activations == "static" else None)
        self.register_buffer("input_scale", None)
        self.register_parameter("lora_A", None)  # optional low-rank adapter, see add_adapter
        self.register_parameter("lora_B", None)
        self.folded_scale: Optional[torch.Tensor] = None
        self.calibration: Optional[dict] = None  # method and parameters, recorded in checkpoints
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                                     requires_grad=False) if bias else None)
        self.layout = CANONICAL
        self._prepare()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Module, config: Union[QuantConfig, str] = "w8a8", *, name: str = "",
                    weight_qparams: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                    act_scale: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                    input_scale: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize ``linear``'s weight (an ``nn.Linear``, or a transformers ``Conv1D``, whose
        weight is stored transposed). ``weight_qparams`` = (scales, zeros) from an observer;
        ``act_scale`` is the static activation scale (required when activations="static").
        ``weight`` replaces the weight to quantize (a calibration method's result, [out, in]);
        ``input_scale`` is the per-input-channel scale the layer applies to its input."""
        name = name or "QuantLinear"
        orig = linear_weight(linear, name)
        w = orig if weight is None else weight
        if tuple(w.shape) != tuple(orig.shape):
            raise ValueError(f"{name}: weight {list(w.shape)} does not match the layer's {list(orig.shape)}")
        cfg = resolve(config)
        check_has_values(w, name)
        if orig.dtype not in FLOAT_DTYPES or w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {w.dtype} weights are not supported; kquant runs float32, float16 and "
                            f"bfloat16 layers (convert the model first, e.g. model.float())")
        scales, zeros = weight_qparams if weight_qparams is not None else (None, None)
        packed = quantize_weight(w, cfg.weight_bits, cfg.group_size, cfg.symmetric, scales, zeros, name=name)
        return cls.from_packed(packed, cfg, bias=linear.bias, act_scale=act_scale, input_scale=input_scale,
                               name=name, dtype=orig.dtype)

    @classmethod
    def from_packed(cls, packed: PackedWeight, config: Union[QuantConfig, str], *, bias: Optional[torch.Tensor] = None,
                    act_scale: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None,
                    name: str = "QuantLinear", dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """A layer holding ``packed`` (canonical), with its bias, static activation scale and
        input scale; ``dtype`` is the float type of its bias and outputs."""
        cfg = resolve(config)
        if cfg.activations == "static" and act_scale is None:
            raise ValueError(f"{name}: activations='static' needs an act_scale from calibration data")
        device = packed.qweight.device
        mod = cls(packed.in_features, packed.out_features, bias is not None, cfg, name=name, device=device,
                  dtype=dtype)
        mod.load_packed(packed)
        if bias is not None:
            if not torch.isfinite(bias).all():
                raise ValueError(f"{name}: bias holds NaN or Inf")
            mod.bias.data.copy_(bias.detach())
        if act_scale is not None:
            a = torch.as_tensor(act_scale, dtype=torch.float32, device=device).detach().reshape(1)
            if not (torch.isfinite(a).all() and a.item() > 0 and torch.isfinite(1.0 / a).all()):
                raise ValueError(f"{name}: act_scale must be finite and > 0, got {a.item()}")
            mod.act_scale = a
        if input_scale is not None:
            mod.set_input_scale(input_scale)
        return mod

    def set_input_scale(self, input_scale: Optional[torch.Tensor]) -> None:
        """Install (or with None, remove) the per-input-channel scale applied to the input."""
        if input_scale is not None:
            input_scale = torch.as_tensor(input_scale).to(self.scales.device, torch.float32).contiguous()
            check_input_scale(input_scale, self.in_features, self.name)
        self.input_scale = input_scale

    # ------------------------------------------------------------------ low-rank adapter
    def add_adapter(self, rank: int, *, generator: Optional[torch.Generator] = None) -> None:
        """Add a trainable low-rank adapter beside the frozen packed weight (QLoRA style):
        ``y = packed(x) + (x @ lora_A.T) @ lora_B.T``. ``lora_B`` starts at zero, so the layer's
        output is unchanged until the adapter is trained."""
        most = min(self.in_features, self.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= most:
            raise ValueError(f"{self.name}: adapter rank must be an int in [1, {most}] for a "
                             f"[{self.out_features}, {self.in_features}] layer, got {rank!r}")
        dev = self.scales.device
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        a = torch.randn(rank, self.in_features, generator=generator, device=dev) / self.in_features ** 0.5
        self.lora_A = nn.Parameter(a.to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype))

    def set_adapter(self, lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor]) -> None:
        """Install a trained adapter (``lora_A [r, in]``, ``lora_B [out, r]``) or, with None, remove it."""
        if lora_a is None or lora_b is None:
            if lora_a is not None or lora_b is not None:
                raise ValueError(f"{self.name}: an adapter needs both lora_A and lora_B")
            self.lora_A = self.lora_B = None
            return
        r = lora_a.shape[0] if lora_a.dim() == 2 else -1
        if (lora_a.dim() != 2 or tuple(lora_a.shape) != (r, self.in_features)
                or tuple(lora_b.shape) != (self.out_features, r) or not lora_a.is_floating_point()
                or not lora_b.is_floating_point()):
            raise ValueError(f"{self.name}: adapter must be float lora_A [r, {self.in_features}] and lora_B "
                             f"[{self.out_features}, r], got {list(lora_a.shape)} and {list(lora_b.shape)}")
        if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
            raise ValueError(f"{self.name}: adapter holds NaN or Inf")
        dev = self.scales.device
        self.lora_A = nn.Parameter(lora_a.detach().to(dev).clone())
        self.lora_B = nn.Parameter(lora_b.detach().to(dev, lora_a.dtype).clone())

    @torch.no_grad()
    def merge_adapter(self) -> None:
        """Fold the adapter into the packed weight: ``dequantize_weight() + lora_B @ lora_A`` is
        quantized again on this layer's grid (its scales kept), and the adapter is removed. What
        the adapter changes by less than half a quantization step is lost in the rounding."""
        if self.lora_A is None:
            raise ValueError(f"{self.name}: the layer has no adapter to merge")
        w = self.packed_weight().dequantize(torch.float32)
        delta = self.lora_B.float() @ self.lora_A.float()
        if self.input_scale is not None:
            delta = delta / self.input_scale  # the packed weight sees x * input_scale
        packed = quantize_weight(w + delta, self.bits, self.group_size, self.symmetric, self.scales, self.zeros,
                                 name=self.name)
        self.lora_A = self.lora_B = None
        self.load_packed(packed)

    def load_packed(self, packed: PackedWeight) -> None:
        """Install a canonical PackedWeight (validated against this layer's shape)."""
        if (packed.bits, packed.group_size, packed.in_features, packed.out_features, packed.symmetric) != (
                self.bits, self.group_size, self.in_features, self.out_features, self.symmetric):
            raise ValueError(
                f"{self.name}: packed weight is {packed.bits}-bit group {packed.group_size} "
                f"[{packed.out_features}, {packed.in_features}] symmetric={packed.symmetric}, layer expects "
                f"{self.bits}-bit group {self.group_size} [{self.out_features}, {self.in_features}] "
                f"symmetric={self.symmetric}")
        packed.validate(f"{self.name}: ")
        dev = self.scales.device
        self.qweight = packed.qweight.to(dev)
        self.layout = CANONICAL
        self.scales = packed.scales.to(dev, torch.float32)
        if packed.zeros is not None:
            self.zeros = packed.zeros.to(dev, torch.float32)
        self._prepare()

    # ------------------------------------------------------------------ the prepared kernel
    @property
    def spec(self) -> LinearSpec:
        return LinearSpec(self.bits, self.group_size, self.symmetric, self.activations != "none",
                          self.in_features, self.out_features, self.scales.device)

    def _prepare(self) -> backends.PreparedLinear:
        """Choose the backend for this layer's device; it may re-lay the weight out once
        (the canonical copy is dropped)."""
        canon = self.canonical_qweight()
        self.qweight, kernel = backends.prepare_linear(self.spec, canon)
        self.layout = kernel.layout
        self._kernel = kernel
        return kernel

    def backend(self) -> str:
        """The backend(s) this layer's calls run on ("cuda|triton": chosen per call by M)."""
        return self._kernel.backend

    # ------------------------------------------------------------------ canonical views
    def canonical_qweight(self) -> torch.Tensor:
        return to_canonical(self.qweight, self.layout, self.bits, self.out_features, self.padded_in_features)

    def packed_weight(self) -> PackedWeight:
        return PackedWeight(self.canonical_qweight(), self.scales, self.zeros, self.bits, self.group_size,
                            self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] this layer computes with (its
        ``input_scale``, if any, multiplied in, and its adapter's ``lora_B @ lora_A`` added)."""
        w = self.packed_weight().dequantize(torch.float32)
        if self.input_scale is not None:
            w = w * self.input_scale
        if self.lora_A is not None:
            w = w + self.lora_B.detach().float() @ self.lora_A.detach().float()
        return w.to(dtype)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the packed weight: codes + scales (+ zeros, + input_scale, + adapter)."""
        extra = sum(t.numel() * t.element_size() for t in (self.input_scale, self.lora_A, self.lora_B)
                    if t is not None)
        return self.packed_weight().nbytes + extra

    @property
    def mode(self) -> str:
        return f"w{self.bits}a{16 if self.activations == 'none' else 8}"

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self.name}: input must be a float32, float16 or bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        shape = x.shape
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input shape {list(shape)} does not end in "
                             f"in_features={self.in_features}")
        buffers, bias = self._buffers, self._parameters["bias"]
        if x.device != buffers["scales"].device:
            raise ValueError(f"{self.name}: input is on {x.device} but the layer is on {buffers['scales'].device}")
        x2 = flatten(scale_input(x, buffers["input_scale"]), self.in_features, self.padded_in_features)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or (bias is not None and bias.requires_grad))):
            # the registered op: traced by torch.compile (fake impl), differentiable for x and bias
            y = torch.ops.kquant._linear_prepared(
                x2, buffers["qweight"], buffers["scales"], buffers["zeros"], bias, buffers["act_scale"], self.bits,
                self.group_size, self.in_features, self.activations != "none", self.layout)
        else:
            kernel = self._kernel
            if kernel.env != os.environ.get(backends.ENV):
                kernel = self._prepare()
                buffers = self._buffers
            y = kernel(x2, buffers["qweight"], buffers["scales"], buffers["zeros"], bias, buffers["act_scale"])
        y = y if len(shape) == 2 else y.reshape(*shape[:-1], self.out_features)
        a = self._parameters["lora_A"]
        return y if a is None else y + adapter_out(x, a, self._parameters["lora_B"])

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn, recurse=True):
        # back to canonical before a device move, fp32 scales kept exact through .half()
        self.qweight, self.layout = self.canonical_qweight(), CANONICAL
        saved = {n: getattr(self, n) for n in _FLOAT_BUFFERS if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for n, old in saved.items():
            new = getattr(self, n)
            if new.dtype != torch.float32:
                setattr(self, n, old.to(new.device))
        self._prepare()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.canonical_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.qweight, self.layout = self.canonical_qweight(), CANONICAL
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._prepare()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_kernel", None)  # holds functions: chosen again on unpickling
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._prepare()

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == PER_CHANNEL else str(self.group_size)
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bits={self.bits}, group_size={group}, symmetric={self.symmetric}, "
                f"activations={self.activations}, bias={self.bias is not None}, "
                f"{'input_scale=True, ' if self.input_scale is not None else ''}"
                f"{f'adapter_rank={self.lora_A.shape[0]}, ' if self.lora_A is not None else ''}"
                f"backend={self.backend()}")


def adapter_out(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The low-rank adapter's term ``(x @ A.T) @ B.T`` in x's dtype."""
    return ((x.to(lora_a.dtype) @ lora_a.T) @ lora_b.T).to(x.dtype)


def linear_weight(module: nn.Module, name: str = "") -> torch.Tensor:
    """The [out_features, in_features] weight of an ``nn.Linear`` or a transformers ``Conv1D``
    (GPT-2 and its family store it transposed, [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"{name or 'from_linear'}: expected nn.Linear (or transformers' Conv1D), got "
                    f"{type(module).__name__}")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted module path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_has_values(weight: torch.Tensor, name: str) -> None:
    if weight.device.type == "meta":
        raise ValueError(f"{name}: the weight is on the meta device (no values to quantize); load the model's "
                         f"weights first, or rebuild quantized layers with kquant.load_quantized")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D: y = x @ W + b with W [in, out] (a Linear with a transposed weight)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")
