"""Offline throughput against the number of distinct LoRA adapters, and against what users would run instead.

One run, the same requests everywhere, outputs checked. The default requests are chat turns from the
chatterbot corpus: the question as the prompt, and as many output tokens as the corpus answer has (2..128, so
lengths vary as in chat traffic; static batches run until their longest request is done). `--data tweets`
gives long prompts of 1..4 tweets with --new-tokens each instead (no static-batching waste at all).

  - Quiver with 0 (base model), 1, 8, 64, 512 and 2,048 LoRA adapters (ranks 8-64 mixed, q_proj and v_proj
    of every layer), each request's adapter drawn uniformly or by a zipf law (alpha 1) from the first n.
    More adapters than device slots, and a host cache smaller than the bank, so eviction and re-reading
    from disk happen while serving;
  - PEFT `generate(adapter_names=...)` in static batches, and "merge and swap" with PEFT's merge, on the
    64-adapter uniform request set (every output compared with Quiver's);
  - transformers `generate()` without adapters (compared with Quiver's base run);
  - for the other adapter counts, a sample of requests is re-run through PEFT and compared.

The sweep over adapter counts runs without prefix caching, like the peers: a cached run of one adapter reuses
the chat template's system prompt on nearly every request, which requests for distinct adapters cannot (their
KV differs), so with caching the sweep would measure the workload's prompt sharing rather than the cost of
serving many adapters. A few counts (--cached-at) are run again with prefix caching, as served by default.
Each configuration runs --repeats times with a new draw of adapters each time (the same prompts; new adapters
come from disk); the fastest repetition counts, as timing noise on a shared machine only ever slows a run.

    python -m benchmarks.offline                 # default model, 256 chat requests (~30 min here)
    python -m benchmarks.offline --quick         # 64 requests, 0/1/64/512 adapters, uniform, once (~5 min)
    python -m benchmarks.offline --data tweets   # 128 long prompts x 32 new tokens each
    python -m benchmarks.offline --random-llama  # GPU: a random-weight ~1.1B Llama in bf16, adapters in memory
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks import baselines, data, lora_bank, machine
from quiver.config import EngineConfig, ModelConfig, default_cache_dir
from quiver.engine import openmp
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.engine.service import EngineService
from quiver.model.loader import LoadedModel, load_model

# ~1.1B parameters (TinyLlama's shape): 22 layers of hidden 2048, GQA with 4 KV heads
RANDOM_LLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def popularity(n: int, law: str, count: int, seed: int = 0) -> list[int]:
    """`count` adapter indices in [0, n): uniform, or zipf (P(k) ~ 1/(k+1)) over a shuffled order."""
    rng = random.Random(seed * 7919 + n)
    if law == "uniform":
        return [rng.randrange(n) for _ in range(count)]
    order = list(range(n))
    rng.shuffle(order)  # the popular adapters are not always the low-numbered ones
    return [order[k] for k in rng.choices(range(n), weights=[1 / (k + 1) for k in range(n)], k=count)]


def load_base(args) -> tuple[LoadedModel, list[list[int]], list[int], int]:
    """The served model, the prompts, each request's output length and the pad id."""
    if not args.random_llama:
        loaded = load_model(ModelConfig(cache_dir=default_cache_dir()))
        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if args.data == "tweets":
            prompts = data.chat_prompts(tok, args.requests, max_tweets=args.max_tweets)
            return loaded, prompts, [args.new_tokens] * len(prompts), pad
        pairs = data.chatterbot_requests(tok, args.requests, max_output=128)
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)) for q, _ in pairs]
        return loaded, prompts, [n for _, n in pairs], pad
    loaded = random_llama(args.layers)
    rng = random.Random(0)
    vocab = loaded.model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(32, 512))] for _ in range(args.requests)]
    return loaded, prompts, [args.new_tokens] * len(prompts), 0


def random_llama(layers: int) -> LoadedModel:
    """The random-weight ~1.1B Llama (RANDOM_LLAMA with `layers` layers), bf16, on CUDA if there is one."""
    from transformers import LlamaConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(**(RANDOM_LLAMA | {"num_hidden_layers": layers}))
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, path=Path("random-llama"), device=device, dtype=torch.bfloat16)


def reference_model(args, loaded: LoadedModel):
    """A second, plain transformers copy of the base (sdpa attention), for the baselines."""
    if not args.random_llama:
        return AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    with loaded.device:
        model = AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.bfloat16, attn_implementation="sdpa")
    served = loaded.model.state_dict()  # Quiver wraps each linear layer: its weight is <layer>.base_layer.weight
    model.load_state_dict({k.replace(".base_layer.", "."): v for k, v in served.items()})
    return model.eval().requires_grad_(False)


