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
    with pytest.raises(ValueError, match="supported: \\[8, 4, 3, 2\\]"):
        QuantConfig(weight_bits=1)
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


def test_nan_weight_leaves_the_model_unchanged():
    model = MLP()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="head"):
        kquant.quantize_(model, "w8a8", progress=False)
    assert set(linears(model).values()) == {"Linear"}  # nothing swapped before the error


# ----------------------------------------------------------------------------- what can be swapped
def test_multihead_attention_and_encoder_layer_keep_working():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), nn.Linear(32, 8))
    mha = nn.Sequential()
    mha.attn = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    model.eval()
    ref = model(x)
    kept = r"0.self_attn.out_proj.*MultiheadAttention.*; 0.linear1, 0.linear2.*fast path"
    with pytest.warns(UserWarning, match=kept):
        kquant.quantize_(model, "w8a8", progress=False)
    assert isinstance(model[1], QuantLinear) and isinstance(model[0].linear1, nn.Linear)
    assert type(model[0].self_attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    y = model(x)  # eval: the encoder layer's fast path; before, AttributeError: ... no attribute 'weight'
    assert ((y - ref).norm() / ref.norm()).item() < 0.05
    model.train()
    assert model(x).shape == (2, 5, 8)
    with pytest.warns(UserWarning, match="attn.out_proj"):
        kquant.quantize_(mha, "w8a8", progress=False)
    out, _ = mha.attn(x, x, x)
    assert out.shape == (2, 5, 32)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped layers are not warned about
        kquant.quantize_(nn.Sequential(nn.MultiheadAttention(32, 4), nn.Linear(32, 4)), "w8a8",
                         skip=["0.out_proj"], progress=False)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class PlainSubclass(nn.Linear):
    pass


def test_linear_subclasses_with_their_own_forward_stay_float():
    model = nn.Sequential(ScaledLinear(16, 16), PlainSubclass(16, 8))
    x = torch.randn(3, 16)
    ref = model(x)
    with pytest.warns(UserWarning, match="0 .1.: ScaledLinear overrides nn.Linear.forward"):
        kquant.quantize_(model, "w8a16", progress=False)
    assert type(model[0]) is ScaledLinear and isinstance(model[1], QuantLinear)
    assert ((model(x) - ref).norm() / ref.norm()).item() < 0.02


def test_transformers_conv1d_is_converted():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    n_conv = sum(isinstance(m, Conv1D) for m in model.modules())
    assert n_conv == 8
    kquant.quantize_(model, "w8a16", progress=False)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_conv
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
    assert ((y - ref).norm() / ref.norm()).item() < 0.01
    # one layer: the weight is stored [in, out]; from_linear transposes it
    conv = Conv1D(24, 40)
    q = QuantLinear.from_linear(conv, "w8a16")
    assert (q.in_features, q.out_features) == (40, 24)
    x = torch.randn(3, 40)
    assert ((q(x) - conv(x)).norm() / conv(x).norm()).item() < 0.01


# ----------------------------------------------------------------------------- configs and models
def test_config_bits_and_group_must_be_integers():
    for bad in (8.0, True, "8"):
        with pytest.raises(ValueError, match="unsupported weight bits"):
            QuantConfig(weight_bits=bad)
    with pytest.raises(ValueError, match="unsupported group size 128.0"):
        QuantConfig(group_size=128.0)


def test_float64_and_meta_models_are_refused_by_layer_name():
    model = MLP().double()
    with pytest.raises(TypeError, match="encoder.0: torch.float64 weights are not supported.*model.float"):
        kquant.quantize_(model, "w8a8", progress=False)
    assert set(linears(model).values()) == {"Linear"}
    with torch.device("meta"):
        meta = MLP()
    with pytest.raises(ValueError, match="encoder.0: the weight is on the meta device"):
        kquant.quantize_(meta, "w8a8", progress=False)
    with pytest.raises(TypeError, match="fc: torch.float64 layers are not supported"):
        QuantLinear(8, 4, config="w8a8", name="fc", dtype=torch.float64)


def test_import_is_light():
    # `import kquant` loads torch and kquant only: the progress bar, Triton, safetensors, rich and
    # transformers load when a call needs them
    import subprocess
    import sys
    code = ("import sys, torch; before = set(sys.modules); import kquant; "
            "heavy = {'tqdm', 'triton', 'safetensors', 'rich', 'transformers', 'matplotlib'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in set(sys.modules) - before}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
