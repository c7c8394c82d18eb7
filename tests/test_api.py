"""quantize_: presets, QuantConfig, overrides, skip lists, static calibration."""
import pytest
import torch
from torch import nn

import kquant
from kquant import QuantConfig, QuantLinear


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.encoder(x))


def linears(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


@pytest.mark.parametrize("preset", ["w8a8", "w8a16", "w4a16", "w4a8"])
def test_presets_convert_every_linear_in_place(preset):
    model = MLP()
    x = torch.randn(8, 32)
    ref = model(x)
    out = kquant.quantize_(model, preset, progress=False)
    assert out is model
    assert set(linears(model).values()) == {"QuantLinear"}
    assert all(m.mode == preset for m in model.modules() if isinstance(m, QuantLinear))
    y = model(x)
    assert ((y - ref).norm() / ref.norm()).item() < (0.05 if preset.startswith("w8") else 0.3)


def test_skip_and_overrides():
    model = MLP()
    cfg = QuantConfig(overrides={"encoder.2": "w4a16", "encoder.*": QuantConfig(weight_bits=8), "head": None})
    kquant.quantize_(model, cfg, skip=["encoder.0"], progress=False)
    kinds = linears(model)
    assert kinds == {"encoder.0": "Linear", "encoder.2": "QuantLinear", "head": "Linear"}
    # the last matching override wins
    assert model.encoder[2].mode == "w8a8"
    model2 = kquant.quantize_(MLP(), QuantConfig(overrides={"encoder.*": "w4a16"}), progress=False)
    assert model2.encoder[0].mode == "w4a16" and model2.head.mode == "w8a8"


def test_static_activations_need_and_use_calibration_data():
    model = MLP()
    cfg = QuantConfig(activations="static")
    with pytest.raises(ValueError, match="need calib_data"):
        kquant.quantize_(MLP(), cfg, progress=False)
    calib = [torch.randn(16, 32) for _ in range(4)]
    x = torch.randn(8, 32)
    ref = model(x)
    kquant.quantize_(model, cfg, calib_data=calib, progress=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m.activations == "static" and m.act_scale.item() > 0
    y = model(x)
    assert ((y - ref).norm() / ref.norm()).item() < 0.05


def test_weight_observer_mse_is_no_worse_than_minmax():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    w[0, 0] = 12.0  # an outlier that min-max clipping wastes range on
    errs = {}
    for obs in ("minmax", "mse"):
        lin = nn.Linear(256, 64)
        lin.weight.data.copy_(w)
        q = QuantLinear.from_linear(lin, QuantConfig(weight_bits=4, group_size=-1, activations="none",
                                                     weight_observer=obs))
        if obs == "mse":
            from kquant.calibration import weight_qparams
            s, z = weight_qparams(w, 4, -1, True, "mse")
            q = QuantLinear.from_linear(lin, QuantConfig(weight_bits=4, group_size=-1, activations="none"),
                                        weight_qparams=(s, z))
        errs[obs] = (q.dequantize_weight() - w).pow(2).mean().item()
    assert errs["mse"] <= errs["minmax"]


def test_config_errors_list_supported_values():
    with pytest.raises(ValueError, match="unknown preset 'int3'.*w4a16"):
        kquant.quantize_(MLP(), "int3")
    with pytest.raises(ValueError, match="supported: \\[8, 4\\]"):
        QuantConfig(weight_bits=2)
    with pytest.raises(ValueError, match="asymmetric weights are supported only with activations='none'"):
        QuantConfig(symmetric=False)
    with pytest.raises(ValueError, match="unsupported activations"):
        QuantConfig(activations="per_tensor")
    with pytest.raises(TypeError, match="for one layer use"):
        kquant.quantize_(nn.Linear(4, 4), "w8a8")
    with pytest.raises(TypeError, match="preset name or a kquant.QuantConfig"):
        kquant.quantize_(MLP(), 8)


def test_nan_weight_names_layer_in_model():
    model = MLP()
    with torch.no_grad():
        model.encoder[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="encoder.2"):
        kquant.quantize_(model, "w8a8", progress=False)


def test_no_linear_warns():
    with pytest.warns(UserWarning, match="no nn.Linear"):
        kquant.quantize_(nn.Sequential(nn.ReLU()), "w8a8", progress=False)
