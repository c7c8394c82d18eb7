"""Triton backend vs the reference oracle, run through the Triton interpreter on CPU.

TRITON_INTERPRET must be set before ``import triton``: triton.language's own helpers
(tl.zeros, ...) are @triton.jit functions decorated at import. So tests/triton_interp.py sets it when
triton is not imported yet (pytest imports test modules before running any test); if
something imported triton earlier without it, every test here is skipped and one test
re-runs this file in a subprocess with TRITON_INTERPRET=1. Sizes stay small: the
interpreter runs every program in Python.
"""
# first: it switches the interpreter on before anything imports triton
from triton_interp import subprocess_test, triton_backend  # noqa: I001

import pytest
import torch

from kquant.backends import reference as R
from kquant.format import PER_CHANNEL, quantize_weight

GROUPS = (PER_CHANNEL, 32, 64, 128)

# output dtype -> tolerance on max|err| / max|ref| (fp32 epilogue, then one rounding to dtype)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}

test_in_subprocess_with_interpreter = subprocess_test(__file__)


@pytest.fixture(scope="module")
def interpreter():
    return triton_backend()


@pytest.fixture
def T(interpreter):
    return interpreter


def close(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.isfinite(y.float()).all()
    err = (y.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1e-6)
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} vs max |ref| {scale:.3g} ({dtype})"


def test_available_under_interpreter(T):
    from kquant.spec import LinearSpec
    ok, why = T.BACKEND.available()
    assert ok, why
    x = torch.randn(2, 4)
    assert T.BACKEND.can_run_op("quantize_per_token", x)[0]
    assert T.BACKEND.can_implement(LinearSpec(8, -1, True, True, 64, 8))[0]
    assert not T.BACKEND.reads(7)  # a foreign layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 17), (33, 1025), (3, 5000)])
def test_quantize_per_token_bit_identical(T, dtype, shape):
    x = (torch.randn(shape) * 4).to(dtype)
    x[0, 0] = 0.5  # exact ties exercise round-half-even
    if shape[0] > 2:
        x[1] = 0  # all-zero row: scale 1, q 0
        x[2, :3] = torch.tensor([127.0, -127.0, 0.5]).to(dtype)
    q, s = T.quantize_per_token(x)
    qr, sr = R.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)


def test_quantize_static_bit_identical(T):
    x = torch.randn(9, 1025) * 3
    act_scale = torch.tensor([0.0173])
    q, s = T._quantize(x, act_scale)
    qr, sr = R.quantize_static(x, act_scale)
    assert torch.equal(q, qr) and torch.equal(s, sr.reshape(s.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_inf_and_tiny_rows_as_the_reference(T, dtype):
    # NaN/Inf rows: q = 0, scale NaN (outputs NaN); rows with amax < 2^-64 are lifted by 2^64.
    # (The interpreter converts subnormal bfloat16 wrongly, so the tiny rows stay normal here.)
    x = torch.randn(6, 300)
    x[1, 5], x[2, 7], x[3, 0] = float("nan"), float("inf"), float("-inf")
    x[4] = x[0] * (1e-30 if dtype != torch.float16 else 1e-7)
    x[5] = x[0] * (3e-37 if dtype == torch.float32 else 1e-25 if dtype == torch.bfloat16 else 1.0)
    x = x.to(dtype)
    for act in (None, torch.tensor([0.02])):
        q, s = T._quantize(x, act)
        qr, sr = R.quantize_per_token(x) if act is None else R.quantize_static(x, act)
        assert torch.equal(q, qr)
        assert torch.equal(s.isnan(), sr.isnan()) and torch.equal(s.nan_to_num(), sr.reshape(s.shape).nan_to_num())
        assert s[1:4].isnan().all() and (q[1:4] == 0).all()
    pw = quantize_weight(torch.randn(16, 300), 8, PER_CHANNEL)
    kp = pw.padded_in_features
    y = T.act_linear(torch.nn.functional.pad(x, (0, kp - 300)), pw.qweight, pw.scales, None, None, -1, 8)
    assert y[1:4].isnan().all() and torch.isfinite(y[[0, 4, 5]]).all()


@pytest.mark.parametrize("m,n,k", [(1, 17, 17), (33, 17, 1025), (33, 1025, 17), (16, 64, 256)])
def test_int8_mm_exact(T, m, n, k):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    assert torch.equal(T.int8_mm(a, b), R.int8_mm(a, b))


def test_int8_mm_extremes(T):
    a = torch.full((17, 1025), 127, dtype=torch.int8)
    b = torch.full((5, 1025), -127, dtype=torch.int8)
    out = T.int8_mm(a, b)
    assert torch.equal(out, R.int8_mm(a, b))
    assert int(out[0, 0]) == -127 * 127 * 1025


def _act_args(bits, g, m, n, k, dtype, bias=True):
    pw = quantize_weight(torch.randn(n, k), bits, g)
    kp = pw.padded_in_features
    x = torch.nn.functional.pad(torch.randn(m, k), (0, kp - k)).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    return x, pw, b


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (33, torch.float32)])
def test_act_linear_matches_reference(T, bits, g, m, dtype):
    x, pw, bias = _act_args(bits, g, m, 17, 200, dtype)
    y = T.act_linear(x, pw.qweight, pw.scales, bias, None, g, bits)
    close(y, R.act_linear(x, pw.qweight, pw.scales, bias, None, g, bits), dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cfg", [
    {"SPLIT_K": 3, "BLOCK_M": 16, "BLOCK_N": 32},   # split-K reduction, uneven K slices
    {"SPLIT_AB": True},                            # int4: even/odd activation planes
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32},  # many tiles, K tail (K=1025)
    {"UNPACK": True},                              # large M int4: unpack to int8, int8 kernel
])
def test_act_linear_paths(T, bits, cfg):
    g = PER_CHANNEL
    x, pw, bias = _act_args(bits, g, 5, 33, 1025, torch.float16)
    for act_scale in (None, torch.tensor([0.05])):
        y = T.act_linear(x, pw.qweight, pw.scales, bias, act_scale, g, bits, config=cfg)
        close(y, R.act_linear(x, pw.qweight, pw.scales, bias, act_scale, g, bits), torch.float16)


