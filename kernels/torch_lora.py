"""The torch backend's LoRA ops: the serving path on CPU (and `--kernel-backend torch`).

Signatures, semantics and the running example (seg_starts [0, 3, 3, 4, 7], seg_slots [2, 0, -1, 2], ranks
[8, 64, 16]): `quiver.kernels.ops`; tested against `quiver.kernels.reference`. Each adapter is computed at its
own rank; short segments (decode) are computed together, reading the adapters' weights in place when their
slots are dense, in bands of slots read at each band's own rank.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from quiver.kernels import native
from quiver.kernels.ops import ACTIVATIONS


def _segments(starts: list[int], slots: list[int], rank_of: list[int]):
    """(start, end, slot, rank) of every non-empty segment whose adapter has a rank here."""
    segments = zip(starts, starts[1:], slots)
    return [(s, e, w, rank_of[w]) for s, e, w in segments if w >= 0 and e > s and rank_of[w] > 0]


def plan_lora(*, seg_starts: Sequence[int], seg_slots: Sequence[int], ranks: Sequence[int], device: torch.device) -> "LoraPlan":
    """`ops.PlanLora`: the long segments and the short rows of a call (see _split), the same at every layer whose
    slots have these ranks."""
    return _split(_segments(list(seg_starts), list(seg_slots), list(ranks)), device)


def _planned(plan: "LoraPlan | None", seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor) -> "LoraPlan":
    """`plan`, or (None) the plan of these tensors, built now."""
    if plan is not None:
        return plan
    return plan_lora(seg_starts=seg_starts.tolist(), seg_slots=seg_slots.tolist(), ranks=ranks.tolist(),
                     device=seg_starts.device)


# Segments of at most this many tokens (decode: one token each) are computed together in one bmm: on CPU a
# python loop of tiny matmuls costs ~7x more when every decode token has its own adapter. Longer segments
# (prefill) get one 2-d matmul each. The bmm runs at the largest rank r among the short rows; a row of lower
# rank multiplies its adapter's columns beyond its rank by zero (its shrink output is masked there, and the
# stacks only ever hold finite values: zero-initialised, written with validated weights), so they add nothing.
# The bmm reads the adapters' weights in place when the short rows' slots are dense (a slot range at most three
# times the rows: a gather costs a read, a write and a read per row): the tokens are scattered into a
# [slots, depth, H] grid and the stacks' slot range is a view; the range's unused slots are read too and meet
# zero rows of the grid. Otherwise the weights are gathered.
_SHORT_SEGMENT = 4


@dataclass(frozen=True)
class _Grid:
    """Rows whose adapters sit in slots lo .. lo+span-1, for reading those slots' weights in place at rank r:
    row i goes to cell cell[i] of a [span * depth] grid (its slot's offset times depth, plus its index among
    its slot's rows)."""

    lo: int
    span: int
    depth: int
    r: int  # the largest rank among its rows
    cell: torch.Tensor  # [n] int64
    cell_rows: torch.Tensor  # [span * depth] int64: the row in each grid cell (row 0 in an empty one)
    cell_off: torch.Tensor | None  # [span, depth, r] bool: an empty cell, or a column beyond its row's rank; None if none
    # the cells hold rows 0 .. span·depth-1 in order, every cell filled (a decode step whose every sequence has an
    # adapter, the same number per slot, slots dense): a call over that many rows reads x and adds to y as they are
    in_order: bool = False
    # by id of a layer's stack `a`: (a, b, scales, their views at this grid's slots and rank), see stack_views
    views: dict = field(default_factory=dict, compare=False)

    def stack_views(self, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(Aᵀ [span, in, r], Bᵀ [span, r, out], scales [span, 1, 1] in a's dtype) of this grid's slots, made once
        per layer's stacks: a plan and its grids serve every layer with its ranks, step after step (indexing the
        three cost ~8 us a call)."""
        known = self.views.get(id(a))
        if known is None or known[1] is not b or known[2] is not scales:
            lo, hi, r = self.lo, self.lo + self.span, self.r
            known = (a, b, scales, a[0, lo:hi, :r].transpose(1, 2), b[lo:hi, :, :r].transpose(1, 2),
                     scales[lo:hi, None, None].to(a.dtype))
            self.views[id(a)] = known
        return known[3:]


@dataclass(frozen=True)
class _Rows:
    """The tokens of all short segments: rows [n], their slots [n] and ranks [n]; r = the largest rank.

    In place (`grid` set): one grid over the slot range of every row. `bands` cover the same rows in grids
    over disjoint slot ranges, each read at its own largest rank: with slots laid out by rank (the adapter
    registry places them so) a band of rank-8 slots reads 8 columns, not the batch's largest rank.
    """

    rows: torch.Tensor
    slots: torch.Tensor
    ranks: torch.Tensor
    r: int
    uniform: bool  # every row has rank r
    grid: _Grid | None  # when the weights are read in place
    bands: tuple[_Grid, ...] | None  # with grid: the same rows, banded by slot range

    def valid(self) -> torch.Tensor:  # [n, r] bool: column j < this row's rank
        return torch.arange(self.r, device=self.rows.device) < self.ranks[:, None]


class LoraPlan:
    """A call's segments: `long` ones (start, end, slot, rank) computed one by one, `short` ones' rows together
    (their `_Rows`, tensors, built on first use: when the C kernel takes a call, nothing asks for them)."""

    def __init__(
        self, long: list[tuple[int, int, int, int]], short: list[tuple[int, int, int, int]], device: torch.device
    ) -> None:
        self.long = long
        self._short, self._device = short, device
        small = sum(e - s <= _C_MAX_ROWS for s, e, _, _ in long)
        self.c_segments = len(short) + small  # the segments the C kernel would take
        self.c_takes_all = small == len(long)  # and whether that is all of them

    @cached_property
    def short(self) -> _Rows | None:
        return _short_rows(self._short, self._device) if self._short else None


def _split(segments, device) -> LoraPlan:
    """Long segments to compute one by one, and the short ones' rows to compute together."""
    long = [seg for seg in segments if seg[1] - seg[0] > _SHORT_SEGMENT]
    short = [seg for seg in segments if seg[1] - seg[0] <= _SHORT_SEGMENT]
    return LoraPlan(long, short, device)


def _short_rows(short, device) -> _Rows:
    """The rows of the short segments, with their slot grid where the slots are dense enough."""
    rows = [t for s, e, _, _ in short for t in range(s, e)]
    slots = [w for s, e, w, _ in short for _ in range(s, e)]
    ranks = [r for s, e, _, r in short for _ in range(s, e)]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
    grid = bands = None
    distinct = sorted({w for _, _, w, _ in short})
    # in place when reading the slot range once costs less than gathering a copy per row and reading it
    if distinct[-1] - distinct[0] + 1 <= 3 * len(rows):
        grid = _make_grid(short, device)
        split = _banded(short)
        bands = (grid,) if len(split) == 1 else tuple(_make_grid(band, device) for band in split)
    uniform = min(ranks) == max(ranks)
    return _Rows(as_tensor(rows), as_tensor(slots), as_tensor(ranks), max(ranks), uniform, grid, bands)


def _make_grid(short, device) -> _Grid:
    """The grid of the short segments' rows over their slot range."""
    lo = min(w for _, _, w, _ in short)
    span = max(w for _, _, w, _ in short) - lo + 1
    fill: dict[int, int] = {}
    cells, rows, ranks = [], [], []
    for s, e, w, r in short:
        for t in range(s, e):
            cells.append((w - lo, fill.get(w, 0)))
            fill[w] = fill.get(w, 0) + 1
            rows.append(t)
            ranks.append(r)
    depth, r_max = max(fill.values()), max(ranks)
    row_of, rank_of = [0] * (span * depth), [0] * (span * depth)
    for (k, j), t, r in zip(cells, rows, ranks):
        row_of[k * depth + j], rank_of[k * depth + j] = t, r
    cell_off = None
    if len(rows) < span * depth or min(ranks) < r_max:
        cell_off = (torch.arange(r_max) >= torch.tensor(rank_of)[:, None]).view(span, depth, r_max).to(device)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
    in_order = len(rows) == span * depth and row_of == list(range(span * depth))
    return _Grid(lo, span, depth, r_max, as_tensor([k * depth + j for k, j in cells]), as_tensor(row_of), cell_off,
                 in_order)


# What one more band costs against reading more weights, in slot-rank units (one slot's A and B at one rank):
# about six torch calls, ~65 us on the project's CPU, where a slot-rank of a q/v projection pair reads in ~0.19 us.
_BAND_COST = 350


def _banded(short) -> list[list]:
    """The short segments split by slot range into bands that cost least to read at each band's own largest
    rank: scanning the slots in order, a slot joins the current band unless starting a new one (one more band)
    costs less than reading the whole band at the higher rank."""
    rank_of = {w: r for _, _, w, r in short}
    bands: list[list[int]] = []  # runs of slots, ascending
    band_cost = band_rank = 0
    for w in sorted(rank_of):
        r = rank_of[w]
        if bands:
            lo = bands[-1][0]
            joined = (w - lo + 1) * max(band_rank, r)
            if joined - band_cost <= r + _BAND_COST:
                bands[-1].append(w)
                band_cost, band_rank = joined, max(band_rank, r)
                continue
        bands.append([w])
        band_cost, band_rank = r, r
    band_of = {w: i for i, band in enumerate(bands) for w in band}
    out: list[list] = [[] for _ in bands]
    for seg in short:
        out[band_of[seg[2]]].append(seg)
    return out


def _in_grid(grid: _Grid, values: torch.Tensor) -> torch.Tensor:
    """values [n, C] -> [span, depth, C], zero where no row lands."""
    out = values.new_zeros(grid.span * grid.depth, values.shape[1])
    return out.index_copy_(0, grid.cell, values).view(grid.span, grid.depth, -1)


def _from_grid(grid: _Grid, values: torch.Tensor) -> torch.Tensor:
    """values [span, depth, C] -> the rows' values [n, C]."""
    return values.reshape(-1, values.shape[-1]).index_select(0, grid.cell)


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, *, seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    out: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None, plan: LoraPlan | None = None,
) -> None:
    """Down-projection of each segment by its adapter's A, for P projections sharing the input x (shapes,
    semantics: `ops.LoraShrink`). Accumulates in x's dtype on CPU (fp32 inside the matmul); `out` may be any
    float dtype.
    """
    act = ACTIVATIONS[activation] if activation is not None else None
    plan = _planned(plan, seg_starts, seg_slots, ranks)
    long, short = plan.long, plan.short
    for s, e, w, r in long:
        for p in range(a.shape[0]):  # one 2-d matmul per projection: a broadcast 3-d one is ~10x slower in bf16
            h = x[s:e] @ a[p, w, :r].t()  # [e-s, r]
            if bias is not None:
                h = h + bias[w, :r].to(h.dtype)
            if act is not None:
                h = act(h)
            out[p, s:e, :r] = h.to(out.dtype)
    if short is None:
        return
    xs = x.index_select(0, short.rows).unsqueeze(2)  # [n, H_in, 1]
    for p in range(a.shape[0]):
        if (g := short.grid) is not None:  # the slot range of the stack, as a view: each adapter's A read once
            h = _from_grid(g, torch.bmm(_in_grid(g, xs.squeeze(2)), a[p, g.lo : g.lo + g.span, : short.r].transpose(1, 2)))
        else:
            h = torch.bmm(a[p, :, : short.r].index_select(0, short.slots), xs).squeeze(2)  # [n, r]
        if bias is not None:
            h = h + bias[:, : short.r].index_select(0, short.slots).to(h.dtype)
        if act is not None:
            h = act(h)
        target = out[p, :, : short.r]  # [T, r] view
        if not short.uniform:  # keep what lies beyond each row's own rank
            h = torch.where(short.valid(), h, target.index_select(0, short.rows))
        target.index_copy_(0, short.rows, h.to(out.dtype))


def lora_apply(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, out_offsets: Sequence[int] | torch.Tensor,
    seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
    plan: LoraPlan | None = None,
) -> None:
    """One projection's LoRA delta added into y (shapes: `ops.LoraApply`): `lora_shrink` then `lora_expand`,
    with the same result, for y, x, a and b of one dtype.

    Fused, it needs no [T, R] buffer between the two products, and when the short rows' weights are read in
    place (see _split) the down-projection's output stays in the slot grid for the up-projection: six torch
    ops per call instead of about sixteen, which is most of a decode step's LoRA overhead on CPU.
    """
    plan = _planned(plan, seg_starts, seg_slots, ranks)
    if plan.c_segments and native.adapter_apply(y, x, a, b, seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks,
                                                  scales=scales, max_rows=_C_MAX_ROWS):
        if plan.c_takes_all:
            return
        long, short = [seg for seg in plan.long if seg[1] - seg[0] > _C_MAX_ROWS], None  # the rest: the C kernel's
    else:
        long, short = plan.long, plan.short  # (the short rows' tensors built here, on first use)
    if (short is not None and short.grid is None) or not y.dtype == x.dtype == a.dtype == b.dtype:
        buf = x.new_empty(1, x.shape[0], a.shape[2])
        lora_shrink(x, a, seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks, out=buf, plan=plan)
        lora_expand(y, buf, b, out_offsets=out_offsets, seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks,
                    scales=scales, plan=plan)
        return
    scale_of = scales.tolist() if long else None
    for s, e, w, r in long:
        y[s:e].addmm_(x[s:e] @ a[0, w, :r].t(), b[w, :, :r].t(), alpha=scale_of[w])
    if short is None:
        return
    # the rows themselves in slot order (see _Grid.in_order): read x and add to y as they are, no gather
    first = short.bands[0]
    in_order = len(short.bands) == 1 and first.in_order and x.shape[0] == y.shape[0] == first.span * first.depth
    target = y if in_order else _accumulator(y)
    for g in short.bands:  # each band of slots read in place at its own largest rank
        a_t, b_t, scale = g.stack_views(a, b, scales)
        xg = (x if in_order else x.index_select(0, g.cell_rows)).view(g.span, g.depth, -1)  # [span, depth, H_in]
        h = torch.bmm(xg, a_t)  # [span, depth, r]
        if g.cell_off is not None:  # empty cells and columns beyond a rank add nothing (b there is finite)
            h.masked_fill_(g.cell_off, 0)
        h.mul_(scale)
        delta = torch.bmm(h, b_t).view(g.span * g.depth, -1)  # [span * depth, H_out]
        if in_order:
            y.add_(delta)
        else:
            target.index_add_(0, g.cell_rows, delta)  # an empty cell adds zeros to row 0
    if target is not y:
        y += target


# Segments of at most _C_MAX_ROWS rows (decode's, and short prefill chunks) go to the C kernel (native.py: one
# row at a time, float32, each row's weights read from cache after its segment's first row, segments shared by the
# OpenMP team), whatever the size of the weights. Measured on this project's CPU: 128 rows of r=8 64->64 (0.2 MiB),
# 1 thread, 23 us in C against 30 us here; every projection of 30 layers with 64 distinct r=16 adapters on the
# default model (1.25 GB, from memory), 2 threads, C against here: 28.0 / 42.6 ms at 1 row a segment, 39.4 / 57.0 at
# 2, 57.0 / 66.5 at 4, 104 / 369 at 8 (until the C kernel stopped prefetching large weights ahead, it streamed them
# slower than MKL's batched products here: 51.4 against 37.6 ms, and took only cache-sized calls).
_C_MAX_ROWS = 16


def bottleneck_apply(
    y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, *, seg_starts: torch.Tensor,
    seg_slots: torch.Tensor, sizes: torch.Tensor, scales: torch.Tensor, down_bias: torch.Tensor,
    up_bias: torch.Tensor, activation: str, plan: LoraPlan | None = None,
) -> None:
    """`ops.BottleneckApply`: in C (native.py) when every segment is short enough for it, else lora_shrink into a
    buffer then lora_expand."""
    plan = _planned(plan, seg_starts, seg_slots, sizes)
    seg = dict(seg_starts=seg_starts, seg_slots=seg_slots)
    if plan.c_takes_all and native.adapter_apply(
            y, x, down, up, ranks=sizes, scales=scales, max_rows=_C_MAX_ROWS, a_bias=down_bias, activation=activation,
            b_bias=up_bias, **seg):
        return
    buf = y.new_empty(1, y.shape[0], down.shape[2])  # [1, T, N_max]
    lora_shrink(x, down, out=buf, bias=down_bias, activation=activation, ranks=sizes, plan=plan, **seg)
    lora_expand(y, buf, up, out_offsets=[0, y.shape[1]], scales=scales, bias=up_bias, ranks=sizes, plan=plan, **seg)


def _accumulator(y: torch.Tensor) -> torch.Tensor:
    """Where the short rows' deltas are index-added: y itself when contiguous, else a zeroed contiguous copy of
    its shape, added to y after (y a column slice of a fused GEMM's output, where index_add_ runs 3-6x slower)."""
    return y if y.is_contiguous() else torch.zeros(y.shape, dtype=y.dtype, device=y.device)


def lora_expand(
    y: torch.Tensor, buf: torch.Tensor, b: torch.Tensor, *, out_offsets: Sequence[int] | torch.Tensor,
    seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
    bias: torch.Tensor | None = None, plan: LoraPlan | None = None,
) -> None:
    """Up-projection of each segment by its adapter's B, added into y (shapes, semantics: `ops.LoraExpand`).

    buf is cast to b's dtype before the product; rows of no-adapter segments are untouched.
    """
    # one projection runs over all of y (the offsets run from 0 to its width): nothing to read from a tensor
    offs = [0, y.shape[1]] if len(out_offsets) == 2 else [int(o) for o in out_offsets]
    plan = _planned(plan, seg_starts, seg_slots, ranks)
    long, short = plan.long, plan.short
    scale_of = scales.tolist() if long else None  # host scalars for the long segments' in-place products
    for s, e, w, r in long:
        for p in range(len(offs) - 1):
            lo, hi = offs[p], offs[p + 1]
            h = buf[p, s:e, :r].to(b.dtype)  # [e-s, r]
            if y.dtype == b.dtype:  # in place: no [e-s, hi-lo] temporary (large ones cost page faults on CPU)
                y[s:e, lo:hi].addmm_(h, b[w, lo:hi, :r].t(), alpha=scale_of[w])
            else:
                y[s:e, lo:hi] += torch.matmul(h, b[w, lo:hi, :r].t()).mul_(scale_of[w]).to(y.dtype)
            if bias is not None:
                y[s:e, lo:hi] += bias[w, lo:hi].to(y.dtype)
    if short is None:
        return
    row_scales = scales.index_select(0, short.slots).to(b.dtype)[:, None]  # [n, 1]
    valid = None if short.uniform else short.valid()
    target = _accumulator(y)
    for p in range(len(offs) - 1):
        lo, hi = offs[p], offs[p + 1]
        h = buf[p, :, : short.r].index_select(0, short.rows).to(b.dtype)  # [n, r]
        if valid is not None:  # buf beyond a row's own rank holds anything; b there holds finite values
            h = torch.where(valid, h, 0)
        if (g := short.grid) is not None:  # the slot range of the stack, as a view: each adapter's B read once
            bv = b[g.lo : g.lo + g.span, lo:hi, : short.r].transpose(1, 2)  # [span, r, hi-lo]
            delta = _from_grid(g, torch.bmm(_in_grid(g, h * row_scales), bv))  # [n, hi-lo]
        else:
            bg = b[:, lo:hi, : short.r].index_select(0, short.slots)  # [n, hi-lo, r]
            delta = torch.bmm(bg, h.unsqueeze(2)).squeeze(2).mul_(row_scales)  # [n, hi-lo]
        if bias is not None:
            delta += bias[:, lo:hi].index_select(0, short.slots).to(delta.dtype)
        target[:, lo:hi].index_add_(0, short.rows, delta.to(y.dtype))
    if target is not y:
        y += target
