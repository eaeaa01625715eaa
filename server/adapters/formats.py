"""Read an adapter directory (`adapter_config.json` + `adapter_model.safetensors`) into typed, validated weights.

`load_adapter` is pure: it returns the whole adapter or raises `InvalidArgument` naming the file and the problem.
Pickled weights are never read. The formats, and what is refused and why, are in docs/adapters.md. This module
dispatches on `peft_type`; each kind's parser lives in its own module (`lora_format`, `bottleneck_format`,
`prompt_formats`), the file and tensor checks in `files`.
"""

from collections.abc import Callable
from pathlib import Path

from transformers import PretrainedConfig

from quiver.adapters.bottleneck_format import parse_bottleneck, save_bottleneck
from quiver.adapters.config_values import ConfigValues, read_config, short
from quiver.adapters.files import CONFIG_FILE, WEIGHTS_FILE, Tensors, adapter_files
from quiver.adapters.lora_format import parse_lora
from quiver.adapters.peft_layout import BaseShapes
from quiver.adapters.prompt_formats import parse_p_tuning, parse_prefix, parse_prompt_tuning
from quiver.adapters.weights import AdapterKind, AdapterWeights

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "adapter_files", "load_adapter", "save_bottleneck"]

_TASK_TYPES = (None, "CAUSAL_LM")

# A parser reads one peft_type: (config, tensors, base shapes, decoder linears: name -> (in, out)) -> weights.
Parser = Callable[[ConfigValues, Tensors, BaseShapes, dict[str, tuple[int, int]]], AdapterWeights]
_PARSERS: dict[str, Parser] = {
    AdapterKind.LORA.peft_type: parse_lora,
    AdapterKind.BOTTLENECK.peft_type: parse_bottleneck,
    AdapterKind.PREFIX_TUNING.peft_type: parse_prefix,  # PREFIX_TUNING or P_TUNING_V2
    AdapterKind.PROMPT_TUNING.peft_type: parse_prompt_tuning,
    AdapterKind.P_TUNING.peft_type: parse_p_tuning,
}


def load_adapter(path: Path, base: PretrainedConfig, *, module_names: set[str] | None = None) -> AdapterWeights:
    """Read and validate the adapter in directory `path` against the base model described by `base`.

    module_names: the base model's module names (as `named_modules()` gives them); adapters may only act on
    decoder linear layers that are among them. None: the standard Llama-family layout implied by `base`.
    """
    config_file, weights_file = adapter_files(path)
    config = read_config(config_file)
    task_type = config.get("task_type")
    if task_type not in _TASK_TYPES:
        raise config.refuse(f"task_type {short(task_type)} is not served; Quiver serves CAUSAL_LM adapters")
    peft_type = config.get("peft_type")
    parse = _PARSERS.get(peft_type) if isinstance(peft_type, str) else None
    if parse is None:
        raise config.refuse(f"unknown peft_type {short(peft_type)}; expected one of {sorted(_PARSERS)}")
    shapes = BaseShapes.of(base)
    linears = shapes.linear_shapes()
    if module_names is not None:
        linears = {name: shape for name, shape in linears.items() if name in module_names}
    with Tensors(weights_file) as tensors:
        return parse(config, tensors, shapes, linears)