def register_bank(service: EngineService, args, model_config) -> dict:
    """Adapters 0..max-1 into the engine: from disk (CPU: host cache trimmed, re-read on use) or from memory."""
    n = max(args.adapters)
    start = time.perf_counter()
    if args.random_llama:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for i in range(n):
            service.register_adapter(lora_bank.name_of(i), lora_bank.weights(model_config, i, device))
    else:
        root = args.bank_dir / f"{model_config.model_type}-{model_config.hidden_size}x{model_config.num_hidden_layers}"
        paths = lora_bank.on_disk(model_config, root, n)
        made = time.perf_counter()
        print(f"bank: {n} adapters under {root} ({made - start:.0f} s)", flush=True)
        for i, path in enumerate(paths):
            service.load_adapter(lora_bank.name_of(i), path)
    return {"adapters_registered": n, "register_s": time.perf_counter() - start}


def run_quiver(service: EngineService, prompts, lengths, ids: list[int | None], cached: bool) -> tuple[list[list[int]], float, dict]:
    engine = service.engine
    scheduler = engine.scheduler
    before = (engine.adapters.num_evictions, engine.adapters.num_reads, scheduler.num_preemptions,
              scheduler.prefix_cache_hit_tokens)
    service.reset_prefix_cache()  # cold: each run reuses only what its own requests share
    scheduler.prefix_caching = cached  # the engine is idle between runs: nothing reads the flag now
    openmp.release_thread_pool()  # this thread's baseline work made an OpenMP team: free it (openmp.py)
    start = time.perf_counter()
    streams = service.submit_many(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths],
                                  adapter_ids=[None if i is None else lora_bank.name_of(i) for i in ids])
    tokens = [[t for out in stream for t in out.new_token_ids] for stream in streams]
    seconds = time.perf_counter() - start
    counters = {"device_evictions": engine.adapters.num_evictions - before[0],
                "disk_reads": engine.adapters.num_reads - before[1],
                "preemptions": scheduler.num_preemptions - before[2],
                "prefix_cache_hit_tokens": scheduler.prefix_cache_hit_tokens - before[3]}
    return tokens, seconds, counters


