"""QuantLinear against nn.Linear, module plumbing and torch.compile."""
import copy
import io

import pytest
import torch
from torch import nn

import kquant
from kquant import QuantConfig, QuantLinear

# relative output error allowed against nn.Linear, by mode (random Gaussian weights/inputs)
BOUND = {"w8a16": 0.01, "w8a8": 0.02, "w4a16": 0.15, "w4a8": 0.15}
DT_EXTRA = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset", ["w8a8", "w8a16", "w4a16", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_quantlinear_close_to_linear(preset, dtype, bias, lead):
    lin = nn.Linear(256, 48, bias=bias)
    q = QuantLinear.from_linear(lin, preset, name="fc")
    x = torch.randn(*lead, 256)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (*lead, 48)
    assert rel_err(y, lin(x)) < BOUND[preset] + DT_EXTRA[dtype]


@pytest.mark.parametrize("preset", ["w8a16", "w4a16"])
def test_weight_only_equals_dequantized_weight_math(preset):
    lin = nn.Linear(100, 30)
    q = QuantLinear.from_linear(lin, preset)
    x = torch.randn(7, 100)
    expect = x.double() @ q.dequantize_weight(torch.float64).T + lin.bias.double()
    assert rel_err(q(x), expect) < 1e-5


def test_dequantize_weight_and_bytes():
    lin = nn.Linear(300, 64)
    for preset, nbytes in [("w8a8", 64 * 300 + 64 * 4), ("w4a16", 64 * 192 + 64 * 3 * 4)]:
        q = QuantLinear.from_linear(lin, preset)
        w = q.dequantize_weight()
        assert w.shape == (64, 300) and w.dtype == torch.float32
        assert q.weight_nbytes == nbytes
        assert rel_err(w, lin.weight) < BOUND[preset]


def test_extra_repr_shows_mode_bits_group_backend():
    q = QuantLinear.from_linear(nn.Linear(64, 8), "w4a16")
    r = repr(q)
    for s in ("mode=w4a16", "bits=4", "group_size=128", "backend="):
        assert s in r, r
    assert "group_size=per-channel" in repr(QuantLinear.from_linear(nn.Linear(64, 8), "w8a8"))


def test_all_zero_weight_rows_give_exact_zero_outputs():
    lin = nn.Linear(64, 6, bias=False)
    with torch.no_grad():
        lin.weight[2] = 0
        lin.weight[4, :32] = 0
    for preset in ("w8a8", "w8a16", "w4a16", "w4a8"):
        q = QuantLinear.from_linear(lin, preset)
        assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
        y = q(torch.randn(5, 64))
        assert torch.isfinite(y).all()
        assert torch.equal(y[:, 2], torch.zeros(5)), preset


def test_zero_input_rows_are_safe():
    q = QuantLinear.from_linear(nn.Linear(64, 6), "w8a8")
    x = torch.zeros(3, 64)
    y = q(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, q.bias.expand(3, 6))


