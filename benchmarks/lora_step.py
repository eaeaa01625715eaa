"""What a decode step pays for LoRA on CPU: the same engine's decode steps with no adapter, and with one distinct
adapter per sequence, each computed by the fused `lora_apply` and by `lora_shrink` + `lora_expand`, alternating,
in one process (the engine on the main thread).

    python -m benchmarks.lora_step                      # 64 sequences, 64 adapters r=16 on all linear layers
    python -m benchmarks.lora_step --targets q_proj,v_proj --rank 64

The adapters are random (PEFT's LoraConfig, B ~ N(0, 0.02)); they are held in memory, not written out.
"""

import argparse
import dataclasses
import statistics
import time

import torch

from benchmarks import data
from quiver.adapters.weights import LoraModule, LoraWeights
from quiver.config import EngineConfig, ModelConfig, default_cache_dir
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.kernels import torch_lora
from quiver.model.layers import AdapterLinear
from quiver.model.loader import load_model


def two_ops(y, x, a, b, *, out_offsets, seg_starts, seg_slots, ranks, scales, plan=None) -> None:
    """lora_apply as the layer computed it before: shrink into a buffer, then expand (with the step's plan)."""
    buf = x.new_empty(1, x.shape[0], a.shape[2])
    torch_lora.lora_shrink(x, a, seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks, out=buf, plan=plan)
    torch_lora.lora_expand(y, buf, b, out_offsets=out_offsets, seg_starts=seg_starts, seg_slots=seg_slots,
                           ranks=ranks, scales=scales, plan=plan)


def random_lora(model, targets: list[str], rank: int, seed: int) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear) and name.rsplit(".", 1)[-1] in targets:
            base = module.base_layer
            a = torch.randn(rank, base.in_features, generator=gen) * base.in_features ** -0.5
            modules[name] = LoraModule(a=a, b=torch.randn(base.out_features, rank, generator=gen) * 0.02, scale=2.0)
    return LoraWeights(modules=modules)


class TwoGroups:
    """The default model decoding `n` chat prompts twice, on the base model (group "base") and each with its own
    random LoRA adapter (group "lora"), every prompt computed; `step_ms` times decode steps of one group alone.
    `max_steps`: decode steps the caller will take in all (nobody finishes before)."""

    def __init__(self, n: int, *, rank: int, targets: list[str], max_steps: int) -> None:
        self.loaded = load_model(ModelConfig(cache_dir=default_cache_dir()))
        config = EngineConfig(max_num_seqs=2 * n, adapter_slots=n, max_lora_rank=rank, kv_cache_bytes=4 << 30)
        self.engine = engine = Engine(self.loaded, config)  # a pool that holds every sequence: no preemption
        for i in range(n):
            engine.register_adapter(f"lora{i}", random_lora(self.loaded.model, targets, rank, i), source=None)
        params = SamplingParams(max_new_tokens=128 + max_steps, ignore_eos=True)
        for i, prompt in enumerate(data.chat_prompts(self.loaded.tokenizer, n)):  # the same prompts in both groups
            engine.add_request(f"base{i}", prompt, params)
            engine.add_request(f"lora{i}", prompt, params, adapter_id=f"lora{i}")
        while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.requests.values()):
            engine.step()
        scheduler = engine.scheduler
        self._preemptions = scheduler.num_preemptions
        self._groups = {g: [r for r in scheduler.running if r.request_id.startswith(g)] for g in ("base", "lora")}

    def step_ms(self, group: str, steps: int) -> float:
        """The mean time of `steps` decode steps of `group`'s sequences alone, in ms."""
        engine, scheduler = self.engine, self.engine.scheduler
        everyone = list(scheduler.running)
        scheduler.running[:] = self._groups[group]
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = (time.perf_counter() - start) / steps * 1e3
        if scheduler.num_preemptions != self._preemptions or any(r.request_id not in engine.requests for r in everyone):
            raise RuntimeError("a sequence was preempted or finished: the steps measured are not all alike")
        scheduler.running[:] = everyone
        return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="decode steps per round and side")
    args = p.parse_args()

    n = args.prompts
    two = TwoGroups(n, rank=args.rank, targets=args.targets.split(","), max_steps=4 * args.rounds * args.steps)
    layers = [m for m in two.loaded.model.modules() if isinstance(m, AdapterLinear)]
    fused_ops = layers[0].ops
    unfused_ops = dataclasses.replace(fused_ops, lora_apply=two_ops)

    def timed(group: str, ops, out: list[float]) -> None:
        for layer in layers:
            layer.ops = ops
        out.append(two.step_ms(group, args.steps))

    # The floor: only the two products per adapter layer, one row per adapter, over the stacks in place, i.e.
    # reading every adapter's A and B once (what any LoRA step must do), with nothing around them.
    stacks = [(m.lora_a[0, :n, : args.rank].transpose(1, 2), m.lora_b[:n, :, : args.rank].transpose(1, 2))
              for m in layers if m.lora_slots]
    rows = {a.shape[1]: torch.randn(n, 1, a.shape[1]) for a, _ in stacks}

    def products_only(out: list[float]) -> None:
        start = time.perf_counter()
        for _ in range(args.steps):
            for a, b in stacks:
                torch.bmm(torch.bmm(rows[a.shape[1]], a), b)
        out.append((time.perf_counter() - start) / args.steps * 1e3)

    sides = {"base model": ("base", fused_ops), "LoRA, lora_apply (fused)": ("lora", fused_ops),
             "LoRA, shrink + expand": ("lora", unfused_ops)}
    times: dict[str, list[float]] = {name: [] for name in (*sides, "LoRA products alone")}
    for _ in range(args.rounds):
        for name in ("base model", "LoRA, lora_apply (fused)", "base model", "LoRA, shrink + expand"):
            timed(*sides[name], times[name])  # the base side twice: both groups' contexts grow alike
        products_only(times["LoRA products alone"])
    weights = sum(a.numel() + b.numel() for a, b in stacks) * stacks[0][0].element_size()
    print(f"decode step of {n} sequences ({n} distinct adapters, rank {args.rank}, {args.targets}; "
          f"{weights / 1e9:.2f} GB of adapter weights a step), ms:")
    for name, values in times.items():
        print(f"  {name:28} min {min(values):6.1f}  median {statistics.median(values):6.1f}")
    base, floor = min(times["base model"]), min(times["LoRA products alone"])
    for name in list(sides)[1:]:
        print(f"base / {name}: {base / min(times[name]):.2f}")
    print(f"base / (base + products alone): {base / (base + floor):.2f}  "
          f"(the products read {weights / floor / 1e6:.1f} GB/s)")


if __name__ == "__main__":
    main()