def same(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 requests; 0, 1, 64, 512 adapters, uniform, once, no cached runs")
    p.add_argument("--data", choices=["chatterbot", "tweets"], default="chatterbot")
    p.add_argument("--random-llama", action="store_true", help="a random ~1.1B Llama, bf16 (meant for the GPU)")
    p.add_argument("--layers", type=int, default=RANDOM_LLAMA["num_hidden_layers"], help="of the random Llama")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool (default: 1 GiB on CPU, 90%% of free GPU memory)")
    p.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 8, 64, 512, 2048])
    p.add_argument("--laws", type=lambda s: s.split(","), default=["uniform", "zipf"])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32, help="per request, with --data tweets or --random-llama")
    p.add_argument("--max-tweets", type=int, default=4, help="tweets per prompt: 1..N, sets the prompt lengths")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--slots", type=int, default=64, help="LoRA adapters on the device at once")
    p.add_argument("--host-cache-mib", type=int, default=1024, help="parsed adapters kept in host memory")
    p.add_argument("--baselines-at", type=int, default=64, help="adapter count for PEFT and merge-and-swap")
    p.add_argument("--no-baselines", action="store_true", help="Quiver's runs only (no peers, no output checks)")
    p.add_argument("--cached-at", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="adapter counts run again with prefix caching, first law only ('' for none; default: 0, 1 and "
                        "the largest of --adapters)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration, each with a new draw of adapters")
    p.add_argument("--baseline-requests", type=int, default=0, help="run the baselines on the first N requests (0: all)")
    p.add_argument("--check-sample", type=int, default=8, help="requests per other adapter count re-run through PEFT")
    p.add_argument("--static-batch-size", type=int, default=16)
    p.add_argument("--bank-dir", type=Path, default=default_cache_dir() / "bench-adapters")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/offline.json"))
    if "--quick" in sys.argv[1:]:  # new defaults; flags given explicitly still win
        p.set_defaults(requests=64, laws=["uniform"], check_sample=4, adapters=[0, 1, 64, 512], cached_at=[], repeats=1)
    args = p.parse_args()
    if not args.no_baselines and args.baselines_at not in args.adapters:
        raise SystemExit(f"--baselines-at {args.baselines_at} must be one of --adapters {args.adapters}")
    if args.cached_at is None:
        args.cached_at = sorted({n for n in (0, 1, max(args.adapters)) if n in args.adapters})
    if not set(args.cached_at) <= set(args.adapters):
        raise SystemExit(f"--cached-at {args.cached_at} must be among --adapters {args.adapters}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    loaded, prompts, lengths, pad = load_base(args)
    model_config = loaded.model.config
    config = EngineConfig(
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs, adapter_slots=args.slots,
        max_lora_rank=max(lora_bank.RANKS), max_bottleneck_size=0, host_cache_bytes=args.host_cache_mib << 20,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)) if args.kv_cache_gib else None,
        enable_prefix_caching=True,  # switched per run (run_quiver)
    )
    service = EngineService(Engine(loaded, config))
    sizes = [len(prompt) for prompt in prompts]
    result = {"model": str(loaded.path.name), "dtype": str(loaded.dtype), "requests": len(prompts), "data": args.data,
              "output_tokens_min_max_sum": [min(lengths), max(lengths), sum(lengths)],
              "prompt_tokens_min_max_sum": [min(sizes), max(sizes), sum(sizes)],
              "slots": args.slots, "host_cache_mib": args.host_cache_mib, "max_num_seqs": args.max_num_seqs,
              "ranks": list(lora_bank.RANKS), "targets": list(lora_bank.TARGETS), "repeats": args.repeats, "runs": []}
    result |= register_bank(service, args, model_config)
    # warm-up: prefill and decode shapes, with and without adapters (Triton compiles each variant once)
    service.generate(prompts[:4], SamplingParams(max_new_tokens=3), adapter_ids=["lora0", "lora1", None, "lora0"])
    total = sum(lengths)

    # (adapters, law, prefix caching) -> the first repetition's adapter of each request and tokens
    outputs: dict[tuple[int, str, bool], tuple[list[int | None], list[list[int]]]] = {}
    configs = [(n, law, False) for n in args.adapters for law in (["-"] if n <= 1 else args.laws)]
    configs += [(n, "-" if n <= 1 else args.laws[0], True) for n in args.cached_at]
    for n, law, cached in configs:
        reps = []
        for rep in range(args.repeats):
            ids = [None] * len(prompts) if n == 0 else popularity(n, law, len(prompts), seed=rep)
            tokens, seconds, counters = run_quiver(service, prompts, lengths, ids, cached)
            if rep == 0:
                outputs[(n, law, cached)] = (ids, tokens)
            reps.append({"seconds": seconds, "distinct_used": len({i for i in ids if i is not None}), **counters})
            print(f"quiver  {n:>5} adapters {law:<8} {'cached' if cached else '':<7}{seconds:8.2f} s "
                  f"{total / seconds:8.1f} tok/s  {counters}", flush=True)
        best = min(reps, key=lambda r: r["seconds"])
        result["runs"].append({"adapters": n, "law": law, "prefix_caching": cached, **best, "tok_s": total / best["seconds"],
                               "repeats": reps})
    service.shutdown()

    result["baselines"] = {} if args.no_baselines else run_baselines(args, loaded, prompts, lengths, pad, outputs)
    result |= ratios(result)
    result["machine"] = machine.describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    try:
        from benchmarks.plots import plot_offline
    except ImportError:  # the GPU machine has no matplotlib: plot the fetched JSON later with benchmarks/plots.py
        print("matplotlib is missing: no plot", flush=True)
    else:
        plot_offline(result, args.out.with_suffix(".png"))
    print_table(result, args.out)


def run_baselines(args, loaded, prompts, lengths, pad, outputs) -> dict:
    """HF without adapters vs Quiver's base run; PEFT and merge-and-swap at --baselines-at adapters; samples."""
    k = args.baseline_requests or len(prompts)
    sub, sub_lengths = prompts[:k], lengths[:k]
    total = sum(sub_lengths)
    ref = reference_model(args, loaded)
    model_config = loaded.model.config
    out: dict = {}
    hf_tokens, hf_s = baselines.timed_static(ref, sub, sub_lengths, args.static_batch_size, pad)
    out["hf_static"] = {"requests": k, "seconds": hf_s, "tok_s": total / hf_s, "same": same(outputs[(0, "-", False)][1][:k], hf_tokens)}
    print(f"transformers static {hf_s:8.2f} s  same {out['hf_static']['same']}/{k}", flush=True)

    ids, q_tokens = outputs[(args.baselines_at, args.laws[0] if args.baselines_at > 1 else "-", False)]
    checks = _samples(args, outputs)
    needed = sorted({i for i in ids[:k] if i is not None} | {i for _, _, i, _ in checks})
    peft = baselines.peft_with(ref, model_config, needed)
    names = [lora_bank.name_of(i) for i in ids[:k]]
    peft_tokens, peft_s = baselines.timed_static(peft, sub, sub_lengths, args.static_batch_size, pad, names)
    out["peft_mixed"] = {"adapters": args.baselines_at, "requests": k, "seconds": peft_s, "tok_s": total / peft_s,
                         "same": same(q_tokens[:k], peft_tokens)}
    print(f"peft mixed batches  {peft_s:8.2f} s  same {out['peft_mixed']['same']}/{k}", flush=True)
    merge_tokens, merge_s = baselines.timed_merge_and_swap(peft, sub, sub_lengths, args.static_batch_size, pad, names)
    out["merge_and_swap"] = {"adapters": args.baselines_at, "requests": k, "seconds": merge_s,
                             "tok_s": total / merge_s, "same": same(q_tokens[:k], merge_tokens)}
    print(f"merge and swap      {merge_s:8.2f} s  same {out['merge_and_swap']['same']}/{k}", flush=True)

    if checks:  # the other adapter counts: a sample of requests through PEFT, compared with Quiver's tokens
        check_tokens, _ = baselines.timed_static(peft, [prompts[r] for _, r, _, _ in checks], [lengths[r] for _, r, _, _ in checks],
                                                 args.static_batch_size, pad, [lora_bank.name_of(i) for _, _, i, _ in checks])
        per_run: dict[str, list[int]] = {}
        for (run, _, _, tokens), got in zip(checks, check_tokens, strict=True):
            per_run.setdefault(run, [0, 0])
            per_run[run][0] += tokens == got
            per_run[run][1] += 1
        out["sampled_checks"] = per_run
    return out