def test_bad_inputs_name_the_layer():
    lin = nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match="blocks.0.fc.*NaN"):
        QuantLinear.from_linear(lin, "w8a8", name="blocks.0.fc")
    q = QuantLinear.from_linear(nn.Linear(16, 4), "w8a8", name="head")
    with pytest.raises(TypeError, match="head: input must be a float32"):
        q(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"head: input shape \[2, 15\] does not end in in_features=16"):
        q(torch.randn(2, 15))
    with pytest.raises(ValueError, match="unknown preset 'w2a2'"):
        QuantLinear.from_linear(nn.Linear(16, 4), "w2a2")
    with pytest.raises(ValueError, match="static.*act_scale"):
        QuantLinear.from_linear(nn.Linear(16, 4), QuantConfig(activations="static"), name="x")
    with pytest.raises(TypeError, match="expected nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_state_dict_round_trip_is_canonical_and_exact():
    lin = nn.Linear(96, 40)
    for preset in ("w8a8", "w4a8", "w4a16"):
        q = QuantLinear.from_linear(lin, preset)
        sd = q.state_dict()
        assert torch.equal(sd["qweight"], q.packed_weight().qweight)
        fresh = QuantLinear(96, 40, True, preset)
        fresh.load_state_dict(sd)
        x = torch.randn(4, 96)
        assert torch.equal(fresh(x), q(x))


def test_half_keeps_fp32_scales_and_works():
    q = QuantLinear.from_linear(nn.Linear(64, 16), "w8a8")
    scales = q.scales.clone()
    q.half()
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales)
    assert q.bias.dtype == torch.float16
    assert q(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16


def test_device_mismatch_is_an_error():
    q = QuantLinear.from_linear(nn.Linear(8, 4), "w8a8", name="proj")
    with pytest.raises(ValueError, match="proj: input is on meta"):
        q(torch.randn(2, 8, device="meta"))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("preset", ["w8a8", "w4a16"])
def test_torch_compile_fullgraph_no_graph_break(preset):
    model = kquant.quantize_(Tiny(), preset, progress=False)
    x = torch.randn(3, 64)
    eager = model(x)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_deepcopy_and_pickle_a_quantized_model():
    import copy
    import io

    model = kquant.quantize_(Tiny(), "w4a8", progress=False)
    x = torch.randn(2, 64)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = kquant.quantize_(Tiny(), "w4a8", progress=False)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), model(x))


# ----------------------------------------------------------------------------- the prepared kernel
# A QuantLinear chooses its backend once (built, moved, loaded, or KQUANT_BACKEND changed);
# a call checks only the input. Buffers are read at each call, so reassigning one is safe.
from kquant import ops  # noqa: E402
from kquant.backends import reference  # noqa: E402


@pytest.mark.parametrize("preset", ["w8a8", "w8a16", "w4a16", "w4a8"])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3)])
def test_prepared_kernel_equals_public_op(preset, lead):
    q = QuantLinear.from_linear(nn.Linear(100, 24), preset, name="fc")  # K=100: padded for int4
    p = q.packed_weight()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(*lead, 100).to(dtype)
        y = q(x)
        assert y.dtype == dtype and y.shape == (*lead, 24)
        if q.activations == "none":
            r = ops.linear(p.bits, False, x, p.qweight, p.scales, p.zeros, q.bias, None, p.group_size)
        else:
            r = ops.linear(p.bits, True, x, p.qweight, p.scales, None, q.bias, q.act_scale, p.group_size)
        assert torch.equal(y, r)


def test_call_errors_name_the_layer():
    q = QuantLinear.from_linear(nn.Linear(16, 4), "w8a8", name="head")
    q(torch.randn(2, 16))
    with pytest.raises(TypeError, match="head: input must be a float32"):
        q(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="head: input must be a float32"):
        q([1.0] * 16)
    with pytest.raises(ValueError, match=r"head: input shape \[2, 15\] does not end in in_features=16"):
        q(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"head: input shape \[\] does not end in in_features=16"):
        q(torch.tensor(1.0))
    with pytest.raises(ValueError, match="head: input is on meta but the layer is on cpu"):
        q(torch.randn(2, 16, device="meta"))


