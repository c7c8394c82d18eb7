"""Public ops in the ``torch.ops.kquant`` namespace.

Every op validates its arguments (clear ``TypeError``/``ValueError`` naming the
argument), normalizes them (leading dims flattened, input made contiguous, K padded to
the packed width) and hands them to the router. Each has a fake implementation so
``torch.compile(fullgraph=True)`` traces through without a graph break.

Semantics (the reference backend is the definition):

* ``quantize_per_token(x) -> (q int8 [..., K], scale fp32 [..., 1])``: per row
  ``scale = amax / 127`` (1 for an all-zero row), ``q = rint(x * ((1 / amax) * 127))`` in fp32.
* ``int8_mm(a int8 [M, K], b int8 [N, K]) -> int32 [M, N] = a @ b.T``, exact.
* ``w8a8_linear`` / ``w4a8_linear(x, qweight, scales, bias, act_scale, group_size, layout)``:
  activations quantized per token (or with the static per-tensor ``act_scale``), an
  exact int32 GEMM per weight group, then ``y = sx * sum_g(sw[g] * acc_g) + bias`` in
  fp32, returned in ``x.dtype``. 4-bit weights must be symmetric.
* ``w8a16_linear`` / ``w4a16_linear(x, qweight, scales, zeros, bias, group_size, layout)``:
  ``y = x @ dequant(W).T + bias`` in ``x.dtype``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .format import CANONICAL, PER_CHANNEL, check_group_size, padded_k

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- checks
def _check_float(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def _check_device(t: Optional[Tensor], name: str, ref: Tensor) -> None:
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}; move them to one device")


def _check_linear_args(x, qweight, scales, bias, extra, group_size, layout, bits, extra_name):
    _check_float(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (features last), got shape {list(x.shape)}")
    check_group_size(group_size, "group_size: ")
    for name, t in (("qweight", qweight), ("scales", scales), ("bias", bias), (extra_name, extra)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_device(t, name, x)
    if scales.dtype != torch.float32 or scales.dim() != 2:
        raise TypeError(f"scales must be float32 [N, groups], got {scales.dtype} {list(scales.shape)}")
    n = scales.shape[0]
    k = x.shape[-1]
    kp = padded_k(k, bits, group_size)
    groups = 1 if group_size == PER_CHANNEL else kp // group_size
    if scales.shape[1] != groups:
        raise ValueError(f"scales {list(scales.shape)} do not match x with K={k} and group_size={group_size} "
                         f"(expected [{n}, {groups}])")
    if layout == CANONICAL:
        want = (torch.int8, [n, kp]) if bits == 8 else (torch.uint8, [n, kp // 2])
        if qweight.dtype != want[0]:
            raise TypeError(f"qweight must be {want[0]} for {bits}-bit weights, got {qweight.dtype}")
        if list(qweight.shape) != want[1]:
            raise ValueError(f"qweight {list(qweight.shape)} does not match x with K={k} "
                             f"(expected {want[1]} for {bits}-bit, group_size={group_size})")
    if bias is not None:
        if bias.dtype not in FLOAT_DTYPES or list(bias.shape) != [n]:
            raise ValueError(f"bias must be a float tensor of shape [{n}], got {bias.dtype} {list(bias.shape)}")
    return n, k, kp


def _flatten(x: Tensor, k: int, kp: int) -> Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # a 2-D x needs no view (a microsecond at M=1)
    if kp != k:
        x2 = torch.nn.functional.pad(x2, (0, kp - k))
    return x2.contiguous()


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("kquant::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    _check_float(x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {list(x.shape)}")
    k = x.shape[-1]
    q, s = backends.dispatch("quantize_per_token", x.reshape(-1, k).contiguous())
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


@quantize_per_token.register_fake
def _(x):
    _check_float(x, "x")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


def _check_int8_mm(a, b):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_mm: a {list(a.shape)} and b {list(b.shape)} must share K (b is [N, K])")
    if a.device != b.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}")


@torch.library.custom_op("kquant::int8_mm", mutates_args=())
def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    _check_int8_mm(a, b)
    return backends.dispatch("int8_mm", a.contiguous(), b.contiguous())


@int8_mm.register_fake
def _(a, b):
    _check_int8_mm(a, b)
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


def _act_linear(op: str, bits: int, x, qweight, scales, bias, act_scale, group_size, layout):
    n, k, kp = _check_linear_args(x, qweight, scales, bias, act_scale, group_size, layout, bits, "act_scale")
    if act_scale is not None and (act_scale.numel() != 1 or act_scale.dtype != torch.float32):
        raise ValueError(f"act_scale must be a float32 tensor with one element, got "
                         f"{act_scale.dtype} {list(act_scale.shape)}")
    y = backends.dispatch(op, _flatten(x, k, kp), qweight, scales, bias, act_scale, group_size, layout)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _weight_only_linear(op, bits, x, qweight, scales, zeros, bias, group_size, layout):
    n, k, kp = _check_linear_args(x, qweight, scales, bias, zeros, group_size, layout, bits, "zeros")
    if zeros is not None and (zeros.dtype != torch.float32 or zeros.shape != scales.shape):
        raise ValueError(f"zeros must be float32 {list(scales.shape)} like scales, got "
                         f"{zeros.dtype} {list(zeros.shape)}")
    y = backends.dispatch(op, _flatten(x, k, kp), qweight, scales, zeros, bias, group_size, layout)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


# torch drops arguments equal to the schema default before calling a fake, so each fake's
# defaults must equal its op's: group_size defaults to -1 for 8-bit and 128 for 4-bit ops.
def _fake_act_linear(bits: int):
    def fake(x, qweight, scales, bias=None, act_scale=None, group_size=-1 if bits == 8 else 128, layout=0):
        n, _, _ = _check_linear_args(x, qweight, scales, bias, act_scale, group_size, layout, bits, "act_scale")
        return x.new_empty(*x.shape[:-1], n)
    return fake


def _fake_weight_only_linear(bits: int):
    def fake(x, qweight, scales, zeros=None, bias=None, group_size=-1 if bits == 8 else 128, layout=0):
        n, _, _ = _check_linear_args(x, qweight, scales, bias, zeros, group_size, layout, bits, "zeros")
        return x.new_empty(*x.shape[:-1], n)
    return fake


@torch.library.custom_op("kquant::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                act_scale: Optional[Tensor] = None, group_size: int = -1, layout: int = 0) -> Tensor:
    return _act_linear("w8a8_linear", 8, x, qweight, scales, bias, act_scale, group_size, layout)


@torch.library.custom_op("kquant::w4a8_linear", mutates_args=())
def w4a8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                act_scale: Optional[Tensor] = None, group_size: int = 128, layout: int = 0) -> Tensor:
    return _act_linear("w4a8_linear", 4, x, qweight, scales, bias, act_scale, group_size, layout)


@torch.library.custom_op("kquant::w8a16_linear", mutates_args=())
def w8a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, group_size: int = -1, layout: int = 0) -> Tensor:
    return _weight_only_linear("w8a16_linear", 8, x, qweight, scales, zeros, bias, group_size, layout)


@torch.library.custom_op("kquant::w4a16_linear", mutates_args=())
def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, group_size: int = 128, layout: int = 0) -> Tensor:
    return _weight_only_linear("w4a16_linear", 4, x, qweight, scales, zeros, bias, group_size, layout)


w8a8_linear.register_fake(_fake_act_linear(8))
w4a8_linear.register_fake(_fake_act_linear(4))
w8a16_linear.register_fake(_fake_weight_only_linear(8))
w4a16_linear.register_fake(_fake_weight_only_linear(4))

# op name -> (public op, bits, uses int8 activations)
LINEAR_OPS = {
    "w8a8_linear": (w8a8_linear, 8, True),
    "w4a8_linear": (w4a8_linear, 4, True),
    "w8a16_linear": (w8a16_linear, 8, False),
    "w4a16_linear": (w4a16_linear, 4, False),
}


# The same computation without the dispatcher round trip (about 20 us a call on CPU):
# QuantLinear calls these in eager mode (then, where backends.route says the choice is
# reusable, the chosen backend function directly) and the registered ops when compiling.
EAGER_LINEAR = {
    "w8a8_linear": functools.partial(_act_linear, "w8a8_linear", 8),
    "w4a8_linear": functools.partial(_act_linear, "w4a8_linear", 4),
    "w8a16_linear": functools.partial(_weight_only_linear, "w8a16_linear", 8),
    "w4a16_linear": functools.partial(_weight_only_linear, "w4a16_linear", 4),
}


def linear_op_name(bits: int, int8_activations: bool) -> str:
    return f"w{bits}a{8 if int8_activations else 16}_linear"
