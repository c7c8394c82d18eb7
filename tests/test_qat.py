"""Quantization-aware training: prepare_qat, FakeQuantLinear and convert."""
import copy

import pytest
import torch
from torch import nn

import kquant
from kquant.backends import reference
from kquant.config import QuantConfig
from kquant.format import qrange
from kquant.qat import FakeQuantLinear, fake_quantize_weight, minmax_qparams


def _mlp(k=100, h=48, out=10, bias=True):
    return nn.Sequential(nn.Linear(k, h, bias=bias), nn.ReLU(), nn.Linear(h, out, bias=bias))


def _train_steps(model, x, steps=5, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model


CONFIGS = ["w8a8", "w8a16", "w4a16", "w4a8", QuantConfig(weight_bits=4, group_size=32, symmetric=False,
                                                          activations="none"),
           QuantConfig(weight_bits=8, group_size=64, activations="dynamic")]


# ----------------------------------------------------------------------------- convert equivalence
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c if isinstance(c, str) else "custom")
@pytest.mark.parametrize("learn_scales", [False, True])
def test_converted_model_matches_fake_quant_after_training(config, learn_scales):
    # K = 100 is padded to the group / packing width; training moves weights and scales first
    model = kquant.prepare_qat(_mlp(), config, learn_scales=learn_scales)
    x = torch.randn(16, 100)
    _train_steps(model, x)
    with torch.no_grad():
        fake = model(x)
    kquant.convert(model)
    assert all(isinstance(m, kquant.QuantLinear) for m in (model[0], model[2]))
    with torch.no_grad():
        packed = model(x)
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)


def test_static_activations_train_and_convert():
    cfg = QuantConfig(weight_bits=8, activations="static")
    calib = [torch.randn(8, 100) for _ in range(3)]
    model = kquant.prepare_qat(_mlp(), cfg, learn_scales=True, calib_data=calib)
    assert model[0].log_act_scale is not None
    before = model[0].current_act_scale().item()
    x = torch.randn(16, 100)
    _train_steps(model, x)
    assert model[0].current_act_scale().item() != before  # the static scale learns too
    with torch.no_grad():
        fake = model(x)
    kquant.convert(model)
    torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-5)


