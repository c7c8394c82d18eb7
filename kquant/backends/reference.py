"""Pure-PyTorch reference kernels: the test oracle and the fallback backend.

Written for clarity, not speed. Integer products are summed in float64, which is
exact here: |sum| <= 127 * 127 * K < 2^53 for any K an int32 result can hold.

Arguments arrive validated by :mod:`kquant.spec`: ``x`` is 2-D ``[M, Kp]`` (padded),
weights are in any registered layout (converted back to canonical here when needed).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .base import Backend
from ..format import CANONICAL, PER_CHANNEL, symmetric_zero, to_canonical, unpack_codes
from ..spec import LinearSpec


# Rows whose largest |x| is below this are scaled up by 2^64 (exact) before quantizing:
# otherwise (1 / amax) * 127 overflows fp32 (from amax < ~3.7e-37) and every value saturates.
TINY_AMAX = 2.0 ** -64
TINY_LIFT = 2.0 ** 64


def _quantize_rows(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    # q = rint(x * inv_scale) in fp32, round-half-even: every backend must match this
    return torch.clamp(torch.round(x.float() * inv_scale), -127, 127).to(torch.int8)


def _poison(q: torch.Tensor, scale: torch.Tensor, bad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows holding NaN or Inf: codes 0 and scale NaN, so every output of the row is NaN."""
    return torch.where(bad, torch.zeros_like(q), q), torch.where(bad, torch.full_like(scale, float("nan")), scale)


def quantize_per_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, bit-exact across devices and backends (all in fp32):

    scale = amax / 127 (an IEEE division; 1 for an all-zero row)
    inv   = (1 / amax) * 127 (an IEEE reciprocal, then a multiply: two roundings)
    q     = clamp(rint(x * inv), -127, 127), round half to even

    A row with amax < 2^-64 is multiplied by 2^64 first (x and amax alike, exactly), so
    ``inv`` cannot overflow. A row holding NaN or Inf gets q = 0 and scale = NaN: its
    outputs are NaN, as float Linear's would be.
    """
    xf = x.float()
    bad = ~torch.isfinite(xf).all(dim=-1, keepdim=True)
    amax = torch.where(bad, torch.zeros_like(xf[..., :1]), xf.abs().amax(dim=-1, keepdim=True))
    nonzero = amax > 0
    tiny = nonzero & (amax < TINY_AMAX)
    safe = torch.where(nonzero, amax, torch.ones_like(amax))
    # tensor / tensor: torch's CUDA tensor / scalar multiplies by a reciprocal instead
    scale = torch.where(nonzero, safe / torch.full_like(safe, 127.0), torch.ones_like(amax))
    lift = torch.where(tiny, torch.full_like(amax, TINY_LIFT), torch.ones_like(amax))
    inv = torch.where(nonzero, torch.reciprocal(safe * lift) * 127.0, torch.ones_like(amax))
    xs = torch.where(bad, torch.zeros_like(xf), xf) * lift
    return _poison(_quantize_rows(xs, inv), scale, bad)


def quantize_static(x: torch.Tensor, act_scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor static scale from calibration: q = rint(x * (1 / s)); rows holding NaN or
    Inf get q = 0 and scale NaN, as in :func:`quantize_per_token`."""
    xf = x.float()
    bad = ~torch.isfinite(xf).all(dim=-1, keepdim=True)
    s = act_scale.float().reshape(1, 1)
    inv = torch.reciprocal(s)
    q = _quantize_rows(torch.where(bad, torch.zeros_like(xf), xf), inv)
    return _poison(q, s.expand(x.shape[0], 1), bad)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K] -> int32 [M, N] = a @ b.T, exact."""
    return (a.double() @ b.double().T).to(torch.int32)


def _weight_codes(qweight, bits, layout, n, kp) -> torch.Tensor:
    """Stored codes as float64 [N, Kp] (sub-byte codes unsigned: int4 nibbles 0..15, 0..7, 0..3)."""
    return unpack_codes(to_canonical(qweight, layout, bits, n, kp), bits).double()


def _grouped_int_linear(qx, codes, wscales, group_size) -> torch.Tensor:
    """sum_g wscale[n, g] * (int sum over group g of qx[m, k] * codes[n, k]) in fp32."""
    m, kp = qx.shape
    n = codes.shape[0]
    g = kp if group_size == PER_CHANNEL else group_size
    groups = kp // g
    xg = qx.double().reshape(m, groups, g).transpose(0, 1)         # [G, M, g]
    wg = codes.reshape(n, groups, g).transpose(0, 1)                # [G, N, g]
    acc = torch.bmm(xg, wg.transpose(1, 2)).to(torch.int32)         # exact int32 [G, M, N]
    return (acc.float() * wscales.T.unsqueeze(1)).sum(0)            # [M, N]


def act_linear(x, qweight, scales, bias, act_scale, group_size, bits, layout=CANONICAL):
    """WbA8: per-token (or static) int8 x, exact int32 sums per group, fp32 epilogue."""
    n, kp = scales.shape[0], x.shape[1]
    qx, sx = quantize_per_token(x) if act_scale is None else quantize_static(x, act_scale)
    codes = _weight_codes(qweight, bits, layout, n, kp) - symmetric_zero(bits)  # e.g. int4: nibble - 8
    y = _grouped_int_linear(qx, codes, scales, group_size) * sx
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequantize(qweight, scales, zeros, group_size, layout, bits, n, kp) -> torch.Tensor:
    """Float32 weight [N, Kp] from stored codes."""
    codes = _weight_codes(qweight, bits, layout, n, kp).float()
    zero = zeros if zeros is not None else torch.full_like(scales, float(symmetric_zero(bits)))
    g = kp if group_size == PER_CHANNEL else group_size
    return ((codes.reshape(n, -1, g) - zero.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(n, kp)


def weight_only_linear(x, qweight, scales, zeros, bias, group_size, bits, layout=CANONICAL):
    """WbA16: y = x @ dequant(W).T + bias in fp32, returned in x.dtype."""
    w = dequantize(qweight, scales, zeros, group_size, layout, bits, scales.shape[0], x.shape[1])
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear(spec: LinearSpec, x, qweight, layout, scales, zeros, bias, act_scale) -> torch.Tensor:
    """Any of the four linear kinds of ``spec`` (the definition every backend matches)."""
    if spec.int8_activations:
        return act_linear(x, qweight, scales, bias, act_scale, spec.group_size, spec.bits, layout)
    return weight_only_linear(x, qweight, scales, zeros, bias, spec.group_size, spec.bits, layout)


class ReferenceBackend(Backend):
    """Pure PyTorch: every op, every device, any layout. The oracle and the last resort."""

    name = "reference"

    def available(self):
        return True, "pure PyTorch, always available"

    def can_implement(self, spec):
        return True, "reference runs every layer"

    def reads(self, layout):
        return True

    def linear(self, spec, x, qweight, layout, scales, zeros, bias, act_scale):
        return linear(spec, x, qweight, layout, scales, zeros, bias, act_scale)

    def can_run_op(self, op, *args):
        return True, "reference runs every op on every device"

    def quantize_per_token(self, x):
        return quantize_per_token(x)

    def int8_mm(self, a, b):
        return int8_mm(a, b)


BACKEND = ReferenceBackend()
