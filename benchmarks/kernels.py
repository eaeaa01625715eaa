"""Times every kernel op on realistic shapes against the torch backend's; writes JSON, prints a table.

    python -m benchmarks.kernels [--quick | --no-quick] [--out benchmarks/out/kernels.json]

On CUDA: the Triton op and the torch backend's, timed with triton.testing.do_bench (median, L2 flushed
before every repetition), the bytes each op must move (its inputs read once, outputs written once: x,
the used rows of A/B, y read and written ...), the achieved GB/s and its fraction of the device's copy
bandwidth, measured here with a large device-to-device copy (bytes read + written). Also the relative
error of the Triton output against the torch one. On CPU: the torch path only (`--quick` by default).
Shapes: hidden 4096, q/k/v = 4096/1024/1024 (a Llama-3-8B layer), ranks 8–64 mixed, 1–512 distinct
adapters over 1–4096 tokens, bf16, segments grouped by adapter as the runner packs them.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from quiver.kernels import TORCH_OPS
from quiver.kernels.ops import kv_entry_bytes

HIDDEN, QKV, RANKS, SLOTS = 4096, (4096, 1024, 1024), (8, 16, 32, 64), 1024
KV_HEADS, HEAD_DIM, HEADS, BLOCK = 8, 128, 32, 16
LORA_FULL = [(1, 1), (64, 1), (64, 64), (512, 1), (512, 64), (512, 512), (4096, 1), (4096, 64), (4096, 512)]
LORA_QUICK = [(1, 1), (64, 1), (64, 64)]
# (name, q_lens, ctx_lens)
ATTN_FULL = [("decode 64x1024", [1] * 64, [1023] * 64), ("decode 256x512", [1] * 256, [511] * 256),
             ("prefill 2048", [2048], [0]), ("chunk 512 after 1536", [512], [1536]),
             ("mixed 32 decode + 2x512", [1] * 32 + [512, 512], [1023] * 32 + [0, 256])]
ATTN_QUICK = [("decode 8x256", [1] * 8, [255] * 8), ("chunk 64 after 64", [64], [64])]


def lora_cases(tokens_adapters, device, dtype, gen):
    """Yields (name, op, bytes, torch_fn, triton_args) for shrink (P = 3, q/k/v) and expand."""
    ranks = torch.tensor(RANKS, dtype=torch.int32)[torch.randint(0, len(RANKS), (SLOTS,), generator=gen)]
    a = (torch.randn(3, SLOTS, max(RANKS), HIDDEN, generator=gen) * HIDDEN**-0.5).to(device, dtype)
    b = (torch.randn(SLOTS, sum(QKV), max(RANKS), generator=gen) * 0.1).to(device, dtype)
    scales = torch.rand(SLOTS, generator=gen).to(device)
    offsets = torch.tensor([0, QKV[0], QKV[0] + QKV[1], sum(QKV)], dtype=torch.int32, device=device)
    ranks = ranks.to(device)
    size = torch.finfo(dtype).bits // 8
    for n_tokens, n_adapters in tokens_adapters:
        starts = torch.linspace(0, n_tokens, n_adapters + 1).round().int()
        slots = torch.randperm(SLOTS, generator=gen)[:n_adapters].int()
        seg = dict(seg_starts=starts.to(device), seg_slots=slots.to(device), ranks=ranks)
        r_tok = sum(int(ranks[w]) * int(starts[i + 1] - starts[i]) for i, w in enumerate(slots.tolist()))
        r_used = sum(int(ranks[w]) for w in slots.tolist())
        x = torch.randn(n_tokens, HIDDEN, generator=gen).to(device, dtype)
        y = torch.randn(n_tokens, sum(QKV), generator=gen).to(device, dtype)
        buf = torch.randn(3, n_tokens, max(RANKS), generator=gen).to(device) * 0.1
        name = f"T={n_tokens} adapters={n_adapters}"
        shrink_bytes = x.numel() * size + 3 * r_used * HIDDEN * size + 3 * r_tok * 4
        expand_bytes = 3 * r_tok * 4 + r_used * sum(QKV) * size + 2 * y.numel() * size
        yield (name, "lora_shrink", shrink_bytes, (x, a), dict(out=torch.empty_like(buf), **seg))
        yield (name, "lora_expand", expand_bytes, (y, buf, b), dict(out_offsets=offsets, scales=scales, **seg))


def attention_cases(cases, device, dtype, gen):
    for name, q_lens, ctx_lens in cases:
        seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
        n_blocks = [(n + BLOCK - 1) // BLOCK for n in seq_lens]
        perm = torch.randperm(sum(n_blocks), generator=gen)
        width = max(n_blocks)
        tables = torch.zeros(len(q_lens), width, dtype=torch.int32)
        used = 0
        for i, nb in enumerate(n_blocks):
            tables[i, :nb] = perm[used:used + nb]
            used += nb
        cache_shape = (sum(n_blocks), BLOCK, KV_HEADS, HEAD_DIM)
        k_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
        v_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
        t = sum(q_lens)
        query = torch.randn(t, HEADS, HEAD_DIM, generator=gen).to(device, dtype)
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        meta = dict(block_tables=tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                    query_starts=starts.to(device), scale=HEAD_DIM**-0.5)
        size = torch.finfo(dtype).bits // 8
        moved = 2 * query.numel() * size + 2 * sum(seq_lens) * KV_HEADS * HEAD_DIM * size
        yield (name, "paged_attention", moved, (query, k_cache, v_cache), meta)


def kv_cases(quick, device, dtype, gen):
    size = torch.finfo(dtype).bits // 8
    entry = KV_HEADS * HEAD_DIM
    n_layers, n_blocks = (4, 64) if quick else (32, 2048)
    kv = torch.randn(n_layers, 2, n_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    for n_tokens in (64,) if quick else (64, 4096):
        key = torch.randn(n_tokens, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
        slots = torch.randperm(n_blocks * BLOCK, generator=gen)[:n_tokens].to(device)
        yield (f"T={n_tokens}", "store_kv", 4 * n_tokens * entry * size, (key, key.clone(), kv[0, 0], kv[0, 1], slots), {})
    n_prefix = 20 if quick else 100
    prefix = torch.randn(n_layers, 2, n_prefix, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    blocks = torch.arange((n_prefix + BLOCK - 1) // BLOCK, device=device)
    yield (f"N={n_prefix} L={n_layers}", "write_prefix", 2 * prefix.numel() * size, (kv, prefix, blocks), {})
    n_copies = 4 if quick else 64
    src = torch.arange(n_copies, device=device)
    moved = 2 * n_layers * 2 * n_copies * BLOCK * entry * size
    yield (f"M={n_copies} L={n_layers}", "copy_blocks", moved, (kv, src, src + n_copies), {})


def time_cpu(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_gpu(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbps(device) -> float:
    """A 1 GiB device-to-device copy: bytes read + written over its median time."""
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    ms = time_gpu(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def run_case(name, op, moved, args, kwargs, *, triton_ops, copy_gbps):
    """Times one op; returns its JSON row. Inputs written in place are cloned for the accuracy check."""
    cuda = triton_ops is not None
    torch_fn = getattr(TORCH_OPS, op)
    triton_fn = getattr(triton_ops, op) if cuda else None
    row = {"op": op, "case": name, "bytes": moved}
    if cuda:  # before timing: the timed loops update y in place, and a drifted bf16 y would swallow the deltas
        row["rel_err"] = accuracy(op, args, kwargs, torch_fn, triton_fn)
    planned = {**kwargs, **torch_plan(op, args, kwargs)}  # the runner plans once a step, not once a call
    row["torch_ms"] = (time_gpu if cuda else time_cpu)(lambda: torch_fn(*args, **planned))
    row["torch_GBps"] = moved / row["torch_ms"] / 1e6
    if not cuda:
        return row
    row["triton_ms"] = time_gpu(lambda: triton_fn(*args, **kwargs))
    row["triton_GBps"] = moved / row["triton_ms"] / 1e6
    row["triton_frac_copy_bw"] = row["triton_GBps"] / copy_gbps
    row["speedup"] = row["torch_ms"] / row["triton_ms"]
    return row


def torch_plan(op, args, kwargs) -> dict:
    """{"plan": ...} for an op the torch backend plans (built from the metadata once, as the runner does), else {}."""
    if op == "paged_attention":
        return {"plan": TORCH_OPS.plan_attention(
            query_starts=kwargs["query_starts"].tolist(), seq_lens=kwargs["seq_lens"].tolist(),
            block_tables=kwargs["block_tables"].tolist(), block_size=args[1].shape[1],
            entry_bytes=kv_entry_bytes(args[1]), kv_heads=args[1].shape[2], device=args[0].device)}
    if op.startswith("lora_"):
        return {"plan": TORCH_OPS.plan_lora(
            seg_starts=kwargs["seg_starts"].tolist(), seg_slots=kwargs["seg_slots"].tolist(),
            ranks=kwargs["ranks"].tolist(), device=kwargs["seg_starts"].device)}
    return {}


def accuracy(op, args, kwargs, torch_fn, triton_fn):
    """Relative error of the Triton result against the torch one, on fresh copies of what the op writes."""
    if op == "paged_attention":
        return rel_err(triton_fn(*args, **kwargs), torch_fn(*args, **kwargs))
    if op == "lora_shrink":
        outs = [torch.zeros_like(kwargs["out"]) for _ in range(2)]
        for fn, out in zip((torch_fn, triton_fn), outs):
            fn(*args, **{**kwargs, "out": out})
        return rel_err(outs[1], outs[0])
    if op == "lora_expand":  # y in float32: in bf16, y + delta - y loses most of a small delta to rounding
        y0 = args[0].float()
        ys = [y0.clone() for _ in range(2)]
        for fn, y in zip((torch_fn, triton_fn), ys):
            fn(y, *args[1:], **kwargs)
        return rel_err(ys[1] - y0, ys[0] - y0)
    if op == "store_kv":
        return None  # exact copies into caches it shares with other cases; covered by the tests
    caches = [args[0].clone() for _ in range(2)]
    for fn, cache in zip((torch_fn, triton_fn), caches):
        fn(cache, *args[1:], **kwargs)
    return rel_err(caches[1], caches[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                        help="small cases (default on CPU); --no-quick for the full set")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/kernels.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = (not cuda) if args.quick is None else args.quick
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    triton_ops = None
    copy_gbps = None
    if cuda:
        from quiver.kernels.triton_ops import TRITON_OPS

        triton_ops = TRITON_OPS
        copy_gbps = copy_bandwidth_gbps(device)
    cases = [
        *lora_cases(LORA_QUICK if quick else LORA_FULL, device, dtype, gen),
        *attention_cases(ATTN_QUICK if quick else ATTN_FULL, device, dtype, gen),
        *kv_cases(quick, device, dtype, gen),
    ]
    rows = [run_case(*case, triton_ops=triton_ops, copy_gbps=copy_gbps) for case in cases]
    machine = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if cuda:
        import triton

        machine["triton"] = triton.__version__
    result = {"machine": machine, "dtype": str(dtype), "quick": quick, "copy_bandwidth_GBps": copy_gbps, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {args.out}")


def print_table(result) -> None:
    cuda = result["copy_bandwidth_GBps"] is not None
    print(f"{result['machine']['device']}, {result['dtype']}" + (
        f", copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s" if cuda else " (torch path only)"))
    head = f"{'op':16} {'case':28} {'torch ms':>9} {'GB/s':>7}"
    if cuda:
        head += f" {'triton ms':>9} {'GB/s':>7} {'of copy':>7} {'speedup':>7} {'rel err':>8}"
    print(head)
    for r in result["rows"]:
        line = f"{r['op']:16} {r['case']:28} {r['torch_ms']:9.3f} {r['torch_GBps']:7.1f}"
        if cuda:
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
            line += (f" {r['triton_ms']:9.3f} {r['triton_GBps']:7.1f} {r['triton_frac_copy_bw']:7.1%}"
                     f" {r['speedup']:7.1f} {err:>8}")
        print(line)


if __name__ == "__main__":
    main()
