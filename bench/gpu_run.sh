#!/usr/bin/env bash
# One device session: build kquant for this GPU, run the CUDA tests, then bench/gpu_check.py.
# Logs go to $OUT (or ./gpu-check). Each stage has its own time limit so a hang in one
# still leaves the others' logs. Usage: bash bench/gpu_run.sh [extra gpu_check.py args]
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
cap=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null)
[ "$cap" = 90 ] && cap=90a
export KQUANT_CUDA_ARCHS=${KQUANT_CUDA_ARCHS:-${cap:-80;90a}}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
echo "archs $KQUANT_CUDA_ARCHS; $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"

t0=$(date +%s)
if ! timeout 240 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  tail -20 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s; kernels with spills (ptxas):"
grep -E "(^|[^0-9])[1-9][0-9]* bytes spill" "$OUT/build.log" | sort | uniq -c | head -10

t0=$(date +%s)
timeout 120 $PY -m pytest -q -p no:cacheprovider -m cuda -rfE tests/test_cuda_backend.py >"$OUT/pytest.log" 2>&1
echo "pytest -m cuda: rc $? in $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | head -30

timeout 300 $PY bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log" | grep -v '^{"op"'
