"""Triton paged attention against a float64 oracle: decode, prefill chunks with context, mixed, GQA."""

import pytest
import torch
from kernel_cases import ATTENTION_CASES as CASES
from kernel_cases import TOLERANCE, paged_batch, rel_err

from quiver.kernels import attention, reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_CASES = {
    "decode-llama8b": ([1] * 64, [37 * i % 1999 + 1 for i in range(64)], 32, 8, 16, 128, torch.bfloat16),
    "mixed-smollm": ([1] * 30 + [512, 300], [100] * 30 + [0, 700], 9, 3, 16, 64, torch.bfloat16),
    "prefill-fp16": ([1000], [24], 16, 4, 32, 128, torch.float16),
    "mixed-fp32": ([1, 77, 1], [500, 33, 9], 8, 8, 16, 64, torch.float32),
}


def check(case, *, seed, device="cpu"):
    q_lens, ctx_lens, n_heads, kv_heads, block_size, head_dim, dtype = case
    gen = torch.Generator().manual_seed(seed)
    batch = paged_batch(q_lens, ctx_lens, n_heads=n_heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, gen=gen, device=device)
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    out = attention.paged_attention(query, k_cache, v_cache, **batch)
    ref = reference.paged_attention(query.cpu(), k_cache.cpu(), v_cache.cpu(), batch["block_tables"].cpu(),
                                    batch["seq_lens"].cpu(), batch["query_starts"].cpu(), batch["scale"])
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", CASES)
def test_paged_attention(name):
    check(CASES[name], seed=list(CASES).index(name))


def test_strided_query_view():
    """query split from a fused qkv projection: rows are strided."""
    gen = torch.Generator().manual_seed(3)
    batch = paged_batch([3, 1], [2, 6], n_heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, gen=gen)
    qkv = torch.randn(4, 8, 16, generator=gen)
    query = qkv[:, :4]
    out = attention.paged_attention(query, batch["k_cache"], batch["v_cache"], block_tables=batch["block_tables"],
                                    seq_lens=batch["seq_lens"], query_starts=batch["query_starts"], scale=0.3)
    ref = reference.paged_attention(query, batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                    batch["seq_lens"], batch["query_starts"], 0.3)
    assert rel_err(out, ref) < 1e-5


def test_launcher_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(4)
    batch = paged_batch([1, 2], [3, 0], n_heads=3, kv_heads=3, head_dim=16, block_size=4, dtype=torch.float32, gen=gen)
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    with pytest.raises(TypeError, match="seq_lens"):
        attention.paged_attention(query, k_cache, v_cache, **{**batch, "seq_lens": batch["seq_lens"].long()})
    with pytest.raises(ValueError, match="kv heads"):
        attention.paged_attention(query[:, :2], k_cache, v_cache, **batch)
    with pytest.raises(ValueError, match="k_cache"):
        attention.paged_attention(query, k_cache.transpose(0, 1), v_cache, **batch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_CASES)
def test_paged_attention_gpu(name):
    check(GPU_CASES[name], seed=10 + list(GPU_CASES).index(name), device="cuda")
