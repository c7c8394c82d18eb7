"""`kquant demo-train --ddp`: DDP on 2 gloo processes, gradients all-reduced in fp32, fp16 and
kquant's quantized hook. One short real run (2 epochs) is shared by the tests."""
import importlib.util
import json
import multiprocessing
import os

import pytest

from kquant import demo_ddp
from kquant.cli import main
from kquant.demo import DemoError

HAVE_DISTRIBUTED = importlib.util.find_spec("kquant.distributed") is not None
QUICK_BITS = (8, 2) if HAVE_DISTRIBUTED else ()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    report = demo_ddp.run_ddp(epochs=2, bits=QUICK_BITS, seed=0, timeout=120)
    out = tmp_path_factory.mktemp("ddp")
    paths = demo_ddp.write_outputs(report, str(out))
    return report, paths


def _rows(report):
    return {r["config"]: r for r in report["rows"]}


def test_baseline_rows(quick):
    report, _ = quick
    rows = _rows(report)
    assert list(rows)[:2] == ["fp32", "fp16"]
    assert report["world_size"] == 2 and report["model"]["parameters"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    n_train = report["dataset"]["train"]
    for r in rows.values():
        assert len(r["curve"]) == 2 and r["accuracy"] == r["curve"][-1]
        assert r["accuracy"] > 0.7, r  # fp32 reaches ~0.85 after 2 epochs
        assert r["steps"] == 2 * -(-n_train // 64) and r["seconds"] > 0
    fp32 = rows["fp32"]
    assert fp32["bytes_per_step"] == 2 * (2 - 1) / 2 * fp32["gradient_elements"] * 4
    assert fp32["ratio_vs_fp32"] == 1.0 and fp32["delta_points"] == 0.0
    assert rows["fp16"]["ratio_vs_fp32"] == 0.5
    # same weights, same batches: fp16 gradients barely move the accuracy
    assert abs(rows["fp16"]["delta_points"]) < 5


def test_kquant_rows(quick):
    pytest.importorskip("kquant.distributed")
    report, _ = quick
    rows = _rows(report)
    assert set(rows) == {"fp32", "fp16", "kquant-8bit", "kquant-2bit"}
    for name, limit in (("kquant-8bit", 0.3), ("kquant-2bit", 0.1)):
        r = rows[name]
        assert r["hook_steps"] == r["steps"], r
        assert 0 < r["ratio_vs_fp32"] < limit, r
        assert r["accuracy"] > 0.6, r
        # the hook's own fp32 reference agrees with the ring formula
        assert r["hook_fp32_bytes_per_step"] == pytest.approx(r["fp32_bytes_per_step"], rel=1e-6), r
    assert rows["kquant-2bit"]["bytes_per_step"] < rows["kquant-8bit"]["bytes_per_step"]


def test_outputs_written(quick):
    report, paths = quick
    with open(paths["json"], encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["rows"] == report["rows"] and "cpu" in saved["environment"]
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from rich.console import Console
    console = Console(record=True, width=140)
    console.print(demo_ddp.render_table(report))
    text = console.export_text()
    assert "fp16" in text and "0.500" in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(epochs=1, bits=(3,)), "bits must be among"),
    (dict(epochs=1, timeout=0), "timeout"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(DemoError, match=match):
        demo_ddp.run_ddp(**kwargs)


def test_child_exception_is_reported_with_its_traceback():
    from kquant.digits import load_data
    with pytest.raises(DemoError, match="(?s)failed.*Traceback.*unknown config 'nosuch'"):
        demo_ddp._launch(["nosuch"], load_data(0), epochs=1, seed=0, timeout=60)
    assert not multiprocessing.active_children()


def test_timeout_kills_the_processes():
    from kquant.digits import load_data
    with pytest.raises(DemoError, match="timed out: config 'fp32' did not finish within 0.01 s"):
        demo_ddp._launch(["fp32"], load_data(0), epochs=1, seed=0, timeout=0.01)
    assert not multiprocessing.active_children()


def test_cli_ddp(quick, monkeypatch, tmp_path, capsys):
    report, _ = quick
    calls = []

    def fake_run(epochs, bits, seed, progress, timeout):
        calls.append(dict(epochs=epochs, bits=tuple(bits), seed=seed))
        return report

    monkeypatch.setattr(demo_ddp, "run_ddp", fake_run)
    monkeypatch.chdir(tmp_path)
    assert main(["demo-train", "--ddp", "--epochs", "3", "--seed", "5", "--no-progress"]) == 0
    assert calls == [dict(epochs=3, bits=(8, 4, 2), seed=5)]
    assert os.path.isfile(tmp_path / "kquant-demo-ddp" / "results.json")
    assert os.path.isfile(tmp_path / "kquant-demo-ddp" / "curves.png")
    assert "kquant DDP" in capsys.readouterr().out
    assert main(["demo-train", "--ddp", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert calls[-1]["epochs"] == 30 and os.path.isfile(tmp_path / "o" / "results.json")


def test_cli_ddp_bad_epochs(capsys, tmp_path):
    assert main(["demo-train", "--ddp", "--epochs", "0", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--epochs must be an integer >= 1" in capsys.readouterr().err


def test_cli_epochs_needs_ddp(capsys, tmp_path):
    assert main(["demo-train", "--epochs", "3", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--epochs is for --ddp" in capsys.readouterr().err
