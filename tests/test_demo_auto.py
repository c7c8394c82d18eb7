"""kquant demo --auto: the Pareto helpers, the outputs and the command line's errors."""
import json

import pytest

from kquant import demo_auto
from kquant.cli import main


def _pt(name, mib, cos, kind="uniform", **kw):
    return {"kind": kind, "name": name, "model_mib": mib, "stored_bits": 8 * mib / 10, "cos_mean": cos, **kw}


def test_pareto_front_keeps_the_undominated_points_by_size():
    pts = [_pt("a", 10, 0.90), _pt("b", 12, 0.89), _pt("c", 14, 0.97), _pt("d", 20, 0.999), _pt("e", 21, 0.99)]
    assert [p["name"] for p in demo_auto.pareto_front(pts)] == ["a", "c", "d"]


@pytest.mark.parametrize("mib,cos,want", [(12, 0.94, True), (12, 0.92, False), (14, 0.98, True), (14, 0.97, False),
                                          (9, 0.5, True),
                                          (25, 0.998, False), (25, 0.9995, True), (10, 0.89, False)])
def test_on_or_above_interpolates_between_front_points(mib, cos, want):
    front = demo_auto.pareto_front([_pt("a", 10, 0.90), _pt("c", 14, 0.98), _pt("d", 20, 0.999)])
    assert demo_auto.on_or_above(_pt("x", mib, cos, "auto"), front) is want


def _report():
    env = {"cpu": "test cpu", "cores": 2, "torch": "x", "git_commit": None}
    rows = [_pt("fp32", 80, 1.0, "fp32"), _pt("w4a16", 50, 0.99), _pt("w3a16", 49, 0.97),
            _pt("auto 4", 49.5, 0.985, "auto", budget_bits=4.0, layer_configs={"w4a16 g128 sym": 3},
                on_or_above_uniform_front=True)]
    for r in rows:
        r.update(code_bits=4.0, layer_mib=5.0, cos_min=r["cos_mean"] - 0.01, nn_agreement=0.9, seconds=None)
    return {"model": "m", "method": "gptq", "corpus": {"sentences": 10}, "calibration": {"sentences": 4},
            "note": "n", "environment": env, "results": rows}


def test_outputs_table_markdown_and_chart(tmp_path):
    report = _report()
    paths = demo_auto.demo.write_outputs(report, str(tmp_path), chart=demo_auto.write_chart, png="pareto.png")
    assert json.loads(open(paths["json"]).read())["method"] == "gptq"
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = demo_auto.markdown(report)
    assert "| auto 4 | 4.00 |" in md and "3 w4a16 g128 sym" in md and md.count("\n|") == 6


def test_cli_errors(capsys):
    assert main(["demo", "--budgets", "4"]) == 2
    assert "--budgets is for --auto" in capsys.readouterr().err
    assert main(["demo", "--auto", "--method", "rtn,gptq"]) == 2
    assert "one --method" in capsys.readouterr().err
    assert main(["demo", "--auto", "--budgets", "-1", "--no-progress"]) == 2
    assert "positive numbers" in capsys.readouterr().err
    assert main(["demo", "--sensitivity-sentences", "64"]) == 2
    assert "--sensitivity-sentences is for --auto" in capsys.readouterr().err
    assert main(["demo", "--auto", "--calib-sentences", "900", "--no-progress"]) == 2
    assert "has 800 sentences; the demo needs at least 902" in capsys.readouterr().err
    assert main(["demo", "--auto", "--sensitivity-sentences", "400", "--no-progress"]) == 2
    assert "--sensitivity-sentences must be an int in [1, 384]" in capsys.readouterr().err
    assert main(["demo", "--calib-sentences", "0", "--no-progress"]) == 2
    assert "--calib-sentences must be an int >= 1, got 0" in capsys.readouterr().err
