"""Thousands of random LoRA adapters for the scaling benchmarks, the same bits however they are made.

Adapter i has rank 8, 16, 32 or 64 (drawn from i), targets PEFT's default modules for Llama-family models
(q_proj and v_proj) on every layer, alpha = 2r, A ~ U(±1/sqrt(in)) as PEFT initialises it, B ~ N(0, 0.02)
so outputs stay fluent but differ from the base. Weights are drawn in float32 from a generator seeded by
i and rounded once to bfloat16, so a PEFT model built in memory, a directory on disk and Quiver's in-memory
copy all hold identical values.
"""

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from quiver.adapters.weights import LoraModule, LoraWeights

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "v_proj")  # PEFT's default target_modules for llama, mistral and qwen2


def rank_of(i: int) -> int:
    return random.Random(i).choice(RANKS)


def name_of(i: int) -> str:
    return f"lora{i}"


def _shapes(config) -> list[tuple[str, int, int]]:
    """(module name, in, out) of every targeted module, e.g. ("model.layers.0.self_attn.q_proj", 576, 576)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    outs = {"q_proj": config.num_attention_heads * head_dim, "v_proj": config.num_key_value_heads * head_dim}
    return [
        (f"model.layers.{layer}.self_attn.{t}", config.hidden_size, outs[t])
        for layer in range(config.num_hidden_layers)
        for t in TARGETS
    ]


def state_dict(config, i: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Adapter i as PEFT saves it: `base_model.model.<module>.lora_{A,B}.weight`, bfloat16, on `device`."""
    r = rank_of(i)
    g = torch.Generator(device=device).manual_seed(1_000_003 * i + 17)
    out = {}
    for name, din, dout in _shapes(config):
        bound = 1 / din**0.5
        a = torch.rand(r, din, generator=g, device=device).mul_(2 * bound).sub_(bound)
        b = torch.randn(dout, r, generator=g, device=device).mul_(0.02)
        out[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
        out[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    return out


def peft_config(i: int) -> dict:
    r = rank_of(i)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "inference_mode": True,
    }


def weights(config, i: int, device: str = "cpu") -> LoraWeights:
    """Adapter i as Quiver's typed weights (on the host), without a trip through a file."""
    sd = state_dict(config, i, device)
    cfg = peft_config(i)
    scale = cfg["lora_alpha"] / cfg["r"]
    modules = {}
    for name, _, _ in _shapes(config):
        a, b = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
        modules[name] = LoraModule(a=a.cpu(), b=b.cpu(), scale=scale)
    return LoraWeights(modules=modules)


def on_disk(config, root: Path, n: int) -> list[Path]:
    """Directories of adapters 0..n-1 under root (written once; later runs reuse them)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / name_of(i)
        if not (path / "adapter_model.safetensors").exists():
            tmp = root / f".{name_of(i)}.tmp{os.getpid()}"
            tmp.mkdir(exist_ok=True)
            (tmp / "adapter_config.json").write_text(json.dumps(peft_config(i)))
            save_file(state_dict(config, i), tmp / "adapter_model.safetensors")
            tmp.rename(path)  # a run killed halfway leaves a hidden temporary folder, never a partial adapter
        paths.append(path)
    return paths
