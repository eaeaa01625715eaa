"""Adapters for the serving benchmarks, made with PEFT on the base model (random weights of a realistic
size: LoRA B ~ N(0, 0.02), so outputs stay fluent but differ from the base)."""

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from quiver.adapters.formats import save_bottleneck
from quiver.adapters.weights import BottleneckSite, BottleneckWeights


def lora_set(model_path: Path, root: Path, n: int, *, rank: int = 16, seed: int = 0) -> tuple[PeftModel, dict[str, Path]]:
    """n LoRA adapters (rank `rank`, all linear layers) in one PeftModel, each also saved to root/<name>."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    names = [f"lora{i}" for i in range(n)]
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.02)
    model.save_pretrained(root / "peft")  # each adapter in its own sub-folder
    return model.eval(), {name: root / "peft" / name for name in names}


def kind_set(model_path: Path, root: Path, per_kind: int, *, seed: int = 0) -> dict[str, dict[str, Path]]:
    """per_kind adapters of each non-LoRA kind: {kind: {name: dir}}."""
    makers = {
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=16, prefix_projection=True, encoder_hidden_size=64, task_type="CAUSAL_LM"),
        "ptuning-v2": lambda: PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=12, task_type="CAUSAL_LM"),
        "ptuning": lambda: PromptEncoderConfig(num_virtual_tokens=10, encoder_hidden_size=64, task_type="CAUSAL_LM"),
    }
    sets: dict[str, dict[str, Path]] = {}
    for k, (kind, make) in enumerate(makers.items()):
        sets[kind] = {}
        for i in range(per_kind):
            torch.manual_seed(seed + 100 * k + i)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), make())
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.mul_(0.1)  # close to the scale of real embeddings and keys
            path = root / f"{kind}{i}"
            model.save_pretrained(path)
            sets[kind][f"{kind}{i}"] = path
    base = AutoModelForCausalLM.from_pretrained(model_path)
    h, layers = base.config.hidden_size, base.config.num_hidden_layers
    sets["bottleneck"] = {}
    for i in range(per_kind):
        torch.manual_seed(seed + 1000 + i)
        sites = {
            f"model.layers.{l}.{leaf}": BottleneckSite(
                down=torch.randn(32, h) * 0.02, down_bias=torch.zeros(32), up=torch.randn(h, 32) * 0.02, up_bias=torch.zeros(h)
            )
            for l in range(layers)
            for leaf in ("self_attn.o_proj", "mlp.down_proj")
        }
        path = root / f"bottleneck{i}"
        save_bottleneck(path, weights=BottleneckWeights(sites=sites, non_linearity="relu", scaling=1.0))
        sets["bottleneck"][f"bottleneck{i}"] = path
    return sets


def lora_variants(model_path: Path, root: Path, configs: dict[str, tuple[int, list[str] | str]], *,
                  seed: int = 0) -> dict[str, Path]:
    """One LoRA adapter per entry of `configs` ({name: (rank, target_modules)}, e.g. ("all-linear" or
    ["q_proj", "v_proj"])), alpha = 2·rank, B ~ N(0, 0.02), saved to root/peft/<name>: {name: dir}."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = None
    for name, (rank, targets) in configs.items():
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM")
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.02)
    model.save_pretrained(root / "peft")
    return {name: root / "peft" / name for name in configs}