def _wo_args(bits, g, m, n, k, dtype, symmetric):
    pw = quantize_weight(torch.randn(n, k), bits, g, symmetric=symmetric)
    kp = pw.padded_in_features
    x = torch.nn.functional.pad(torch.randn(m, k), (0, kp - k)).to(dtype)
    return x, pw


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (8, torch.float16), (33, torch.float32)])
def test_weight_only_matches_reference(T, bits, g, symmetric, m, dtype):
    # m=1: GEMV kernel; m=8: tensor-core kernel with BLOCK_M=16; m=33: tiled kernel
    x, pw = _wo_args(bits, g, m, 17, 300, dtype, symmetric)
    bias = torch.randn(17).to(dtype) if m != 8 else None
    y = T.wo_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits)
    close(y, R.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits), dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,cfg", [
    (1, {"KERNEL": "gemv", "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 3}),   # split-K GEMV
    (3, {"KERNEL": "gemv", "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1}),   # GEMV, K tail in a step
    (2, {"KERNEL": "gemv", "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_X": True}),  # GEMV, int4 planes
    (1, {"KERNEL": "gemv", "BLOCK_N": 128, "BLOCK_K": 32, "FAST_CVT": True}),  # bit-trick codes, 1 group/step
    (33, {"KERNEL": "dequant_mm"}),                                           # large M: dequant + matmul
    (16, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4}),     # split-K dot path
    (33, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_AB": True}),  # tiled, int4 planes
])
@pytest.mark.parametrize("g", [PER_CHANNEL, 32])
def test_weight_only_paths(T, bits, m, cfg, g):
    x, pw = _wo_args(bits, g, m, 1025, 1000 if g != PER_CHANNEL else 1025 + (bits == 4), torch.bfloat16, False)
    bias = torch.randn(1025, dtype=torch.bfloat16)
    y = T.wo_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits, config=cfg)
    close(y, R.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, bias, g, bits), torch.bfloat16)


