"""The CPU's C kernels (`quiver.kernels.native`: cpu_decode.c, cpu_layer.c, cpu_lora.c, cpu_sample.c) against
float64 oracles and torch, each test twice: built for this CPU (AVX-512 here) and built without AVX-512 (the
portable loops a machine without it runs); and their build: cached by content, bound to torch's OpenMP runtime,
and a machine without a compiler keeps the pure-torch path."""

import ast
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import ATTENTION_CASES, paged_batch, rel_err

from quiver.kernels import native, reference, torch_attention

needs_build = pytest.mark.skipif(not native.available(), reason="no C compiler here")


@pytest.fixture(autouse=True, scope="module", params=["this-cpu", "without-avx512"])
def build(request, tmp_path_factory):
    """Every test of this module with the library built for this CPU, then with one built without AVX-512."""
    if request.param == "this-cpu" or not native.available():
        yield request.param
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUIVER_CACHE_DIR", str(tmp_path_factory.mktemp("portable")))
        patch.setattr(native, "_FLAGS", [*native._FLAGS, "-mno-avx512f"])
        patch.setattr(native, "_loaded", {})
        assert native.available()
        yield request.param


def test_built_wherever_a_compiler_is():
    """The tests below skip without a compiler; with one, a build that fails must fail here, not skip them."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here")
    assert native.available()

# (q_lens, ctx_lens, heads, kv heads, block size, head dim): every head size the kernel has a copy for (16, 32,
# 64, 80, 128) and one it runs generically (8, 24), GQA and MHA, block sizes below, at and above 16 and not a
# power of two, contexts of 1 entry, of a block's end and of a thousand; a prefill row among them is left alone.
CASES = {
    "d16-gqa2-bs16": ([1] * 9, [0, 1, 14, 15, 16, 31, 40, 100, 7], 4, 2, 16, 16),
    "d64-gqa3-bs16": ([1] * 6, [300, 2, 63, 64, 17, 1000], 9, 3, 16, 64),
    "d128-mha-bs32": ([1] * 4, [5, 70, 33, 200], 2, 2, 32, 128),
    "d32-gqa4-bs5": ([1] * 5, [4, 5, 6, 23, 51], 8, 2, 5, 32),
    "d80-gqa2-bs4": ([1, 1], [9, 90], 4, 2, 4, 80),
    "d8-generic": ([1, 1, 1], [3, 30, 12], 6, 2, 4, 8),
    "d24-generic-with-prefill": ([1, 7, 1], [40, 3, 9], 4, 4, 8, 24),
}


def decode_rows(q_lens):
    starts = [sum(q_lens[:b]) for b in range(len(q_lens))]
    return [starts[b] for b, q in enumerate(q_lens) if q == 1]


@needs_build
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_the_oracle(name, threads, monkeypatch):
    q_lens, ctx_lens, heads, kv_heads, block_size, dim = CASES[name]
    if threads > 1:  # every call starts its threads
        monkeypatch.setattr(native, "_THREADS_MIN_VALUES", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    batch = paged_batch(q_lens, ctx_lens, n_heads=heads, kv_heads=kv_heads, head_dim=dim, block_size=block_size,
                        dtype=torch.float32, gen=torch.Generator().manual_seed(len(name)))
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    query = torch.cat([query, torch.randn_like(query)], dim=1)[:, :heads]  # rows further apart than H * D
    out = torch.full_like(query, float("nan")).contiguous()
    entries = sum(n + q for n, q in zip(ctx_lens, q_lens) if q == 1)
    assert native.decode_attention(query, k_cache, v_cache, out=out, entries=entries, **batch)
    ref = reference.paged_attention(query, k_cache, v_cache, batch["block_tables"], batch["seq_lens"],
                                    batch["query_starts"], batch["scale"])
    rows = decode_rows(q_lens)
    assert rel_err(out[rows], ref[rows]) < 1e-6
    others = [t for t in range(out.shape[0]) if t not in rows]
    assert out[others].isnan().all()  # a prefill row is not the kernel's


@needs_build
def test_a_large_score_spread_underflows_to_zero_not_nan():
    """Scores 100 apart: the small ones' weights underflow (as expf's would) and the result is the top value."""
    k_cache = torch.zeros(2, 16, 1, 16)
    v_cache = torch.randn(2, 16, 1, 16)
    k_cache[0, 3, 0, 0] = 1.0
    query = torch.zeros(1, 1, 16)
    query[0, 0, 0] = 1000.0
    out = torch.empty(1, 1, 16)
    meta = dict(block_tables=torch.tensor([[0, 1]], dtype=torch.int32), seq_lens=torch.tensor([20], dtype=torch.int32),
                query_starts=torch.tensor([0, 1], dtype=torch.int32))
    assert native.decode_attention(query, k_cache, v_cache, out=out, entries=20, scale=1.0, **meta)
    assert torch.equal(out[0, 0], v_cache[0, 3, 0])


@needs_build
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_are_declined_and_the_torch_path_serves_them(dtype):
    q_lens, ctx_lens, heads, kv_heads, block_size, dim = CASES["d16-gqa2-bs16"]
    batch = paged_batch(q_lens, ctx_lens, n_heads=heads, kv_heads=kv_heads, head_dim=dim, block_size=block_size,
                        dtype=dtype, gen=torch.Generator().manual_seed(3))
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    assert not native.decode_attention(query, k_cache, v_cache, out=torch.empty_like(query), entries=1, **batch)
    out = torch_attention.paged_attention(query, k_cache, v_cache, **batch)
    ref = reference.paged_attention(query, k_cache, v_cache, batch["block_tables"], batch["seq_lens"],
                                    batch["query_starts"], batch["scale"])
    assert rel_err(out, ref) < 2e-2


@needs_build
@pytest.mark.parametrize("name", ["decode-gqa3", "mixed-gqa3", "decode-many-gqa3"])
def test_the_torch_backend_gives_the_same_with_and_without_the_kernel(name, monkeypatch):
    q_lens, ctx_lens, heads, kv_heads, block_size, dim, _ = ATTENTION_CASES[name]
    batch = paged_batch(q_lens, ctx_lens, n_heads=heads, kv_heads=kv_heads, head_dim=dim, block_size=block_size,
                        dtype=torch.float32, gen=torch.Generator().manual_seed(9))
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    with_kernel = torch_attention.paged_attention(query, k_cache, v_cache, **batch)
    monkeypatch.setattr(native, "_loaded", {"lib": None})
    without = torch_attention.paged_attention(query, k_cache, v_cache, **batch)
    assert rel_err(with_kernel, without) < 1e-6


@needs_build
def test_the_library_is_built_once_per_source_and_a_failed_build_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUIVER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    assert native.available()
    built = list((tmp_path / "kernels").glob("quiver_cpu-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "kernels").iterdir() if p.is_dir()]  # no temporary left
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert native.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    monkeypatch.setattr(native, "_FLAGS", [*native._FLAGS, "-DQUIVER_TEST_REBUILD"])  # as if the sources changed
    monkeypatch.setattr(native, "_loaded", {})
    assert native.available()
    (rebuilt,) = (tmp_path / "kernels").glob("quiver_cpu-*.so")  # the earlier build removed
    assert rebuilt != built[0]

    monkeypatch.setenv("QUIVER_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    monkeypatch.setattr(native, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
    assert "could not build the CPU kernels" in caplog.text
    q_lens, ctx_lens, heads, kv_heads, block_size, dim = CASES["d16-gqa2-bs16"]
    batch = paged_batch(q_lens, ctx_lens, n_heads=heads, kv_heads=kv_heads, head_dim=dim, block_size=block_size,
                        dtype=torch.float32, gen=torch.Generator().manual_seed(4))
    query, k_cache, v_cache = batch.pop("query"), batch.pop("k_cache"), batch.pop("v_cache")
    out = torch_attention.paged_attention(query, k_cache, v_cache, **batch)  # the pure-torch path
    ref = reference.paged_attention(query, k_cache, v_cache, batch["block_tables"], batch["seq_lens"],
                                    batch["query_starts"], batch["scale"])
    assert rel_err(out, ref) < 1e-5


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("QUIVER_NATIVE_KERNELS", "0")
    monkeypatch.setattr(native, "_loaded", {})
    assert not native.available()


# The layer's elementwise steps (cpu_layer.c) against float64 torch, and rope bit for bit against the torch ops
# the forward runs without the C kernels.

@needs_build
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n", [64, 576, 37])  # the skeleton's and the default model's widths, and an odd one
def test_add_rms_norm(residual, n):
    gen = torch.Generator().manual_seed(n)
    delta = torch.randn(9, n + 5, generator=gen)[:, :n] * 3  # rows further apart than n
    res = torch.randn(9, n, generator=gen) if residual else None
    weight, eps = torch.randn(n, generator=gen), 1e-5
    out, r = native.add_rms_norm(delta, res, weight, eps)
    want_r = delta.double() + (res.double() if residual else 0)
    want = weight.double() * want_r * torch.rsqrt(want_r.pow(2).mean(-1, keepdim=True) + eps)
    assert torch.equal(r, want_r.float())  # one rounded add, as torch's
    assert rel_err(out, want) < 1e-6


@needs_build
def test_rope_store_is_bit_for_bit_the_torch_ops():
    t, heads, kv_heads, dim, block_size = 7, 6, 2, 16, 4
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim + 3, generator=gen)[:, : (heads + 2 * kv_heads) * dim]
    cos, sin = torch.randn(t, 1, dim, generator=gen), torch.randn(t, 1, dim, generator=gen)
    slots = torch.tensor([5, 6, 17, 0, 31, 2, 12])
    k_cache = torch.full((8, block_size, kv_heads, dim), float("nan"))
    v_cache = torch.full((8, block_size, kv_heads, dim), float("nan"))
    q = native.rope_store(qkv, cos, sin, slots, k_cache, v_cache, heads=heads, kv_heads=kv_heads, dim=dim)
    qk = qkv[:, : (heads + kv_heads) * dim].view(t, heads + kv_heads, dim)
    qk = qk * cos + qk.roll(dim // 2, dims=-1) * sin
    k_want, v_want = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    torch_attention.store_kv(qk[:, heads:], qkv[:, (heads + kv_heads) * dim :].view(t, kv_heads, dim),
                             k_want, v_want, slots)
    assert torch.equal(q, qk[:, :heads])
    assert torch.equal(k_cache.nan_to_num(7), k_want.nan_to_num(7))  # untouched slots stay NaN on both sides
    assert torch.equal(v_cache.nan_to_num(7), v_want.nan_to_num(7))


@needs_build
@pytest.mark.parametrize("n", [176, 1536, 13])
def test_silu_mul(n):
    gen = torch.Generator().manual_seed(n)
    gate_up = torch.randn(5, 2 * n + 4, generator=gen)[:, : 2 * n] * 6
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -88.0])  # e^-x overflowing and underflowing
    out = native.silu_mul(gate_up, n)
    x = gate_up.double()
    want = torch.nn.functional.silu(x[:, :n]) * x[:, n:]
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < 1e-6
    assert ((out - want).abs() <= 1e-6 * want.abs() + 1e-30).float().mean() > 0.999  # elementwise, not only in norm


@needs_build
def test_a_layout_the_kernels_do_not_take_is_refused_not_read():
    with pytest.raises(ValueError, match="layout"):
        native.silu_mul(torch.randn(4, 8).t(), 2)  # columns not contiguous
    with pytest.raises(ValueError, match="layout"):
        native.rope_store(torch.randn(3, 64), torch.randn(3, 16), torch.randn(3, 16), torch.tensor([0, 1, 2], dtype=torch.int32),
                          torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16), heads=2, kv_heads=1, dim=16)
    # decode attention declines (the torch path then serves) a cache whose head size or shape is not the query's,
    # and metadata of mismatched lengths
    i32 = torch.int32
    q, out = torch.randn(2, 4, 16), torch.empty(2, 4, 16)
    cache = torch.zeros(3, 4, 2, 16)
    meta = {"block_tables": torch.zeros(2, 1, dtype=i32), "seq_lens": torch.ones(2, dtype=i32),
            "query_starts": torch.arange(3, dtype=i32)}
    assert native.decode_attention(q, cache, cache, scale=1.0, out=out, entries=2, **meta)
    assert not native.decode_attention(q, torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8), scale=1.0, out=out,
                                       entries=2, **meta)
    assert not native.decode_attention(q, cache, torch.zeros(3, 4, 2, 32), scale=1.0, out=out, entries=2, **meta)
    assert not native.decode_attention(q, torch.zeros(3, 4, 3, 16), torch.zeros(3, 4, 3, 16), scale=1.0, out=out,
                                       entries=2, **meta)  # 4 query heads over 3 kv heads
    assert not native.decode_attention(q, cache, cache, scale=1.0, out=out, entries=2,
                                       **{**meta, "query_starts": torch.arange(2, dtype=i32)})


@needs_build
@pytest.mark.parametrize("r_max,h_in,out", [(8, 64, 64), (40, 50, 37), (16, 576, 1536)])
def test_lora_apply_short_segments_against_the_oracle(r_max, h_in, out):
    """Rows of segments up to max_rows (2 here) get their delta, ranks below, at and above 16 and a slot of rank 0;
    a longer segment and no-adapter rows are left alone; y is a column slice of a wider output."""
    gen = torch.Generator().manual_seed(r_max)
    slots_n = 6
    a = torch.randn(1, slots_n, r_max, h_in, generator=gen) * h_in ** -0.5
    b = torch.randn(slots_n, out, r_max, generator=gen) * 0.2
    ranks = torch.tensor([r_max, 1, 0, min(17, r_max), r_max // 2, 3], dtype=torch.int32)
    scales = torch.rand(slots_n, generator=gen) + 0.5
    seg_starts = torch.tensor([0, 1, 3, 4, 5, 9, 10, 12], dtype=torch.int32)  # the segment 5:9 is long (4 rows)
    seg_slots = torch.tensor([0, 3, -1, 2, 1, 4, 5], dtype=torch.int32)
    x = torch.randn(12, h_in, generator=gen)
    wide = torch.randn(12, out + 9, generator=gen)
    before = wide.clone()
    y = wide[:, 4 : 4 + out]
    assert native.adapter_apply(y, x, a, b, seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks, scales=scales,
                             max_rows=2)
    want = before[:, 4 : 4 + out].double()
    for s, e, w in zip(seg_starts.tolist(), seg_starts[1:].tolist(), seg_slots.tolist()):
        if w >= 0 and e - s <= 2:
            r = int(ranks[w])
            want[s:e] += scales[w].double() * (x[s:e].double() @ a[0, w, :r].double().t()) @ b[w, :, :r].double().t()
    assert rel_err(y, want) < 1e-6
    assert torch.equal(y[5:9], before[5:9, 4 : 4 + out])  # the long segment: the caller's
    assert torch.equal(y[3], before[3, 4 : 4 + out]) and torch.equal(y[4], before[4, 4 : 4 + out])  # no adapter; rank 0
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + out :], before[:, 4 + out :])


@needs_build
def test_adapter_apply_checks_every_call_its_stack_was_checked_for():
    """The stacks' checks are kept from one call to the next (by their `a`); a call with another tensor in the
    stack's place, a stack that no longer fits, rows of another layout or a stack gone is checked afresh."""
    i32 = {"dtype": torch.int32}
    stack = {"a": torch.randn(1, 4, 2, 16), "b": torch.randn(4, 8, 2), "ranks": torch.full((4,), 2, **i32),
             "scales": torch.ones(4)}
    seg = {"seg_starts": torch.arange(5, **i32), "seg_slots": torch.arange(4, **i32), "max_rows": 1}

    def call(y=None, x=None, **changed):
        kw = {**stack, **changed}
        y = torch.zeros(4, 8) if y is None else y
        x = torch.randn(4, 16) if x is None else x
        return native.adapter_apply(y, x, kw.pop("a"), kw.pop("b"), **kw, **seg)

    assert call() and call()
    assert not call(b=torch.randn(4, 2, 8).transpose(1, 2))  # another b, not contiguous
    assert not call(b=torch.randn(4, 8, 3))  # another b, its rank not a's
    assert not call(scales=torch.ones(4, dtype=torch.float64))
    assert not call(ranks=torch.full((4,), 2, dtype=torch.int64))
    assert not call(a_bias=torch.randn(4, 3))  # a bias of the wrong shape
    assert not call(y=torch.zeros(8, 4).t()) and not call(x=torch.randn(16, 4).t())  # rows' columns apart
    assert not call(y=torch.zeros(4, 9)) and not call(y=torch.zeros(4, 8, dtype=torch.float64))
    assert not call(y=torch.zeros(2, 2, 8))
    assert call()  # the stack as it was: still taken
    stack["b"].data = torch.randn(4, 8, 3)  # the same tensor object, moved to new storage of another shape
    assert not call()
    key = id(stack["a"])
    stack.clear()
    assert key not in native._checked_weights  # the entry left with its stack


