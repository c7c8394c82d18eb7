"""QuantLinear: a drop-in nn.Linear that holds a packed weight and calls one op."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import backends, ops
from .config import QuantConfig, resolve
from .format import (CANONICAL, PER_CHANNEL, PackedWeight, padded_k, quantize_weight, to_canonical)

_FLOAT_BUFFERS = ("scales", "zeros", "act_scale")


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored packed (int8 or int4) in the canonical format.

    Build one with :meth:`from_linear`; ``kquant.quantize_`` does it for a whole model.
    The weight may be re-laid out once for the chosen kernel; ``state_dict`` and
    :meth:`packed_weight` always return the canonical form.
    """

    # (device, KQUANT_BACKEND, (backend function, args after x, K, Kp, N)) once a call has
    # passed every check and the router's choice is reusable; None after any reassignment
    _route = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Union[QuantConfig, str] = "w8a8", *, name: str = "QuantLinear",
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = resolve(config)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"{name}: in_features and out_features must be >= 1, got "
                             f"[{out_features}, {in_features}]")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = cfg.weight_bits, cfg.group_size, cfg.symmetric
        self.activations = cfg.activations
        self.name = name
        self.op_name = ops.linear_op_name(self.bits, cfg.int8_activations)
        kp = padded_k(in_features, self.bits, self.group_size)
        groups = 1 if self.group_size == PER_CHANNEL else kp // self.group_size
        if self.bits == 8:
            q = torch.zeros(out_features, kp, dtype=torch.int8, device=device)
        else:  # nibble 8 is the value 0 for symmetric int4
            q = torch.full((out_features, kp // 2), 0x88 if self.symmetric else 0, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", None if self.symmetric else torch.zeros(out_features, groups, device=device))
        self.register_buffer("act_scale", torch.ones(1, device=device) if self.activations == "static" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.layout = CANONICAL
        self._prepare()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Union[QuantConfig, str] = "w8a8", *, name: str = "",
                    weight_qparams: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                    act_scale: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize ``linear``'s weight. ``weight_qparams`` = (scales, zeros) from an observer;
        ``act_scale`` is the static activation scale (required when activations="static")."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name or 'from_linear'}: expected nn.Linear, got {type(linear).__name__}")
        cfg = resolve(config)
        name = name or "QuantLinear"
        if cfg.activations == "static" and act_scale is None:
            raise ValueError(f"{name}: activations='static' needs an act_scale from calibration data")
        w = linear.weight
        scales, zeros = weight_qparams if weight_qparams is not None else (None, None)
        packed = quantize_weight(w, cfg.weight_bits, cfg.group_size, cfg.symmetric, scales, zeros, name=name)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg, name=name,
                  device=w.device, dtype=w.dtype)
        mod.load_packed(packed)
        if linear.bias is not None:
            if not torch.isfinite(linear.bias).all():
                raise ValueError(f"{name}: bias holds NaN or Inf")
            mod.bias.data.copy_(linear.bias.detach())
        if act_scale is not None:
            a = torch.as_tensor(act_scale, dtype=torch.float32, device=w.device).reshape(1)
            if not (torch.isfinite(a).all() and a.item() > 0):
                raise ValueError(f"{name}: act_scale must be finite and > 0, got {a.item()}")
            mod.act_scale = a
        return mod

    def load_packed(self, packed: PackedWeight) -> None:
        """Install a canonical PackedWeight (validated against this layer's shape)."""
        packed.validate(f"{self.name}: ")
        if (packed.bits, packed.group_size, packed.in_features, packed.out_features, packed.symmetric) != (
                self.bits, self.group_size, self.in_features, self.out_features, self.symmetric):
            raise ValueError(
                f"{self.name}: packed weight is {packed.bits}-bit group {packed.group_size} "
                f"[{packed.out_features}, {packed.in_features}] symmetric={packed.symmetric}, layer expects "
                f"{self.bits}-bit group {self.group_size} [{self.out_features}, {self.in_features}] "
                f"symmetric={self.symmetric}")
        dev = self.scales.device
        self.qweight = packed.qweight.to(dev)
        self.layout = CANONICAL
        self.scales = packed.scales.to(dev, torch.float32)
        if packed.zeros is not None:
            self.zeros = packed.zeros.to(dev, torch.float32)
        self._prepare()

    def _prepare(self) -> None:
        """Let the preferred backend derive its layout once; the canonical copy is dropped."""
        canon = self.canonical_qweight()
        self.qweight, self.layout = backends.prepare_weight(canon, self.bits, self.group_size, self.op_name)

    # ------------------------------------------------------------------ canonical views
    @property
    def padded_in_features(self) -> int:
        return padded_k(self.in_features, self.bits, self.group_size)

    def canonical_qweight(self) -> torch.Tensor:
        return to_canonical(self.qweight, self.layout, self.bits, self.out_features, self.padded_in_features)

    def packed_weight(self) -> PackedWeight:
        return PackedWeight(self.canonical_qweight(), self.scales, self.zeros, self.bits, self.group_size,
                            self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] this layer computes with."""
        return self.packed_weight().dequantize(dtype)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the packed weight: codes + scales (+ zeros)."""
        return self.packed_weight().nbytes

    @property
    def _op(self):
        # looked up, not stored: op objects cannot be deep-copied or pickled
        return ops.LINEAR_OPS[self.op_name][0]

    @property
    def mode(self) -> str:
        return self.op_name.split("_")[0]

    def backend(self) -> str:
        """Backend the router would pick for this layer's device (shape checks aside)."""
        try:
            return backends.select(self.op_name, self.qweight.device.type)[0]
        except backends.BackendError as e:
            return f"none ({e})"

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in ops.FLOAT_DTYPES:
            raise TypeError(f"{self.name}: input must be a float32, float16 or bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        shape = x.shape
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input shape {list(shape)} does not end in "
                             f"in_features={self.in_features}")
        if torch.compiler.is_compiling():  # the registered op: its fake impl traces, no graph break
            self._check_device(x)
            return self._call(self._op, x)
        # eager fast path: the backend function the router chose on an earlier call with this
        # layer's own (already validated) tensors; only x is checked
        route = self._route
        if route is not None and route[0] == x.device and route[1] == os.environ.get(backends.ENV):
            fn, args, k, kp, n = route[2]
            y = fn(ops._flatten(x, k, kp), *args)
            return y if len(shape) == 2 else y.reshape(*shape[:-1], n)
        self._check_device(x)
        env = os.environ.get(backends.ENV)
        y = self._call(ops.EAGER_LINEAR[self.op_name], x)  # the op body: full checks, then the router
        self._cache_route(x, env)
        return y

    def _check_device(self, x: torch.Tensor) -> None:
        if x.device != self.qweight.device:
            raise ValueError(f"{self.name}: input is on {x.device} but the layer is on {self.qweight.device}")

    def _tensor_args(self) -> tuple:
        """The op's arguments after x, in its schema order."""
        if self.activations == "none":
            return self.qweight, self.scales, self.zeros, self.bias, self.group_size, self.layout
        return self.qweight, self.scales, self.bias, self.act_scale, self.group_size, self.layout

    def _call(self, op, x: torch.Tensor) -> torch.Tensor:
        return op(x, *self._tensor_args())

    def _cache_route(self, x: torch.Tensor, env: Optional[str]) -> None:
        """After a call that passed every check: keep the router's choice if it may be reused."""
        k, kp = self.in_features, self.padded_in_features
        args = self._tensor_args()
        fn, reusable = backends.route(self.op_name, x.device.type, ops._flatten(x, k, kp), *args)
        if reusable:
            self.__dict__["_route"] = (x.device, env, (fn, args, k, kp, self.out_features))

    # whatever replaces a tensor or setting drops the route: the op body checks the next call
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self.__dict__["_route"] = None

    def __delattr__(self, name):
        super().__delattr__(name)
        self.__dict__["_route"] = None

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(name, tensor, persistent)
        self.__dict__["_route"] = None

    def register_parameter(self, name, param):
        super().register_parameter(name, param)
        self.__dict__["_route"] = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_route"] = None  # holds functions and tensor references: rebuilt on the next call
        return state

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

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == PER_CHANNEL else str(self.group_size)
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bits={self.bits}, group_size={group}, symmetric={self.symmetric}, "
                f"activations={self.activations}, bias={self.bias is not None}, backend={self.backend()}")
