"""kquant.error_report: per-layer and model-level error of a quantized model."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import kquant
from kquant.report import ErrorReport, sqnr_db

PRESETS = ("w8a8", "w8a16", "w4a16", "w4a8")


def mlp():
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32))


@pytest.fixture(scope="module")
def fp_and_inputs():
    torch.manual_seed(0)
    return mlp().eval(), torch.randn(48, 128)


@pytest.fixture(scope="module")
def reports(fp_and_inputs):
    fp, x = fp_and_inputs
    out = {}
    for p in PRESETS:
        q = kquant.quantize_(copy.deepcopy(fp), p, progress=False)
        out[p] = kquant.error_report(fp, q, [x[:16], x[16:]])
    return out


def test_rows_and_fields(reports, fp_and_inputs):
    fp, _ = fp_and_inputs
    r = reports["w8a16"]
    assert [row.name for row in r.layers] == ["0", "2", "4"]
    assert r.num_batches == 2
    for row in r.layers:
        lin = fp.get_submodule(row.name)
        assert row.mode == "w8a16" and row.bits == 8 and row.group_size == -1 and row.activations == "none"
        assert row.fp_bytes == lin.weight.numel() * 4
        # int8 codes + one fp32 scale per row
        assert row.weight_bytes == lin.out_features * lin.in_features + lin.out_features * 4
        assert row.calls == 2
    assert reports["w4a16"]["2"].weight_bytes == 256 * 128 + 256 * 2 * 4


def test_error_levels(reports):
    for p in PRESETS:
        for row in reports[p].layers:
            assert math.isfinite(row.output_sqnr_db) and row.rel_error > 0
    assert all(row.rel_error < 0.02 for row in reports["w8a16"].layers)
    assert reports["w8a16"].model_rel_error < 0.02
    for p4 in ("w4a16", "w4a8"):
        assert reports[p4].model_rel_error > 2 * reports["w8a16"].model_rel_error
        assert reports[p4].model_rel_error < 0.5
    for a, b in (("w8a16", "w4a16"), ("w8a8", "w4a8")):
        for r8, r4 in zip(reports[a].layers, reports[b].layers):
            assert r8.weight_sqnr_db > r4.weight_sqnr_db + 15  # ~6 dB per bit
            assert r8.output_sqnr_db > r4.output_sqnr_db
    # dynamic int8 activations add error on top of the same 8-bit weights
    assert reports["w8a8"].model_rel_error > reports["w8a16"].model_rel_error


def test_weight_sqnr_matches_definition(reports, fp_and_inputs):
    fp, _ = fp_and_inputs
    q = kquant.quantize_(copy.deepcopy(fp), "w4a16", progress=False)
    w, wq = fp[2].weight.double(), q[2].dequantize_weight().double()
    want = 10 * math.log10((w ** 2).sum().item() / ((w - wq) ** 2).sum().item())
    assert reports["w4a16"]["2"].weight_sqnr_db == pytest.approx(want, rel=1e-9)


def test_table_and_json_round_trip(reports, tmp_path):
    r = reports["w4a8"]
    text = str(r)
    lines = text.splitlines()
    assert "weight SQNR dB" in lines[0] and "rel err" in lines[0]
    assert any(line.startswith("(model)") for line in lines)
    assert len({len(line) for line in lines[:5]}) == 1  # aligned columns
    path = tmp_path / "r.json"
    s = r.to_json(path)
    assert json.loads(path.read_text()) == json.loads(s) == r.to_dict()
    back = ErrorReport.from_json(path)
    assert back.to_dict() == r.to_dict()
    assert back.layers[1].output_sqnr_db == r.layers[1].output_sqnr_db
    assert ErrorReport.from_json(s).summary() == r.summary()
    from rich.console import Console
    con = Console(width=200, record=True)
    con.print(r)
    assert "out SQNR dB" in con.export_text()


def test_exact_match_is_inf_and_json_null(fp_and_inputs):
    fp, x = fp_and_inputs
    q = kquant.quantize_(copy.deepcopy(fp), "w8a16", progress=False)
    fp2 = copy.deepcopy(fp)
    with torch.no_grad():
        for name in ("0", "2", "4"):
            fp2.get_submodule(name).weight.copy_(q.get_submodule(name).dequantize_weight())
    r = kquant.error_report(fp2, q, x)
    assert all(row.weight_sqnr_db == math.inf for row in r.layers)
    d = json.loads(r.to_json())
    assert d["layers"][0]["weight_sqnr_db"] is None
    back = ErrorReport.from_dict(d)
    assert back.layers[0].weight_sqnr_db == math.inf
    assert "inf" in str(r)
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf


def test_minus_inf_round_trip():
    row = kquant.report.LayerError("a", "w8a8", 8, -1, True, "dynamic", 10, 40, 30.0, -math.inf, math.inf, 1)
    r = ErrorReport([row], math.inf, 0.0, 1)
    back = ErrorReport.from_json(r.to_json())
    assert back.layers[0].output_sqnr_db == -math.inf and back.layers[0].rel_error == math.inf
    assert back.model_output_sqnr_db == math.inf and back.model_rel_error == 0.0


class KwModel(nn.Module):
    """A transformers-like model: keyword inputs, an output object with last_hidden_state."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, input_embeds, scale=1.0):
        h = self.proj(input_embeds) * scale
        h = self.proj(torch.tanh(h))  # a shared layer runs twice per forward
        return {"last_hidden_state": self.out(h), "aux": [h]}


