"""The torch backend (the CPU serving path) against the float64 oracles (`quiver.kernels.reference`)."""

import pytest
import torch
from kernel_cases import (
    ATTENTION_CASES,
    LORA_CASES,
    MIXES,
    TOLERANCE,
    make_lora,
    paged_batch,
    rel_err,
)

from quiver.kernels import native, reference, torch_attention, torch_lora


@pytest.mark.parametrize("mix,n_proj,dtype", LORA_CASES, ids=[f"{m}-P{p}-{str(d)[6:]}" for m, p, d in LORA_CASES])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("one_rank", [False, True], ids=["mixed-ranks", "one-rank"])
def test_lora_shrink_and_expand(mix, n_proj, dtype, activation, one_rank):
    """With one rank for every adapter, short segments take the in-place slot-range path."""
    c = make_lora(mix, n_proj, dtype, seed=42, n_tokens=80 if mix == "huge" else 16, n_slots=16, h_in=48,
                  out_dims=[32, 16, 16])
    if one_rank:
        c["ranks"].fill_(16)
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    r_max = c["a"].shape[2]
    bias = torch.randn(16, r_max) if n_proj == 1 else None
    out = torch.full((n_proj, 80 if mix == "huge" else 16, r_max), float("nan"))
    torch_lora.lora_shrink(c["x"], c["a"], out=out, bias=bias, activation=activation, **kw)
    ref = reference.lora_shrink(c["x"], c["a"], c["per_token"], c["ranks"].tolist(), bias=bias, activation=activation)
    defined = ~ref.isnan()
    assert out[~defined].isnan().all()
    assert rel_err(out[defined], ref[defined]) < TOLERANCE[dtype]

    buf = ref.nan_to_num(0.0).float()
    up_bias = torch.randn(16, c["offsets"][-1]).to(dtype) if n_proj == 1 else None
    y = c["y"].clone()
    torch_lora.lora_expand(y, buf, c["b"], out_offsets=c["offsets"], scales=c["scales"], bias=up_bias, **kw)
    ref_y = reference.lora_expand(c["y"], buf, c["b"], c["per_token"], c["ranks"].tolist(), c["scales"].tolist(),
                                  c["offsets"], bias=up_bias)
    assert rel_err(y, ref_y) < TOLERANCE[dtype]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_rank", [False, True], ids=["mixed-ranks", "one-rank"])
