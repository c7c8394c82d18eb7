#!/usr/bin/env bash
# Runs the CPU benchmark suite in its three configurations and writes the ## CPU section
# of bench/RESULTS.md (+ bench/cpu_speedup.png). Usage: bench/run_cpu.sh [python]
#  1. all threads, wall clock (what a user sees; noisy when the machine is shared)
#  2. one thread, CPU time (per-core numbers that other processes barely disturb)
#  3. as 2 on an emulated small-cache AVX2-only machine: kquant (KQUANT_CPU_ISA=avx2), fbgemm
#     (FBGEMM_ENABLE_INSTRUCTIONS), MKL (MKL_ENABLE_INSTRUCTIONS) and oneDNN
#     (ONEDNN_MAX_CPU_ISA) all held to AVX2, like the machines without AVX-512/AMX, and
#     kquant's blocking sized for a 512 KiB L2 / 32 MiB L3 (KQUANT_CPU_CACHE; fbgemm, MKL
#     and oneDNN have no such switch and keep the caches they detect). The report states
#     every kquant cell of this run as a % of the ceilings measured in it. The whole suite
#     runs but torch._int_mm (no target, and slow without AVX-512: ~0.5 s for one row of
#     4096x11008 on a Zen 2); the AMX ceilings skip themselves when kquant is held below AMX.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=${KQUANT_BENCH_OUT:-bench/results}
export KQUANT_BENCH_SECONDS=${KQUANT_BENCH_SECONDS:-0.3}
mkdir -p "$OUT"
uptime | tee "$OUT/uptime_before.txt"
"$PY" -m pytest bench/ --benchmark-only -q --benchmark-json="$OUT/cpu_all_threads.json"
KQUANT_BENCH_THREADS=1 "$PY" -m pytest bench/ --benchmark-only -q --benchmark-timer=time.process_time \
  --benchmark-json="$OUT/cpu_1thread_cputime.json"
KQUANT_CPU_ISA=avx2 KQUANT_CPU_CACHE="l2=512K,l3=32M" \
  FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  KQUANT_BENCH_THREADS=1 "$PY" -m pytest bench/ --benchmark-only -q --benchmark-timer=time.process_time \
  -k "not int_mm" --benchmark-json="$OUT/cpu_1thread_cputime_avx2_only.json"
uptime | tee "$OUT/uptime_after.txt"
"$PY" bench/report.py "$OUT/cpu_1thread_cputime.json" "$OUT/cpu_all_threads.json" \
  "$OUT/cpu_1thread_cputime_avx2_only.json" --preamble bench/cpu_preamble.md
