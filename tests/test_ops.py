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
from kquant.format import PER_CHANNEL, quantize_weight
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


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
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


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
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
         ("w4a8_linear", 4, 32), ("w8a16_linear", 8, PER_CHANNEL), ("w4a16_linear", 4, 128),
         ("w3a8_linear", 3, 64), ("w2a8_linear", 2, PER_CHANNEL), ("w3a16_linear", 3, PER_CHANNEL),
         ("w2a16_linear", 2, 32)]


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
    p3 = quantize_weight(torch.randn(16, 64), 3, 32)
    p2 = quantize_weight(torch.randn(16, 64), 2, PER_CHANNEL, symmetric=False)
    b = torch.randn(16)
    return [
        (ops.quantize_per_token.default, (x,)),
        (ops.int8_mm.default, (p8.qweight[:3].contiguous(), p8.qweight)),
        (ops.w8a8_linear.default, (x, p8.qweight, p8.scales, b, None, -1)),
        (ops.w8a8_linear.default, (x, p8.qweight, p8.scales, None, torch.tensor([0.05]), -1)),
        (ops.w4a8_linear.default, (x, p4.qweight, p4.scales, b, None, 32)),
        (ops.w8a16_linear.default, (x.half(), p8.qweight, p8.scales, None, b.half(), -1)),
        (ops.w4a16_linear.default, (x.bfloat16(), pa.qweight, pa.scales, pa.zeros, None, 32)),
        (ops.w3a8_linear.default, (x, p3.qweight, p3.scales, b, None, 32)),
        (ops.w2a16_linear.default, (x, p2.qweight, p2.scales, p2.zeros, b, -1)),
    ]


@pytest.mark.parametrize("case", range(9))
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


# ----------------------------------------------------------------------------- edge rows
CPU_BACKENDS = [b for b in ("reference", "cpu") if kquant.backends()[b]["available"]]


def _special_rows(k=300):
    x = torch.randn(8, k)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3, 0] = float("-inf")
    x[4] = x[0] * 1e-38   # subnormal and tiny values: (1 / amax) * 127 would overflow
    x[5] = x[0] * 3e-37
    x[6] = x[0] * 1e-30
    x[7] = 0.0
    return x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inf_and_tiny_rows_quantize_as_defined(monkeypatch, backend):
    monkeypatch.setenv("KQUANT_BACKEND", backend)
    x = _special_rows()
    q, s = ops.quantize_per_token(x)
    assert torch.equal(q[1:4], torch.zeros(3, 300, dtype=torch.int8)) and s[1:4].isnan().all()
    # a tiny row quantizes to the same codes as the row it was scaled from
    for r in (4, 5, 6):
        assert torch.equal(q[r], q[0]), r
        assert torch.isfinite(s[r]).all() and s[r].item() > 0
    assert torch.equal(s[7], torch.ones(1)) and (q[7] == 0).all()
    rq, rs = ref.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(), rs.nan_to_num())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op,bits,group", [("w8a8_linear", 8, PER_CHANNEL), ("w4a8_linear", 4, 128),
                                           ("w8a8_linear", 8, 32)])
@pytest.mark.parametrize("static", [False, True])
def test_nan_rows_give_nan_outputs(monkeypatch, backend, op, bits, group, static):
    # float Linear turns a NaN input into NaN outputs: so must int8 activations, on every backend
    monkeypatch.setenv("KQUANT_BACKEND", backend)
    x = _special_rows()
    p = quantize_weight(torch.randn(24, 300), bits, group)
    bias = torch.randn(24) * 0.05
    act = torch.tensor([0.02]) if static else None
    y = call_linear(op, x, p, bias, act)
    assert y[1:4].isnan().all(), y[1:4]
    assert torch.isfinite(y[[0, 4, 5, 6, 7]]).all()
    expect = oracle_linear(op, x, p, bias, act)
    assert torch.equal(y.isnan(), expect.isnan())
    ok = ~expect.isnan()
    assert rel_err(y[ok], expect[ok]) < 1e-5
    if not static:  # the tiny rows: the outputs of the row they were scaled from, scaled
        y = call_linear(op, x, p, None)
        for r, f in ((5, 3e-37), (6, 1e-30)):
            assert torch.allclose(y[r], y[0] * f, rtol=1e-4, atol=0.0), r


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_only_nan_input_gives_nan(monkeypatch, backend):
    monkeypatch.setenv("KQUANT_BACKEND", backend)
    x = _special_rows(128)
    for op, bits in (("w8a16_linear", 8), ("w4a16_linear", 4)):
        p = quantize_weight(torch.randn(20, 128), bits, 64)
        y = call_linear(op, x, p, None)
        assert y[1].isnan().all() and not y[1:4].isfinite().any(), op


