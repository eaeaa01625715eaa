"""What the host spends on one decode step: the engine's step against one bare transformers eager forward of
the same batch, on a *skeleton* model that does almost no arithmetic, so that a step's time is host work.

The skeleton has TinyLlama's 22 layers with hidden size 64 (4 heads, 2 KV heads, vocab 512, random weights).
128 sequences decode at ~20 tokens of context, on one thread. Cases, each timed in the same run:
    base        no adapters
    lora        64 distinct LoRA adapters (r=8 on q_proj and v_proj), two sequences each
    mixed       all six kinds: LoRA, bottleneck, prefix tuning, P-tuning v2, prompt tuning, P-tuning
For each case: the median of the engine's decode steps (`Engine.step`: scheduling, the forward, sampling)
and the median of transformers' eager forward of the same 128 tokens over a `DynamicCache` holding contexts
of the same lengths (both grow a token a step; rounds of steps alternate), with its greedy pick. The ratio
engine / eager is what the engine's host work costs against transformers' own; `tokens_sha` fingerprints the
engine's greedy tokens; `gemm_floor_ms` is what the step's matrix products alone cost (see gemm_floor).

    python -m benchmarks.step_overhead                 # JSON on stdout and in benchmarks/out/step_overhead.json
    python -m benchmarks.step_overhead --profile lora  # also a table of where the engine's step time goes
"""

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from benchmarks import machine
from benchmarks.adapter_sets import kind_set, lora_variants
from quiver.config import EngineConfig
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.model.loader import LoadedModel

SEQUENCES = 128
CONTEXT = 20
KINDS = ("lora", "bottleneck", "prefix", "ptuning-v2", "prompt", "ptuning")


def skeleton(path: Path) -> Path:
    """TinyLlama's depth at hidden size 64, random weights, saved to `path`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=22, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def adapters(model_path: Path, root: Path, case: str) -> list[tuple[str, Path]]:
    """The (adapter id, directory) each of the case's adapters, in the order sequences are given them."""
    if case == "base":
        return []
    if case == "lora":
        made = lora_variants(model_path, root, {f"lora{i}": (8, ["q_proj", "v_proj"]) for i in range(64)})
        return list(made.items())
    loras = lora_variants(model_path, root / "lora", {f"lora{i}": (8, ["q_proj", "v_proj"]) for i in range(6)})
    others = kind_set(model_path, root / "kinds", per_kind=2)
    return list(loras.items()) + [item for kind in KINDS[1:] for item in others[kind].items()]


def engine_for(model_path: Path, named: list[tuple[str, Path]]) -> Engine:
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa").eval()
    model.requires_grad_(False)
    loaded = LoadedModel(model=model, tokenizer=None, path=model_path, device=torch.device("cpu"), dtype=torch.float32)
    config = EngineConfig(
        max_num_seqs=SEQUENCES, max_num_batched_tokens=SEQUENCES * (CONTEXT + 32), adapter_slots=max(1, len(named)),
        max_lora_rank=8, max_bottleneck_size=32, kv_cache_bytes=256 << 20, enable_prefix_caching=False,
    )
    engine = Engine(loaded, config)
    for adapter_id, path in named:
        engine.register_adapter(adapter_id, engine.read_adapter(path))
    return engine


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, 512, (SEQUENCES, CONTEXT), generator=gen).tolist()


def start(engine: Engine, named: list[tuple[str, Path]], steps: int) -> None:
    """Every sequence prefilled and decoding; none finishes within `steps` more steps."""
    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
    ids = [a for a, _ in named] or [None]
    for i, prompt in enumerate(prompts()):
        adapter_id = ids[i % len(ids)] if named else None
        engine.add_request(f"r{i}", prompt, params, adapter_id=adapter_id)
    while any(r.num_computed_tokens < r.num_tokens - 1 or not r.output_token_ids for r in engine.requests.values()):
        engine.step()


