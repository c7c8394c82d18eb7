"""bench/report.py on a tiny synthetic pytest-benchmark JSON: the AVX2 run's per-cell
percentages of the ceilings and its targets table are computed from the JSON."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CEIL = {"int16_vpmaddwd": 100.0, "sign_vpmaddubsw": 80.0, "w4a8_vpmaddubsw": 200.0, "fbgemm_style": 120.0,
        "fp32_fma_avx2": 50.0, "read_16MiB": 20.0}


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(REPO, "bench", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(kind, t, **extra):
    return {"stats": {"min": t}, "extra_info": dict(kind=kind, **extra)}


def linear(k, n, m, impl, gmacs):
    """A Linear case timed to run at `gmacs` GMAC/s."""
    wb = k * n // 2 if impl in ("kquant_w4a8", "kquant_w4a16") else 4 * k * n if impl == "fp32" else k * n
    return bench("linear", m * k * n / gmacs / 1e9, K=k, N=n, M=m, impl=impl, macs=m * k * n, weight_bytes=wb)


def run_json(tmp_path, isa="avx2", w8a8_minilm=75.0, name="run.json"):
    bs = [bench("ceiling", 1.0, name=c, value=v) for c, v in CEIL.items()]
    # W8A8 at M >= 128, incl. the three MiniLM shapes at M = 2048
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        bs.append(linear(k, n, 2048, "kquant_w8a8", w8a8_minilm))
    bs.append(linear(384, 1536, 128, "kquant_w8a8", 90.0))
    # M = 1: W8A8 on the sign trick, 4 GMAC/s = 4 GB/s of int8 weights; W4A16 0.8x as fast
    bs.append(linear(4096, 4096, 1, "kquant_w8a8", 4.0))
    bs.append(linear(4096, 4096, 1, "kquant_w4a16", 3.2))
    # weight-only against fp32 at M = 2 and 16 (W4A16 slower than fp32 at M = 16)
    for m, fp, w8, w4 in ((2, 10.0, 20.0, 15.0), (16, 30.0, 40.0, 24.0)):
        bs += [linear(4096, 4096, m, "fp32", fp), linear(4096, 4096, m, "kquant_w8a16", w8),
               linear(4096, 4096, m, "kquant_w4a16", w4)]
    bs += [bench("minilm", 1.0, impl="fp32", mean_cosine=1.0, min_cosine=1.0),
           bench("minilm", 0.4, impl="kquant_w8a8", mean_cosine=0.998, min_cosine=0.99),
           bench("minilm", 0.5, impl="kquant_w4a8", mean_cosine=0.94, min_cosine=0.8)]
    info = {"kquant": {"isa": isa, "cpu_model": "test CPU", "kquant_cpu_cache_env": "l2=512K,l3=32M",
                       "cache_sizes": {"l1": 32768, "l2": 524288, "l3": 32 << 20},
                       "cache_sizes_detected": {"l1": 32768, "l2": 1 << 20, "l3": 16 << 20}}}
    p = tmp_path / name
    p.write_text(json.dumps({"machine_info": info, "datetime": "2026-01-01T00:00:00", "benchmarks": bs}))
    return str(p)


def targets_of(rep, path):
    d, lin, mini, ceil, cold = rep.load(path)
    return {row[0]: row[1:] for row in rep.avx2_targets(d, lin, mini, ceil, cold)}


def find(rows, prefix):
    hits = [v for k, v in rows.items() if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(rows))
    return hits[0]


def test_avx2_targets_are_computed(tmp_path):
    rep = load_report()
    rows = targets_of(rep, run_json(tmp_path))
    measured, met = find(rows, "W8A8 M >= 128")
    assert met and "min 75% (" in measured and "max 90% (384x1536 M=128)" in measured
    assert find(rows, "MiniLM W8A8 >= 2.0x") == ("2.50x", True)
    assert find(rows, "MiniLM W4A8 >= 2.3x") == ("2.00x", False)
    measured, met = find(rows, "W8A16 2 <= M <= 128")
    assert met and "min 1.33x (4096x4096 M=16)" in measured and "max 2.00x (4096x4096 M=2)" in measured
    measured, met = find(rows, "W4A16 2 <= M <= 128")
    assert not met and "below: 4096x4096 M=16 0.80x" in measured
    assert find(rows, "W4A16 M=1") == ("4096x4096: 0.80x", False)

    # one MiniLM shape below 70%: not met, and named
    rows = targets_of(rep, run_json(tmp_path, w8a8_minilm=65.0, name="slow.json"))
    measured, met = find(rows, "W8A8 M >= 128")
    assert not met and "384x384 M=2048 65%" in measured


def test_avx2_cells_state_percent_of_their_ceiling(tmp_path):
    rep = load_report()
    path = run_json(tmp_path)
    text = "\n".join(rep.section(path, *rep.load(path), None))
    assert "kquant ISA: **avx2**" in text and "L3 32 MiB (KQUANT_CPU_CACHE=l2=512K,l3=32M" in text
    assert "detected L1 32 KiB, L2 1 MiB, L3 16 MiB" in text
    assert "AVX2 targets in this run" in text
    # W8A8 at M = 2048 against int16 (75 of 100), at M = 1 against the sign trick (4 of 80) and
    # 4 GB/s of weights against read_16MiB's 20; W8A16 against the fp32 FMA ceiling (40 of 50)
    assert "(75, 75%)" in text
    assert "(4.0, 5%; 4.0 GB/s, 20%)" in text
    assert "(40, 80%)" in text


def test_other_levels_have_no_avx2_table(tmp_path):
    rep = load_report()
    path = run_json(tmp_path, isa="amx")
    text = "\n".join(rep.section(path, *rep.load(path), None))
    assert "AVX2 targets" not in text and "| eff |" in text and "(75, 75%)" not in text


@pytest.mark.parametrize("desc,isa", [("C++ kernels, AVX2+FMA", "avx2"),
                                      ("C++ kernels, AVX2+FMA, AVX-512 VNNI, AMX (int8 GEMMs)", "amx")])
def test_isa_of_runs_recorded_before_it_was(desc, isa):
    assert load_report().run_isa({"machine_info": {"kquant": {"kquant_cpu": desc}}}) == isa


def test_main_writes_only_the_cpu_section(tmp_path):
    rep = load_report()
    out = tmp_path / "RESULTS.md"
    out.write_text("## CPU\n\nold\n\n## GPU\n\nkept\n")
    rep.main([run_json(tmp_path), "--out", str(out), "--png", str(tmp_path / "c.png")])
    text = out.read_text()
    assert "old" not in text and "## GPU\n\nkept" in text and "MiniLM W4A8 >= 2.3x fp32 | 2.00x | **no**" in text
