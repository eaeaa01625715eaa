"""Adapters of all six kinds for a tiny test model, saved as directories, and their unbatched references.

The five PEFT kinds are made and saved by PEFT itself; the bottleneck adapter by `save_bottleneck`. The
reference for a PEFT kind is the `PeftModel` loaded back from that directory (its forward, in a greedy
loop); for the bottleneck, the eager base model with a plain forward hook on each adapted layer. Also an
in-memory LoRA whose weights can be made as large as a test needs (`huge_lora`).
"""

from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from quiver.adapters.formats import save_bottleneck
from quiver.adapters.weights import ACTIVATIONS, BottleneckSite, BottleneckWeights, LoraModule, LoraWeights
from quiver.engine.engine import Engine

PEFT_CONFIGS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                               init_lora_weights=False, task_type="CAUSAL_LM"),
    "lora-all-r4": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=32, task_type="CAUSAL_LM"),
    "ptuning-v2": lambda: PrefixTuningConfig(num_virtual_tokens=11, prefix_projection=False, task_type="CAUSAL_LM"),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM"),
    "ptuning": lambda: PromptEncoderConfig(num_virtual_tokens=9, encoder_hidden_size=32, task_type="CAUSAL_LM"),
}
ALL = (*PEFT_CONFIGS, "bottleneck")


def save_zoo(model_path: Path, root: Path, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """One adapter directory per name in ALL, for the model at `model_path`; `scale` shrinks the random
    weights (1.0 makes every adapter change a tiny random model a lot)."""
    dirs = {}
    for i, (name, make) in enumerate(PEFT_CONFIGS.items()):
        torch.manual_seed(seed + i)
        base = AutoModelForCausalLM.from_pretrained(model_path)
        peft_model = get_peft_model(base, make())
        with torch.no_grad():  # LoRA B starts at zero, prompt tables small: make every adapter matter
            for pname, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, (0.5 if "lora" in pname else 1.0) * scale)
        dirs[name] = root / name
        peft_model.save_pretrained(dirs[name])
    torch.manual_seed(seed + 100)
    dirs["bottleneck"] = root / "bottleneck"
    save_bottleneck(dirs["bottleneck"], weights=random_bottleneck(model_path, scale=scale))
    return dirs


def random_bottleneck(model_path: Path, size: int = 6, scale: float = 1.0) -> BottleneckWeights:
    base = AutoModelForCausalLM.from_pretrained(model_path)
    cfg = base.config
    sites = {}
    for layer in range(cfg.num_hidden_layers):
        for leaf in ("self_attn.o_proj", "mlp.down_proj"):
            h = cfg.hidden_size
            sites[f"model.layers.{layer}.{leaf}"] = BottleneckSite(
                down=torch.randn(size, h) * 0.3 * scale, down_bias=torch.randn(size) * 0.1 * scale,
                up=torch.randn(h, size) * 0.3 * scale, up_bias=torch.randn(h) * 0.1 * scale,
            )
    return BottleneckWeights(sites=sites, non_linearity="gelu", scaling=0.7)


def huge_lora(engine: Engine, factor: float, *, scale: float = 2.0, seed: int = 0) -> LoraWeights:
    """A random rank-4 LoRA on q/o/down projections, its B entries multiplied by `factor`, its scale `scale`."""
    g = torch.Generator().manual_seed(seed)
    cfg = engine.runner.model.config
    h = cfg.hidden_size
    modules = {}
    for layer in range(cfg.num_hidden_layers):
        for leaf, d_in in (("self_attn.q_proj", h), ("self_attn.o_proj", h), ("mlp.down_proj", cfg.intermediate_size)):
            modules[f"model.layers.{layer}.{leaf}"] = LoraModule(
                a=torch.randn(4, d_in, generator=g) * 0.5, b=torch.randn(h, 4, generator=g) * 0.5 * factor, scale=scale
            )
    return LoraWeights(modules=modules)


def reference_model(model_path: Path, name: str, adapter_dir: Path) -> torch.nn.Module:
    """The unbatched reference for adapter `name`, in eval mode."""
    base = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    if name != "bottleneck":
        return PeftModel.from_pretrained(base, adapter_dir).eval()
    from quiver.adapters.formats import load_adapter

    weights = load_adapter(adapter_dir, base.config)
    act = ACTIVATIONS[weights.non_linearity]
    for module_name, site in weights.sites.items():
        def hook(_module, _inputs, y, site=site):
            down, down_bias, up, up_bias = (t.to(y.dtype) for t in (site.down, site.down_bias, site.up, site.up_bias))
            return y + weights.scaling * (act(y @ down.T + down_bias) @ up.T + up_bias)

        base.get_submodule(module_name).register_forward_hook(hook)
    return base


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits each was chosen from [n, V], with full forwards (no cache)."""
    ids = list(prompt)
    rows = []
    for _ in range(n):
        x = torch.tensor([ids])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
        rows.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(rows)


@torch.no_grad()
def float64_logits(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits [len(tokens), V] that chose each of `tokens` after `prompt`, from `model` run in float64 (one
    forward): what float32 computations of the same model are judged by."""
    x = torch.tensor([prompt + tokens[:-1]])
    model = model.double()
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -len(tokens) :]  # (after any virtual tokens)