class Eager:
    """transformers' eager forward of the 128 sequences' next tokens over a DynamicCache of their contexts, which
    grow by one token a step as the engine's do (both sides run the same number of steps, alternating)."""

    def __init__(self, model_path: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
        ids = torch.tensor(prompts())
        self.cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits
        self.next_ids = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        self.position = CONTEXT

    @torch.inference_mode()
    def step(self) -> None:
        position_ids = torch.full((SEQUENCES, 1), self.position)
        logits = self.model(input_ids=self.next_ids, position_ids=position_ids, past_key_values=self.cache,
                            use_cache=True).logits
        self.next_ids = logits[:, -1].argmax(-1, keepdim=True)
        self.position += 1


def gemm_floor(engine: Engine) -> float:
    """The median time (ms) of the step's matrix products alone, as the engine computes them (its projections' own
    GEMMs: oneDNN's packed linears in float32 on the CPU, see quiver.kernels.packed_linear): every layer's q/k/v,
    o, gate/up and down projections and the LM head over the 128 rows, and decode attention's two batched
    products at the sequences' longest context now, as torch matmuls. floor / eager bounds the ratio from below
    for this engine's GEMMs."""
    runner = engine.runner
    context = max(r.prefix_len + r.num_computed_tokens for r in engine.requests.values())
    layers = runner.forward.layers
    first = layers[0]
    heads, kv_heads, dim = first.heads, first.kv_heads, first.head_dim
    x = torch.randn(SEQUENCES, first.qkv.weight.shape[1])
    q = torch.randn(SEQUENCES, kv_heads, heads // kv_heads, dim)
    k = torch.randn(SEQUENCES, kv_heads, context, dim)
    p = torch.randn(SEQUENCES, kv_heads, heads // kv_heads, context)
    act = torch.randn(SEQUENCES, first.intermediate)

    def products() -> None:
        for layer in layers:
            layer.qkv.gemm(x)
            torch.matmul(q, k.transpose(2, 3))
            torch.matmul(p, k)
            layer.o.gemm(x)
            layer.gate_up.gemm(x)
            layer.down.gemm(act)
        runner.lm_head(x)

    with torch.inference_mode():
        products()
        return 1000 * statistics.median(timed(products, 10))


def timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_case(model_path: Path, root: Path, case: str, *, rounds: int, steps: int, profile: bool) -> dict:
    named = adapters(model_path, root / case, case)
    engine = engine_for(model_path, named)
    eager = Eager(model_path)
    total_steps = rounds * steps + (steps if profile else 0)
    start(engine, named, total_steps)
    engine_times: list[float] = []
    eager_times: list[float] = []
    for _ in range(rounds):
        engine_times += timed(engine.step, steps)
        eager_times += timed(eager.step, steps)
    tokens = [r.output_token_ids for r in sorted(engine.requests.values(), key=lambda r: int(r.request_id[1:]))]
    result = {
        "engine_ms": 1000 * statistics.median(engine_times),
        "eager_ms": 1000 * statistics.median(eager_times),
        "tokens_sha": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16],
        "gemm_floor_ms": gemm_floor(engine),
    }
    result["ratio"] = result["engine_ms"] / result["eager_ms"]
    result["floor_ratio"] = result["gemm_floor_ms"] / result["eager_ms"]
    if profile:
        result["profile"] = profile_table(engine, steps)
    return result


def profile_table(engine: Engine, steps: int) -> str:
    """Self CPU time of the engine's steps by operator, the top rows (torch.profiler); the C kernels
    (quiver.kernels.native), which the profiler does not see, as `c::<function>` rows."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from quiver.kernels import native

    def recorded(fn):
        def call(*args, **kwargs):
            with record_function(f"c::{fn.__name__}"):
                return fn(*args, **kwargs)
        return call

    names = ("decode_attention", "add_rms_norm", "rope_store", "silu_mul", "adapter_apply", "greedy_rows")
    originals = {name: getattr(native, name) for name in names}
    try:
        for name, fn in originals.items():
            setattr(native, name, recorded(fn))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
    finally:
        for name, fn in originals.items():
            setattr(native, name, fn)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="base,lora,mixed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="steps per round and side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", default="", help="a case to profile (its table printed after the JSON)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": machine.describe(), "sequences": SEQUENCES, "context": CONTEXT, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = skeleton(Path(tmp) / "skeleton")
        for case in args.cases.split(","):
            results["cases"][case] = run_case(model_path, Path(tmp), case, rounds=args.rounds, steps=args.steps,
                                              profile=case == args.profile)
    tables = {case: r.pop("profile") for case, r in results["cases"].items() if "profile" in r}
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "step_overhead.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    for case, table in tables.items():
        print(f"\n== where the engine's step time goes ({case})\n{table}")


if __name__ == "__main__":
    main()
