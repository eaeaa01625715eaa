"""Shared test data for the kernel tests: adapter mixes, random inputs and error measures (the float64
oracles they are checked against are `quiver.kernels.reference`).

Every index tensor follows `quiver.kernels.ops`'s running example, e.g. seg_starts [0, 3, 3, 4, 7],
seg_slots [2, 0, -1, 2], ranks [8, 64, 16].
"""

import torch

MIXES = ("distinct", "uniform", "zipf", "identical", "huge", "empty", "no_adapter")

# (mix, projections, dtype): every mix, both P, every dtype, kept few because the interpreter is slow.
LORA_CASES = [
    ("distinct", 3, torch.bfloat16),
    ("uniform", 1, torch.float32),
    ("zipf", 3, torch.float16),
    ("identical", 1, torch.bfloat16),
    ("huge", 3, torch.float32),
    ("empty", 1, torch.float16),
    ("no_adapter", 3, torch.bfloat16),
]

# ‖out − ref‖ / ‖ref‖ allowed per input dtype (fp32 runs in full fp32; half types round operands and outputs).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# paged attention cases, name: (q_lens, ctx_lens, heads, kv heads, block size, head dim, dtype)
ATTENTION_CASES = {
    "decode-gqa3": ([1, 1, 1], [16, 3, 40], 6, 2, 4, 16, torch.float32),
    "prefill-no-context": ([19], [0], 4, 4, 8, 16, torch.float32),
    "prefill-chunk-with-context-gqa4": ([13], [21], 8, 2, 4, 16, torch.bfloat16),
    "mixed-gqa3": ([1, 9, 1, 70, 2], [30, 0, 5, 12, 7], 6, 2, 16, 16, torch.float16),
    "mixed-mha-d24-empty-seq": ([1, 5, 0, 1], [9, 4, 3, 0], 2, 2, 4, 24, torch.bfloat16),
    # many decode sequences, lengths in a mixed order (test_kernel_torch also splits them over several calls)
    "decode-many-gqa3": ([1] * 17 + [3], [33, 2, 17, 40, 5, 9, 9, 26, 0, 12, 31, 7, 22, 3, 15, 38, 11, 6],
                         6, 2, 4, 16, torch.float32),
}

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in out gives NaN, which fails every threshold."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def segments(mix: str, n_tokens: int, n_slots: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(seg_starts [N+1], seg_slots [N]) as python lists for one adapter mix over n_tokens tokens."""
    def draw(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    if mix == "distinct":  # decode: one token per segment, every adapter different
        assert n_tokens <= n_slots
        perm = torch.randperm(n_slots, generator=gen)[:n_tokens].tolist()
        return list(range(n_tokens + 1)), perm
    if mix == "identical":  # decode: one token per segment, all the same adapter
        return list(range(n_tokens + 1)), [draw(n_slots)] * n_tokens
    if mix == "huge":
        return [0, n_tokens], [draw(n_slots)]
    n_cuts = 4 if mix == "zipf" else max(1, n_tokens // 5)  # zipf: few long segments (prefill tiles)
    cuts = sorted(torch.randperm(n_tokens - 1, generator=gen)[:n_cuts].add(1).tolist())
    starts = [0, *cuts, n_tokens]
    n_segs = len(starts) - 1
    if mix == "zipf":
        weights = torch.tensor([1.0 / (k + 1) ** 1.2 for k in range(n_slots)])
        slots = torch.multinomial(weights, n_segs, replacement=True, generator=gen).tolist()
    else:
        slots = [draw(n_slots) for _ in range(n_segs)]
    if mix == "empty":  # empty segments in front, between and behind
        starts = [0, 0, *starts[1:2], starts[1], *starts[2:], n_tokens]
        slots = [draw(n_slots), slots[0], draw(n_slots), *slots[1:], draw(n_slots)]
    if mix == "no_adapter":
        slots = [-1 if i % 2 == 0 else w for i, w in enumerate(slots)]
    return starts, slots


def token_slots(starts: list[int], slots: list[int], n_tokens: int) -> list[int]:
    """The adapter slot of every token (-1: none)."""
    per_token = [-1] * n_tokens
    for s, e, w in zip(starts, starts[1:], slots):
        per_token[s:e] = [w] * (e - s)
    return per_token


def paged_batch(q_lens: list[int], ctx_lens: list[int], *, n_heads: int, kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype, gen: torch.Generator, device: str = "cpu"):
    """Random query, caches and metadata for sequences with q_lens new tokens after ctx_lens earlier ones;
    blocks are handed out shuffled so tables are not the identity."""
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    n_blocks = [(n + block_size - 1) // block_size for n in seq_lens]
    total = sum(n_blocks) + 2
    perm = torch.randperm(total, generator=gen).tolist()
    max_blocks = max(n_blocks)
    tables, used = [], 0
    for nb in n_blocks:
        row = perm[used:used + nb]
        used += nb
        tables.append(row + [perm[-1]] * (max_blocks - nb))
    t = sum(q_lens)
    kv_shape = (total, block_size, kv_heads, head_dim)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    as_i32 = dict(dtype=torch.int32, device=device)
    return dict(
        query=torch.randn(t, n_heads, head_dim, generator=gen).to(device=device, dtype=dtype),
        k_cache=torch.randn(kv_shape, generator=gen).to(device=device, dtype=dtype),
        v_cache=torch.randn(kv_shape, generator=gen).to(device=device, dtype=dtype),
        block_tables=torch.tensor(tables, **as_i32),
        seq_lens=torch.tensor(seq_lens, **as_i32),
        query_starts=torch.tensor(starts, **as_i32),
        scale=head_dim ** -0.5,
    )


def make_lora(mix, n_proj, dtype, *, seed, n_tokens, n_slots, h_in, out_dims, device="cpu"):
    """Random adapters with ranks 1..64 (both ends included) and the segment tensors for one mix."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, 65, (n_slots,), generator=gen)
    ranks[0], ranks[-1] = 1, 64
    r_max = int(ranks.max())
    starts, slots = segments(mix, n_tokens, n_slots, gen)
    offsets = [0]
    for d in out_dims[:n_proj]:
        offsets.append(offsets[-1] + d)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    i32 = dict(dtype=torch.int32, device=device)
    return dict(
        x=rand(n_tokens, h_in),
        a=rand(n_proj, n_slots, r_max, h_in, std=h_in ** -0.5),
        b=rand(n_slots, offsets[-1], r_max, std=0.2),
        y=rand(n_tokens, offsets[-1]),
        seg_starts=torch.tensor(starts, **i32),
        seg_slots=torch.tensor(slots, **i32),
        ranks=ranks.to(**i32),
        scales=(torch.rand(n_slots, generator=gen) + 0.5).to(device),
        offsets=offsets,
        per_token=token_slots(starts, slots, n_tokens),
    )
