"""The least time any system could take for `benchmarks.serving`'s workload on this machine, and so the largest
`ratio` and `vs_peft` reachable against the baselines' times of a serving run.

The work is counted from the model and the prompts, not from any engine: the linear layers' multiply-adds of
every prompt token the engine must compute (prefix caching shares the prompts' common first blocks) and of every
decode row, the LM head of every sampled row, and attention's products. It is divided by the fastest rate this
machine's GEMMs reach on the model's own weight shapes (`F.linear`'s MKL or oneDNN's packed linears, alone, the
best of the model's projection shapes at the prefill chunk's and the decode batch's rows). A decode step cannot
be faster than reading the weights it uses either: the base model's, and with one distinct LoRA adapter per
sequence, every adapter's (r=16 on all linear layers, as serving.py loads them), at the memory bandwidth measured
here. So:

    base floor = prefill FLOPs / peak + sum over decode steps of max(step FLOPs / peak, step bytes / bandwidth)
    ratio ≤ transformers' seconds / base floor;   vs_peft ≤ PEFT's seconds / LoRA floor

    python -m benchmarks.serving_floor --serving benchmarks/records/cpu-2026-11-29/serving-57864fd.json
"""

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import data, machine
from quiver.config import ModelConfig, default_cache_dir
from quiver.kernels import packed_linear
from quiver.model.loader import load_model

BLOCK = 16  # the engine's default block size: prefix caching shares whole blocks
LORA_RANK = 16


def best_rate(weights: list[torch.Tensor], rows: int) -> float:
    """The best GEMM rate (FLOP/s) over these weights at `rows` rows, of F.linear (MKL) and of oneDNN's packed
    linears (what the engine runs), each the median of 20 runs."""
    best = 0.0
    for w in weights:
        x = torch.randn(rows, w.shape[1])
        packed = packed_linear.pack(w)
        for product in [functools.partial(F.linear, weight=w)] + ([packed] if packed is not None else []):
            for _ in range(3):
                product(x)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                product(x)
                times.append(time.perf_counter() - start)
            best = max(best, 2 * rows * w.shape[0] * w.shape[1] / sorted(times)[10])
    return best


def bandwidth() -> float:
    """Bytes a second that a sum over 1 GiB of float32 reads (the best of 5)."""
    big = torch.ones(1 << 28)
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cached_tokens(prompts: list[list[int]]) -> list[int]:
    """Each prompt's tokens the engine does not compute with prefix caching: the whole blocks of the beginning it
    shares with an earlier prompt (its last token always computed)."""
    cached = []
    for i, prompt in enumerate(prompts):
        shared = 0
        for earlier in prompts[:i]:
            pairs = enumerate(zip(prompt, earlier))
            common = next((k for k, (a, b) in pairs if a != b), min(len(prompt), len(earlier)))
            shared = max(shared, common)
        cached.append(min(shared // BLOCK * BLOCK, len(prompt) - 1))
    return cached


def shapes(model) -> list[torch.Tensor]:
    """One weight of each shape the model's linear layers have, the fused q/k/v and gate/up the engine runs, and
    the LM head."""
    layer = model.get_decoder().layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    own = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    fused = [torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
             torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])]
    distinct = {tuple(w.shape): w.detach() for w in own + fused}
    return [*distinct.values(), model.get_output_embeddings().weight.detach()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serving", type=Path, default=Path("benchmarks/out/serving.json"),
                   help="a serving.py result: its workload and the baselines' times")
    args = p.parse_args()
    run = json.loads(args.serving.read_text())
    n, new, chunk = run["prompts"], run["new_tokens"], run["max_num_batched_tokens"]

    loaded = load_model(ModelConfig(cache_dir=default_cache_dir()))
    model, config = loaded.model, loaded.model.config
    prompts = data.chat_prompts(loaded.tokenizer, n)
    assert sum(map(len, prompts)) == run["prompt_tokens_min_max_sum"][2], "not the run's prompts"
    linears = [m for m in model.get_decoder().layers.modules() if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach() for m in linears]
    body_flops = sum(2 * w.numel() for w in weights)  # a token's linear layers
    head = model.get_output_embeddings().weight
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    attn = 4 * heads * dim * config.num_hidden_layers  # a token's two attention products, per entry of context
    lora_bytes = 4 * LORA_RANK * sum(w.shape[0] + w.shape[1] for w in weights)  # one adapter, fp32

    cached = cached_tokens(prompts)
    prefill_tokens = sum(map(len, prompts)) - sum(cached)
    prefill_flops = prefill_tokens * body_flops + n * 2 * head.numel()
    # causal attention of the computed prompt tokens: token t attends t + 1 entries
    prefill_flops += sum(attn * (len(q) * (len(q) + 1) - c * (c + 1)) // 2 for q, c in zip(prompts, cached))
    rate_prefill, rate_decode = best_rate(shapes(model), chunk), best_rate(shapes(model), n)
    bw = bandwidth()
    weight_bytes = 4 * (sum(w.numel() for w in weights) + head.numel())
    base_floor = lora_floor = prefill_flops / rate_prefill
    lora_floor += n * lora_bytes / bw  # every adapter's weights read at least once in the prefill
    for step in range(1, new):  # decode steps: n rows each, the context one longer each step
        flops = n * (body_flops + 2 * head.numel()) + attn * sum(len(q) + step for q in prompts)
        compute = flops / rate_decode
        base_floor += max(compute, weight_bytes / bw)
        lora_floor += max(compute, (weight_bytes + n * lora_bytes) / bw)

    total = n * new
    hf_s, peft_s = total / run["hf_tok_s"], total / run["peft_tok_s"]
    engine_s, lora_s = total / run["engine_tok_s"], total / run["lora_tok_s"]
    decode_flops = (new - 1) * n * (body_flops + 2 * head.numel())
    result = {
        "serving_run": str(args.serving), "prompt_tokens": sum(map(len, prompts)),
        "prompt_tokens_computed": prefill_tokens,
        "gemm_gflop_s": {"prefill_rows": round(rate_prefill / 1e9, 1), "decode_rows": round(rate_decode / 1e9, 1)},
        "bandwidth_gb_s": round(bw / 1e9, 1), "tflop": round((prefill_flops + decode_flops) / 1e12, 2),
        "adapter_mb": round(lora_bytes / 1e6, 1),
        "base_floor_s": round(base_floor, 2), "lora_floor_s": round(lora_floor, 2),
        "engine_s": round(engine_s, 2), "engine_lora_s": round(lora_s, 2),
        "hf_s": round(hf_s, 2), "peft_s": round(peft_s, 2),
        "ratio_measured": round(run["ratio"], 2), "ratio_at_floor": round(hf_s / base_floor, 2),
        "vs_peft_measured": round(run["vs_peft"], 2), "vs_peft_at_floor": round(peft_s / lora_floor, 2),
        "machine": machine.describe(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
