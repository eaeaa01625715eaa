"""The attention function registered with transformers' `AttentionInterface`.

Hugging Face attention modules compute Q, K, V (with rotary embeddings) and call this function with the
`quiver_batch` keyword that the runner passed to the model: it stores the new K/V in the paged cache and
attends over each sequence's blocks. Masking is done here (no mask function is registered, so
transformers passes `attention_mask=None`).
"""

import torch
from transformers import AttentionInterface

from quiver.model.batch import StepBatch

ATTENTION_NAME = "quiver_paged"


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,  # [1, KVH, T, D]
    attention_mask: torch.Tensor | None,
    *,
    scaling: float,
    quiver_batch: StepBatch,
    **_unused,  # the other keywords transformers passes (dropout, position_ids, ...)
) -> tuple[torch.Tensor, None]:
    batch = quiver_batch
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
    )
    return out.unsqueeze(0), None  # [1, T, H, D]


def register() -> str:
    """Make the function known to transformers (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
