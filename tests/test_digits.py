"""kquant.digits: a small MLP trained on scikit-learn's handwritten digits, quantized with every
preset and calibration method; test accuracy against fp32, and the `kquant digits` command."""
import json
import os
import subprocess
import sys

import pytest
import torch

import kquant
from kquant import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_ONLY = ("w8a16", "w4a16")


@pytest.fixture(scope="module")
def data():
    return digits.load_data(seed=0)


@pytest.fixture(scope="module")
def report():
    return digits.run(seed=0)  # every preset x method


def rows(report):
    return {(r["preset"], r["method"]): r for r in report["results"]}


def test_split_is_stratified_standardized_and_deterministic(data):
    sizes = {k: len(y) for k, (_, y) in data.items()}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1077, "calib": 180, "test": 540}
    for x, y in data.values():
        assert x.dtype == torch.float32 and x.shape[1] == 64 and y.dtype == torch.int64
    # stratified: every class keeps its share (within one image) in every split
    whole = torch.cat([y for _, y in data.values()]).bincount(minlength=10).double()
    for _, y in data.values():
        expected = whole * len(y) / whole.sum()
        assert (y.bincount(minlength=10).double() - expected).abs().max() <= 1.0
    x_train = data["train"][0]
    assert x_train.mean(0).abs().max() < 1e-5
    std = x_train.std(0, unbiased=False)
    assert ((std - 1).abs() < 1e-4).logical_or(std == 0).all()  # constant pixels are only centred
    again = digits.load_data(seed=0)
    for k in data:
        assert torch.equal(data[k][0], again[k][0]) and torch.equal(data[k][1], again[k][1])


def test_training_is_seeded_and_a_narrow_net_learns(data):
    threads = torch.get_num_threads()
    a = digits.train_mlp(data, hidden=(32,), epochs=20, seed=3)
    b = digits.train_mlp(data, hidden=(32,), epochs=20, seed=3)
    assert torch.get_num_threads() == threads  # training's single thread is restored
    assert [type(m).__name__ for m in a] == ["Linear", "ReLU", "Linear"]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert digits.accuracy(a, *data["test"]) >= 0.93


def test_fp32_accuracy(report):
    assert report["fp32_accuracy"] >= 0.95
    assert report["dataset"]["test"] == 540 and report["model"]["hidden"] == [128, 64]


def test_every_preset_and_method_is_measured(report):
    got = rows(report)
    assert set(got) == {(p, m) for p in digits.DEFAULT_PRESETS for m in digits.DEFAULT_METHODS}
    for (preset, method), r in got.items():
        if preset in WEIGHT_ONLY and method.startswith("smoothquant"):
            assert r["applicable"] is False and "int8 activations" in r["reason"]
            continue
        assert r["applicable"] is True, (preset, method)
        assert r["quantized_layers"] == 3, (preset, method)
        assert 0.9 < r["accuracy"] <= 1.0, (preset, method, r["accuracy"])
        assert r["delta_points"] == pytest.approx(100 * (r["accuracy"] - report["fp32_accuracy"]))
        assert r["calib_seconds"] > 0
    assert json.loads(json.dumps(report)) == report  # JSON-ready


def test_int8_weights_keep_fp32_accuracy(report):
    assert abs(rows(report)[("w8a8", "rtn")]["delta_points"]) <= 0.5


def test_4bit_gptq_keeps_fp32_accuracy(report):
    assert abs(rows(report)[("w4a16", "gptq")]["delta_points"]) <= 0.5


def test_render_table_has_a_row_per_result(report):
    table = digits.render_table(report)
    assert table.row_count == len(report["results"])


def test_smoothquant_on_a_weight_only_preset_raises(data):
    model = digits.train_mlp(data, hidden=(32,), epochs=2)
    with pytest.raises(ValueError, match="SmoothQuant"):
        kquant.quantize_(model, "w4a16", method="smoothquant", calib_data=digits.calib_batches(data), progress=False)
    assert not any(isinstance(m, kquant.QuantLinear) for m in model.modules())
    from kquant.calibration.methods import applicable
    assert not applicable(["smoothquant", "gptq"], "w4a16") and applicable(["smoothquant", "gptq"], "w4a8")


def test_unknown_names_fail_before_training():
    with pytest.raises(ValueError, match="unknown calibration method 'foo'"):
        digits.run(methods=["rtn", "awq+foo"])
    with pytest.raises(ValueError, match="unknown preset 'w3a3'"):
        digits.run(presets=["w3a3"])
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        digits.run(threads=0)


def test_cli_digits(tmp_path, report):
    out = tmp_path / "digits"
    p = subprocess.run([sys.executable, "-m", "kquant", "digits", "--presets", "w8a8", "--methods", "rtn,gptq",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "kquant digits" in p.stdout and "results.json" in p.stdout
    with open(out / "results.json", encoding="utf-8") as f:
        got = json.load(f)
    # same seed, same single-thread training: the same network as the in-process run
    assert got["fp32_accuracy"] == report["fp32_accuracy"]
    assert [(r["preset"], r["method"]) for r in got["results"]] == [("w8a8", "rtn"), ("w8a8", "gptq")]
    for r in got["results"]:
        assert r["accuracy"] == rows(report)[(r["preset"], r["method"])]["accuracy"]
        assert r["quantized_layers"] == 3


def test_cli_digits_rejects_an_unknown_method(tmp_path, capsys):
    from kquant.cli import main
    assert main(["digits", "--methods", "gptq+awq", "--out", str(tmp_path / "x")]) == 2
    assert "must come before" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
