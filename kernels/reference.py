"""The float64 oracles every backend is tested against: each op computed token by token (and head by head) in
float64, small and obviously right, with no regard for speed. Semantics and argument shapes: `quiver.kernels.ops`.

The LoRA and attention oracles return a new float64 tensor instead of writing in place, and take each token's
adapter slot (`per_token`, -1 for none) where the ops take segments; tests/kernels/kernel_cases.py builds both
from one mix. The KV cache writes are copies (cast to the cache's dtype): their oracles write in place, entry by
entry, with the ops' signatures.
"""

import math

import torch

from quiver.kernels.ops import ACTIVATIONS


def lora_shrink(
    x: torch.Tensor,  # [T, H_in]
    a: torch.Tensor,  # [P, S, R_max, H_in]
    per_token: list[int],  # [T]: each token's adapter slot, -1 for none
    ranks: list[int],  # [S]
    bias: torch.Tensor | None = None,  # [S, R_max]
    activation: str | None = None,  # a key of ACTIVATIONS or None
) -> torch.Tensor:
    """float64 [P, T, R_max]: token by token; NaN where nothing is defined (no adapter, columns >= rank)."""
    n_proj, _, r_max, _ = a.shape
    out = torch.full((n_proj, x.shape[0], r_max), math.nan, dtype=torch.float64)
    for t, w in enumerate(per_token):
        if w >= 0:
            r = ranks[w]
            h = a[:, w, :r].double() @ x[t].double()  # [P, r]
            if bias is not None:
                h = h + bias[w, :r].double()
            out[:, t, :r] = ACTIVATIONS[activation](h) if activation is not None else h
    return out


def lora_expand(
    y: torch.Tensor,  # [T, H_out_total]
    buf: torch.Tensor,  # [P, T, R_max]
    b: torch.Tensor,  # [S, H_out_total, R_max]
    per_token: list[int],  # [T]: each token's adapter slot, -1 for none
    ranks: list[int],  # [S]
    scales: list[float],  # [S]
    offsets: list[int],  # [P+1]: projection p owns columns offsets[p]:offsets[p+1]
    bias: torch.Tensor | None = None,  # [S, H_out_total]
) -> torch.Tensor:
    """float64 [T, H_out_total]: y plus every token's delta, token by token."""
    out = y.double().clone()
    for t, w in enumerate(per_token):
        if w >= 0:
            r = ranks[w]
            for p in range(len(offsets) - 1):
                lo, hi = offsets[p], offsets[p + 1]
                out[t, lo:hi] += scales[w] * (b[w, lo:hi, :r].double() @ buf[p, t, :r].double())
                if bias is not None:
                    out[t, lo:hi] += bias[w, lo:hi].double()
    return out


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,  # [NB, BS, KVH, D]
    block_tables: torch.Tensor,  # [B, MAXB]
    seq_lens: torch.Tensor,  # [B]
    query_starts: torch.Tensor,  # [B+1]
    scale: float,
) -> torch.Tensor:
    """float64 [T, H, D]: every query row on its own, keys gathered slot by slot."""
    n_heads, bs, kvh = query.shape[1], k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for b, n in enumerate(seq_lens.tolist()):
        qs, qe = query_starts[b].item(), query_starts[b + 1].item()
        pages = block_tables[b].tolist()
        keys = torch.stack([k_cache[pages[i // bs], i % bs] for i in range(n)]).double()  # [n, KVH, D]
        values = torch.stack([v_cache[pages[i // bs], i % bs] for i in range(n)]).double()
        for j in range(qe - qs):
            visible = n - (qe - qs) + j + 1
            for h in range(n_heads):
                g = h // (n_heads // kvh)
                scores = (keys[:visible, g] @ query[qs + j, h].double()) * scale
                out[qs + j, h] = torch.softmax(scores, 0) @ values[:visible, g]
    return out


def store_kv(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,  # [NB, BS, KVH, D]
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    """Token t's key and value land in block slot // BS, offset slot % BS, one token at a time."""
    bs = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        k_cache[slot // bs, slot % bs] = key[t]
        v_cache[slot // bs, slot % bs] = value[t]


def write_prefix(
    kv_cache: torch.Tensor,  # [L, 2, NB, BS, KVH, D]
    prefix: torch.Tensor,  # [L, 2, N, KVH, D]
    block_ids: torch.Tensor,  # [ceil(N / BS)]
) -> None:
    """Prefix entry i lands in block block_ids[i // BS], offset i % BS, one entry at a time."""
    bs, blocks = kv_cache.shape[3], block_ids.tolist()
    for i in range(prefix.shape[2]):
        kv_cache[:, :, blocks[i // bs], i % bs] = prefix[:, :, i]


def copy_blocks(
    kv_cache: torch.Tensor,  # [L, 2, NB, BS, KVH, D]
    src: torch.Tensor,  # [M]
    dst: torch.Tensor,  # [M]
) -> None:
    """Block dst[i] becomes a copy of block src[i], one block at a time (every src read before any write)."""
    copies = [kv_cache[:, :, s].clone() for s in src.tolist()]
    for d, block in zip(dst.tolist(), copies):
        kv_cache[:, :, d] = block
