"""Triton kernels for 3- and 2-bit weights vs the reference, through the Triton interpreter on CPU.

Set up like test_triton_backend.py: TRITON_INTERPRET must be set before ``import triton``,
so tests/triton_interp.py (imported first) sets it when triton is not imported yet; otherwise every test here is
skipped and one test re-runs this file in a subprocess. Integer-valued activations whose
per-token scale is exactly 1 and unit weight scales make the outputs the int32 sums
themselves, so those tests compare exactly. Sizes stay small: the interpreter is slow.
"""
# first: it switches the interpreter on before anything imports triton
from triton_interp import subprocess_test, triton_backend  # noqa: I001

import warnings

import pytest
import torch

from kquant.backends import reference as R
from kquant.format import PER_CHANNEL, pack_codes, padded_k, quantize_weight, symmetric_zero

pytestmark = pytest.mark.triton
BITS = (3, 2)
GROUPS = (PER_CHANNEL, 32, 64, 128)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}

test_in_subprocess_with_interpreter = subprocess_test(__file__)


@pytest.fixture(scope="module")
def T():
    return triton_backend()


def close(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.isfinite(y.float()).all()
    err = (y.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1e-6)
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} vs max |ref| {scale:.3g} ({dtype})"


def unit_weight(codes, bits, g, zero=None):
    """Canonical (qweight, scales, zeros) of unsigned codes [N, K] with unit scales; padded
    columns hold the zero point (``zero``, or the symmetric one), so they dequantize to 0."""
    n, k = codes.shape
    kp = padded_k(k, bits, g)
    z = symmetric_zero(bits) if zero is None else zero
    full = torch.full((n, kp), z, dtype=torch.uint8)
    full[:, :k] = codes
    groups = 1 if g == PER_CHANNEL else kp // g
    zeros = None if zero is None else torch.full((n, groups), float(zero))
    return pack_codes(full, bits), torch.ones(n, groups), zeros, full.long() - z


def unit_scale_x(m, k, kp):
    """Integer-valued activations with 127 in every row: per-token scale exactly 1, q == x."""
    x = torch.randint(-127, 128, (m, k)).float()
    x[torch.arange(m), torch.randint(0, k, (m,))] = 127.0
    return torch.nn.functional.pad(x, (0, kp - k))


