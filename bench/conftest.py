"""Shared setup for the CPU benchmarks: machine/commit/load info stored in the JSON."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# KQUANT_BENCH_THREADS=1 pins every implementation to one thread; with
# `--benchmark-timer=time.process_time` that gives per-core numbers that other
# processes sharing the machine barely disturb (CPU time, not wall time).
if os.environ.get("KQUANT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["KQUANT_BENCH_THREADS"]))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout
        # the suite's own outputs (rewritten while it runs) do not make the code dirty
        outputs = ("bench/results/", "bench/RESULTS.md", "bench/cpu_speedup.png")
        return any(not line[3:].startswith(outputs) for line in out.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def pytest_benchmark_update_machine_info(config, machine_info):
    import kquant  # only when benchmarks run
    machine_info["kquant"] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit(),
        "dirty_tree": git_dirty(),
        "timer": str(getattr(config.option, "benchmark_timer", "")),
        "fbgemm_isa": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "default (best the CPU has)"),
        "mkl_isa": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default"),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "kquant_cpu": kquant.backends()["cpu"]["reason"],
        "kquant_cpu_isa_env": os.environ.get("KQUANT_CPU_ISA", ""),
        "kquant_cpu_cache_env": os.environ.get("KQUANT_CPU_CACHE", ""),
    }
    machine_info["kquant"].update(kquant_cpu_levels())


def kquant_cpu_levels() -> dict:
    """The level and cache sizes (bytes) kquant's CPU kernels run with in this process
    (KQUANT_CPU_ISA / KQUANT_CPU_CACHE applied), and the cache sizes the CPU reports."""
    try:
        from kquant.backends import cpu
    except ImportError:
        return {}
    out = {}
    for key, fn in (("isa", lambda: cpu.isa()), ("best_isa", lambda: cpu.best_isa()),
                    ("cache_sizes", lambda: cpu.cache_sizes()),
                    ("cache_sizes_detected", lambda: cpu.cache_sizes(detected=True))):
        try:
            out[key] = fn()
        except Exception:  # an older build without the function, or no kernels: leave it out
            pass
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info"].setdefault("kquant", {})["load_end"] = list(os.getloadavg())
