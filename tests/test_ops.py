"""Public ops: the reference oracle against float math, the router, opcheck, bad input.

Whatever backend the router picks on this machine is compared with the reference
(called directly, never through the router): int32 results exactly, floats within a
tolerance tied to the output dtype.
"""
import json

import pytest
import torch
from torch.library import opcheck

import kquant
from kquant import backends as router
from kquant.backends import reference as ref
from kquant.format import PER_CHANNEL, padded_k, quantize_weight
from kquant.spec import LinearSpec

ops = torch.ops.kquant
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- oracles
def test_int8_mm_reference_is_exact_int_math():
    a = torch.randint(-127, 128, (9, 1025), dtype=torch.int8)
    b = torch.randint(-127, 128, (17, 1025), dtype=torch.int8)
    assert torch.equal(ref.int8_mm(a, b), (a.long() @ b.long().T).int())
    ext = torch.full((3, 4096), 127, dtype=torch.int8)
    assert torch.equal(ref.int8_mm(ext, -ext), torch.full((3, 3), -127 * 127 * 4096, dtype=torch.int32))


def test_quantize_per_token_reference_semantics():
    x = torch.randn(6, 33)
    x[2] = 0.0
    q, s = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (6, 1)
    assert s[2].item() == 1.0 and (q[2] == 0).all()
    amax = x.abs().amax(1, keepdim=True)
    assert torch.equal(q[[0, 1, 3, 4, 5]].abs().amax(1), torch.full((5,), 127, dtype=torch.int8))
    # dequantized activations within half a step
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-7).all()
    # round half to even on exact ties: amax 127 -> inv scale 1
    t = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])
    assert ref.quantize_per_token(t)[0].tolist() == [[127, 0, 2, 2, 0, -2]]
    assert (amax > 0).any()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 128, PER_CHANNEL])
def test_act_linear_reference_matches_float_math(bits, group):
    x = torch.randn(7, 200)
    w = torch.randn(19, 200) * 0.1
    bias = torch.randn(19)
    p = quantize_weight(w, bits, group)
    kp = p.padded_in_features
    xp = torch.nn.functional.pad(x, (0, kp - 200))
    y = ref.act_linear(xp, p.qweight, p.scales, bias, None, group, bits)
    qx, sx = ref.quantize_per_token(xp)
    expect = (qx.double() * sx.double())[:, :200] @ p.dequantize(torch.float64).T + bias.double()
    assert rel_err(y, expect) < 1e-6


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_reference_matches_float_math(bits, symmetric):
    x = torch.randn(5, 96)
    p = quantize_weight(torch.randn(11, 96), bits, 32, symmetric)
    y = ref.weight_only_linear(x, p.qweight, p.scales, p.zeros, None, 32, bits)
    assert rel_err(y, x.double() @ p.dequantize(torch.float64).T) < 1e-6


def test_static_activation_reference():
    x = torch.randn(4, 64) * 3
    s = torch.tensor([0.02])
    q, sx = ref.quantize_static(x, s)
    assert torch.equal(q, torch.clamp(torch.round(x * (1.0 / s)), -127, 127).to(torch.int8))
    assert (sx == 0.02).all() and q.abs().max() == 127  # clamped: amax is far above 127 * 0.02


# ----------------------------------------------------------------------------- routed ops vs oracle
MODES = [("w8a8_linear", 8, PER_CHANNEL), ("w8a8_linear", 8, 64), ("w4a8_linear", 4, 128),
         ("w4a8_linear", 4, 32), ("w8a16_linear", 8, PER_CHANNEL), ("w4a16_linear", 4, 128)]


def call_linear(op, x, p, bias, act_scale=None):
    fn = getattr(ops, op)
    if op.endswith("a8_linear"):
        return fn(x, p.qweight, p.scales, bias, act_scale, p.group_size)
    return fn(x, p.qweight, p.scales, p.zeros, bias, p.group_size)