def test_untrained_fake_quant_is_round_to_nearest_ptq():
    fp = _mlp()
    x = torch.randn(16, 100)
    for preset in ("w8a8", "w4a16", "w4a8"):
        ptq = kquant.quantize_(copy.deepcopy(fp), preset, progress=False)
        fake = kquant.prepare_qat(copy.deepcopy(fp), preset)
        with torch.no_grad():
            torch.testing.assert_close(fake(x), ptq(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", ["awq", "gptq"]])
def test_calibrated_start_matches_the_calibrated_model(method):
    fp = _mlp(k=64)
    calib = [torch.randn(32, 64) * (1 + 5 * torch.rand(64)) for _ in range(2)]
    ptq = kquant.quantize_(copy.deepcopy(fp), "w4a16", calib_data=calib, method=method, progress=False)
    qat = kquant.prepare_qat(copy.deepcopy(fp), "w4a16", calib_data=calib, method=method, progress=False)
    assert qat[0].scale_mode == "fixed" and qat[0].calibration["method"] != "rtn"
    x = torch.randn(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(qat(x), ptq(x), rtol=1e-5, atol=1e-5)
    kquant.convert(qat)
    assert torch.equal(qat[0].packed_weight().qweight, ptq[0].packed_weight().qweight)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_low_bit_fake_quant_trains_and_converts_where_a_format_exists(bits):
    model = kquant.prepare_qat(_mlp(), "w4a8", weight_bits=bits, learn_scales=True)
    assert model[0].bits == bits
    w = model[0].quantized_weight().detach()
    lo, hi = qrange(bits, True)
    s = model[0].qparams()[0].detach()
    codes = torch.round(w / s)  # per channel: one scale per row
    assert codes.min() >= lo and codes.max() <= hi and len(codes.unique()) <= hi - lo + 1
    _train_steps(model, torch.randn(8, 100))
    if bits in (2, 3):  # packed formats exist: the packed model computes what the fake-quantized one does
        x = torch.randn(5, 100)
        with torch.no_grad():
            want = model(x)
            kquant.convert(model)
            got = model(x)
        assert isinstance(model[0], kquant.QuantLinear) and model[0].bits == bits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        return
    with pytest.raises(ValueError, match=rf"0: {bits}-bit weights have no packed format"):
        kquant.convert(model)
    assert isinstance(model[0], FakeQuantLinear)  # nothing swapped on the error


# ----------------------------------------------------------------------------- gradients
def test_straight_through_gradients_equal_the_analytic_ones():
    torch.manual_seed(0)
    n, k, bits = 6, 32, 4
    lin = nn.Linear(k, n)
    scales, _ = minmax_qparams(lin.weight, bits, -1, True)
    scales = scales * 0.6  # smaller than the range: some weights clamp
    fq = FakeQuantLinear(lin.weight, lin.bias, "w4a8", scale_mode="learned", scales=scales)
    x = torch.randn(5, k, requires_grad=True)
    y = fq(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    s = scales.detach()  # [n, 1]
    u = lin.weight.detach() / s
    lo, hi = qrange(bits, True)
    inside = (u >= lo) & (u <= hi)
    q = torch.clamp(torch.round(u), lo, hi)
    xq = reference.quantize_per_token(x.detach())
    xq = xq[0].float() * xq[1]
    g_wq = gy.T @ xq                                       # dL/dWq
    torch.testing.assert_close(fq.weight.grad, g_wq * inside)                      # STE, zero where clamped
    ds = torch.where(inside, q - u, q)                    # LSQ: d(s*q(w/s))/ds
    torch.testing.assert_close(fq.log_scales.grad, (g_wq * ds).sum(1, keepdim=True) * s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad, gy @ (q * s))       # activations: straight through
    torch.testing.assert_close(fq.bias.grad, gy.sum(0))


def test_frozen_codes_only_move_scales():
    ql = kquant.QuantLinear.from_linear(nn.Linear(64, 16), "w4a16")
    fq = FakeQuantLinear.from_quantized(ql, train_weight=False, learn_scales=True)
    assert fq.weight is None and fq.codes is not None
    torch.testing.assert_close(fq.quantized_weight(), ql.dequantize_weight())
    fq(torch.randn(4, 64)).sum().backward()
    assert fq.log_scales.grad is not None
    with torch.no_grad():
        fq.log_scales += 0.1
    back = fq.to_quantized()
    assert torch.equal(back.packed_weight().qweight, ql.packed_weight().qweight)
    torch.testing.assert_close(back.scales, ql.scales * torch.exp(torch.tensor(0.1)))


def test_fake_quantize_weight_matches_the_packed_format():
    w = torch.randn(12, 70)
    for bits, gs, sym in [(4, 32, False), (8, -1, True), (4, 64, True), (8, 32, False)]:
        s, z = minmax_qparams(w, bits, gs, sym)
        packed = kquant.quantize_weight(w, bits, gs, sym)
        torch.testing.assert_close(fake_quantize_weight(w, s, z, bits, gs, sym), packed.dequantize())


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_of_a_qat_model():
    fp = _mlp()
    x = torch.randn(8, 100)
    a = _train_steps(kquant.prepare_qat(copy.deepcopy(fp), "w4a8", learn_scales=True), x)
    b = kquant.prepare_qat(copy.deepcopy(fp), "w4a8", learn_scales=True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert "0.log_scales" in a.state_dict()


def test_training_through_quantlinear_adapter_and_bias():
    # a packed model trains around its frozen weights: the adapter and bias get the gradients of a
    # float layer holding the dequantized weight
    ql = kquant.QuantLinear.from_linear(nn.Linear(40, 24), "w4a16")
    ql.add_adapter(4)
    with torch.no_grad():
        ql.lora_B.normal_()
    ql.bias.requires_grad_(True)
    x = torch.randn(6, 40, requires_grad=True)
    gy = torch.randn(6, 24)
    ql(x).backward(gy)
    a, b = ql.lora_A.detach().clone().requires_grad_(True), ql.lora_B.detach().clone().requires_grad_(True)
    bias = ql.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w = ql.packed_weight().dequantize()
    (nn.functional.linear(x2, w, bias) + x2 @ a.T @ b.T).backward(gy)
    for got, want in [(x.grad, x2.grad), (ql.lora_A.grad, a.grad), (ql.lora_B.grad, b.grad), (ql.bias.grad, bias.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not ql.qweight.requires_grad
    torch.testing.assert_close(ql.dequantize_weight(), w + b.detach() @ a.detach())


# ----------------------------------------------------------------------------- bad input
def test_errors():
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        kquant.prepare_qat(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "w8a8")
    for bits in (1, 9, 3.5, True):
        with pytest.raises(ValueError, match="2 to 8 bits"):
            kquant.prepare_qat(_mlp(), "w8a8", weight_bits=bits)
    with pytest.raises(ValueError, match="no FakeQuantLinear layer.*prepare_qat"):
        kquant.convert(_mlp())
    with pytest.raises(ValueError, match="already holds QuantLinear"):
        kquant.convert(kquant.quantize_(_mlp(), "w8a8", progress=False))
    with pytest.raises(ValueError, match="starts from packed layers"):
        kquant.prepare_qat(_mlp(), "w4a16", weight_bits=5, method="gptq", calib_data=[torch.randn(4, 100)])
    with pytest.raises(ValueError, match="need calib_data"):
        kquant.prepare_qat(_mlp(), QuantConfig(activations="static"))
    with pytest.raises(TypeError, match="inside a model"):
        kquant.prepare_qat(nn.Linear(4, 4), "w8a8")
    model = kquant.prepare_qat(_mlp(), "w8a8")
    with pytest.raises(ValueError, match=r"0: input must be a float tensor \[\.\.\., 100\]"):
        model(torch.randn(3, 99))
