"""Public ops in the ``torch.ops.kquant`` namespace.

Every op validates its arguments (:mod:`kquant.spec`: a clear ``TypeError``/``ValueError``
naming the argument), normalizes them (leading dims flattened, K padded to the packed
width) and hands them to the router. Each has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through without a graph break, and the linear
ops have autograd for ``x`` and ``bias`` (the gradient uses the dequantized weight; the
packed weight is frozen).

Semantics (the reference backend is the definition; weights in the canonical format):

* ``quantize_per_token(x) -> (q int8 [..., K], scale fp32 [..., 1])``: per row
  ``scale = amax / 127`` (1 for an all-zero row), ``q = rint(x * ((1 / amax) * 127))`` in fp32;
  a row holding NaN or Inf gets q = 0 and scale NaN.
* ``int8_mm(a int8 [M, K], b int8 [N, K]) -> int32 [M, N] = a @ b.T``, exact.
* ``w{8,4,3,2}a8_linear(x, qweight, scales, bias, act_scale, group_size)``:
  activations quantized per token (or with the static per-tensor ``act_scale``), an exact
  int32 GEMM per weight group, then ``y = sx * sum_g(sw[g] * acc_g) + bias`` in fp32,
  returned in ``x.dtype``. Weights must be symmetric.
* ``w{8,4,3,2}a16_linear(x, qweight, scales, zeros, bias, group_size)``:
  ``y = x @ dequant(W).T + bias`` in ``x.dtype``.
* Every linear op takes an optional ``input_scale`` (fp32 ``[K]``, > 0): the input is
  multiplied by it per channel before anything else (the equalization scale of a layer
  calibrated with AWQ or SmoothQuant whose scale could not be folded upstream).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends import reference
from .format import CANONICAL
from .spec import FLOAT_DTYPES, LINEAR_OPS, LinearSpec, check_int8_mm, check_linear_call, check_x

__all__ = ["quantize_per_token", "int8_mm", "linear", "FLOAT_DTYPES", "LINEAR_OPS"]


def flatten(x: Tensor, k: int, kp: int) -> Tensor:
    """x [..., K] -> contiguous [M, Kp] (zero-padded to the packed width)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # a 2-D x needs no view (a microsecond at M=1)
    if kp != k:
        x2 = torch.nn.functional.pad(x2, (0, kp - k))
    return x2.contiguous()


# ----------------------------------------------------------------------------- quantize / int8_mm
@torch.library.custom_op("kquant::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    check_x(x)
    k = x.shape[-1]
    q, s = backends.run_op("quantize_per_token", x.reshape(-1, k).contiguous())
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


@quantize_per_token.register_fake
def _(x):
    check_x(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


@torch.library.custom_op("kquant::int8_mm", mutates_args=())
def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    check_int8_mm(a, b)
    return backends.run_op("int8_mm", a.contiguous(), b.contiguous())


@int8_mm.register_fake
def _(a, b):
    check_int8_mm(a, b)
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


# ----------------------------------------------------------------------------- linear
def linear(bits: int, int8_activations: bool, x, qweight, scales, zeros=None, bias=None, act_scale=None,
           group_size: int = -1, input_scale=None) -> Tensor:
    """The body of every public linear op: validate, flatten, route, restore the shape."""
    spec = check_linear_call(bits, int8_activations, x, qweight, scales, zeros, bias, act_scale, group_size,
                             input_scale)
    y = backends.run_linear(spec, CANONICAL, flatten(scale_input(x, input_scale), spec.in_features,
                                                     spec.padded_in_features), qweight, scales, zeros, bias,
                            act_scale)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], spec.out_features)


def scale_input(x: Tensor, input_scale: Optional[Tensor]) -> Tensor:
    """x times the per-input-channel scale of an equalized layer (in x's dtype)."""
    return x if input_scale is None else x * input_scale.to(x.dtype)


def _save_for_grad(ctx, x, qweight, scales, zeros, bias, bits, group_size, layout, kp, n_inputs, bias_pos,
                   input_scale=None):
    """What the backward of a linear op needs: y = (x * input_scale) @ W.T + bias, W dequantized from any
    layout."""
    ctx.save_for_backward(qweight, scales, zeros, input_scale)
    ctx.meta = (bits, group_size, layout, kp, x.shape, x.dtype, bias.dtype if bias is not None else None,
                n_inputs, bias_pos)
    ctx.needs_x, ctx.needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[bias_pos]