def test_input_forms_and_shared_layer():
    fp = KwModel().eval()
    q = kquant.quantize_(copy.deepcopy(fp), "w8a8", progress=False)
    x = torch.randn(2, 5, 32)
    r_dict = kquant.error_report(fp, q, {"input_embeds": x})
    assert r_dict["proj"].calls == 2 and r_dict["out"].calls == 1
    assert r_dict.model_rel_error is not None and r_dict.model_rel_error < 0.05
    r_tuple = kquant.error_report(fp, q, (x, 1.0))  # a tuple is one batch of positional args
    assert r_tuple.num_batches == 1
    assert r_tuple["out"].rel_error == pytest.approx(r_dict["out"].rel_error, rel=1e-9)
    r_gen = kquant.error_report(fp, q, ({"input_embeds": x[i:i + 1]} for i in range(2)))
    assert r_gen.num_batches == 2 and r_gen["proj"].calls == 4


def test_non_tensor_output_has_no_model_row():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            return (self.a(x), "text")

    fp = TupleOut()
    q = kquant.quantize_(copy.deepcopy(fp), "w8a16", progress=False)
    r = kquant.error_report(fp, q, torch.randn(3, 8))
    assert r.model_output_sqnr_db is None and r.model_rel_error is None
    assert r["a"].output_sqnr_db > 30
    assert json.loads(r.to_json())["summary"]["model_rel_error"] is None


def test_modes_restored(fp_and_inputs):
    fp, x = fp_and_inputs
    fp = copy.deepcopy(fp).train()
    q = kquant.quantize_(copy.deepcopy(fp), "w8a16", progress=False)
    kquant.error_report(fp, q, x)
    assert fp.training and q.training


def test_mismatch_errors(fp_and_inputs):
    fp, x = fp_and_inputs
    q = kquant.quantize_(copy.deepcopy(fp), "w8a16", progress=False)
    with pytest.raises(ValueError, match="same object"):
        kquant.error_report(q, q, x)
    q2 = kquant.quantize_(copy.deepcopy(fp), "w8a16", progress=False)
    with pytest.raises(ValueError, match="already a QuantLinear"):
        kquant.error_report(q2, q, x)
    with pytest.raises(ValueError, match="no kquant.QuantLinear"):
        kquant.error_report(fp, copy.deepcopy(fp), x)
    other = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 32))
    with pytest.raises(ValueError, match=r"layer '2'.*\[128, 256\]"):
        kquant.error_report(other, q, x)
    short = nn.Sequential(nn.Linear(128, 256), nn.GELU())
    with pytest.raises(ValueError, match="layer '2'.*no module"):
        kquant.error_report(short, q, x)
    wrong_type = copy.deepcopy(fp)
    wrong_type[4] = nn.Identity()
    with pytest.raises(ValueError, match="layer '4'.*Identity"):
        kquant.error_report(wrong_type, q, x)
    with pytest.raises(ValueError, match="no batch"):
        kquant.error_report(fp, q, [])
    with pytest.raises(TypeError):
        kquant.error_report(fp, q, 3)
