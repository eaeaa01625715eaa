#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests, decode steps with CUDA graphs on and off (128 sequences, 64 LoRA
# adapters, random ~1.1B Llama), the offline throughput benchmark on that Llama (bf16) with up to 2,048 LoRA
# adapters against PEFT and merge-and-swap, then the kernel benchmark (about 9 minutes at most). Everything lands
# under $OUT (progress lines as they come, so a timeout still returns what finished).
# Run from the repo root: `bash benchmarks/gpu_check.sh`. Needs no network and installs nothing.
set -uo pipefail
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
# Quiver is not installed there (no registry): the `quiver` package that pyproject.toml's package-dir maps out of
# the repository's folders is made of links, and put on the path with the repository (for benchmarks, tests).
PKG="$(mktemp -d)"
mkdir "$PKG/quiver"
ln -s "$PWD"/server/* "$PKG/quiver/"
ln -s "$PWD/kernels" "$PWD/trainer" "$PWD/deploy" "$PKG/quiver/"
ln -s "$PWD/protos/quiver/v1" "$PKG/quiver/v1"
export PYTHONPATH="$PKG:$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/machine.txt" 2>&1
timeout 170 python3 -m pytest -m gpu tests/kernels tests/test_engine_gpu.py -q -rs -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
tests_rc=$?
timeout 120 python3 -m benchmarks.decode_graphs --out "$OUT/decode_graphs.json" > "$OUT/decode_graphs.log" 2>&1
graphs_rc=$?
timeout 200 python3 -m benchmarks.offline --random-llama --requests 128 --new-tokens 32 \
  --adapters 0,1,64,2048 --laws uniform,zipf --slots 128 --max-num-seqs 128 --max-num-batched-tokens 4096 \
  --kv-cache-gib 24 --host-cache-mib 65536 --baseline-requests 64 --check-sample 4 --repeats 1 --cached-at '' \
  --out "$OUT/offline_gpu.json" > "$OUT/offline.log" 2>&1
offline_rc=$?
timeout 70 python3 -m benchmarks.kernels --no-quick --out "$OUT/kernels.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
cat "$OUT/machine.txt"
echo "--- pytest -m gpu (rc=$tests_rc): $(tail -n 1 "$OUT/pytest_gpu.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -20
echo "--- decode steps, CUDA graphs on and off (rc=$graphs_rc)"
python3 -c "import json; r = json.load(open('$OUT/decode_graphs.json')); [print(f'{m:7s} {r[m][\"step_ms\"]:8.2f} ms/step {r[m][\"tok_s\"]:9.0f} tok/s  graphs {r[m][\"graphs\"]}') for m in ('eager', 'graphs') if m in r]; print('speedup', round(r.get('speedup', 0), 2), 'same tokens', r.get('same_tokens'))" 2>&1 || tail -n 5 "$OUT/decode_graphs.log"
echo "--- offline, random 1.1B Llama (rc=$offline_rc)"
grep -vE "Warning|warn|Loading" "$OUT/offline.log" | tail -n 22
echo "--- kernel benchmark (rc=$bench_rc)"
tail -n 30 "$OUT/bench.log"
exit $(( tests_rc != 0 || graphs_rc != 0 || offline_rc != 0 || bench_rc != 0 ))