# ----------------------------------------------------------------------------- exact int32 range
def test_int32_overflow_shapes_are_refused():
    # 127 * 127 * K must stay below 2^31 in one exact sum: per-channel W8A8 up to K = 133,144
    from kquant.spec import MAX_K_INT8_MM, MAX_K_PER_SUM
    assert MAX_K_PER_SUM[8] == 133_144 and 127 * 127 * MAX_K_PER_SUM[8] < 2 ** 31 <= 127 * 127 * 133_145
    assert MAX_K_INT8_MM == 131_071
    k = 140_000
    x = torch.full((1, k), 1.0)
    p = quantize_weight(torch.full((2, k), 1.0), 8)
    with pytest.raises(ValueError, match="in_features=140000 is too large.*133,144.*group_size"):
        ops.w8a8_linear(x, p.qweight, p.scales, None, None, -1)
    a = torch.full((1, k), 127, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8_mm: K=140,000 can overflow"):
        ops.int8_mm(a, a)
    # grouped: every sum covers one group, so any K works; weight-only has no int32 sums
    pg = quantize_weight(torch.full((2, k), 1.0), 8, 128)
    y = ops.w8a8_linear(x, pg.qweight, pg.scales, None, None, 128)
    assert torch.allclose(y, torch.full((1, 2), float(k)), rtol=1e-4)
    assert torch.allclose(ops.w8a16_linear(x, p.qweight, p.scales, None, None, -1), torch.full((1, 2), float(k)))


def test_quantlinear_refuses_overflowing_layers_by_name():
    with pytest.raises(ValueError, match="blocks.3.fc: in_features=140000 is too large"):
        kquant.QuantLinear(140_000, 4, config="w8a8", name="blocks.3.fc")
    kquant.QuantLinear(140_000, 4, config="w4a8", name="ok")  # groups of 128
    kquant.QuantLinear(140_000, 4, config="w8a16", name="ok")


# ----------------------------------------------------------------------------- values and types
def test_direct_ops_check_values_and_types():
    x = torch.randn(3, 64)
    p = quantize_weight(torch.randn(16, 64), 8)
    p4 = quantize_weight(torch.randn(16, 64), 4, 32, symmetric=False)
    with pytest.raises(RuntimeError, match="expected at most 7 argument"):  # canonical format only: no layout
        ops.w8a8_linear(x, p.qweight, p.scales, None, None, -1, None, 1)
    from kquant.backends.cpu import int8_to_blocked
    with pytest.raises(ValueError, match=r"qweight must be 2-D .* canonical format, got \[1, 16, 16, 4\]"):
        ops.w8a8_linear(torch.randn(3, 1), int8_to_blocked(p.qweight), p.scales, None, None, -1)
    for bad, what in ((float("nan"), "nan"), (-1.0, "-1.0"), (0.0, "0.0")):
        s = p.scales.clone()
        s[3, 0] = bad
        with pytest.raises(ValueError, match=rf"scales must be finite and > 0 \(found {what} at \[3, 0\]\)"):
            ops.w8a8_linear(x, p.qweight, s, None, None, -1)
    for a in (0.0, float("nan"), -1.0, float("inf"), 1e-45):
        with pytest.raises(ValueError, match="act_scale must be finite and > 0"):
            ops.w8a8_linear(x, p.qweight, p.scales, None, torch.tensor([a]), -1)
    z = p4.zeros.clone()
    z[0, 0] = 16.0
    with pytest.raises(ValueError, match=r"zeros must be integers in \[0, 15\]"):
        ops.w4a16_linear(x, p4.qweight, p4.scales, z, None, 32)
    z[0, 0] = 2.5
    with pytest.raises(ValueError, match=r"zeros must be integers"):
        ops.w4a16_linear(x, p4.qweight, p4.scales, z, None, 32)
    q = p.qweight.clone()
    q[0, 0] = -128
    with pytest.raises(ValueError, match="-128 is not used"):
        ops.w8a8_linear(x, q, p.scales, None, None, -1)
    with pytest.raises(ValueError, match=r"scales must be float32 \[16, 1\].*got torch.float32 \[15, 1\]"):
        ops.w8a8_linear(x, p.qweight, p.scales[:15], None, None, -1)
    with pytest.raises(TypeError, match="qweight must be a torch.Tensor, got NoneType"):
        ops.w8a8_linear(x, None, p.scales, None, None, -1)


def test_value_checks_run_once_per_tensor_version():
    x = torch.randn(3, 64)
    p = quantize_weight(torch.randn(16, 64), 8)
    ops.w8a8_linear(x, p.qweight, p.scales, None, None, -1)
    with torch.no_grad():
        p.scales[0, 0] = -1.0  # an in-place change is seen: the tensor's version moved
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        ops.w8a8_linear(x, p.qweight, p.scales, None, None, -1)


@pytest.mark.parametrize("op,bits,group", MODES)
def test_public_ops_have_input_and_bias_gradients(op, bits, group):
    p = quantize_weight(torch.randn(12, 100), bits, group)
    x = torch.randn(2, 3, 100, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    g = torch.randn(2, 3, 12)
    call_linear(op, x, p, b).backward(g)
    torch.testing.assert_close(x.grad, g @ p.dequantize(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, g.sum((0, 1)))
