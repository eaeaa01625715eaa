"""Typed adapter weights on CPU, one dataclass per family of kinds, as `formats.load_adapter` returns them.

Tensors keep the floating dtype they were saved in (float32, bfloat16 or float16); whoever places them on a
device casts them to the serving dtype. Module names are the base model's own full names, e.g.
`model.layers.3.self_attn.q_proj`.
"""

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from quiver.kernels.ops import ACTIVATIONS  # noqa: F401 (the bottleneck non-linearities; re-exported here)


class AdapterKind(enum.Enum):
    """The six kinds Quiver serves; the one type every layer passes. Where a layer needs another spelling
    it reads it here (`peft_type`, `proto_name`, `label`, `method`), from the table `_SPELLINGS` below."""

    LORA = "LORA"
    BOTTLENECK = "BOTTLENECK"
    PREFIX_TUNING = "PREFIX_TUNING"  # PEFT PREFIX_TUNING saved with prefix_projection=true
    P_TUNING_V2 = "P_TUNING_V2"  # PEFT PREFIX_TUNING saved with prefix_projection=false
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"

    @property
    def peft_type(self) -> str:
        """`peft_type` in adapter_config.json (PREFIX_TUNING and P_TUNING_V2 share one)."""
        return _SPELLINGS[self].peft_type

    @property
    def proto_name(self) -> str:
        """The name of this kind's value in the API's `quiver.v1.AdapterKind` enum."""
        return _SPELLINGS[self].proto_name

    @property
    def label(self) -> str:
        """The `adapter_kind` metrics label."""
        return _SPELLINGS[self].label

    @property
    def method(self) -> str:
        """The trainer's method name (`quiver train --method`)."""
        return _SPELLINGS[self].method

    @classmethod
    def of_method(cls, method: str) -> "AdapterKind":
        """The kind a trainer method exports; ValueError for a method that exports no adapter (e.g. "full")."""
        for kind in cls:
            if kind.method == method:
                return kind
        raise ValueError(f"{method!r} is no adapter method")


@dataclass(frozen=True)
class _Spellings:
    peft_type: str
    proto_name: str
    label: str
    method: str


_SPELLINGS = {
    AdapterKind.LORA: _Spellings("LORA", "ADAPTER_KIND_LORA", "lora", "lora"),
    AdapterKind.BOTTLENECK: _Spellings("BOTTLENECK", "ADAPTER_KIND_BOTTLENECK", "bottleneck", "adapter"),
    AdapterKind.PREFIX_TUNING: _Spellings("PREFIX_TUNING", "ADAPTER_KIND_PREFIX_TUNING", "prefix_tuning", "prefix"),
    AdapterKind.P_TUNING_V2: _Spellings("PREFIX_TUNING", "ADAPTER_KIND_P_TUNING_V2", "p_tuning_v2", "ptuning-v2"),
    AdapterKind.PROMPT_TUNING: _Spellings("PROMPT_TUNING", "ADAPTER_KIND_PROMPT_TUNING", "prompt_tuning", "prompt"),
    AdapterKind.P_TUNING: _Spellings("P_TUNING", "ADAPTER_KIND_P_TUNING", "p_tuning", "ptuning"),
}

# The kinds served as virtual tokens ahead of the prompt (KV prefix or input embeddings), not as weight deltas.
PREFIX_KINDS = (AdapterKind.PREFIX_TUNING, AdapterKind.P_TUNING_V2, AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING)
# A bottleneck adapter's sites (its config's `target_sites`) -> the decoder-layer module whose output it follows.
BOTTLENECK_SITES = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}


def _num_params(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class LoraModule:
    """`y += scale · (x·Aᵀ)·Bᵀ` on the output of one linear layer."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float  # alpha/r, or alpha/sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraWeights:
    modules: dict[str, LoraModule]  # "model.layers.3.self_attn.q_proj" -> A, B, scale; ranks may differ

    kind = AdapterKind.LORA

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in self.modules.values() for t in (m.a, m.b)]

    @property
    def num_params(self) -> int:
        return _num_params(self.tensors())

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def describe(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        return f"LORA: {len(self.modules)} modules, rank {'/'.join(map(str, ranks))}, {self.num_params:,} params"


@dataclass(frozen=True)
class BottleneckSite:
    """`y += scaling · (up·act(down·y + down_bias) + up_bias)` on the output `y` of one linear layer."""

    down: torch.Tensor  # [bottleneck, hidden]
    down_bias: torch.Tensor  # [bottleneck]
    up: torch.Tensor  # [hidden, bottleneck]
    up_bias: torch.Tensor  # [hidden]


@dataclass(frozen=True)
class BottleneckWeights:
    sites: dict[str, BottleneckSite]  # "model.layers.3.self_attn.o_proj" / "model.layers.3.mlp.down_proj" -> site
    non_linearity: str  # a key of ACTIVATIONS
    scaling: float

    kind = AdapterKind.BOTTLENECK

    @property
    def bottleneck_size(self) -> int:
        return next(iter(self.sites.values())).down.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.sites.values() for t in (s.down, s.down_bias, s.up, s.up_bias)]

    @property
    def num_params(self) -> int:
        return _num_params(self.tensors())

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def describe(self) -> str:
        return (
            f"BOTTLENECK: {len(self.sites)} sites, size {self.bottleneck_size}, {self.non_linearity}, "
            f"scaling {self.scaling:g}, {self.num_params:,} params"
        )


@dataclass(frozen=True)
class PrefixWeights:
    """Per-layer key/value vectors of `n` virtual tokens that every layer attends to first."""

    kind: AdapterKind  # PREFIX_TUNING or P_TUNING_V2
    prefix: torch.Tensor  # [num_layers, 2, n, kv_heads, head_dim]; [:, 0] keys, [:, 1] values

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.shape[2]

    @property
    def num_params(self) -> int:
        return self.prefix.numel()

    @property
    def nbytes(self) -> int:
        return _nbytes([self.prefix])

    def describe(self) -> str:
        return f"{self.kind.value}: {self.num_virtual_tokens} virtual tokens, {self.num_params:,} params"


@dataclass(frozen=True)
class PromptWeights:
    """`n` input embeddings that take positions 0 … n-1 ahead of the prompt."""

    kind: AdapterKind  # PROMPT_TUNING or P_TUNING
    embeddings: torch.Tensor  # [n, hidden]

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def num_params(self) -> int:
        return self.embeddings.numel()

    @property
    def nbytes(self) -> int:
        return _nbytes([self.embeddings])

    def describe(self) -> str:
        return f"{self.kind.value}: {self.num_virtual_tokens} virtual tokens, {self.num_params:,} params"


AdapterWeights = LoraWeights | BottleneckWeights | PrefixWeights | PromptWeights
