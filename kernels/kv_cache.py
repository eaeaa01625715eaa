"""Triton KV-cache writes: new tokens by slot mapping, an adapter's prefix into its blocks, block copies.

Semantics and the cache layout ([L, 2, NB, BS, KVH, D], slot = block * BS + offset): `quiver.kernels.ops`.
Values are cast to the cache's dtype on store.
"""

import torch
import triton
import triton.language as tl

INDEX_DTYPES = (torch.int32, torch.int64)
COPY_CHUNK = 1024  # elements of one block that one copy_blocks program moves


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, ENTRY: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    e = tl.arange(0, BLOCK)
    mask = e < ENTRY
    h, d = e // HEAD_DIM, e % HEAD_DIM
    k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + slot * ENTRY + e, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ENTRY + e, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton `ops.StoreKV`: k_cache.flat[slot_mapping[t]] = key[t], likewise value.

    key and value may be strided views (e.g. split from a fused qkv) as long as head_dim is contiguous;
    slot_mapping may be int64 or int32.
    """
    _check_cache("k_cache", k_cache, dims=4)
    _check_cache("v_cache", v_cache, dims=4)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} differs from k_cache {tuple(k_cache.shape)}")
    entry_shape = tuple(k_cache.shape[2:])
    t = slot_mapping.shape[0] if slot_mapping.dim() == 1 else -1
    for name, x in (("key", key), ("value", value)):
        if not x.is_floating_point() or x.dim() != 3 or tuple(x.shape[1:]) != entry_shape or x.shape[0] != t:
            raise ValueError(f"{name} must be float [T, KVH, D] = [{t}, {entry_shape}], got {x.dtype} {tuple(x.shape)}")
        if x.stride(2) != 1 or x.device != k_cache.device:
            raise ValueError(f"{name} must have a contiguous last dim and live on {k_cache.device}")
    _check_index("slot_mapping", slot_mapping, k_cache.device)
    if t == 0:
        return
    kvh, d = entry_shape
    _store_kv_kernel[(t,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        HEAD_DIM=d, ENTRY=kvh * d, BLOCK=triton.next_power_of_2(kvh * d),
    )


@triton.jit
def _write_prefix_kernel(
    cache_ptr, prefix_ptr, block_ids_ptr,
    n_entries, stride_lk,
    BLOCK_SIZE: tl.constexpr, ENTRY: tl.constexpr, BLOCK: tl.constexpr,
):
    lk = tl.program_id(0).to(tl.int64)  # layer * 2 + (0 keys | 1 values)
    i = tl.program_id(1)
    block = tl.load(block_ids_ptr + i // BLOCK_SIZE).to(tl.int64)
    e = tl.arange(0, BLOCK)
    mask = e < ENTRY
    x = tl.load(prefix_ptr + (lk * n_entries + i) * ENTRY + e, mask=mask)
    dst = cache_ptr + lk * stride_lk + (block * BLOCK_SIZE + i % BLOCK_SIZE) * ENTRY + e
    tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


def write_prefix(kv_cache: torch.Tensor, prefix: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Triton `ops.WritePrefix`: prefix entry i of every layer, keys and values, lands in
    block block_ids[i // BS] at offset i % BS. Runs once per adapter load: inputs are moved to the cache's
    device if needed."""
    _check_cache("kv_cache", kv_cache, dims=6)
    n_layers, two, _, bs, kvh, d = kv_cache.shape
    n = prefix.shape[2] if prefix.dim() == 5 else -1
    if not prefix.is_floating_point() or tuple(prefix.shape) != (n_layers, two, n, kvh, d):
        raise ValueError(f"prefix must be float [L, 2, N, KVH, D] = [{n_layers}, 2, N, {kvh}, {d}], got {prefix.shape}")
    prefix = prefix.to(kv_cache.device).contiguous()
    block_ids = block_ids.to(kv_cache.device)
    _check_index("block_ids", block_ids, kv_cache.device)
    if block_ids.shape[0] * bs < n:
        raise ValueError(f"{block_ids.shape[0]} blocks of {bs} cannot hold a prefix of {n} entries")
    if n == 0:
        return
    _write_prefix_kernel[(n_layers * two, n)](
        kv_cache, prefix, block_ids, n, kv_cache.stride(1),
        BLOCK_SIZE=bs, ENTRY=kvh * d, BLOCK=triton.next_power_of_2(kvh * d),
    )


@triton.jit
def _copy_blocks_kernel(cache_ptr, src_ptr, dst_ptr, stride_lk, BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    lk = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = e < BLOCK_NUMEL
    base = cache_ptr + lk * stride_lk + e
    src = tl.load(src_ptr + i).to(tl.int64)
    dst = tl.load(dst_ptr + i).to(tl.int64)
    tl.store(base + dst * BLOCK_NUMEL, tl.load(base + src * BLOCK_NUMEL, mask=mask), mask=mask)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Triton `ops.CopyBlocks`: kv_cache[:, :, dst[i]] = kv_cache[:, :, src[i]] for every i.

    The dst blocks must be distinct and none of them a src block (copies run in parallel).
    """
    _check_cache("kv_cache", kv_cache, dims=6)
    src, dst = src.to(kv_cache.device), dst.to(kv_cache.device)
    _check_index("src", src, kv_cache.device)
    _check_index("dst", dst, kv_cache.device)
    if src.shape != dst.shape:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must have the same length")
    m = src.shape[0]
    if m == 0:
        return
    n_layers, two, _, bs, kvh, d = kv_cache.shape
    numel = bs * kvh * d
    grid = (m, n_layers * two, triton.cdiv(numel, COPY_CHUNK))
    _copy_blocks_kernel[grid](kv_cache, src, dst, kv_cache.stride(1), BLOCK_NUMEL=numel, CHUNK=COPY_CHUNK)


def _check_cache(name: str, cache: torch.Tensor, *, dims: int) -> None:
    if not cache.is_floating_point() or cache.dim() != dims or not cache.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dims}-d float tensor, got {cache.dtype} {tuple(cache.shape)}")


def _check_index(name: str, index: torch.Tensor, device: torch.device) -> None:
    if index.dtype not in INDEX_DTYPES or index.dim() != 1 or not index.is_contiguous():
        raise TypeError(f"{name} must be a contiguous 1-d int64/int32 tensor, got {index.dtype} {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device}, the cache on {device}")