def test_split_k_is_deterministic_and_counters_reset(T):
    x, pw = _wo_args(4, 128, 1, 64, 1024, torch.float32, True)
    cfg = {"KERNEL": "gemv", "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4}
    y1 = T.wo_linear(x, pw.qweight, pw.scales, None, None, 128, 4, config=cfg)
    y2 = T.wo_linear(x, pw.qweight, pw.scales, None, None, 128, 4, config=cfg)
    assert torch.equal(y1, y2)
    assert int(T._counters(x.device, 1).abs().sum()) == 0


def test_empty_and_zero_inputs(T):
    pw = quantize_weight(torch.randn(17, 64), 8)
    x = torch.zeros(0, 64)
    assert T.act_linear(x, pw.qweight, pw.scales, None, None, -1, 8).shape == (0, 17)
    assert T.wo_linear(x, pw.qweight, pw.scales, None, None, -1, 8).shape == (0, 17)
    y = T.act_linear(torch.zeros(3, 64), pw.qweight, pw.scales, None, None, -1, 8)
    assert torch.equal(y, torch.zeros(3, 17))  # zero rows: scale 1, never NaN


@pytest.mark.parametrize("op,bits,g,zeros", [
    ("w8a8_linear", 8, PER_CHANNEL, False), ("w4a8_linear", 4, 128, False),
    ("w8a16_linear", 8, 64, True), ("w4a16_linear", 4, 32, True),
])
def test_public_ops_route_to_triton(T, monkeypatch, op, bits, g, zeros):
    from kquant import backends, ops
    from kquant.spec import LinearSpec
    monkeypatch.setenv("KQUANT_BACKEND", "triton")
    pw = quantize_weight(torch.randn(17, 70), bits, g, symmetric=not zeros)
    x = torch.randn(2, 3, 70, dtype=torch.bfloat16)
    int8_act = op.endswith("a8_linear")
    assert backends.choose(LinearSpec(bits, g, not zeros, int8_act, 70, 17)) == "triton"
    y = ops.linear(bits, int8_act, x, pw.qweight, pw.scales, pw.zeros, None, None, g)
    x2 = ops.flatten(x, 70, pw.padded_in_features)
    ref = R.act_linear(x2, pw.qweight, pw.scales, None, None, g, bits) if int8_act else \
        R.weight_only_linear(x2, pw.qweight, pw.scales, pw.zeros, None, g, bits)
    close(y.reshape(-1, 17), ref, torch.bfloat16)
    q, s = torch.ops.kquant.quantize_per_token(x)
    qr, sr = R.quantize_per_token(x.reshape(-1, 70))
    assert torch.equal(q.reshape(-1, 70), qr) and torch.equal(s.reshape(-1, 1), sr)
    a = torch.randint(-127, 128, (5, 33), dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 33), dtype=torch.int8)
    assert torch.equal(torch.ops.kquant.int8_mm(a, b), R.int8_mm(a, b))


def test_large_m_path_falls_back_to_fused_kernel(T, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated compile failure")
    monkeypatch.setattr(T, "_dequant", boom)
    monkeypatch.setattr(T, "_BROKEN", {})
    x, pw = _wo_args(4, 32, 20, 24, 64, torch.float32, True)
    with pytest.warns(UserWarning, match="dequant_mm"):
        y = T.wo_linear(x, pw.qweight, pw.scales, None, None, 32, 4, config={"KERNEL": "dequant_mm"})
    close(y, R.weight_only_linear(x, pw.qweight, pw.scales, None, None, 32, 4), torch.float32)
    assert "dequant_mm" in T._BROKEN


@pytest.mark.parametrize("bits,g", [(8, PER_CHANNEL), (4, 128)])
def test_gptq_layer_same_int32_sums_and_outputs_as_reference(T, monkeypatch, bits, g):
    from kquant.calibration import gptq
    torch.manual_seed(0)
    w, x = torch.randn(24, 200), torch.randn(64, 200)
    wq, scales, _ = gptq(w, x.T @ x, bits, g, True)
    pw = quantize_weight(wq, bits, g, True, scales)
    codes = pw.codes().to(torch.int8)
    xp = torch.nn.functional.pad(x[:5], (0, pw.padded_in_features - 200))
    qx, _ = R.quantize_per_token(xp)
    monkeypatch.setenv("KQUANT_BACKEND", "triton")
    assert torch.equal(torch.ops.kquant.int8_mm(qx, codes), R.int8_mm(qx, codes))
    close(T.act_linear(xp, pw.qweight, pw.scales, None, None, g, bits),
          R.act_linear(xp, pw.qweight, pw.scales, None, None, g, bits), torch.float32)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_gradient_quantize_kernel_matches_the_torch_path(T, bits):
    # kquant.distributed quantizes gradients with this kernel on GPUs: same codes and scales,
    # given the same uniforms, as the definition
    from kquant.distributed import quantize_chunks
    x = torch.randn(2, 3, 64) * torch.tensor([1e-3, 1.0, 30.0]).view(1, 3, 1)
    x[1, 1] = 0  # an all-zero chunk: scale 1, codes at the middle
    u = torch.rand(x.shape)
    want_codes, want_s = quantize_chunks(x, u, bits)
    codes, s = T.grad_quantize(x.reshape(2, -1), u.reshape(2, -1), bits, 64)
    assert torch.equal(s, want_s) and torch.equal(codes, want_codes)
