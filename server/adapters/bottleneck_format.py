"""Our `BOTTLENECK` adapter directories (docs/adapters.md): read, and written by `save_bottleneck` (the trainer's
export) so that `load_adapter` reads them back unchanged."""

import json
import re
from pathlib import Path

from safetensors.torch import save_file

from quiver.adapters import bounds
from quiver.adapters.config_values import ConfigValues, short
from quiver.adapters.files import CONFIG_FILE, WEIGHTS_FILE, Tensors
from quiver.adapters.peft_layout import COMMON_KEYS, DECODER_LAYERS, SAVED_PREFIX, BaseShapes
from quiver.adapters.weights import ACTIVATIONS, BOTTLENECK_SITES, AdapterKind, BottleneckSite, BottleneckWeights

_BOTTLENECK_KEYS = COMMON_KEYS | {"bottleneck_size", "non_linearity", "target_sites", "layers_to_transform", "scaling"}
_BOTTLENECK_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def parse_bottleneck(config: ConfigValues, tensors: Tensors, shapes: BaseShapes, linears: dict) -> BottleneckWeights:
    """linears: full name -> (in_features, out_features) of the decoder linear layers a site may follow."""
    config.only_known(_BOTTLENECK_KEYS, what=AdapterKind.BOTTLENECK.peft_type)
    size = config.integer("bottleneck_size")
    if size > shapes.hidden:
        raise config.refuse(f"bottleneck_size {size} exceeds the hidden size {shapes.hidden}")
    non_linearity = config.string("non_linearity", ACTIVATIONS)
    scaling = config.number("scaling", default=1.0, bound=bounds.MAX_SCALE)
    sites = config.get("target_sites", sorted(BOTTLENECK_SITES))
    known = isinstance(sites, list) and all(isinstance(s, str) and s in BOTTLENECK_SITES for s in sites)
    if not known or not sites or len(set(sites)) != len(sites):
        raise config.refuse(f"target_sites must be distinct values of {sorted(BOTTLENECK_SITES)}, got {short(sites)}")
    layers = config.layers("layers_to_transform", shapes.num_layers) or range(shapes.num_layers)
    keys = {}
    for layer in layers:
        for site in sites:
            module = f"{DECODER_LAYERS}.{layer}.{BOTTLENECK_SITES[site]}"
            if module not in linears:
                raise config.refuse(f"site {site!r} of layer {layer} follows {module}, which this base model lacks")
            keys[module] = f"{SAVED_PREFIX}{DECODER_LAYERS}.{layer}.{site}_adapter"
    tensors.expect_names({f"{key}.{part}" for key in keys.values() for part in _BOTTLENECK_PARTS})
    h = shapes.hidden
    sites = {}
    for module, key in keys.items():
        sites[module] = site = BottleneckSite(
            down=tensors.read(f"{key}.down.weight", (size, h)),
            down_bias=tensors.read(f"{key}.down.bias", (size,)),
            up=tensors.read(f"{key}.up.weight", (h, size)),
            up_bias=tensors.read(f"{key}.up.bias", (h,)),
        )
        tensors.check_gain(module, bounds.gain(scaling, site.up, site.down))
    return BottleneckWeights(sites=sites, non_linearity=non_linearity, scaling=scaling)


def save_bottleneck(path: Path, *, weights: BottleneckWeights, base_model_name_or_path: str | None = None) -> None:
    """Write `weights` as a BOTTLENECK adapter directory that `load_adapter` reads back unchanged."""
    if not weights.sites:
        raise ValueError("a bottleneck adapter needs at least one site")
    layers, sites, tensors = set(), set(), {}
    site_of = {module: site for site, module in BOTTLENECK_SITES.items()}
    for name, site in weights.sites.items():
        match = re.fullmatch(rf"{re.escape(DECODER_LAYERS)}\.(\d+)\.(.+)", name)
        if match is None or match[2] not in site_of:
            raise ValueError(f"{name!r} is not a bottleneck site ({DECODER_LAYERS}.N.{{o_proj, down_proj}})")
        layer, site_name = int(match[1]), site_of[match[2]]
        layers.add(layer)
        sites.add(site_name)
        key = f"{SAVED_PREFIX}{DECODER_LAYERS}.{layer}.{site_name}_adapter"
        tensors |= {f"{key}.down.weight": site.down, f"{key}.down.bias": site.down_bias}
        tensors |= {f"{key}.up.weight": site.up, f"{key}.up.bias": site.up_bias}
    if len(weights.sites) != len(layers) * len(sites):
        raise ValueError("bottleneck sites must be the same in every adapted layer")
    config = {
        "peft_type": AdapterKind.BOTTLENECK.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "bottleneck_size": weights.bottleneck_size,
        "non_linearity": weights.non_linearity,
        "target_sites": sorted(sites),
        "layers_to_transform": sorted(layers),
        "scaling": weights.scaling,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