def _samples(args, outputs) -> list[tuple[str, int, int, list[int]]]:
    """(run name, request index, adapter, Quiver's tokens) for a sample of each adapter run the baselines skip."""
    rng = random.Random(1)
    checks = []
    for (n, law, cached), (ids, tokens) in outputs.items():
        if n == 0 or (n == args.baselines_at and law == args.laws[0] and not cached):
            continue
        for r in rng.sample(range(len(ids)), min(args.check_sample, len(ids))):
            checks.append((f"{n}-{law}{'-cached' if cached else ''}", r, ids[r], tokens[r]))
    return checks


def ratios(result: dict) -> dict:
    tok = {(r["adapters"], r["law"], r["prefix_caching"]): r["tok_s"] for r in result["runs"]}
    out = {}
    top = max(n for n, _, _ in tok)
    for cached in (False, True):
        one = tok.get((1, "-", cached))
        for law in ("uniform", "zipf"):
            if one and (top, law, cached) in tok and top > 1:
                out[f"at_{top}_{law}_vs_1{'_cached' if cached else ''}"] = tok[(top, law, cached)] / one
    b = result["baselines"]
    if not b:
        return out
    at = b["peft_mixed"]["adapters"]
    q_at = next(r for r in result["runs"] if r["adapters"] == at and not r["prefix_caching"])
    # the baselines may run on a prefix of the requests: compare token rates
    out["vs_peft"] = q_at["tok_s"] / b["peft_mixed"]["tok_s"]
    out["vs_merge_and_swap"] = q_at["tok_s"] / b["merge_and_swap"]["tok_s"]
    if (0, "-", False) in tok:
        out["base_vs_hf"] = tok[(0, "-", False)] / b["hf_static"]["tok_s"]
    return out


def print_table(result: dict, out: Path) -> None:
    print(f"\n{'system (fastest of ' + str(result['repeats']) + ' runs)':<48}{'seconds':>9}{'tok/s':>9}  {'checked':<10} "
          "evictions/disk reads, cache hit tokens")
    for r in result["runs"]:
        name = "quiver, base model" if r["adapters"] == 0 else f"quiver, {r['adapters']} adapters ({r['law']})"
        name += ", prefix caching" if r["prefix_caching"] else ""
        print(f"{name:<48}{r['seconds']:>9.2f}{r['tok_s']:>9.1f}  {'':<10} {r['device_evictions']}/{r['disk_reads']}, "
              f"{r['prefix_cache_hit_tokens']}")
    b = result["baselines"]
    peers = (("hf_static", "transformers static, no adapters"), ("peft_mixed", "PEFT mixed batches"),
             ("merge_and_swap", "merge and swap (PEFT merge)"))
    for key, label in peers if b else ():
        v = b[key]
        print(f"{label:<48}{v['seconds']:>9.2f}{v['tok_s']:>9.1f}  {v['same']}/{v['requests']}")
    for run, (ok, n) in b.get("sampled_checks", {}).items():
        print(f"  sampled check {run}: {ok}/{n} equal to PEFT")
    keys = [k for k in result if k.startswith("at_") or k in ("vs_peft", "vs_merge_and_swap", "base_vs_hf")]
    print("  ".join(f"{k}={result[k]:.2f}" for k in keys), f"-> {out}")


if __name__ == "__main__":
    main()