def test_kernel_follows_kquant_backend(monkeypatch):
    monkeypatch.delenv("KQUANT_BACKEND", raising=False)
    calls = []
    linear = reference.BACKEND.linear
    monkeypatch.setattr(reference.BACKEND, "linear", lambda *a: calls.append(1) or linear(*a))
    q = QuantLinear.from_linear(nn.Linear(64, 8), "w8a8", name="fc")
    x = torch.randn(3, 64)
    auto = q(x)
    default_is_reference = q.backend() == "reference"
    assert len(calls) == (1 if default_is_reference else 0)
    monkeypatch.setenv("KQUANT_BACKEND", "reference")
    calls.clear()
    forced = q(x)
    q(x)
    assert len(calls) == 2 and q.backend() == "reference" and q.layout == 0
    assert rel_err(forced, auto) < 1e-5
    monkeypatch.setenv("KQUANT_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(kquant.BackendError, match="KQUANT_BACKEND=cuda cannot run"):
            q(x)
    monkeypatch.setenv("KQUANT_BACKEND", "nope")
    with pytest.raises(ValueError, match="not a backend"):
        q(x)
    monkeypatch.delenv("KQUANT_BACKEND")
    calls.clear()
    assert torch.equal(q(x), auto)
    assert len(calls) == (1 if default_is_reference else 0)


def test_reassigned_buffers_loads_and_moves():
    lin = nn.Linear(64, 8, bias=False)
    q = QuantLinear.from_linear(lin, "w8a8", name="fc")
    x = torch.randn(2, 64)
    y = q(x)
    scales = q.scales
    q.scales = scales * 2  # a reassigned buffer is what the next call uses
    assert torch.allclose(q(x), 2 * y)
    q.register_buffer("scales", scales * 3)
    assert torch.allclose(q(x), 3 * y)
    q.register_buffer("scales", scales)
    assert torch.equal(q(x), y)

    fresh = QuantLinear(64, 8, False, "w8a8", name="fc")
    assert torch.equal(fresh(x), torch.zeros(2, 8))  # zero weight
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), y)

    q.half()
    assert q(x.half()).dtype == torch.float16
    q.float()
    meta = copy.deepcopy(q).to("meta")
    assert meta.backend() == "reference" and meta.layout == 0  # nothing else runs on meta tensors
    with pytest.raises(ValueError, match="fc: input is on cpu but the layer is on meta"):
        meta(x)
    assert meta(x.to("meta")).shape == (2, 8) and meta(x.to("meta")).device.type == "meta"


def test_copies_and_pickles_keep_their_own_buffers():
    q = QuantLinear.from_linear(nn.Linear(64, 8), "w4a8", name="fc")
    x = torch.randn(2, 64)
    y = q(x)
    clone = copy.deepcopy(q)
    assert torch.equal(clone(x), y) and clone.backend() == q.backend()
    with torch.no_grad():
        clone.scales.mul_(2)  # in place: the clone's own buffer, not the original's
    assert torch.equal(q(x), y)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y) and loaded.backend() == q.backend()


# ----------------------------------------------------------------------------- autograd
BACKENDS_HERE = [b for b in ("cpu", "reference") if kquant.backends()[b]["available"]]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("preset", ["w8a8", "w8a16", "w4a16", "w4a8"])
def test_gradients_flow_through_quantlinear(monkeypatch, backend, preset):
    # the input gradient uses the dequantized weight (activation quantization is passed
    # straight through); the packed weight stays frozen; a bias that requires grad gets one
    monkeypatch.setenv("KQUANT_BACKEND", backend)
    torch.manual_seed(0)
    pre = nn.Linear(20, 100)
    q = QuantLinear.from_linear(nn.Linear(100, 24), preset, name="fc")
    q.bias.requires_grad_(True)
    x = torch.randn(2, 3, 20, requires_grad=True)
    h = pre(x)
    y = q(h)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert x.grad is not None and pre.weight.grad is not None, "gradients were dropped"
    w = q.dequantize_weight()
    torch.testing.assert_close(q.bias.grad, grad_out.sum((0, 1)))
    x2 = x.detach().requires_grad_(True)
    torch.nn.functional.linear(pre(x2), w, q.bias.detach()).backward(grad_out)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert not q.qweight.requires_grad and q.qweight.grad is None


def test_gradients_under_torch_compile():
    torch.manual_seed(0)
    model = kquant.quantize_(Tiny(), "w4a8", progress=False)
    x = torch.randn(3, 64, requires_grad=True)
    model(x).sum().backward()
    eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, eager)


def test_no_grad_and_inference_mode_take_the_kernel_directly():
    q = QuantLinear.from_linear(nn.Linear(64, 8), "w8a8")
    x = torch.randn(2, 64, requires_grad=True)
    with torch.no_grad():
        a = q(x)
    with torch.inference_mode():
        b = q(x.detach())
    c = q(x)
    assert not a.requires_grad and c.requires_grad and torch.equal(a, b) and torch.equal(a, c.detach())
