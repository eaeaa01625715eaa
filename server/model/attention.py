"""The attention function registered with transformers' `AttentionInterface`.

Hugging Face attention modules compute Q, K, V (with rotary embeddings) and call this function, which reads
the current step from the `StepContext` the runner attached to every attention module (`attach`): it stores
the new K/V in the paged cache and attends over each sequence's blocks. Masking is done here (no mask
function is registered, so transformers passes `attention_mask=None`).
"""

import torch
from transformers import AttentionInterface

from quiver.model.batch import StepContext

ATTENTION_NAME = "quiver_paged"
CONTEXT_ATTRIBUTE = "quiver_context"  # the attribute of each attention module that holds its runner's StepContext


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,  # [1, KVH, T, D]
    attention_mask: torch.Tensor | None,
    *,
    scaling: float,
    **_unused,  # the other keywords transformers passes (dropout, position_ids, ...)
) -> tuple[torch.Tensor, None]:
    batch = getattr(module, CONTEXT_ATTRIBUTE).step
    layer = module.layer_idx
    k_cache, v_cache = batch.kv_cache[layer, 0], batch.kv_cache[layer, 1]
    new_k = key[0].transpose(0, 1).contiguous()  # [T, KVH, D]
    new_v = value[0].transpose(0, 1).contiguous()
    batch.ops.store_kv(new_k, new_v, k_cache, v_cache, batch.slot_mapping)
    out = batch.ops.paged_attention(
        query[0].transpose(0, 1).contiguous(),  # [T, H, D]
        k_cache,
        v_cache,
        block_tables=batch.block_tables,
        seq_lens=batch.seq_lens,
        query_starts=batch.query_starts,
        scale=scaling,
        plan=batch.attention_plan,
    )
    return out.unsqueeze(0), None  # [1, T, H, D]


def register() -> str:
    """Make the function known to transformers (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME


def attach(model: torch.nn.Module, context: StepContext) -> None:
    """Give every attention module of the decoder the runner's `context`, where it reads the current step."""
    for block in model.get_decoder().layers:
        setattr(block.self_attn, CONTEXT_ATTRIBUTE, context)