@needs_build
def test_the_kernels_run_on_torchs_openmp_runtime_not_a_second_one():
    """The library is linked with -fopenmp: it must bind to the libgomp torch loaded (its parallel loops then run
    on the team torch's ops use), never load the system's beside it (two teams would fight for the cores)."""
    code = """
import torch
from quiver.kernels import native
torch.set_num_threads(2)
native._THREADS_MIN_VALUES = 0
x, y = torch.randn(4, 16), torch.zeros(4, 16)
a, b = torch.randn(1, 4, 2, 16), torch.randn(4, 16, 2)
i32 = dict(dtype=torch.int32)
assert native.adapter_apply(y, x, a, b, seg_starts=torch.arange(5, **i32), seg_slots=torch.arange(4, **i32),
                            ranks=torch.full((4,), 2, **i32), scales=torch.ones(4), max_rows=1)
assert y.abs().sum() > 0
print(sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    paths = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    torch_lib = str(Path(torch.__file__).parent / "lib")
    assert paths and all(p.startswith(torch_lib) for p in paths), paths


@needs_build
@pytest.mark.parametrize("n", [512, 49152, 7, 37])
def test_greedy_rows_is_torch_argmax_and_isfinite(n):
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(9, n + 3, generator=gen)[:, :n]  # rows further apart than n
    logits[1, n // 2] = logits[1, n - 1] = logits[1].max() + 1  # a tie: the first index wins, as torch's
    logits[2, :] = 3.0  # all equal: index 0
    logits[3, n - 1] = float("inf")
    logits[4, 0] = float("nan")
    logits[5, n // 3] = float("-inf")
    logits[6, -1] = logits[6].max() + 1  # the largest value last (in the tail past the vectors when n % 16)
    best, finite = native.greedy_rows(logits)
    assert finite.tolist() == [True, True, True, False, False, False, True, True, True]
    keep = finite
    assert torch.equal(best[keep], logits.argmax(-1)[keep])
