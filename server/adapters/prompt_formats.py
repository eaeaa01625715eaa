"""The prompt-learning kinds, PEFT `PREFIX_TUNING` (served as PREFIX_TUNING or P_TUNING_V2), `PROMPT_TUNING`
and `P_TUNING`: `n` virtual tokens saved as one `prompt_embeddings` tensor."""

from collections.abc import Callable

from quiver.adapters.config_values import ConfigValues, short
from quiver.adapters.files import Tensors
from quiver.adapters.peft_layout import COMMON_KEYS, BaseShapes
from quiver.adapters.weights import AdapterKind, PrefixWeights, PromptWeights

_PROMPT_KEYS = COMMON_KEYS | {"num_virtual_tokens", "token_dim", "num_transformer_submodules"}
_PROMPT_KEYS |= {"num_attention_heads", "num_layers", "modules_to_save"}
_PREFIX_KEYS = _PROMPT_KEYS | {"encoder_hidden_size", "prefix_projection", "init_weights"}
_PROMPT_TUNING_KEYS = _PROMPT_KEYS | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"}
_PROMPT_TUNING_KEYS |= {"tokenizer_kwargs"}
_P_TUNING_KEYS = _PROMPT_KEYS | {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers"}
_P_TUNING_KEYS |= {"encoder_dropout"}


def _virtual_tokens(config: ConfigValues, tensors: Tensors, *, known: set[str], what: str) -> int:
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


def parse_prefix(config: ConfigValues, tensors: Tensors, shapes: BaseShapes, linears: dict) -> PrefixWeights:
    """PREFIX_TUNING if saved with prefix_projection=true, else P_TUNING_V2; `linears` is unused."""
    n = _virtual_tokens(config, tensors, known=_PREFIX_KEYS, what=AdapterKind.PREFIX_TUNING.peft_type)
    L, kvh, d = shapes.num_layers, shapes.kv_heads, shapes.head_dim
    wanted = {"num_layers": L, "num_attention_heads": kvh, "token_dim": kvh * d}
    for key, value in wanted.items():
        if config.get(key) != value:
            saved = short(config.get(key))
            raise config.refuse(f"{key} is {saved}, this base model needs {value} (another architecture?)")
    flat = tensors.read("prompt_embeddings", (n, L * 2 * kvh * d))  # [n, L*2*kv_heads*head_dim]
    prefix = flat.view(n, L, 2, kvh, d).permute(1, 2, 0, 3, 4).contiguous()  # [L, 2, n, kv_heads, head_dim]
    kind = AdapterKind.PREFIX_TUNING if config.get("prefix_projection") is True else AdapterKind.P_TUNING_V2
    return PrefixWeights(kind=kind, prefix=prefix)


def _prompt_parser(kind: AdapterKind, known: set[str]) -> Callable[..., PromptWeights]:
    """The parser of PROMPT_TUNING or P_TUNING, whose configs may hold the keys `known`."""

    def parse(config: ConfigValues, tensors: Tensors, shapes: BaseShapes, linears: dict) -> PromptWeights:
        n = _virtual_tokens(config, tensors, known=known, what=kind.peft_type)
        if config.get("token_dim", shapes.hidden) != shapes.hidden:
            token_dim = config.get("token_dim")
            raise config.refuse(f"token_dim is {short(token_dim)}, this base model's hidden size is {shapes.hidden}")
        return PromptWeights(kind=kind, embeddings=tensors.read("prompt_embeddings", (n, shapes.hidden)))

    return parse


parse_prompt_tuning = _prompt_parser(AdapterKind.PROMPT_TUNING, _PROMPT_TUNING_KEYS)
parse_p_tuning = _prompt_parser(AdapterKind.P_TUNING, _P_TUNING_KEYS)
