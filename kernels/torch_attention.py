"""The torch backend's KV cache and attention ops: the serving path on CPU (and `--kernel-backend torch`).

Signatures, semantics and the cache layout: `quiver.kernels.ops`; tested against `quiver.kernels.reference`.
The LoRA ops of this backend are in `quiver.kernels.torch_lora`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from quiver.kernels import native
from quiver.kernels.ops import kv_entry_bytes


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k_cache.flat[slot_mapping[t]] = key[t]; v_cache.flat[slot_mapping[t]] = value[t]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_starts: torch.Tensor, scale: float,
    plan: "AttentionPlan | None" = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged KV (shapes: `ops.PagedAttention`).

    Decode rows (q = 1), float32: the C kernel (native.py), which reads the blocks in place. Otherwise (or
    without a C compiler) a few sequences of similar length at a time: small head vectors gathered head-major by
    entry ([b, KVH, n, D], one index_select each) into two batched matmuls, larger ones by whole blocks (a block
    is one contiguous row of the cache) into SDPA (see _HEAD_MAJOR_MAX_BYTES). Prefill chunks: one SDPA call
    each, over their blocks gathered whole.
    """
    out = query.new_empty(query.shape)
    if plan is None:
        plan = plan_attention(query_starts=query_starts.tolist(), seq_lens=seq_lens.tolist(),
                              block_tables=block_tables.tolist(), block_size=k_cache.shape[1],
                              entry_bytes=kv_entry_bytes(k_cache), kv_heads=k_cache.shape[2], device=query_starts.device)
    in_c = plan.decode_entries > 0 and native.decode_attention(
        query, k_cache, v_cache, block_tables=block_tables, seq_lens=seq_lens, query_starts=query_starts,
        scale=scale, out=out, entries=plan.decode_entries)
    if in_c and not plan.prefill:  # a decode step, all of it done
        return out
    kvh, dim = k_cache.shape[2:]
    heads = query.shape[1]
    k_rows, v_rows = k_cache.flatten(1), v_cache.flatten(1)  # [NB, BS * KVH * D]: one row per block
    k_vectors, v_vectors = k_cache.reshape(-1, dim), v_cache.reshape(-1, dim)  # [NB * BS * KVH, D]: one row per entry and head
    for group in [] if in_c else plan.decode:
        b = group.rows.shape[0]
        q = query.index_select(0, group.rows).view(b, kvh, heads // kvh, dim)  # a kv head's G query heads as G rows
        if group.entries is None:  # whole blocks, token-major, into SDPA
            k = k_rows.index_select(0, group.blocks).view(b, -1, kvh, dim)[:, :group.length].transpose(1, 2)
            v = v_rows.index_select(0, group.blocks).view(b, -1, kvh, dim)[:, :group.length].transpose(1, 2)
            attend = None if group.mask is None else ~group.mask
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attend, scale=scale)
            out.index_copy_(0, group.rows, o.reshape(b, heads, dim))
            continue
        # head-major: [b, KVH, n, D], so that both products are plain batched matmuls over (sequence, kv head)
        k = k_vectors.index_select(0, group.entries).view(b, kvh, -1, dim).to(query.dtype)
        v = v_vectors.index_select(0, group.entries).view(b, kvh, -1, dim).to(query.dtype)
        q = q * scale
        scores = torch.matmul(q, k.transpose(2, 3))  # [b, KVH, G, n]
        if group.mask is not None:
            scores.masked_fill_(group.mask, float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), v)  # [b, KVH, G, D]
        out.index_copy_(0, group.rows, o.view(b, heads, dim))
    for chunk in plan.prefill:
        k = k_rows.index_select(0, chunk.blocks).view(-1, kvh, dim)[: chunk.length].transpose(0, 1)  # [KVH, n, D]
        v = v_rows.index_select(0, chunk.blocks).view(-1, kvh, dim)[: chunk.length].transpose(0, 1)
        if heads != kvh:  # each query head's kv head beside it: SDPA's fused CPU kernel, not its GQA math path
            k, v = k.repeat_interleave(heads // kvh, 0), v.repeat_interleave(heads // kvh, 0)
        q = query[chunk.start : chunk.end].transpose(0, 1)  # [H, T, D]
        # 4-d: with a mask, 3-d inputs take the math path too (at 200 new of 300 entries, 9 heads of 64: 2.9 -> 1.3 ms)
        o = F.scaled_dot_product_attention(q[None], k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=chunk.mask,
                                           scale=scale)
        out[chunk.start : chunk.end] = o[0].transpose(0, 1)
    return out


# Bytes of KV gathered per batched decode call (sequences of similar length together, as many as fit). Measured
# on CPU with 64 sequences of 90-400 entries (GQA 9/3 heads of 64, fp32: 1.5 KiB an entry), about 8 sequences
# (~3 MiB) a call was ~2x faster than 16 or 64 (the gathered KV of a small call is still in cache when attention
# reads it) and than one call per sequence (call overhead); short or small entries fit many more sequences a
# call, which is what saves host time when steps are small (benchmarks/RESULTS.md, "The step's host work").
_DECODE_GROUP_BYTES = 3 << 20


# How a decode group reads its keys and values. Small head vectors (at most this many bytes, e.g. 16 fp32 values):
# gathered head-major by entry, [b, KVH, n, D], and attended with two batched matmuls; larger ones: whole blocks
# gathered (one contiguous row of the cache each) and attended token-major by SDPA. Measured on this project's CPU,
# in one process each: the skeleton model of benchmarks/step_overhead.py (D = 16, fp32) 15.4 -> 14.5 ms a step
# head-major; the default model (D = 64, fp32) in benchmarks/lora_step.py's engine, 64 sequences decoding beside 64
# more, 216.8 ms a step by blocks against 224.6 ms head-major (gathering 256-byte rows out of a 4 GiB pool).
_HEAD_MAJOR_MAX_BYTES = 128


@dataclass(frozen=True)
class _DecodeGroup:
    rows: torch.Tensor  # [b] int64: the sequences' query rows
    # head-major: [b * KVH * n] int64, n = the longest sequence's length: the cache row (entry slot · KVH + head)
    # of each sequence's entry j for each kv head; a shorter sequence's entries beyond its length repeat its
    # entry 0 (masked: it never reads another sequence's blocks). None: read by blocks
    entries: torch.Tensor | None
    mask: torch.Tensor | None  # [b, 1, 1, n] bool, true beyond a sequence's length; None when all have length n
    blocks: torch.Tensor | None  # by blocks: [b * ceil(n / BS)] int64, each sequence's first blocks (0-padded)
    length: int  # n


@dataclass(frozen=True)
class _PrefillChunk:
    start: int
    end: int  # its query rows are start:end
    blocks: torch.Tensor  # [n] int64
    length: int  # the sequence's KV entries
    mask: torch.Tensor  # [end - start, length] bool, causal


class AttentionPlan:
    """The calls `paged_attention` makes for one step's metadata (the same at every layer). The decode groups
    of the pure-torch path are built on first use: the C kernel, when it runs, needs none."""

    def __init__(self, decode: dict, prefill: list[_PrefillChunk]) -> None:
        self._decode = decode  # _plan_decode's arguments
        self.decode_entries = sum(decode["lens"][b] for b in decode["decode"])  # KV entries of the decode rows
        self.prefill = prefill

    @cached_property
    def decode(self) -> list[_DecodeGroup]:
        return _plan_decode(**self._decode)


def plan_attention(
    *, query_starts: Sequence[int], seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int,
    entry_bytes: int, kv_heads: int, device: torch.device,
) -> AttentionPlan:
    """`ops.PlanAttention`: decode rows grouped by length (on first use), a causal mask per prefill chunk."""
    starts, lens, tables, bs = query_starts, seq_lens, block_tables, block_size
    as_long = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    decode = sorted((b for b, q in enumerate(q_lens) if q == 1), key=lambda b: lens[b])
    chunks = []
    for b, q in enumerate(q_lens):
        if q > 1:
            n = lens[b]
            causal = torch.arange(n, device=device)[None, :] <= torch.arange(n - q, n, device=device)[:, None]
            chunks.append(_PrefillChunk(starts[b], starts[b + 1], as_long(tables[b][: -(-n // bs)]), n, causal))
    return AttentionPlan(dict(decode=decode, starts=starts, lens=lens, tables=tables, bs=bs, entry_bytes=entry_bytes,
                              kv_heads=kv_heads, device=device), chunks)


def _plan_decode(
    *, decode: list[int], starts: Sequence[int], lens: Sequence[int], tables: Sequence[Sequence[int]], bs: int,
    entry_bytes: int, kv_heads: int, device: torch.device,
) -> list[_DecodeGroup]:
    """The decode rows (`decode`, sorted by length) in groups of similar length, each read head-major or by
    blocks."""
    as_long = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
    groups = []
    for group in _decode_groups(decode, lens, max(1, _DECODE_GROUP_BYTES // entry_bytes)):
        n = max(lens[b] for b in group)
        nb = -(-n // bs)
        blocks = torch.tensor([(list(tables[b]) + [0] * nb)[:nb] for b in group], dtype=torch.int64)  # [b, nb]
        beyond = None  # [b, n] bool: entries beyond a sequence's length
        if any(lens[b] != n for b in group):
            beyond = torch.arange(n) >= torch.tensor([lens[b] for b in group])[:, None]
        mask = None if beyond is None else beyond[:, None, None, :].to(device)
        rows = as_long([starts[b] for b in group])
        if entry_bytes // (2 * kv_heads) > _HEAD_MAJOR_MAX_BYTES:
            groups.append(_DecodeGroup(rows, None, mask, blocks.flatten().to(device), n))
            continue
        slots = (blocks[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :n]  # [b, n]
        if beyond is not None:
            slots = torch.where(beyond, slots[:, :1], slots)
        entries = slots[:, None, :] * kv_heads + torch.arange(kv_heads)[None, :, None]  # [b, KVH, n]
        groups.append(_DecodeGroup(rows, entries.flatten().to(device), mask, None, n))
    return groups


def _decode_groups(decode: list[int], lens: Sequence[int], max_entries: int) -> list[list[int]]:
    """`decode` (sorted by length) cut into runs whose padded KV (count x the longest) fits `max_entries`."""
    groups: list[list[int]] = []
    for b in decode:
        if groups and (len(groups[-1]) + 1) * lens[b] <= max_entries:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def write_prefix(kv_cache: torch.Tensor, prefix: torch.Tensor, block_ids: torch.Tensor) -> None:
    """kv_cache[:, :, block_ids].flat[:N] = prefix: the prefix's entry i lands in block i // BS, offset i % BS."""
    bs, n = kv_cache.shape[3], prefix.shape[2]
    slots = (block_ids.to(kv_cache.device)[:, None] * bs + torch.arange(bs, device=kv_cache.device)).flatten()[:n]
    kv_cache.flatten(2, 3)[:, :, slots] = prefix.to(kv_cache.dtype)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """kv_cache[:, :, dst[i]] = kv_cache[:, :, src[i]] for every i (all layers, keys and values)."""
    kv_cache[:, :, dst.to(kv_cache.device)] = kv_cache[:, :, src.to(kv_cache.device)]
