"""The tuning methods, each set up on a frozen base model: PEFT for the five it implements, our bottleneck
adapter (trainer/bottleneck.py) for adapter tuning, and full fine-tuning as the reference they are compared to."""

from dataclasses import dataclass

import torch
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from torch import nn
from transformers import PreTrainedModel

from quiver.adapters.peft_layout import DECODER_LAYERS
from quiver.adapters.weights import ACTIVATIONS, AdapterKind
from quiver.errors import InvalidArgument
from quiver.trainer.bottleneck import Bottlenecks

FULL = "full"  # full fine-tuning, exported as a whole model
ADAPTER_METHODS = tuple(kind.method for kind in AdapterKind)  # exported as adapters: one method per kind
METHODS = (*ADAPTER_METHODS, FULL)
ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}  # P-tuning prompt encoders, as PEFT names them
# Learning rates that work for each method with AdamW at a few hundred steps (prompt kinds need large ones).
_ADAPTER_LR = {
    AdapterKind.LORA: 1e-3, AdapterKind.BOTTLENECK: 1e-3, AdapterKind.PREFIX_TUNING: 1e-3,
    AdapterKind.P_TUNING_V2: 3e-3, AdapterKind.PROMPT_TUNING: 3e-2, AdapterKind.P_TUNING: 1e-3,
}
DEFAULT_LR = {kind.method: lr for kind, lr in _ADAPTER_LR.items()} | {FULL: 3e-5}  # by method name


@dataclass(frozen=True)
class MethodConfig:
    """A method and its own hyper-parameters (the others' are ignored)."""

    method: str  # one of METHODS
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # module name suffixes, or ("all-linear",)
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    bottleneck_size: int = 16
    non_linearity: str = "gelu"  # a key of quiver.adapters.weights.ACTIVATIONS
    num_virtual_tokens: int = 16  # prefix, ptuning-v2, prompt, ptuning
    prefix_hidden: int = 256  # k: hidden size of prefix tuning's re-parametrisation MLP
    encoder: str = "mlp"  # P-tuning prompt encoder: a key of ENCODERS
    encoder_hidden: int = 256  # hidden size of P-tuning's prompt encoder

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        sizes = {
            "lora_rank": self.lora_rank, "bottleneck_size": self.bottleneck_size, "num_virtual_tokens": self.num_virtual_tokens,
            "prefix_hidden": self.prefix_hidden, "encoder_hidden": self.encoder_hidden,
        }
        for name, value in sizes.items():
            if value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value}")
        if self.non_linearity not in ACTIVATIONS:
            raise InvalidArgument(f"unknown non_linearity {self.non_linearity!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.encoder not in ENCODERS:
            raise InvalidArgument(f"unknown P-tuning encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        if not self.lora_targets:
            raise InvalidArgument("lora_targets is empty")

    @property
    def kind(self) -> AdapterKind | None:
        """The adapter kind this method exports; None for full fine-tuning."""
        return None if self.method == FULL else AdapterKind.of_method(self.method)


@dataclass(frozen=True)
class Trainable:
    """A base model set up for one method; `model(**batch)` is the training forward."""

    method: str
    model: nn.Module  # a PeftModel, or the base model itself (with bottleneck hooks, or fully trainable)
    bottlenecks: Bottlenecks | None  # the adapter modules, for the BOTTLENECK kind
    base_params: int  # parameters of the base model alone

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (for prompt-learning methods, including the
        re-parametrisation that is dropped on export)."""
        owners = [self.model] + ([self.bottlenecks] if self.bottlenecks is not None else [])
        return [p for owner in owners for p in owner.parameters() if p.requires_grad]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


def prepare(base: PreTrainedModel, config: MethodConfig) -> Trainable:
    """Set up `base` (modified in place) for training with `config.method`."""
    base_params = sum(p.numel() for p in base.parameters())
    kind = config.kind
    if kind is None:
        base.requires_grad_(True)
        return Trainable(FULL, base, None, base_params)
    base.requires_grad_(False)
    if kind is AdapterKind.BOTTLENECK:
        bottlenecks = Bottlenecks(base, size=config.bottleneck_size, non_linearity=config.non_linearity)
        return Trainable(config.method, base, bottlenecks, base_params)
    prefix = _vocab_prefix(base, config.num_virtual_tokens) if kind is AdapterKind.P_TUNING_V2 else None
    model: PeftModel = get_peft_model(base, _peft_config(config))
    if prefix is not None:
        model.prompt_encoder["default"].embedding.weight.data.copy_(prefix)
    return Trainable(config.method, model, None, base_params)


@torch.no_grad()
def _vocab_prefix(base: PreTrainedModel, n: int) -> torch.Tensor:
    """A deep prefix [n, L·2·kv_dim] (PEFT's layout: layer l's keys, then its values) holding the keys and values
    (before RoPE) that `base` computes for n random vocabulary tokens. P-tuning v2 starts from it: PEFT's default
    N(0, 1) prefix swamps a small model's attention and the loss diverges."""
    layers = base.config.get_text_config().num_hidden_layers
    names = [f"{DECODER_LAYERS}.{layer}.self_attn.{proj}" for layer in range(layers) for proj in ("k_proj", "v_proj")]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        base.get_submodule(name).register_forward_hook(lambda _m, _i, y, name=name: outputs.__setitem__(name, y[0]))
        for name in names
    ]
    try:
        base(input_ids=torch.randint(0, base.config.get_text_config().vocab_size, (1, n)))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([outputs[name] for name in names], dim=-1)


def _peft_config(config: MethodConfig):
    n, kind = config.num_virtual_tokens, config.kind
    if kind is AdapterKind.LORA:
        targets = "all-linear" if config.lora_targets == ("all-linear",) else list(config.lora_targets)
        return LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, use_rslora=config.rslora, target_modules=targets,
            lora_dropout=0.0, task_type="CAUSAL_LM",
        )
    if kind is AdapterKind.PREFIX_TUNING:  # trained through the MLP; save_pretrained keeps only its output
        return PrefixTuningConfig(
            num_virtual_tokens=n, prefix_projection=True, encoder_hidden_size=config.prefix_hidden, task_type="CAUSAL_LM"
        )
    if kind is AdapterKind.P_TUNING_V2:  # the same deep prefix, trained directly
        return PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=False, task_type="CAUSAL_LM")
    if kind is AdapterKind.PROMPT_TUNING:  # starts from the embeddings of random vocabulary tokens
        return PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, task_type="CAUSAL_LM")
    assert kind is AdapterKind.P_TUNING, config.method
    return PromptEncoderConfig(
        num_virtual_tokens=n, encoder_reparameterization_type=ENCODERS[config.encoder],
        encoder_hidden_size=config.encoder_hidden, task_type="CAUSAL_LM",
    )
