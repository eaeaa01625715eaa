"""Read an adapter directory (`adapter_config.json` + `adapter_model.safetensors`) into typed, validated weights.

`load_adapter` is pure: it returns the whole adapter or raises `InvalidArgument` naming the file and the problem.
Pickled weights are never read. The formats, and what is refused and why, are in docs/adapters.md.
"""

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig

from quiver.adapters import bounds
from quiver.adapters.config_values import ConfigValues, read_config, short
from quiver.adapters.lora_targets import LoraTargets
from quiver.adapters.weights import (
    ACTIVATIONS,
    AdapterKind,
    AdapterWeights,
    BottleneckSite,
    BottleneckWeights,
    LoraModule,
    LoraWeights,
    PrefixWeights,
    PromptWeights,
)
from quiver.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DECODER_LAYERS = "model.layers"  # the decoder blocks' module path in a Llama-family *ForCausalLM
SAVED_PREFIX = "base_model.model."  # PEFT's prefix on every saved LoRA/bottleneck tensor name
BOTTLENECK_SITES = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}  # site -> the module whose output it follows
_DTYPES = {"F32", "BF16", "F16"}
_TASK_TYPES = (None, "CAUSAL_LM")
_COMMON_KEYS = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}
_COMMON_KEYS |= {"inference_mode"}
_PROMPT_KEYS = _COMMON_KEYS | {"num_virtual_tokens", "token_dim", "num_transformer_submodules"}
_PROMPT_KEYS |= {"num_attention_heads", "num_layers", "modules_to_save"}

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
_LORA_KEYS = _COMMON_KEYS | {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules"}
_LORA_KEYS |= {"exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "lora_dropout", "bias"}
_LORA_KEYS |= {"init_lora_weights", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying"}
_LORA_KEYS |= {"loftq_config", "eva_config", "corda_config", "lora_ga_config"} | set(_LORA_UNSERVABLE)
# Initialisations that leave the base weights untouched; the others (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) pair
# the adapter with modified base weights unless PEFT converted it on save, and MiCA changes the forward.
_LORA_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_LORA_KEY = re.compile(r".+\.lora_[AB]\.weight")
_OWNER_KEY = re.compile(r"(?P<module>.+?)\.(?:lora_\w+|base_layer)(?:\..+)?")  # the module a PEFT tensor belongs to


@dataclass(frozen=True)
class BaseShapes:
    """The sizes of the base model that an adapter must match."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, base: PretrainedConfig) -> "BaseShapes":
        text = base.get_text_config()
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Full name -> (in_features, out_features) of every linear layer inside the decoder blocks."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        leaves = {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }
        return {
            f"{DECODER_LAYERS}.{layer}.{leaf}": shape
            for layer in range(self.num_layers)
            for leaf, shape in leaves.items()
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
    with _Tensors(weights_file) as tensors:
        return parse(config, tensors, shapes, linears)


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
        "peft_type": "BOTTLENECK",
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


# ---- files -------------------------------------------------------------------------------------------------------


def adapter_files(path: Path) -> tuple[Path, Path]:
    """The config and weights files of the adapter directory `path`, checked: both exist and, symlinks
    resolved, lie inside it; pickled weights are refused. Messages name files relative to the directory."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise InvalidArgument(f"adapter directory {Path(path).name!r} does not exist")
    if not (root / WEIGHTS_FILE).exists():
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidArgument(
                f"{pickles[0]}: pickled weights are refused (unpickling can run arbitrary code); "
                f"re-save the adapter with safe_serialization=True to get {WEIGHTS_FILE}"
            )
    return _inside(root, CONFIG_FILE), _inside(root, WEIGHTS_FILE)


def _inside(root: Path, name: str) -> Path:
    """root/name, which must exist and, symlinks resolved, stay inside root."""
    file = root / name
    if not file.is_file():
        raise InvalidArgument(f"{name}: missing")
    if not file.resolve().is_relative_to(root):
        raise InvalidArgument(f"{name}: a symlink to a file outside the adapter directory")
    return file


class _Tensors:
    """The tensors of one safetensors file; each is checked (shape, dtype, bounded entries) as it is read.
    Messages name the file by its name (`self.name`)."""

    def __init__(self, file: Path):
        self.file, self.name = file, file.name

    def __enter__(self) -> "_Tensors":
        try:
            self._handle = safe_open(str(self.file), framework="pt", device="cpu")
        except SafetensorError as e:
            raise InvalidArgument(f"{self.name}: not a valid safetensors file ({e})") from e
        except OSError as e:
            raise InvalidArgument(f"{self.name}: cannot be read ({e.strerror})") from e
        self.names = set(self._handle.keys())
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)

    def expect_names(self, expected: set[str]) -> None:
        missing, extra = sorted(expected - self.names), sorted(self.names - expected)
        if missing:
            raise InvalidArgument(f"{self.name}: missing tensors {_few(missing)}")
        if extra:
            raise InvalidArgument(f"{self.name}: unexpected tensors {_few(extra)}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        saved = self.shape(name)
        if saved != shape:
            raise InvalidArgument(
                f"{self.name}: tensor {name} has shape {list(saved)}, this base model needs {list(shape)}"
            )
        dtype = self._handle.get_slice(name).get_dtype()
        if dtype not in _DTYPES:
            raise InvalidArgument(f"{self.name}: tensor {name} is {dtype}; expected one of {sorted(_DTYPES)}")
        tensor = self._handle.get_tensor(name)
        problem = bounds.entries_problem(tensor)
        if problem is not None:
            raise InvalidArgument(f"{self.name}: tensor {name} {problem}")
        return tensor


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


# ---- LoRA ------------------------------------------------------------------------------------------------------


def _parse_lora(config: ConfigValues, tensors: _Tensors, shapes: BaseShapes, linears: dict) -> LoraWeights:
    for key, feature in _LORA_UNSERVABLE.items():
        if config.get(key) not in (None, False, [], {}):
            raise config.refuse(f"{feature} ({key}={short(config.get(key))}) cannot be served exactly; train without it")
    config.only_known(_LORA_KEYS, what="LoRA")
    if config.get("bias", "none") != "none":
        raise config.refuse(f"bias={short(config.get('bias'))} trains base biases, which cannot be served; use bias='none'")
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
        _check_gain(tensors, module, bounds.gain(scale, b, a))
        modules[module] = LoraModule(a=a, b=b, scale=scale)
    return LoraWeights(modules=modules)


def _check_gain(tensors: _Tensors, module: str, gain: float) -> None:
    if not gain <= bounds.MAX_GAIN:
        raise InvalidArgument(
            f"{tensors.name}: the adapter on {module} can multiply its input by up to {gain:.3g} (scale·‖B‖·‖A‖), "
            f"above the bound of {bounds.MAX_GAIN:g} (docs/adapters.md)"
        )


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


# ---- bottleneck ------------------------------------------------------------------------------------------------

_BOTTLENECK_KEYS = _COMMON_KEYS | {"bottleneck_size", "non_linearity", "target_sites", "layers_to_transform", "scaling"}


def _parse_bottleneck(config: ConfigValues, tensors: _Tensors, shapes: BaseShapes, linears: dict) -> BottleneckWeights:
    config.only_known(_BOTTLENECK_KEYS, what="BOTTLENECK")
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
        _check_gain(tensors, module, bounds.gain(scaling, site.up, site.down))
    return BottleneckWeights(sites=sites, non_linearity=non_linearity, scaling=scaling)


_BOTTLENECK_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


# ---- prefix and prompt kinds -------------------------------------------------------------------------------------

_PREFIX_KEYS = _PROMPT_KEYS | {"encoder_hidden_size", "prefix_projection", "init_weights"}
_PROMPT_TUNING_KEYS = _PROMPT_KEYS | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"}
_PROMPT_TUNING_KEYS |= {"tokenizer_kwargs"}
_P_TUNING_KEYS = _PROMPT_KEYS | {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers"}
_P_TUNING_KEYS |= {"encoder_dropout"}


def _virtual_tokens(config: ConfigValues, tensors: _Tensors, *, known: set[str], what: str) -> int:
    """Checks shared by the prompt-learning kinds; returns num_virtual_tokens."""
    config.only_known(known, what=what)
    if config.get("modules_to_save"):
        raise config.refuse(f"modules_to_save={short(config.get('modules_to_save'))} cannot be served exactly")
    if config.get("num_transformer_submodules", 1) not in (None, 1):
        raise config.refuse("num_transformer_submodules must be 1 (a decoder-only model)")
    n = config.integer("num_virtual_tokens")
    tensors.expect_names({"prompt_embeddings"})
    saved = tensors.shape("prompt_embeddings")
    if saved[:1] != (n,):
        raise config.refuse(f"num_virtual_tokens is {n} but prompt_embeddings has shape {list(saved)}")
    return n


def _parse_prefix(config: ConfigValues, tensors: _Tensors, shapes: BaseShapes, linears: dict) -> PrefixWeights:
    n = _virtual_tokens(config, tensors, known=_PREFIX_KEYS, what="PREFIX_TUNING")
    L, kvh, d = shapes.num_layers, shapes.kv_heads, shapes.head_dim
    wanted = {"num_layers": L, "num_attention_heads": kvh, "token_dim": kvh * d}
    for key, value in wanted.items():
        if config.get(key) != value:
            raise config.refuse(f"{key} is {short(config.get(key))}, this base model needs {value} (another architecture?)")
    flat = tensors.read("prompt_embeddings", (n, L * 2 * kvh * d))  # [n, L*2*kv_heads*head_dim]
    prefix = flat.view(n, L, 2, kvh, d).permute(1, 2, 0, 3, 4).contiguous()  # [L, 2, n, kv_heads, head_dim]
    kind = AdapterKind.PREFIX_TUNING if config.get("prefix_projection") is True else AdapterKind.P_TUNING_V2
    return PrefixWeights(kind=kind, prefix=prefix)


def _prompt_parser(kind: AdapterKind, known: set[str]) -> Callable[..., PromptWeights]:
    def parse(config: ConfigValues, tensors: _Tensors, shapes: BaseShapes, linears: dict) -> PromptWeights:
        n = _virtual_tokens(config, tensors, known=known, what=kind.value)
        if config.get("token_dim", shapes.hidden) != shapes.hidden:
            token_dim = config.get("token_dim")
            raise config.refuse(f"token_dim is {short(token_dim)}, this base model's hidden size is {shapes.hidden}")
        return PromptWeights(kind=kind, embeddings=tensors.read("prompt_embeddings", (n, shapes.hidden)))

    return parse


_PARSERS = {
    "LORA": _parse_lora,
    "BOTTLENECK": _parse_bottleneck,
    "PREFIX_TUNING": _parse_prefix,
    "PROMPT_TUNING": _prompt_parser(AdapterKind.PROMPT_TUNING, _PROMPT_TUNING_KEYS),
    "P_TUNING": _prompt_parser(AdapterKind.P_TUNING, _P_TUNING_KEYS),
}