def _linear_backward(ctx, grad):
    """Gradients of x (through the dequantized weight) and bias; None for every other input."""
    qweight, scales, zeros, input_scale = ctx.saved_tensors
    bits, group_size, layout, kp, x_shape, x_dtype, bias_dtype, n_inputs, bias_pos = ctx.meta
    w = reference.dequantize(qweight, scales, zeros, group_size, layout, bits, scales.shape[0], kp)
    grads = [None] * n_inputs
    g2 = grad.reshape(-1, grad.shape[-1]).float()
    if ctx.needs_x:
        gx = g2 @ w[:, :x_shape[-1]]
        grads[0] = (gx if input_scale is None else gx * input_scale).to(x_dtype).reshape(x_shape)
    if ctx.needs_bias:
        grads[bias_pos] = g2.sum(0).to(bias_dtype)
    return tuple(grads)


def _fake_linear(bits, int8_activations, x, qweight, scales, zeros, bias, act_scale, group_size,
                 input_scale=None) -> Tensor:
    spec = check_linear_call(bits, int8_activations, x, qweight, scales, zeros, bias, act_scale, group_size,
                             input_scale, values=False)
    return x.new_empty(*x.shape[:-1], spec.out_features)


def _define_linear_op(bits: int, int8_activations: bool):
    """One public linear op from the table: schema, body, fake and autograd."""
    name = LINEAR_OPS[(bits, int8_activations)]
    gs = -1 if bits == 8 else 128  # the default group size of the op
    tensors = ("Tensor? bias=None, Tensor? act_scale=None" if int8_activations
               else "Tensor? zeros=None, Tensor? bias=None")
    schema = (f"(Tensor x, Tensor qweight, Tensor scales, {tensors}, int group_size={gs}, "
              f"Tensor? input_scale=None) -> Tensor")
    bias_pos = 3 if int8_activations else 4

    def with_schema_args(fn):
        """fn(x, qweight, scales, zeros, bias, act_scale, group_size, input_scale) taking this op's arguments."""
        if int8_activations:
            def f(x, qweight, scales, bias=None, act_scale=None, group_size=gs, input_scale=None):
                return fn(x, qweight, scales, None, bias, act_scale, group_size, input_scale)
        else:
            def f(x, qweight, scales, zeros=None, bias=None, group_size=gs, input_scale=None):
                return fn(x, qweight, scales, zeros, bias, None, group_size, input_scale)
        return f

    op = torch.library.custom_op(f"kquant::{name}", with_schema_args(lambda *a: linear(bits, int8_activations, *a)),
                                 mutates_args=(), schema=schema)
    # torch drops arguments equal to the schema default before calling a fake: same defaults
    op.register_fake(with_schema_args(lambda *a: _fake_linear(bits, int8_activations, *a)))

    def setup_context(ctx, inputs, output):
        x, qweight, scales, zeros, bias, _, group_size, input_scale = with_schema_args(lambda *a: a)(*inputs)
        kp = LinearSpec(bits, group_size, zeros is None, False, x.shape[-1], scales.shape[0]).padded_in_features
        _save_for_grad(ctx, x, qweight, scales, zeros, bias, bits, group_size, CANONICAL, kp, len(inputs), bias_pos,
                       input_scale)

    op.register_autograd(_linear_backward, setup_context=setup_context)
    return op


w8a8_linear = _define_linear_op(8, True)
w4a8_linear = _define_linear_op(4, True)
w3a8_linear = _define_linear_op(3, True)
w2a8_linear = _define_linear_op(2, True)
w8a16_linear = _define_linear_op(8, False)
w4a16_linear = _define_linear_op(4, False)
w3a16_linear = _define_linear_op(3, False)
w2a16_linear = _define_linear_op(2, False)


# ----------------------------------------------------------------------------- prepared layers
# QuantLinear's op when it is compiled or trained through: the weight in the layout its
# layer prepared (it may not be canonical), x already flattened and padded [M, Kp].
@torch.library.custom_op("kquant::_linear_prepared", mutates_args=())
def linear_prepared(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                    act_scale: Optional[Tensor], bits: int, group_size: int, in_features: int,
                    int8_activations: bool, layout: int) -> Tensor:
    spec = LinearSpec(bits, group_size, zeros is None, int8_activations, in_features, scales.shape[0], x.device)
    return backends.run_linear(spec, layout, x, qweight, scales, zeros, bias, act_scale)


@linear_prepared.register_fake
def _(x, qweight, scales, zeros, bias, act_scale, bits, group_size, in_features, int8_activations, layout):
    return x.new_empty(x.shape[0], scales.shape[0])


def _prepared_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bias, act_scale, bits, group_size, in_features, int8_activations, layout = inputs
    _save_for_grad(ctx, x, qweight, scales, zeros, bias, bits, group_size, layout, x.shape[-1], len(inputs), 4)


linear_prepared.register_autograd(_linear_backward, setup_context=_prepared_setup)