@pytest.mark.parametrize("n_slots", [16, 64], ids=["dense-slots", "sparse-slots"])
@pytest.mark.parametrize("columns", [False, True], ids=["own-tensor", "columns-of-a-fused-output"])
@pytest.mark.parametrize("c_kernel", [True, False], ids=["c", "torch"])
def test_lora_apply(mix, dtype, one_rank, n_slots, columns, c_kernel, monkeypatch):
    """The fused shrink-then-expand of one projection (the CPU path's form) against the float64 oracle: the slot
    grid path (dense slots, some cells empty or with several rows) and the gathered fallback (sparse slots); into
    a tensor of its own, or into its columns of a wider output (the forward's fused q/k/v GEMM), the columns
    around them untouched. Float32's short rows go through the C kernel (native.adapter_apply) unless it is off."""
    if not c_kernel:
        monkeypatch.setattr(native, "_loaded", {"lib": None})
    n_tokens = 80 if mix == "huge" else 16
    c = make_lora(mix, 1, dtype, seed=7, n_tokens=n_tokens, n_slots=n_slots, h_in=48, out_dims=[32])
    if one_rank:
        c["ranks"].fill_(16)
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    fused = torch.randn(n_tokens, 8 + 32 + 24).to(dtype)
    before = fused.clone()
    y = fused[:, 8:40] if columns else c["y"].clone()
    y.copy_(c["y"])
    torch_lora.lora_apply(y, c["x"], c["a"], c["b"], out_offsets=c["offsets"], scales=c["scales"], **kw)
    if columns:
        assert torch.equal(fused[:, :8], before[:, :8]) and torch.equal(fused[:, 40:], before[:, 40:])
    buf = reference.lora_shrink(c["x"], c["a"], c["per_token"], c["ranks"].tolist()).nan_to_num(0.0)
    ref = reference.lora_expand(c["y"], buf, c["b"], c["per_token"], c["ranks"].tolist(), c["scales"].tolist(),
                                c["offsets"])
    untouched = torch.tensor([w < 0 for w in c["per_token"]])
    assert torch.equal(y[untouched], c["y"][untouched]), "changed the rows of no-adapter tokens"
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("mix", ["distinct", "uniform", "huge", "no_adapter"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("c_kernel", [True, False], ids=["c", "torch"])
@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in-place"])
def test_bottleneck_apply(mix, activation, c_kernel, in_place, monkeypatch):
    """A bottleneck adapter's delta (shrink with its bias and non-linearity, expand with its bias) against the
    float64 oracle's shrink then expand, float32: in C when every segment is short enough (decode, 5-row
    segments), else (an 80-row segment, or the C kernels off) through lora_shrink and lora_expand. In place (x is
    y, as the adapter layers call it): each row's delta is still that of its input before any delta."""
    if not c_kernel:
        monkeypatch.setattr(native, "_loaded", {"lib": None})
    n_tokens = 80 if mix == "huge" else 16
    c = make_lora(mix, 1, torch.float32, seed=8, n_tokens=n_tokens, n_slots=16, h_in=32, out_dims=[32])
    x = c["y"].clone() if in_place else torch.randn(n_tokens, 32, generator=torch.Generator().manual_seed(9))
    down = c["a"]  # [1, S, N, 32]: the bottleneck reads the layer's output, 32 wide
    down_bias, up_bias = torch.randn(16, down.shape[2]), torch.randn(16, 32)
    buf = reference.lora_shrink(x, down, c["per_token"], c["ranks"].tolist(), bias=down_bias, activation=activation)
    want = reference.lora_expand(c["y"], buf.nan_to_num(0.0), c["b"], c["per_token"], c["ranks"].tolist(),
                                 c["scales"].tolist(), c["offsets"], bias=up_bias)
    y = x if in_place else c["y"].clone()
    torch_lora.bottleneck_apply(y, x, down, c["b"], seg_starts=c["seg_starts"], seg_slots=c["seg_slots"],
                                sizes=c["ranks"], scales=c["scales"], down_bias=down_bias, up_bias=up_bias,
                                activation=activation)
    assert rel_err(y, want) < 1e-5
    untouched = torch.tensor([w < 0 for w in c["per_token"]])
    assert torch.equal(y[untouched], c["y"][untouched])


@pytest.mark.parametrize("depth", [1, 2], ids=["one-row-a-slot", "two-rows-a-slot"])
@pytest.mark.parametrize("ranks", ["one-rank", "two-ranks"])
@pytest.mark.parametrize("columns", [False, True], ids=["own-tensor", "columns-of-a-fused-output"])
@pytest.mark.parametrize("c_kernel", [True, False], ids=["c", "torch"])
def test_lora_apply_over_rows_in_slot_order(depth, ranks, columns, c_kernel, monkeypatch):
    """A decode step whose every row has an adapter, slots dense and in the rows' order (the runner sorts chunks
    by slot): the grid is the rows themselves, read and added to without gathering (torch), or one row at a time
    (C); against the float64 oracle."""
    if not c_kernel:
        monkeypatch.setattr(native, "_loaded", {"lib": None})
    n_slots, n_tokens = 16, 16 * depth
    c = make_lora("distinct", 1, torch.float32, seed=11, n_tokens=16, n_slots=n_slots, h_in=48, out_dims=[32])
    c["x"] = torch.randn(n_tokens, 48, generator=torch.Generator().manual_seed(12))
    c["y"] = torch.randn(n_tokens, 32, generator=torch.Generator().manual_seed(13))
    c["seg_starts"] = torch.arange(0, n_tokens + 1, depth, dtype=torch.int32)
    c["seg_slots"] = torch.arange(n_slots, dtype=torch.int32)
    c["ranks"].copy_(torch.tensor([16] * n_slots if ranks == "one-rank" else [8] * 8 + [16] * 8))
    per_token = [t // depth for t in range(n_tokens)]
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    plan = torch_lora.plan_lora(**{k: v.tolist() for k, v in kw.items()}, device=torch.device("cpu"))
    assert len(plan.short.bands) == 1 and plan.short.bands[0].in_order, "the test would not exercise that path"
    fused = torch.randn(n_tokens, 8 + 32 + 24)
    before = fused.clone()
    y = fused[:, 8:40] if columns else c["y"].clone()
    y.copy_(c["y"])
    torch_lora.lora_apply(y, c["x"], c["a"], c["b"], out_offsets=c["offsets"], scales=c["scales"], plan=plan, **kw)
    buf = reference.lora_shrink(c["x"], c["a"], per_token, c["ranks"].tolist()).nan_to_num(0.0)
    ref = reference.lora_expand(c["y"], buf, c["b"], per_token, c["ranks"].tolist(), c["scales"].tolist(), c["offsets"])
    assert rel_err(y, ref) < TOLERANCE[torch.float32]
    if columns:
        assert torch.equal(fused[:, :8], before[:, :8]) and torch.equal(fused[:, 40:], before[:, 40:])


def test_a_plan_kept_across_steps_reads_the_stacks_as_they_are_now(monkeypatch):
    """A plan's grids keep views of the layers' stacks from one call to the next (the runner keeps a step's plans
    for the next steps): a slot's weights and scale rewritten in place are what the next call reads, and another
    layer's stacks get their own views."""
    monkeypatch.setattr(native, "_loaded", {"lib": None})  # the torch path, whose grids hold the views
    c = make_lora("distinct", 1, torch.float32, seed=21, n_tokens=16, n_slots=16, h_in=48, out_dims=[32])
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    plan = torch_lora.plan_lora(**{k: v.tolist() for k, v in kw.items()}, device=torch.device("cpu"))
    assert plan.short is not None and plan.short.grid is not None, "the test would not exercise the grid's views"
    per_token, ranks = c["per_token"], c["ranks"].tolist()

    def check(a, b, scales):
        y = c["y"].clone()
        torch_lora.lora_apply(y, c["x"], a, b, out_offsets=c["offsets"], scales=scales, plan=plan, **kw)
        buf = reference.lora_shrink(c["x"], a, per_token, ranks).nan_to_num(0.0)
        want = reference.lora_expand(c["y"], buf, b, per_token, ranks, scales.tolist(), c["offsets"])
        assert rel_err(y, want) < TOLERANCE[torch.float32]

    a, b, scales = c["a"].clone(), c["b"].clone(), c["scales"].clone()
    check(a, b, scales)
    w = next(w for w in per_token if w >= 0)
    a[0, w].normal_()
    b[w].normal_()
    scales[w] = 3.0
    check(a, b, scales)  # rewritten in place: read as they are now
    check(c["a"], c["b"], c["scales"])  # another layer's stacks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["distinct", "uniform"])
def test_lora_apply_reads_slots_laid_out_by_rank_in_bands(mix, dtype):
    """Slots in rank order (as the adapter registry places them): the slot grid splits into bands read at each
    band's own rank, with the same result as the float64 oracle."""
    c = make_lora(mix, 1, dtype, seed=3, n_tokens=16, n_slots=16, h_in=48, out_dims=[32])
    c["ranks"].copy_(torch.tensor([8] * 6 + [16] * 4 + [64] * 6))
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    short = torch_lora.plan_lora(**{k: v.tolist() for k, v in kw.items()}, device=torch.device("cpu")).short
    assert len(short.bands) > 1 and short.bands[0].r < 64, "no band split: the test would not exercise the banded path"
    y = c["y"].clone()
    torch_lora.lora_apply(y, c["x"], c["a"], c["b"], out_offsets=c["offsets"], scales=c["scales"], **kw)
    buf = reference.lora_shrink(c["x"], c["a"], c["per_token"], c["ranks"].tolist()).nan_to_num(0.0)
    ref = reference.lora_expand(c["y"], buf, c["b"], c["per_token"], c["ranks"].tolist(), c["scales"].tolist(),
                                c["offsets"])
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_paged_attention(name):
    q_lens, ctx_lens, n_heads, kv_heads, block_size, head_dim, dtype = ATTENTION_CASES[name]
    gen = torch.Generator().manual_seed(5)
    batch = paged_batch(q_lens, ctx_lens, n_heads=n_heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, gen=gen)
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    out = torch_attention.paged_attention(query, k_cache, v_cache, **batch)
    ref = reference.paged_attention(query, k_cache, v_cache, batch["block_tables"], batch["seq_lens"],
                                    batch["query_starts"], batch["scale"])
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("read", ["blocks", "head-major"])
def test_paged_attention_over_several_decode_calls(read, monkeypatch):
    """Decode sequences split over batched calls by the plan's KV budget (a large entry makes it small: about
    60 entries a call here), each call padded to its longest sequence and masked, against the oracle; the KV read
    by whole blocks into SDPA, or head-major by entry into two matmuls (forced here by the size threshold); the
    C kernel, which would otherwise take these float32 decode rows, off."""
    monkeypatch.setattr(native, "_loaded", {"lib": None})
    if read == "head-major":
        monkeypatch.setattr(torch_attention, "_HEAD_MAJOR_MAX_BYTES", 1 << 30)
    q_lens, ctx_lens, n_heads, kv_heads, block_size, head_dim, dtype = ATTENTION_CASES["decode-many-gqa3"]
    batch = paged_batch(q_lens, ctx_lens, n_heads=n_heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, gen=torch.Generator().manual_seed(6))
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    plan = torch_attention.plan_attention(
        query_starts=batch["query_starts"].tolist(), seq_lens=batch["seq_lens"].tolist(),
        block_tables=batch["block_tables"].tolist(), block_size=block_size,
        entry_bytes=torch_attention._DECODE_GROUP_BYTES // 60, kv_heads=kv_heads, device=query.device)
    assert len(plan.decode) > 4 and any(g.mask is not None for g in plan.decode)
    assert all((g.entries is None) == (read == "blocks") for g in plan.decode)
    out = torch_attention.paged_attention(query, k_cache, v_cache, **batch, plan=plan)
    ref = reference.paged_attention(query, k_cache, v_cache, batch["block_tables"], batch["seq_lens"],
                                    batch["query_starts"], batch["scale"])
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_kv_writes():
    gen = torch.Generator().manual_seed(6)
    kv = torch.full((2, 2, 6, 4, 2, 8), float("nan"))
    key, value = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    torch_attention.store_kv(key, value, kv[1, 0], kv[1, 1], torch.tensor([5, 6, 17]))
    for t, slot in enumerate([5, 6, 17]):
        assert torch.equal(kv[1, 0, slot // 4, slot % 4], key[t])
        assert torch.equal(kv[1, 1, slot // 4, slot % 4], value[t])

    prefix = torch.randn(2, 2, 6, 2, 8, generator=gen)
    torch_attention.write_prefix(kv, prefix, torch.tensor([3, 0]))
    for i in range(6):
        assert torch.equal(kv[:, :, [3, 0][i // 4], i % 4], prefix[:, :, i])

    before = kv.clone()
    torch_attention.copy_blocks(kv, torch.tensor([3]), torch.tensor([5]))
    assert torch.equal(kv[:, :, 5].nan_to_num(7), before[:, :, 3].nan_to_num(7))
    assert torch.equal(kv[:, :, :5].nan_to_num(7), before[:, :, :5].nan_to_num(7))


def test_a_call_the_c_kernel_takes_builds_no_short_rows(monkeypatch):
    """The short rows' tensors (index tensors, slot grids) are the torch path's: a plan whose call goes to C never
    builds them, and one the torch path serves does."""
    if not native.available():
        pytest.skip("no C compiler here")
    c = make_lora("distinct", 1, torch.float32, seed=3, n_tokens=16, n_slots=16, h_in=48, out_dims=[32])
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    plan = torch_lora.plan_lora(**{k: v.tolist() for k, v in kw.items()}, device=torch.device("cpu"))
    torch_lora.lora_apply(c["y"].clone(), c["x"], c["a"], c["b"], out_offsets=c["offsets"], scales=c["scales"],
                          plan=plan, **kw)
    assert "short" not in vars(plan)
    monkeypatch.setattr(native, "_loaded", {"lib": None})
    torch_lora.lora_apply(c["y"].clone(), c["x"], c["a"], c["b"], out_offsets=c["offsets"], scales=c["scales"],
                          plan=plan, **kw)
    assert vars(plan)["short"] is not None