def oracle_linear(op, x, p, bias, act_scale=None):
    k = x.shape[-1]
    x2 = torch.nn.functional.pad(x.reshape(-1, k), (0, p.padded_in_features - k))
    if op.endswith("a8_linear"):
        y = ref.act_linear(x2, p.qweight, p.scales, bias, act_scale, p.group_size, p.bits)
    else:
        y = ref.weight_only_linear(x2, p.qweight, p.scales, p.zeros, bias, p.group_size, p.bits)
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("op,bits,group", MODES)
@pytest.mark.parametrize("m,k,n", [(0, 17, 17), (1, 1, 1), (1, 1025, 17), (17, 17, 1025), (3, 1025, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shape_matrix(op, bits, group, m, k, n, dtype):
    x = torch.randn(m, k).to(dtype)
    p = quantize_weight(torch.randn(n, k), bits, group)
    bias = torch.randn(n).to(dtype)
    y = call_linear(op, x, p, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    if m:
        assert rel_err(y, oracle_linear(op, x, p, bias)) <= TOL[dtype]


@pytest.mark.parametrize("op,bits,group", MODES)
def test_3d_and_noncontiguous_inputs(op, bits, group):
    base = torch.randn(4, 130, 6)
    x = base.transpose(1, 2)  # [4, 6, 130], non-contiguous
    assert not x.is_contiguous()
    p = quantize_weight(torch.randn(33, 130), bits, group)
    y = call_linear(op, x, p, None)
    assert y.shape == (4, 6, 33)
    assert rel_err(y, oracle_linear(op, x.contiguous(), p, None)) <= TOL[torch.float32]


def test_static_act_scale_through_op():
    x = torch.randn(5, 64)
    p = quantize_weight(torch.randn(8, 64), 8)
    s = torch.tensor([x.abs().max().item() / 127])
    y = call_linear("w8a8_linear", x, p, None, s)
    assert rel_err(y, oracle_linear("w8a8_linear", x, p, None, s)) <= TOL[torch.float32]


def test_int8_mm_and_quantize_ops_exact():
    a = torch.randint(-127, 128, (33, 1025), dtype=torch.int8)
    b = torch.randint(-127, 128, (17, 1025), dtype=torch.int8)
    assert torch.equal(ops.int8_mm(a, b), ref.int8_mm(a, b))
    x = torch.randn(2, 3, 1025)
    q, s = ops.quantize_per_token(x)
    rq, rs = ref.quantize_per_token(x.reshape(-1, 1025))
    assert q.shape == (2, 3, 1025) and s.shape == (2, 3, 1)
    assert torch.equal(q.reshape(-1, 1025), rq) and torch.equal(s.reshape(-1, 1), rs)


# ----------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    x = torch.randn(3, 64)
    p8 = quantize_weight(torch.randn(16, 64), 8)
    p4 = quantize_weight(torch.randn(16, 64), 4, 32)
    pa = quantize_weight(torch.randn(16, 64), 4, 32, symmetric=False)
    b = torch.randn(16)
    return [
        (ops.quantize_per_token.default, (x,)),
        (ops.int8_mm.default, (p8.qweight[:3].contiguous(), p8.qweight)),
        (ops.w8a8_linear.default, (x, p8.qweight, p8.scales, b, None, -1)),
        (ops.w8a8_linear.default, (x, p8.qweight, p8.scales, None, torch.tensor([0.05]), -1)),
        (ops.w4a8_linear.default, (x, p4.qweight, p4.scales, b, None, 32)),
        (ops.w8a16_linear.default, (x.half(), p8.qweight, p8.scales, None, b.half(), -1)),
        (ops.w4a16_linear.default, (x.bfloat16(), pa.qweight, pa.scales, pa.zeros, None, 32)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    opcheck(op, args)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_argument():
    x = torch.randn(3, 64)
    p = quantize_weight(torch.randn(16, 64), 8)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.w8a8_linear(x.int(), p.qweight, p.scales, None, None, -1)
    with pytest.raises(TypeError, match="qweight must be torch.int8"):
        ops.w8a8_linear(x, p.qweight.to(torch.uint8), p.scales, None, None, -1)
    with pytest.raises(ValueError, match=r"qweight \[16, 32\] does not match K=64"):
        ops.w8a8_linear(x, p.qweight[:, :32].contiguous(), p.scales, None, None, -1)
    with pytest.raises(TypeError, match="scales must be float32"):
        ops.w8a8_linear(x, p.qweight, p.scales.half(), None, None, -1)
    with pytest.raises(ValueError, match="bias must be a float tensor of shape \\[16\\]"):
        ops.w8a8_linear(x, p.qweight, p.scales, torch.randn(15), None, -1)
    with pytest.raises(ValueError, match="qweight is on meta but x is on cpu"):
        ops.w8a8_linear(x, p.qweight.to("meta"), p.scales, None, None, -1)
    with pytest.raises(ValueError, match="act_scale must be a float32 tensor with one element"):
        ops.w8a8_linear(x, p.qweight, p.scales, None, torch.ones(2), -1)
    with pytest.raises(ValueError, match="unsupported group size 48"):
        ops.w8a8_linear(x, p.qweight, p.scales, None, None, 48)
    with pytest.raises(TypeError, match="a must be a 2-D int8 tensor"):
        ops.int8_mm(x, p.qweight)
    with pytest.raises(ValueError, match="must share K"):
        ops.int8_mm(p.qweight[:, :32].contiguous(), p.qweight)


# ----------------------------------------------------------------------------- router
def test_backends_report_every_backend_with_a_reason():
    info = kquant.backends()
    assert set(info) == {"reference", "cpu", "triton", "cuda"}
    assert info["reference"]["available"] is True
    for name, d in info.items():
        assert isinstance(d["reason"], str) and d["reason"], name


def test_forced_backend(monkeypatch):
    x = torch.randn(2, 64)
    p = quantize_weight(torch.randn(8, 64), 8)
    monkeypatch.setenv("KQUANT_BACKEND", "reference")
    assert router.choose(LinearSpec(8, -1, True, True, 64, 8)) == "reference"
    y = call_linear("w8a8_linear", x, p, None)
    assert torch.equal(y, oracle_linear("w8a8_linear", x, p, None))
    monkeypatch.setenv("KQUANT_BACKEND", "nope")
    with pytest.raises(ValueError, match="not a backend"):
        call_linear("w8a8_linear", x, p, None)
    monkeypatch.setenv("KQUANT_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(kquant.BackendError, match="KQUANT_BACKEND=cuda cannot run"):
            call_linear("w8a8_linear", x, p, None)


def test_router_prefers_measured_gpu_backend_per_shape(monkeypatch, tmp_path):
    monkeypatch.delenv("KQUANT_BACKEND", raising=False)
    prefs = tmp_path / "prefs.json"
    prefs.write_text(json.dumps({"prefs": {"w4a16_linear": {"1": "cuda", "16": "cuda", "1024": "triton"}}}))
    monkeypatch.setenv("KQUANT_GPU_PREFS", str(prefs))
    assert router.order("cuda", "w4a16_linear", 1) == ["cuda", "triton", "reference"]
    assert router.order("cuda", "w4a16_linear", 2048) == ["triton", "cuda", "reference"]
    assert router.order("cuda", "w8a8_linear", 2048) == ["cuda", "triton", "reference"]  # no entry
    assert router.order("cpu", "w4a16_linear", 2048) == ["cpu", "reference"]
    # CUDA kernels not verified on a GPU yet (no table entry names them): not used automatically
    prefs2 = tmp_path / "prefs2.json"
    prefs2.write_text(json.dumps({"prefs": {"w4a16_linear": {"1": "triton"}}}))
    monkeypatch.setenv("KQUANT_GPU_PREFS", str(prefs2))
    assert router.order("cuda", "w8a8_linear", 16) == ["triton", "reference"]
    monkeypatch.setenv("KQUANT_BACKEND", "cuda")
    assert router.order("cuda", "w8a8_linear", 16) == ["cuda"]
    monkeypatch.setenv("KQUANT_BACKEND", "triton")
    assert router.order("cuda", "w4a16_linear", 1) == ["triton"]
