"""Triton KV-cache writes (store by slot, prefix injection, block copies) against the oracles in
`quiver.kernels.reference`."""

import pytest
import torch

from quiver.kernels import kv_cache, reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_same(out, ref, *, exact):
    """Exact when no dtype conversion happens; else within one rounding of the cache dtype (the interpreter
    rounds fp32 -> bf16 toward zero, the GPU to nearest)."""
    assert torch.equal(out.isnan(), ref.isnan())
    o, r = out.nan_to_num(0).double(), ref.nan_to_num(0).double()
    if exact:
        assert torch.equal(o, r)
    else:
        assert ((o - r).abs() <= r.abs() * torch.finfo(out.dtype).eps).all()


def run_store_kv(dtype, src_dtype, *, n_tokens, n_blocks, block_size, kv_heads, head_dim, device):
    gen = torch.Generator().manual_seed(n_tokens)
    qkv = torch.randn(n_tokens, 3 * kv_heads, head_dim, generator=gen).to(device=device, dtype=src_dtype)
    key, value = qkv[:, kv_heads:2 * kv_heads], qkv[:, 2 * kv_heads:]  # strided views, as from a fused qkv
    slots = torch.randperm(n_blocks * block_size, generator=gen)[:n_tokens].to(device)
    shape = (n_blocks, block_size, kv_heads, head_dim)
    out = [poisoned(shape, dtype, device) for _ in range(2)]
    ref = [poisoned(shape, dtype, device) for _ in range(2)]
    kv_cache.store_kv(key, value, *out, slots)
    reference.store_kv(key, value, *ref, slots)
    for o, r in zip(out, ref):
        assert_same(o.cpu(), r.cpu(), exact=dtype == src_dtype)


def run_write_prefix(dtype, *, n_layers, n_entries, n_blocks, block_size, kv_heads, head_dim, device):
    gen = torch.Generator().manual_seed(n_entries)
    prefix = torch.randn(n_layers, 2, n_entries, kv_heads, head_dim, generator=gen).to(device)
    n_used = (n_entries + block_size - 1) // block_size
    block_ids = torch.randperm(n_blocks, generator=gen)[:n_used].to(device)
    shape = (n_layers, 2, n_blocks, block_size, kv_heads, head_dim)
    out, ref = poisoned(shape, dtype, device), poisoned(shape, dtype, device)
    kv_cache.write_prefix(out, prefix, block_ids)
    reference.write_prefix(ref, prefix, block_ids)
    assert_same(out.cpu(), ref.cpu(), exact=dtype == torch.float32)


def run_copy_blocks(dtype, *, n_layers, n_blocks, n_copies, block_size, kv_heads, head_dim, device):
    gen = torch.Generator().manual_seed(n_copies)
    shape = (n_layers, 2, n_blocks, block_size, kv_heads, head_dim)
    out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    ref = out.clone()
    perm = torch.randperm(n_blocks, generator=gen)
    src, dst = perm[:n_copies].to(device), perm[n_copies:2 * n_copies].to(device)
    kv_cache.copy_blocks(out, src, dst)
    reference.copy_blocks(ref, src, dst)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv(dtype):
    run_store_kv(dtype, dtype, n_tokens=7, n_blocks=5, block_size=4, kv_heads=2, head_dim=12, device="cpu")


def test_store_kv_casts_to_cache_dtype():
    run_store_kv(torch.bfloat16, torch.float32, n_tokens=5, n_blocks=3, block_size=4, kv_heads=3, head_dim=8,
                 device="cpu")


@pytest.mark.parametrize("n_entries", [1, 8, 13])  # less than a block, exactly two blocks, a partial last block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_prefix(n_entries, dtype):
    run_write_prefix(dtype, n_layers=3, n_entries=n_entries, n_blocks=9, block_size=4, kv_heads=2, head_dim=8,
                     device="cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks(dtype):
    run_copy_blocks(dtype, n_layers=2, n_blocks=8, n_copies=3, block_size=4, kv_heads=2, head_dim=8, device="cpu")


def test_launchers_reject_bad_inputs():
    cache = torch.zeros(4, 4, 2, 8)
    key = torch.zeros(3, 2, 8)
    with pytest.raises(TypeError, match="slot_mapping"):
        kv_cache.store_kv(key, key, cache, cache.clone(), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="key"):
        kv_cache.store_kv(key[:, :1], key, cache, cache.clone(), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cannot hold"):
        kv_cache.write_prefix(torch.zeros(1, 2, 4, 4, 2, 8), torch.zeros(1, 2, 9, 2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same length"):
        kv_cache.copy_blocks(torch.zeros(1, 2, 4, 4, 2, 8), torch.tensor([0, 1]), torch.tensor([2]))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_ops_gpu(dtype):
    dims = dict(block_size=16, kv_heads=8, head_dim=128, device="cuda")
    run_store_kv(dtype, dtype, n_tokens=3000, n_blocks=400, **dims)
    run_write_prefix(dtype, n_layers=30, n_entries=100, n_blocks=50, **dims)
    run_copy_blocks(dtype, n_layers=30, n_blocks=64, n_copies=20, **dims)
