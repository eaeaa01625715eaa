"""PEFT `LORA` adapters: which options are served, which modules are adapted, and each module's A, B and scale.
Targets and the rank/alpha patterns are resolved by `lora_targets.LoraTargets`."""

import math
import re

from quiver.adapters import bounds
from quiver.adapters.config_values import ConfigValues, short
from quiver.adapters.files import Tensors
from quiver.adapters.lora_targets import LoraTargets
from quiver.adapters.peft_layout import COMMON_KEYS, DECODER_LAYERS, SAVED_PREFIX, BaseShapes
from quiver.adapters.weights import LoraModule, LoraWeights
from quiver.errors import InvalidArgument

# LoRA options that change what the adapter computes; an adapter that sets one is refused, not approximated.
_LORA_UNSERVABLE = {
    "use_dora": "DoRA (a learned magnitude per weight column)",
    "modules_to_save": "trained full copies of base modules",
    "lora_bias": "a bias on lora_B",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication (changes the base model's layers)",
    "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
_LORA_KEYS = COMMON_KEYS | {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules"}
_LORA_KEYS |= {"exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "lora_dropout", "bias"}
_LORA_KEYS |= {"init_lora_weights", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying"}
_LORA_KEYS |= {"loftq_config", "eva_config", "corda_config", "lora_ga_config"} | set(_LORA_UNSERVABLE)
# Initialisations that leave the base weights untouched; the others (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) pair
# the adapter with modified base weights unless PEFT converted it on save, and MiCA changes the forward.
_LORA_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_LORA_KEY = re.compile(r".+\.lora_[AB]\.weight")
_OWNER_KEY = re.compile(r"(?P<module>.+?)\.(?:lora_\w+|base_layer)(?:\..+)?")  # the module a PEFT tensor belongs to


def parse_lora(config: ConfigValues, tensors: Tensors, shapes: BaseShapes, linears: dict) -> LoraWeights:
    """linears: full name -> (in_features, out_features) of the decoder linear layers LoRA may adapt."""
    for key, feature in _LORA_UNSERVABLE.items():
        if config.get(key) not in (None, False, [], {}):
            value = short(config.get(key))
            raise config.refuse(f"{feature} ({key}={value}) cannot be served exactly; train without it")
    config.only_known(_LORA_KEYS, what="LoRA")
    if config.get("bias", "none") != "none":
        bias = short(config.get("bias"))
        raise config.refuse(f"bias={bias} trains base biases, which cannot be served; use bias='none'")
    init = config.get("init_lora_weights", True)
    if init not in _LORA_PLAIN_INITS:
        raise config.refuse(
            f"init_lora_weights={short(init)} pairs the adapter with modified base weights; save it with "
            "path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    targets = LoraTargets(config, num_layers=shapes.num_layers)
    selected = {name for name in linears if targets.selects(name)}
    for name in sorted(tensors.names):
        owner = _OWNER_KEY.fullmatch(name.removeprefix(SAVED_PREFIX))
        if owner is not None and owner["module"] not in linears:
            raise InvalidArgument(
                f"{tensors.name}: {name} adapts {owner['module']!r}; Quiver serves LoRA only on the base model's "
                f"decoder linear layers ({DECODER_LAYERS}.N.{{q,k,v,o,gate,up,down}}_proj)"
            )
        if not name.startswith(SAVED_PREFIX) or _LORA_KEY.fullmatch(name.removeprefix(SAVED_PREFIX)) is None:
            raise InvalidArgument(f"{tensors.name}: {name!r} is not a LoRA tensor (<module>.lora_A/lora_B.weight)")
    if not selected:
        raise config.refuse(f"target_modules {short(config.get('target_modules'))} selects no decoder linear layer")
    expected = {f"{SAVED_PREFIX}{module}.lora_{ab}.weight" for module in selected for ab in "AB"}
    tensors.expect_names(expected)
    use_rslora = config.get("use_rslora", False) is True
    modules = {}
    for module in sorted(selected, key=_natural):
        rank, alpha = targets.rank_alpha(module)
        in_features, out_features = linears[module]
        if rank > min(in_features, out_features):
            raise config.refuse(f"rank {rank} of {module} exceeds min(in, out) = {min(in_features, out_features)}")
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if abs(scale) > bounds.MAX_SCALE:
            raise config.refuse(f"the LoRA scale of {module} is {scale:.3g}, above the bound of {bounds.MAX_SCALE:g}")
        a = tensors.read(f"{SAVED_PREFIX}{module}.lora_A.weight", (rank, in_features))
        b = tensors.read(f"{SAVED_PREFIX}{module}.lora_B.weight", (out_features, rank))
        tensors.check_gain(module, bounds.gain(scale, b, a))
        modules[module] = LoraModule(a=a, b=b, scale=scale)
    return LoraWeights(modules=modules)


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))
