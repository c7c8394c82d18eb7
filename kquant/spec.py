"""What a quantized Linear is, and the one set of rules every backend trusts.

:class:`LinearSpec` names everything a backend needs to decide whether it can run a layer:
weight bits, group size, symmetry, whether activations are int8, the shape and the device.
The router asks backends ``can_implement(spec)`` once per layer; the checks below are the
only place where arguments are validated, so backends do not repeat them.

Value checks (scales > 0, code ranges, zero points) read whole tensors. They run once per
tensor version: a tensor that was checked and not modified since is not read again.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .format import (PER_CHANNEL, check_bits, check_group_size, packed_row_bytes, padded_k, qrange, symmetric_zero,
                     unpack_codes)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (weight bits, int8 activations) -> public op name: the four linear kinds
LINEAR_OPS: Dict[Tuple[int, bool], str] = {
    (bits, act): f"w{bits}a{8 if act else 16}_linear" for bits in (8, 4, 3, 2) for act in (True, False)}

_INT32_MAX = 2 ** 31 - 1
# The largest number of k one exact int32 sum may cover: kernels add products of int8
# activations (|a| <= 127) and stored codes (int8 weights: |w| <= 127; sub-byte: unsigned
# codes up to 2^bits - 1, the zero point removed after the sum), so |sum| <= 127 * wmax * K
# must stay below 2^31.
MAX_K_PER_SUM = {8: _INT32_MAX // (127 * 127), **{b: _INT32_MAX // (127 * ((1 << b) - 1)) for b in (4, 3, 2)}}
MAX_K_INT8_MM = _INT32_MAX // (128 * 128)  # int8_mm takes any int8, -128 included


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """A quantized Linear layer as the backends see it (shapes in the canonical format)."""

    bits: int
    group_size: int
    symmetric: bool
    int8_activations: bool
    in_features: int
    out_features: int
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.int8_activations and not self.symmetric:
            raise ValueError("asymmetric weights are supported only without int8 activations "
                             "(activations='none')")
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got [{self.out_features}, "
                             f"{self.in_features}]")
        if self.int8_activations and self.sum_length > MAX_K_PER_SUM[self.bits]:
            raise ValueError(
                f"in_features={self.in_features} is too large for per-channel {self.bits}-bit weights with int8 "
                f"activations: one int32 sum may cover at most {MAX_K_PER_SUM[self.bits]:,} products; "
                f"use a group size (e.g. group_size=128)")

    @property
    def op(self) -> str:
        return LINEAR_OPS[(self.bits, self.int8_activations)]

    @property
    def mode(self) -> str:
        return f"w{self.bits}a{8 if self.int8_activations else 16}"

    @property
    def padded_in_features(self) -> int:
        return padded_k(self.in_features, self.bits, self.group_size)

    @property
    def groups(self) -> int:
        return 1 if self.group_size == PER_CHANNEL else self.padded_in_features // self.group_size

    @property
    def sum_length(self) -> int:
        """k covered by one integer sum: the group, or the whole padded row per channel."""
        return self.padded_in_features if self.group_size == PER_CHANNEL else self.group_size

    def qweight_shape(self) -> Tuple[torch.dtype, Tuple[int, int]]:
        kp = self.padded_in_features
        if self.bits == 8:
            return torch.int8, (self.out_features, kp)
        return torch.uint8, (self.out_features, packed_row_bytes(kp, self.bits))


# ----------------------------------------------------------------------------- value checks
def _values_checked(t: Tensor) -> bool:
    """True when ``t``'s values cannot be read (meta) or were checked at this version."""
    if t.device.type == "meta":
        return True
    try:
        return getattr(t, "_kquant_checked", None) == t._version
    except RuntimeError:  # inference tensors have no version counter: check every time
        return False


def _mark_checked(t: Tensor) -> None:
    try:
        t._kquant_checked = t._version
    except RuntimeError:
        pass


def _check_values(t: Tensor, ok_fn, message) -> None:
    """Raise ValueError(message, or message() when callable) unless ok_fn(t) holds for t's values."""
    if _values_checked(t) or t.numel() == 0:
        return
    if not bool(ok_fn(t)):
        raise ValueError(message() if callable(message) else message)
    _mark_checked(t)


def _where(where: str) -> str:
    return f"{where}: " if where and not where.endswith(": ") else where


