"""Decode steps with CUDA graphs and without: the same engine, model and requests, `--enforce-eager` on and off.

A random-weight Llama (the ~1.1B of `benchmarks.offline --random-llama`, bf16) decodes 128 sequences, each with
its own of 64 LoRA adapters (benchmarks.lora_bank: ranks 8-64 on q_proj and v_proj), two sequences an adapter
(`--adapters 0`: the base model). Every prompt is computed first; then `--steps` decode steps are timed one by
one (each ends reading its sampled tokens back, so a step's time is its whole time) and the median is reported,
with tokens per second (sequences / median step). Both modes' greedy tokens must be equal.

    python -m benchmarks.decode_graphs                     # on the GPU machine (benchmarks/gpu_check.sh runs it)
    python -m benchmarks.decode_graphs --layers 2 --sequences 8 --adapters 4   # a CPU smoke run: eager only
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from benchmarks import lora_bank, machine
from benchmarks.offline import RANDOM_LLAMA, random_llama
from quiver.config import EngineConfig
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.model.loader import LoadedModel


def run(loaded: LoadedModel, *, enforce_eager: bool, sequences: int, adapters: int, steps: int) -> dict:
    """The median decode step (ms) and every sequence's tokens, for one mode."""
    config = EngineConfig(max_num_seqs=sequences, max_num_batched_tokens=4096, adapter_slots=max(1, adapters),
                          max_lora_rank=64, kv_cache_bytes=4 << 30, enforce_eager=enforce_eager,
                          enable_prefix_caching=False)
    engine = Engine(loaded, config)
    for i in range(adapters):
        engine.register_adapter(lora_bank.name_of(i), lora_bank.weights(loaded.model.config, i), source=None)
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
    for s in range(sequences):
        prompt = [rng.randrange(3, loaded.model.config.vocab_size) for _ in range(64)]
        engine.add_request(f"s{s}", prompt, params, adapter_id=lora_bank.name_of(s % adapters) if adapters else None)
    while any(not r.output_token_ids for r in engine.requests.values()):
        engine.step()  # every prompt computed: what follows are decode steps
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    tokens = {r.request_id: list(r.output_token_ids) for r in engine.requests.values()}
    graphs = engine.runner.graphs
    captured = len(graphs) if graphs is not None and graphs.enabled else 0
    return {"step_ms": 1000 * statistics.median(times), "tokens": tokens, "graphs": captured}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=RANDOM_LLAMA["num_hidden_layers"])
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "decode_graphs.json")
    args = p.parse_args()
    loaded = random_llama(args.layers)
    modes = [True] if loaded.device.type != "cuda" else [True, False]  # enforce_eager; graphs exist only on CUDA
    results = {}
    for enforce_eager in modes:
        results["eager" if enforce_eager else "graphs"] = run(
            loaded, enforce_eager=enforce_eager, sequences=args.sequences, adapters=args.adapters, steps=args.steps)
    report = {"machine": machine.describe(), "sequences": args.sequences, "adapters": args.adapters,
              "layers": args.layers, "steps": args.steps}
    for mode, r in results.items():
        report[mode] = {"step_ms": r["step_ms"], "tok_s": args.sequences / r["step_ms"] * 1000, "graphs": r["graphs"]}
    if "graphs" in results:
        report["speedup"] = results["eager"]["step_ms"] / results["graphs"]["step_ms"]
        report["same_tokens"] = results["eager"]["tokens"] == results["graphs"]["tokens"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
