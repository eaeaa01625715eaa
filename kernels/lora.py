"""Triton segmented LoRA shrink and expand (SGMV style), for any mix of adapters and ranks in one launch.

Semantics, argument shapes and the running example: `quiver.kernels.ops` (`LoraShrink`, `LoraExpand`).

Work split. Tokens arrive grouped in contiguous segments that share an adapter. Each segment is cut into
tiles of BLOCK_M tokens; segment i's tiles are numbered from `s[i] // BLOCK_M + i`, a key that grows with
i and leaves room for every tile, so the grid is sized from host-known numbers (`cdiv(T, BLOCK_M) + N`)
and a program finds its segment by binary search over `seg_starts`: no prefix sum, no host sync. At most
one program per segment finds no rows and exits, as do programs of no-adapter segments. Prefill (long
segments) gets full tl.dot tiles; decode (one-token segments, the BGMV regime) gets one program per
segment that streams its adapter's weights once. Ranks are walked in chunks of 16: an adapter of rank r
costs cdiv(r, 16) chunks whatever the largest rank in the batch.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from quiver.kernels.ops import ACTIVATIONS, FLOAT_DTYPES

RANK_CHUNK = 16  # ranks are computed in chunks of this many (tl.dot's smallest dimension)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def segment_tile(starts_ptr, n_segs, tile, BLOCK_M: tl.constexpr):
    """(i, j): the segment i holding virtual tile `tile`, the largest i with starts[i] // BLOCK_M + i <= tile,
    and the tile's index j inside it (its rows start at starts[i] + j * BLOCK_M)."""
    lo = tile * 0
    hi = lo + n_segs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        hit = tl.load(starts_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(hit, mid, lo)
        hi = tl.where(hit, hi, mid)
    return lo, tile - (tl.load(starts_ptr + lo) // BLOCK_M + lo)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, bias_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr,
    n_segs, n_chunks, h_in,
    stride_xt, stride_ap, stride_as, stride_ar, stride_op, stride_ot, stride_bias,
    P: tl.constexpr, P_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    seg, j = segment_tile(seg_starts_ptr, n_segs, pid // n_chunks, BLOCK_M)
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    row0 = tl.load(seg_starts_ptr + seg) + j * BLOCK_M
    row_end = tl.load(seg_starts_ptr + seg + 1)
    r0 = chunk * BLOCK_R
    if (slot >= 0) & (j >= 0) & (row0 < row_end) & (r0 < rank):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        n = tl.arange(0, P_PAD * BLOCK_R)  # (projection, rank) pairs side by side: x is read once for all P
        p = n // BLOCK_R
        r = r0 + n % BLOCK_R
        col_mask = (p < P) & (r < rank)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xt + ks[None, :]
        a_ptrs = (
            a_ptr + slot.to(tl.int64) * stride_as + p.to(tl.int64)[None, :] * stride_ap + r[None, :] * stride_ar
            + ks[:, None]
        )
        acc = tl.zeros((BLOCK_M, P_PAD * BLOCK_R), dtype=tl.float32)
        for k0 in range(0, h_in, BLOCK_K):
            k_mask = k0 + ks < h_in
            xt = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs + k0, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT_DTYPE), at.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + slot * stride_bias + r, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == "relu":
            acc = tl.maximum(acc, 0.0)
        elif ACTIVATION == "gelu":
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        elif ACTIVATION == "silu":
            acc = acc * tl.sigmoid(acc)
        elif ACTIVATION == "tanh":
            acc = 2.0 * tl.sigmoid(2.0 * acc) - 1.0
        out_ptrs = out_ptr + p.to(tl.int64)[None, :] * stride_op + rows.to(tl.int64)[:, None] * stride_ot + r[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr, buf_ptr, b_ptr, bias_ptr, offsets_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, scales_ptr,
    n_segs, n_col_tiles, h_out,
    stride_yt, stride_bp, stride_bt, stride_bs, stride_bh, stride_bias,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    col0 = (pid % n_col_tiles) * BLOCK_N
    seg, j = segment_tile(seg_starts_ptr, n_segs, pid // n_col_tiles, BLOCK_M)
    slot = tl.load(seg_slots_ptr + seg)
    row0 = tl.load(seg_starts_ptr + seg) + j * BLOCK_M
    row_end = tl.load(seg_starts_ptr + seg + 1)
    if (slot >= 0) & (j >= 0) & (row0 < row_end):
        rank = tl.load(ranks_ptr + slot)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        cols = col0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + cols.to(tl.int64)[None, :] * stride_bh + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(P):
            lo = tl.load(offsets_ptr + p)
            hi = tl.load(offsets_ptr + p + 1)
            if (col0 < hi) & (col0 + BLOCK_N > lo):
                col_mask = (cols >= lo) & (cols < hi)
                u_ptrs = buf_ptr + p * stride_bp + rows.to(tl.int64)[:, None] * stride_bt + ks[None, :]
                for k0 in range(0, rank, BLOCK_K):
                    k_mask = k0 + ks < rank
                    ut = tl.load(u_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    wt = tl.load(w_ptrs + k0, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                    acc = tl.dot(ut.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        acc = acc * tl.load(scales_ptr + slot)
        out_mask = cols < h_out
        if HAS_BIAS:
            acc += tl.load(bias_ptr + slot * stride_bias + cols, mask=out_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + cols[None, :]
        mask = row_mask[:, None] & out_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, *, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    out: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
    plan: None = None,  # this backend plans nothing
) -> None:
    """Triton `ops.LoraShrink`:
    out[p, s[i]:s[i+1], :r] = act(x[s[i]:s[i+1]] @ a[p, w[i], :r]ᵀ + bias[w[i], :r]),  r = ranks[w[i]].

    Requires seg_starts non-decreasing with seg_starts[N] <= T; accumulates in fp32.
    """
    _check_float("x", x, dims=2)
    _check_float("a", a, dims=4, dtype=x.dtype, contiguous=True)
    _check_float("out", out, dims=3, contiguous=True)
    n_proj, n_slots, r_max, h_in = a.shape
    t = x.shape[0]
    if x.stride(1) != 1 or x.shape[1] != h_in:
        raise ValueError(f"x must be [T, {h_in}] with contiguous rows, got {tuple(x.shape)} strides {x.stride()}")
    if out.shape != (n_proj, t, r_max):
        raise ValueError(f"out must be [P, T, R_max] = {(n_proj, t, r_max)}, got {tuple(out.shape)}")
    n_segs = _check_segments(seg_starts, seg_slots, ranks, n_slots, x.device)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)} or None")
    if bias is not None:
        if n_proj != 1:
            raise ValueError(f"bias needs a single projection (P == 1), got P = {n_proj}")
        _check_float("bias", bias, dims=2, contiguous=True)
        if bias.shape != (n_slots, r_max):
            raise ValueError(f"bias must be [S, R_max] = {(n_slots, r_max)}, got {tuple(bias.shape)}")
    if n_segs == 0 or t == 0:
        return
    block_m = _block_m(t, n_segs)
    n_chunks = triton.cdiv(r_max, RANK_CHUNK)
    grid = (n_chunks * (triton.cdiv(t, block_m) + n_segs),)
    _lora_shrink_kernel[grid](
        x, a, out, bias if bias is not None else out, seg_starts, seg_slots, ranks,
        n_segs, n_chunks, h_in,
        x.stride(0), a.stride(0), a.stride(1), a.stride(2), out.stride(0), out.stride(1),
        bias.stride(0) if bias is not None else 0,
        P=n_proj, P_PAD=triton.next_power_of_2(n_proj), BLOCK_M=block_m, BLOCK_R=RANK_CHUNK, BLOCK_K=64,
        HAS_BIAS=bias is not None, ACTIVATION=activation, **dot_config(x.dtype, x.device),
    )


def lora_expand(
    y: torch.Tensor, buf: torch.Tensor, b: torch.Tensor, *, out_offsets: Sequence[int] | torch.Tensor,
    seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
    bias: torch.Tensor | None = None, plan: None = None,
) -> None:
    """Triton `ops.LoraExpand`, for cols = off[p]:off[p+1]:
    y[s[i]:s[i+1], cols] += scales[w[i]] · buf[p, s[i]:s[i+1], :r] @ b[w[i], cols, :r]ᵀ + bias[w[i], cols].

    out_offsets must run from 0 to H_out_total; pass it as an int32 device tensor built once per layer to
    spare a host-to-device copy per call.
    """
    _check_float("y", y, dims=2)
    _check_float("buf", buf, dims=3, contiguous=True)
    _check_float("b", b, dims=3, contiguous=True)
    n_slots, h_out, r_max = b.shape
    n_proj, t = buf.shape[0], buf.shape[1]
    if y.stride(1) != 1 or y.shape != (t, h_out):
        raise ValueError(f"y must be [T, H_out_total] = {(t, h_out)} with contiguous rows, got {tuple(y.shape)}")
    if buf.shape[2] != r_max:
        raise ValueError(f"buf's rank dim {buf.shape[2]} differs from b's R_max {r_max}")
    n_segs = _check_segments(seg_starts, seg_slots, ranks, n_slots, y.device)
    offsets = _offsets(out_offsets, n_proj, h_out, y.device)
    if scales.dtype != torch.float32 or scales.shape != (n_slots,) or scales.device != y.device:
        raise TypeError(f"scales must be float32 [S] = [{n_slots}] on {y.device}")
    if bias is not None:
        _check_float("bias", bias, dims=2, contiguous=True)
        if bias.shape != (n_slots, h_out):
            raise ValueError(f"bias must be [S, H_out_total] = {(n_slots, h_out)}, got {tuple(bias.shape)}")
    if n_segs == 0 or t == 0:
        return
    block_m = _block_m(t, n_segs)
    block_n = 128
    n_col_tiles = triton.cdiv(h_out, block_n)
    grid = (n_col_tiles * (triton.cdiv(t, block_m) + n_segs),)
    _lora_expand_kernel[grid](
        y, buf, b, bias if bias is not None else y, offsets, seg_starts, seg_slots, ranks, scales,
        n_segs, n_col_tiles, h_out,
        y.stride(0), buf.stride(0), buf.stride(1), b.stride(0), b.stride(1),
        bias.stride(0) if bias is not None else 0,
        P=n_proj, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=RANK_CHUNK, HAS_BIAS=bias is not None,
        **dot_config(b.dtype, y.device),
    )


def lora_apply(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, out_offsets: Sequence[int] | torch.Tensor,
    seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
    plan: None = None,
) -> None:
    """Triton `ops.LoraApply`: the shrink kernel into a [1, T, R_max] buffer, then the expand one."""
    buf = x.new_empty(1, x.shape[0], a.shape[2])
    lora_shrink(x, a, seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks, out=buf)
    lora_expand(y, buf, b, out_offsets=out_offsets, seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks,
                scales=scales)


def bottleneck_apply(
    y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, *, seg_starts: torch.Tensor,
    seg_slots: torch.Tensor, sizes: torch.Tensor, scales: torch.Tensor, down_bias: torch.Tensor,
    up_bias: torch.Tensor, activation: str, plan: None = None,
) -> None:
    """Triton `ops.BottleneckApply`: the shrink kernel (bias, non-linearity) into a buffer, then the expand one."""
    buf = x.new_empty(1, x.shape[0], down.shape[2])
    seg = dict(seg_starts=seg_starts, seg_slots=seg_slots, ranks=sizes)
    lora_shrink(x, down, out=buf, bias=down_bias, activation=activation, **seg)
    lora_expand(y, buf, up, out_offsets=[0, y.shape[1]], scales=scales, bias=up_bias, **seg)


def _block_m(n_tokens: int, n_segs: int) -> int:
    """Token tile: 16 (tl.dot's least) when segments average a few tokens (decode), 64 for prefill."""
    return 16 if n_tokens <= 32 * n_segs else 64


def dot_config(dtype: torch.dtype, device: torch.device) -> dict:
    """tl.dot's operand dtype and precision for inputs of `dtype`, as DOT_DTYPE and PRECISION constexprs.

    fp32 multiplies in full fp32, as the torch path does; bf16/fp16 use the tensor cores as they are. Triton's
    interpreter (CPU tensors) multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584, "not
    supported yet"), so there bf16 operands go through fp32: exact, as every bf16 value is an fp32 value.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu"):
        return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
    return {"DOT_DTYPE": _TL_DTYPES[dtype], "PRECISION": "tf32"}


def _check_float(name: str, t: torch.Tensor, *, dims: int, dtype=None, contiguous: bool = False) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_segments(seg_starts, seg_slots, ranks, n_slots: int, device: torch.device) -> int:
    """Checks the index tensors' dtypes, shapes and device; returns N, the number of segments."""
    for name, t in (("seg_starts", seg_starts), ("seg_slots", seg_slots), ("ranks", ranks)):
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous 1-d int32 tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the data on {device}")
    if seg_starts.shape[0] != seg_slots.shape[0] + 1:
        raise ValueError(f"seg_starts must have N+1 = {seg_slots.shape[0] + 1} entries, got {seg_starts.shape[0]}")
    if ranks.shape[0] != n_slots:
        raise ValueError(f"ranks must have S = {n_slots} entries, got {ranks.shape[0]}")
    return seg_slots.shape[0]


def _offsets(out_offsets, n_proj: int, h_out: int, device: torch.device) -> torch.Tensor:
    """out_offsets as an int32 [P+1] tensor on `device` (a python sequence is checked and copied there)."""
    if isinstance(out_offsets, torch.Tensor):
        if out_offsets.dtype != torch.int32 or out_offsets.shape != (n_proj + 1,) or out_offsets.device != device:
            raise TypeError(f"out_offsets must be int32 [P+1] = [{n_proj + 1}] on {device}")
        return out_offsets
    offs = [int(o) for o in out_offsets]
    ordered = all(a <= b for a, b in zip(offs, offs[1:]))
    if len(offs) != n_proj + 1 or offs[0] != 0 or offs[-1] != h_out or not ordered:
        raise ValueError(f"out_offsets must be P+1 = {n_proj + 1} non-decreasing ints from 0 to {h_out}, got {offs}")
    return torch.tensor(offs, dtype=torch.int32, device=device)
