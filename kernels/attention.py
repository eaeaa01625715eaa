"""Triton paged attention for a packed batch of decode rows and chunked-prefill chunks.

Semantics: `quiver.kernels.ops.PagedAttention`. One program takes BLOCK_Q consecutive query tokens of one
sequence and the GROUP query heads that share one KV head (GQA), stacked as the rows of one tile, and
walks that sequence's KV through its block table with an online softmax in fp32 (exp2 form), reading
each KV entry once per tile. Tiles are numbered per sequence as in `quiver.kernels.lora` (`segment_tile` over
query_starts), so the grid comes from T and B alone and the launcher never reads device data.
"""

import math

import torch
import triton
import triton.language as tl

from quiver.kernels.lora import dot_config, segment_tile
from quiver.kernels.ops import FLOAT_DTYPES


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_starts_ptr,
    n_seqs, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    KVH: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    kvh = tl.program_id(1)
    seq, j = segment_tile(query_starts_ptr, n_seqs, tl.program_id(0), BLOCK_Q)
    q_start = tl.load(query_starts_ptr + seq)
    q_end = tl.load(query_starts_ptr + seq + 1)
    row0 = q_start + j * BLOCK_Q
    if (j >= 0) & (row0 < q_end):
        seq_len = tl.load(seq_lens_ptr + seq)
        first_pos = seq_len - (q_end - q_start)  # position of the sequence's first new token
        m = tl.arange(0, BLOCK_M)
        tok = row0 + m // GROUP_PAD
        head = kvh * GROUP + m % GROUP_PAD
        row_mask = (m // GROUP_PAD < BLOCK_Q) & (tok < q_end) & (m % GROUP_PAD < GROUP)
        q_pos = first_pos + tok - q_start
        dd = tl.arange(0, D_PAD)
        d_mask = dd < HEAD_DIM
        q_ptrs = q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dd[None, :]
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        kv_end = first_pos + tl.minimum(row0 + BLOCK_Q, q_end) - q_start  # keys the tile's last token sees
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for start in range(0, kv_end, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)
            k_mask = kpos < kv_end
            page = tl.load(table + kpos // PAGE, mask=k_mask, other=0).to(tl.int64)
            entry = ((page * PAGE + kpos % PAGE) * KVH + kvh) * HEAD_DIM  # [BLOCK_N] offset of (slot, kvh, 0)
            kv_mask = k_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + entry[:, None] + dd[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where((kpos[None, :] <= q_pos[:, None]) & k_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + entry[:, None] + dd[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
            acc = tl.dot(p.to(DOT_DTYPE), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(row_mask, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dd[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_starts: torch.Tensor, scale: float,
    plan: None = None,  # this backend plans nothing
) -> torch.Tensor:
    """Triton `ops.PagedAttention`: for sequence b with q new tokens and n = seq_lens[b],
        out[query_starts[b] + j] = softmax(scale · Q_j · K[:n - q + j + 1]ᵀ) · V[:n - q + j + 1]
    over the KV pages block_tables[b]; query head h reads kv head h // (H // KVH).

    query may be a strided view with a contiguous head dim; the output is a new contiguous tensor.
    """
    if query.dtype not in FLOAT_DTYPES or query.dim() != 3 or query.stride(2) != 1:
        raise ValueError(f"query must be float [T, H, D], contiguous in D, got {query.dtype} {tuple(query.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or not cache.is_contiguous() or cache.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be contiguous float [NB, BS, KVH, D], got {cache.dtype} {cache.shape}")
        if cache.device != query.device:
            raise ValueError(f"{name} is on {cache.device}, query on {query.device}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    t, n_heads, d = query.shape
    _, page, kvh, d_cache = k_cache.shape
    if d_cache != d or n_heads % kvh != 0:
        raise ValueError(f"query [T, {n_heads}, {d}] does not fit a cache of {kvh} kv heads of dim {d_cache}")
    n_seqs = seq_lens.shape[0]
    index = (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1), ("query_starts", query_starts, 1))
    for name, x, dims in index:
        if x.dtype != torch.int32 or x.dim() != dims or x.stride(-1) != 1:
            raise TypeError(f"{name} must be int32, {dims}-d, contiguous in its last dim, got {x.dtype} {x.shape}")
        if x.device != query.device:
            raise ValueError(f"{name} is on {x.device}, query on {query.device}")
    if query_starts.shape[0] != n_seqs + 1 or block_tables.shape[0] != n_seqs:
        raise ValueError(f"query_starts must have B+1 = {n_seqs + 1} rows and block_tables B = {n_seqs}")
    out = torch.empty((t, n_heads, d), dtype=query.dtype, device=query.device)
    if t == 0 or n_seqs == 0:
        return out
    group = n_heads // kvh
    group_pad = triton.next_power_of_2(group)
    block_q = 1 if t == n_seqs else max(1, 64 // group_pad)  # one token per sequence: decode tiles
    grid = (triton.cdiv(t, block_q) + n_seqs, kvh)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, block_tables, seq_lens, query_starts,
        n_seqs, scale * math.log2(math.e),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        KVH=kvh, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)),
        PAGE=page, BLOCK_Q=block_q, BLOCK_M=max(16, block_q * group_pad), BLOCK_N=64,
        **dot_config(query.dtype, query.device),
    )
    return out