# ----------------------------------------------------------------------------- exact int32 sums
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("m,k", [(1, 17), (3, 33), (17, 100)])
def test_a8_int32_sums_exact(T, bits, g, m, k):
    n = 19
    codes = torch.randint(1, 1 << bits, (n, k), dtype=torch.uint8)  # symmetric codes
    qweight, scales, _, values = unit_weight(codes, bits, g)
    x = unit_scale_x(m, k, values.shape[1])
    sums = (x.long() @ values.T).float()
    y = T.act_linear(x, qweight, scales, None, None, g, bits)
    assert torch.equal(y, sums)
    assert torch.equal(y, R.act_linear(x, qweight, scales, None, None, g, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g", [PER_CHANNEL, 32])
@pytest.mark.parametrize("kind", ["a8", "a16", "a16_zeros"])
@pytest.mark.parametrize("extreme", ["max", "min"])
def test_extreme_codes_exact(T, bits, g, kind, extreme):
    m, n, k = (17, 5, 100) if extreme == "max" else (3, 5, 33)
    top = (1 << bits) - 1
    lowest = 0 if kind == "a16_zeros" else 1  # symmetric codes never use 0
    code = top if extreme == "max" else lowest
    zero = (lowest if extreme == "max" else top) if kind == "a16_zeros" else None
    qweight, scales, zeros, values = unit_weight(torch.full((n, k), code, dtype=torch.uint8), bits, g, zero)
    x = torch.nn.functional.pad(torch.full((m, k), 127.0 if extreme == "max" else -127.0),
                                (0, values.shape[1] - k))
    want = float(127 * k * ((code - (zero if zero is not None else symmetric_zero(bits)))
                            * (1 if extreme == "max" else -1)))
    assert abs(want) == 127 * k * (top - lowest if kind == "a16_zeros" else top >> 1)
    if kind == "a8":
        y = T.act_linear(x, qweight, scales, None, None, g, bits)
        ref = R.act_linear(x, qweight, scales, None, None, g, bits)
    else:
        y = T.wo_linear(x, qweight, scales, zeros, None, g, bits)
        ref = R.weight_only_linear(x, qweight, scales, zeros, None, g, bits)
    assert torch.equal(y, torch.full((m, n), want))
    assert torch.equal(y, ref)


# ----------------------------------------------------------------------------- float outputs
def _args(bits, g, m, n, k, dtype, symmetric):
    pw = quantize_weight(torch.randn(n, k), bits, g, symmetric=symmetric)
    x = torch.nn.functional.pad(torch.randn(m, k), (0, pw.padded_in_features - k)).to(dtype)
    return x, pw


# m = 1, 3: GEMV kernel; m = 17: tiled tensor-core kernel
CASES = [(1, 17, torch.bfloat16), (3, 100, torch.float16), (17, 33, torch.float32)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("m,k,dtype", CASES)
def test_a8_matches_reference(T, bits, g, m, k, dtype):
    x, pw = _args(bits, g, m, 21, k, dtype, True)
    bias = torch.randn(21).to(dtype)
    y = T.act_linear(x, pw.qweight, pw.scales, bias, None, g, bits)
    close(y, R.act_linear(x, pw.qweight, pw.scales, bias, None, g, bits), dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,k,dtype", CASES)
def test_a16_matches_reference(T, bits, g, symmetric, m, k, dtype):
    x, pw = _args(bits, g, m, 21, k, dtype, symmetric)
    bias = torch.randn(21).to(dtype) if m != 3 else None
    y = T.wo_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits)
    close(y, R.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits), dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m,g,cfg", [
    (1, 32, {"KERNEL": "gemv", "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3}),     # split-K GEMV, 2 groups a step
    (2, PER_CHANNEL, {"KERNEL": "gemv", "BLOCK_N": 16, "BLOCK_K": 64, "FAST_CVT": False}),  # int -> float codes
    (8, 64, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}),     # M <= 16 dot kernel, split K
    (17, PER_CHANNEL, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),         # many tiles, K tail in a step
    (17, 32, {"KERNEL": "dequant_mm"}),                                       # large M: dequantize + matmul
])
def test_a16_paths(T, bits, m, g, cfg):
    x, pw = _args(bits, g, m, 40, 200, torch.bfloat16, False)
    bias = torch.randn(40, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing dequant_mm path would fall back with a warning
        y = T.wo_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits, config=cfg)
    close(y, R.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits), torch.bfloat16)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g,cfg", [
    (PER_CHANNEL, {"SPLIT_K": 3, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),  # split K, uneven slices
    (64, {"UNPACK": True}),                                                      # unpack to int8, int8 kernel
])
def test_a8_paths_exact(T, bits, g, cfg):
    codes = torch.randint(1, 1 << bits, (24, 200), dtype=torch.uint8)
    qweight, scales, _, values = unit_weight(codes, bits, g)
    x = unit_scale_x(5, 200, values.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing unpack path would fall back with a warning
        y = T.act_linear(x, qweight, scales, None, None, g, bits, config=cfg)
    assert torch.equal(y, (x.long() @ values.T).float())


def test_static_activation_scale(T):
    x, pw = _args(3, 32, 4, 24, 100, torch.float16, True)
    act = torch.tensor([0.03])
    y = T.act_linear(x, pw.qweight, pw.scales, None, act, 32, 3)
    close(y, R.act_linear(x, pw.qweight, pw.scales, None, act, 32, 3), torch.float16)


@pytest.mark.parametrize("bits,int8_act,g,symmetric", [
    (3, True, 128, True), (2, True, PER_CHANNEL, True), (3, False, 64, False), (2, False, 32, True),
])
def test_public_ops_route_to_triton(T, monkeypatch, bits, int8_act, g, symmetric):
    from kquant import backends, ops
    from kquant.spec import LinearSpec
    monkeypatch.setenv("KQUANT_BACKEND", "triton")
    spec = LinearSpec(bits, g, symmetric, int8_act, 70, 17)
    assert T.BACKEND.can_implement(spec)[0]
    assert backends.choose(spec) == "triton"
    pw = quantize_weight(torch.randn(17, 70), bits, g, symmetric=symmetric)
    x = torch.randn(2, 3, 70, dtype=torch.bfloat16)
    y = ops.linear(bits, int8_act, x, pw.qweight, pw.scales, pw.zeros, None, None, g)
    x2 = ops.flatten(x, 70, pw.padded_in_features)
    ref = R.act_linear(x2, pw.qweight, pw.scales, None, None, g, bits) if int8_act else \
        R.weight_only_linear(x2, pw.qweight, pw.scales, pw.zeros, None, g, bits)
    close(y.reshape(-1, 17), ref, torch.bfloat16)
