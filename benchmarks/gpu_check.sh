#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests, then the kernel benchmark; everything lands under $OUT.
# Run from the repo root: `bash benchmarks/gpu_check.sh`. Needs no network and installs nothing.
set -uo pipefail
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONPATH=.
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
timeout 300 python3 -m pytest -m gpu tests/kernels tests/test_engine_gpu.py -q -rs -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
tests_rc=$?
timeout 240 python3 benchmarks/kernels.py --no-quick --out "$OUT/kernels.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
cat "$OUT/machine.txt"
echo "--- pytest -m gpu (rc=$tests_rc): $(tail -n 1 "$OUT/pytest_gpu.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -20
echo "--- benchmark (rc=$bench_rc)"
tail -n 40 "$OUT/bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
