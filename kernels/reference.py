"""Plain torch versions of every op: the oracle in tests and the serving path on CPU.

KV cache layout, shared by every op and backend:
    kv_cache:  [L, 2, NB, BS, KVH, D]   (layer, key/value, block, offset in block, kv head, head dim)
    k_cache = kv_cache[l, 0], v_cache = kv_cache[l, 1]:  [NB, BS, KVH, D]
A token's *slot* is `block * BS + offset`; slot 37 with BS=16 is block 2, offset 5.
"""

import torch
import torch.nn.functional as F


def store_kv(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,  # [NB, BS, KVH, D]
    slot_mapping: torch.Tensor,  # [T] int64, e.g. [37, 38, 80]
) -> None:
    """k_cache.flat[slot_mapping[t]] = key[t]; v_cache.flat[slot_mapping[t]] = value[t]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,  # [NB, BS, KVH, D]
    *,
    block_tables: torch.Tensor,  # [B, MAXB] int32, e.g. [[0, 3, 4], [1, 2, 0]] (unused entries arbitrary)
    seq_lens: torch.Tensor,  # [B] int32: KV entries of each sequence after this step, e.g. [40, 17]
    query_starts: torch.Tensor,  # [B+1] int32: query rows of sequence b are query_starts[b]:query_starts[b+1]
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each sequence's new tokens over its paged KV (which already holds them).

    For sequence b with q = query_starts[b+1] - query_starts[b] new tokens and n = seq_lens[b]:
        out[query_starts[b] + j] = softmax(scale · Q_j · K[:n - q + j + 1]ᵀ) · V[:n - q + j + 1]
    where K = k_cache[block_tables[b]].flatten(0, 1) and likewise V; heads are grouped (GQA): query
    head h reads kv head h // (H // KVH).

    Decode rows (q = 1) of all sequences go through one batched call; prefill chunks one call each.
    """
    out = torch.empty_like(query)
    starts = query_starts.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    decode = [b for b, q in enumerate(q_lens) if q == 1]
    if decode:
        rows = torch.tensor([starts[b] for b in decode], device=query.device)
        out[rows] = _decode(query[rows], k_cache, v_cache, block_tables[decode], seq_lens[decode], scale)
    for b, q in enumerate(q_lens):
        if q > 1:
            rows = slice(starts[b], starts[b + 1])
            out[rows] = _prefill(query[rows], k_cache, v_cache, block_tables[b], lens[b], scale)
    return out


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[NB, BS, KVH, D] gathered by blocks [..., n] -> [..., KVH, n * BS, D]."""
    g = cache[blocks.long()]  # [..., n, BS, KVH, D]
    return g.flatten(-4, -3).transpose(-3, -2)


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """q [B, H, D]; one query per sequence, at its last position."""
    bs = k_cache.shape[1]
    n_blocks = (int(seq_lens.max()) + bs - 1) // bs
    tables = block_tables[:, :n_blocks]
    k, v = _gather(k_cache, tables), _gather(v_cache, tables)  # [B, KVH, n*BS, D]
    mask = torch.arange(n_blocks * bs, device=q.device) < seq_lens[:, None].to(q.device)  # [B, n*BS]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


def _prefill(q, k_cache, v_cache, block_table, seq_len: int, scale):
    """q [T, H, D] for the last T of seq_len positions of one sequence."""
    bs = k_cache.shape[1]
    tables = block_table[: (seq_len + bs - 1) // bs]
    k = _gather(k_cache, tables)[:, :seq_len].to(q.dtype)  # [KVH, seq_len, D]
    v = _gather(v_cache, tables)[:, :seq_len].to(q.dtype)
    t = q.shape[0]
    q_pos = torch.arange(seq_len - t, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [T, seq_len]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)


def write_prefix(
    kv_cache: torch.Tensor,  # [L, 2, NB, BS, KVH, D]
    prefix: torch.Tensor,  # [L, 2, N, KVH, D]: an adapter's per-layer prefix keys (0) and values (1)
    block_ids: torch.Tensor,  # [ceil(N / BS)] int64, e.g. [7, 9]: the blocks that will hold the prefix
) -> None:
    """kv_cache[:, :, block_ids].flat[:N] = prefix: the prefix's entry i lands in block i // BS, offset i % BS."""
    bs, n = kv_cache.shape[3], prefix.shape[2]
    slots = (block_ids.to(kv_cache.device)[:, None] * bs + torch.arange(bs, device=kv_cache.device)).flatten()[:n]
    kv_cache.flatten(2, 3)[:, :, slots] = prefix.to(kv_cache.dtype)


def copy_blocks(
    kv_cache: torch.Tensor,  # [L, 2, NB, BS, KVH, D]
    src: torch.Tensor,  # [M] int64, e.g. [9]
    dst: torch.Tensor,  # [M] int64, e.g. [12]
) -> None:
    """kv_cache[:, :, dst[i]] = kv_cache[:, :, src[i]] for every i (all layers, keys and values)."""
    kv_cache[:, :, dst.to(kv_cache.device)] = kv_cache[:, :, src.to(kv_cache.device)]