def _is_tensor(t, name: str, where: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_weight(spec: LinearSpec, qweight, scales, zeros, where: str = "", values: bool = True) -> None:
    """The canonical weight tensors of ``spec``: dtypes, shapes and (``values``) value ranges."""
    where = _where(where)
    qweight = _is_tensor(qweight, "qweight", where)
    scales = _is_tensor(scales, "scales", where)
    want_dtype, want_shape = spec.qweight_shape()
    if qweight.dtype != want_dtype:
        raise TypeError(f"{where}qweight must be {want_dtype} for {spec.bits}-bit weights, got {qweight.dtype}")
    if tuple(qweight.shape) != want_shape:
        raise ValueError(f"{where}qweight {list(qweight.shape)} does not match K={spec.in_features} "
                         f"(expected {list(want_shape)} for {spec.bits}-bit, group_size={spec.group_size})")
    n, g = spec.out_features, spec.groups
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        _is_tensor(t, name, where)
        if t.dtype != torch.float32 or tuple(t.shape) != (n, g):
            err = TypeError if t.dtype != torch.float32 else ValueError
            raise err(f"{where}{name} must be float32 [{n}, {g}] (N, groups for K={spec.in_features}, "
                      f"group_size={spec.group_size}), got {t.dtype} {list(t.shape)}")
    if zeros is None and not spec.symmetric:
        raise ValueError(f"{where}asymmetric weights need zeros")
    if zeros is not None and spec.symmetric:
        raise ValueError(f"{where}zeros given for symmetric weights")
    if not values:
        return
    _check_values(scales, lambda s: (torch.isfinite(s) & (s > 0)).all(),
                  lambda: f"{where}scales must be finite and > 0 (found {_first_bad(scales)})")
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    if zeros is not None:
        _check_values(zeros, lambda z: ((z == torch.round(z)) & (z >= qmin) & (z <= qmax)).all(),
                      f"{where}zeros must be integers in [{qmin}, {qmax}]")
    if spec.symmetric and spec.bits == 8:
        _check_values(qweight, lambda q: (q != -128).all(),
                      f"{where}symmetric int8 codes must be in [-127, 127] (-128 is not used)")
    if spec.symmetric and spec.bits != 8:
        lo = -symmetric_zero(spec.bits)
        _check_values(qweight, lambda q: (unpack_codes(q, spec.bits) != 0).all(),
                      f"{where}symmetric int{spec.bits} codes must be 1..{2 * -lo - 1} (value {lo} is not used)")


def _first_bad(s: Tensor) -> str:
    bad = (~(torch.isfinite(s) & (s > 0))).nonzero()
    if not len(bad):
        return "none"
    idx = bad[0].tolist()
    return f"{s[tuple(idx)].item()} at {idx}"


def check_act_scale(act_scale, where: str = "", values: bool = True) -> None:
    where = _where(where)
    if act_scale is None:
        return
    _is_tensor(act_scale, "act_scale", where)
    if act_scale.dtype != torch.float32 or act_scale.numel() != 1:
        raise ValueError(f"{where}act_scale must be a float32 tensor with one element, got "
                         f"{act_scale.dtype} {list(act_scale.shape)}")

    if values:  # the kernels multiply by the fp32 reciprocal: it must be finite too
        _check_values(act_scale, lambda a: (torch.isfinite(a) & (a > 0) & torch.isfinite(torch.reciprocal(a))).all(),
                      lambda: f"{where}act_scale must be finite and > 0 (with a finite reciprocal), got "
                              f"{act_scale.reshape(()).item()}")


def check_input_scale(input_scale, k: int, where: str = "", values: bool = True) -> None:
    """The per-input-channel scale a layer multiplies its input by (from equalization)."""
    where = _where(where)
    if input_scale is None:
        return
    _is_tensor(input_scale, "input_scale", where)
    if input_scale.dtype != torch.float32 or list(input_scale.shape) != [k]:
        raise ValueError(f"{where}input_scale must be a float32 tensor of shape [{k}] (one per input channel), "
                         f"got {input_scale.dtype} {list(input_scale.shape)}")
    if values:
        _check_values(input_scale, lambda a: (torch.isfinite(a) & (a > 0)).all(),
                      lambda: f"{where}input_scale must be finite and > 0 in every channel")


def check_bias(bias, n: int, where: str = "") -> None:
    where = _where(where)
    if bias is None:
        return
    _is_tensor(bias, "bias", where)
    if bias.dtype not in FLOAT_DTYPES or list(bias.shape) != [n]:
        raise ValueError(f"{where}bias must be a float tensor of shape [{n}], got {bias.dtype} {list(bias.shape)}")


def check_x(x, where: str = "") -> None:
    where = _where(where)
    _is_tensor(x, "x", where)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{where}x must have a non-empty last dimension (features), got shape {list(x.shape)}")


def check_same_device(ref: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but x is on {ref.device}; move them to one device")


def check_linear_call(bits: int, int8_activations: bool, x, qweight, scales, zeros, bias, act_scale,
                      group_size, input_scale=None, values: bool = True) -> LinearSpec:
    """Every argument of a public linear op; returns the call's spec (device from x).
    ``values=False`` (fake tensors while tracing) checks dtypes and shapes only."""
    check_x(x)
    qweight = _is_tensor(qweight, "qweight", "")
    if qweight.dim() != 2:  # N comes from qweight, so that wrong scales are blamed on scales
        raise ValueError(f"qweight must be 2-D [N, K] (int8) or [N, K * bits / 8] (packed 4, 3 or 2 bits) in the "
                         f"canonical format, got {list(qweight.shape)}")
    check_group_size(group_size, "group_size: ")
    check_same_device(x, qweight=qweight, scales=scales if isinstance(scales, Tensor) else None, zeros=zeros,
                      bias=bias, act_scale=act_scale, input_scale=input_scale)
    spec = LinearSpec(bits, group_size, zeros is None, int8_activations, x.shape[-1], max(qweight.shape[0], 1),
                      x.device)
    check_weight(spec, qweight, scales, zeros, values=values)
    check_bias(bias, spec.out_features)
    check_act_scale(act_scale, values=values)
    check_input_scale(input_scale, spec.in_features, values=values)
    return spec


def check_int8_mm(a, b) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_mm: a {list(a.shape)} and b {list(b.shape)} must share K (b is [N, K])")
    if a.shape[1] > MAX_K_INT8_MM:
        raise ValueError(f"int8_mm: K={a.shape[1]:,} can overflow the exact int32 result (at most "
                         f"{MAX_K_INT8_MM:,} products of int8 values fit); split K")
    if a.device != b.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}")


__all__ = ["LinearSpec", "LINEAR_OPS", "FLOAT_DTYPES", "MAX_K_PER_SUM", "MAX_K_INT8_MM", "check_weight",
           "check_linear_call", "check_act_scale", "check_input_scale", "check_bias", "check_x", "check_int8_mm"]
