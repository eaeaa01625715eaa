"""What every kind's parser checks an adapter against: the base model's shapes and PEFT's saved layout."""

from dataclasses import dataclass

from transformers import PretrainedConfig

DECODER_LAYERS = "model.layers"  # the decoder blocks' module path in a Llama-family *ForCausalLM
SAVED_PREFIX = "base_model.model."  # PEFT's prefix on every saved LoRA/bottleneck tensor name
# Keys any adapter_config.json may hold, whatever its kind.
COMMON_KEYS = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}
COMMON_KEYS |= {"inference_mode"}


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
