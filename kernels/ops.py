"""What every backend implements: the ops' typed signatures (`KernelOps`), the float dtypes they take and the
activation table, shared by the torch backend (`torch_attention`, `torch_lora`), the Triton one (`triton_ops`)
and the float64 oracle both are tested against (`reference`).

KV cache layout, shared by every op and backend:
    kv_cache:  [L, 2, NB, BS, KVH, D]   (layer, key/value, block, offset in block, kv head, head dim)
    k_cache = kv_cache[l, 0], v_cache = kv_cache[l, 1]:  [NB, BS, KVH, D]
A token's *slot* is `block * BS + offset`; slot 37 with BS=16 is block 2, offset 5.

LoRA and bottleneck adapters run over segments of tokens that share an adapter (SGMV style). Running example
used by every LoRA docstring (T = 7 tokens, N = 4 segments, S = 3 adapter slots):
    seg_starts = [0, 3, 3, 4, 7]   segment i holds tokens s[i]:s[i+1]; segment 1 is empty
    seg_slots  = [2, 0, -1, 2]     adapter slot w[i] of segment i; -1 = no adapter (token 3)
    ranks      = [8, 64, 16]       rank of each slot; slot 1 is unused in this batch
Each adapter is computed at its own rank r = ranks[w[i]]: only A[w[i], :r] and B[w[i], :, :r] are read.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the data dtypes every op takes

# The non-linearities a bottleneck adapter (and lora_shrink's `activation`) may name; "gelu" is the exact (erf) GELU.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class StoreKV(Protocol):
    def __call__(
        self,
        key: torch.Tensor,  # [T, KVH, D]
        value: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,  # [NB, BS, KVH, D]
        v_cache: torch.Tensor,  # [NB, BS, KVH, D]
        slot_mapping: torch.Tensor,  # [T] int64, e.g. [37, 38, 80]
    ) -> None:
        """k_cache.flat[slot_mapping[t]] = key[t]; v_cache.flat[slot_mapping[t]] = value[t]."""


class PagedAttention(Protocol):
    def __call__(
        self,
        query: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,  # [NB, BS, KVH, D]
        v_cache: torch.Tensor,  # [NB, BS, KVH, D]
        *,
        block_tables: torch.Tensor,  # [B, MAXB] int32, e.g. [[0, 3, 4], [1, 2, 0]] (unused entries arbitrary)
        seq_lens: torch.Tensor,  # [B] int32: KV entries of each sequence after this step, e.g. [40, 17]
        query_starts: torch.Tensor,  # [B+1] int32: query rows of sequence b are query_starts[b]:query_starts[b+1]
        scale: float,
        plan: object | None = None,  # the backend's plan_attention for this metadata; None: planned in the call
    ) -> torch.Tensor:  # [T, H, D]
        """Causal attention of each sequence's new tokens over its paged KV (which already holds them).

        For sequence b with q = query_starts[b+1] - query_starts[b] new tokens and n = seq_lens[b]:
            out[query_starts[b] + j] = softmax(scale · Q_j · K[:n - q + j + 1]ᵀ) · V[:n - q + j + 1]
        where K = k_cache[block_tables[b]].flatten(0, 1) and likewise V; heads are grouped (GQA): query
        head h reads kv head h // (H // KVH).
        """


class WritePrefix(Protocol):
    def __call__(
        self,
        kv_cache: torch.Tensor,  # [L, 2, NB, BS, KVH, D]
        prefix: torch.Tensor,  # [L, 2, N, KVH, D]: an adapter's per-layer prefix keys (0) and values (1)
        block_ids: torch.Tensor,  # [ceil(N / BS)] int64, e.g. [7, 9]: the blocks that will hold the prefix
    ) -> None:
        """kv_cache[:, :, block_ids].flat[:N] = prefix: the prefix's entry i lands in block i // BS, offset i % BS."""


class CopyBlocks(Protocol):
    def __call__(
        self,
        kv_cache: torch.Tensor,  # [L, 2, NB, BS, KVH, D]
        src: torch.Tensor,  # [M] int64, e.g. [9]
        dst: torch.Tensor,  # [M] int64, e.g. [12]
    ) -> None:
        """kv_cache[:, :, dst[i]] = kv_cache[:, :, src[i]] for every i (all layers, keys and values)."""


class LoraShrink(Protocol):
    def __call__(
        self,
        x: torch.Tensor,  # [T, H_in]
        a: torch.Tensor,  # [P, S, R_max, H_in]
        *,
        seg_starts: torch.Tensor,  # [N+1] int32, e.g. [0, 3, 3, 4, 7]
        seg_slots: torch.Tensor,  # [N] int32, e.g. [2, 0, -1, 2]
        ranks: torch.Tensor,  # [S] int32, e.g. [8, 64, 16]
        out: torch.Tensor,  # [P, T, R_max], written
        bias: torch.Tensor | None = None,  # [S, R_max], only with P == 1
        activation: str | None = None,  # a key of ACTIVATIONS or None
        plan: object | None = None,  # the backend's plan_lora for these segments and ranks; None: planned in the call
    ) -> None:
        """Down-projection of each segment by its adapter's A, for P projections sharing the input x.

        for i in range(N), w = seg_slots[i], r = ranks[w], if w >= 0:
            out[p, s[i]:s[i+1], :r] = act(x[s[i]:s[i+1]] @ a[p, w, :r]ᵀ + bias[w, :r])   for every p < P
        Rows of no-adapter segments and columns >= r are left as they are (nothing reads them).
        """


class LoraExpand(Protocol):
    def __call__(
        self,
        y: torch.Tensor,  # [T, H_out_total], updated in place
        buf: torch.Tensor,  # [P, T, R_max]: lora_shrink's out
        b: torch.Tensor,  # [S, H_out_total, R_max]: the P projections' B stacked along the output dim
        *,
        out_offsets: Sequence[int] | torch.Tensor,  # [P+1] ints or int32 tensor, e.g. [0, 4096, 5120, 6144]
        seg_starts: torch.Tensor,  # [N+1] int32, e.g. [0, 3, 3, 4, 7]
        seg_slots: torch.Tensor,  # [N] int32, e.g. [2, 0, -1, 2]
        ranks: torch.Tensor,  # [S] int32, e.g. [8, 64, 16]
        scales: torch.Tensor,  # [S] float32
        bias: torch.Tensor | None = None,  # [S, H_out_total]
        plan: object | None = None,  # as in LoraShrink
    ) -> None:
        """Up-projection of each segment by its adapter's B, added into y; projection p owns columns off[p]:off[p+1].

        for i in range(N), w = seg_slots[i], r = ranks[w], if w >= 0, for p < P, cols = off[p]:off[p+1]:
            y[s[i]:s[i+1], cols] += scales[w] · buf[p, s[i]:s[i+1], :r] @ b[w, cols, :r]ᵀ + bias[w, cols]
        Rows of no-adapter segments are untouched.
        """


class LoraApply(Protocol):
    def __call__(
        self,
        y: torch.Tensor,  # [T, H_out], updated in place
        x: torch.Tensor,  # [T, H_in]
        a: torch.Tensor,  # [1, S, R_max, H_in]
        b: torch.Tensor,  # [S, H_out, R_max]
        *,
        out_offsets: Sequence[int] | torch.Tensor,  # [0, H_out]
        seg_starts: torch.Tensor,  # [N+1] int32
        seg_slots: torch.Tensor,  # [N] int32
        ranks: torch.Tensor,  # [S] int32
        scales: torch.Tensor,  # [S] float32
        plan: object | None = None,  # as in LoraShrink
    ) -> None:
        """One projection's LoRA delta added into y: lora_shrink then lora_expand (P = 1, no bias, no activation),
            y[s[i]:s[i+1]] += scales[w] · (x[s[i]:s[i+1]] @ a[0, w, :r]ᵀ) @ b[w, :, :r]ᵀ
        """


class BottleneckApply(Protocol):
    def __call__(
        self,
        y: torch.Tensor,  # [T, H_out], updated in place
        x: torch.Tensor,  # [T, H_out]: the layer's output before any delta; may be y itself (see below)
        down: torch.Tensor,  # [1, S, N_max, H_out]
        up: torch.Tensor,  # [S, H_out, N_max]
        *,
        seg_starts: torch.Tensor,  # [N+1] int32
        seg_slots: torch.Tensor,  # [N] int32
        sizes: torch.Tensor,  # [S] int32: each slot's bottleneck size (0: the slot is skipped), as LoraShrink's ranks
        scales: torch.Tensor,  # [S] float32
        down_bias: torch.Tensor,  # [S, N_max]
        up_bias: torch.Tensor,  # [S, H_out]
        activation: str,  # a key of ACTIVATIONS
        plan: object | None = None,  # as in LoraShrink
    ) -> None:
        """A bottleneck adapter's delta added into y: lora_shrink (with down_bias and the activation) then
        lora_expand (with up_bias), w = seg_slots[i], n = sizes[w]:
            y[s[i]:s[i+1]] += scales[w] · act(x[s[i]:s[i+1]] @ down[0, w, :n]ᵀ + down_bias[w, :n]) @ up[w, :, :n]ᵀ
                              + up_bias[w]
        Every row's input is read whole before its delta is added (a backend shrinks all rows before it expands,
        or works a row at a time), so x may be y itself: the layer adds its bottleneck to its output in place. A
        row whose slot has size 0 is neither read nor written.
        """


class PlanAttention(Protocol):
    def __call__(
        self,
        *,
        query_starts: Sequence[int],  # PagedAttention's metadata, as host lists, e.g. [0, 1, 4]
        seq_lens: Sequence[int],  # e.g. [40, 17]
        block_tables: Sequence[Sequence[int]],  # e.g. [[0, 3, 4], [5, 1, 2]]
        block_size: int,
        entry_bytes: int,  # bytes of one token's keys and values in one layer of the cache (2 · KVH · D · itemsize)
        kv_heads: int,  # KVH
        device: torch.device,
    ) -> object | None:
        """What `paged_attention` precomputes from a step's metadata, built once and passed to every layer's call
        as `plan`; None where the backend needs nothing."""


class PlanLora(Protocol):
    def __call__(
        self,
        *,
        seg_starts: Sequence[int],  # the LoRA ops' metadata, as host lists, e.g. [0, 3, 3, 4, 7]
        seg_slots: Sequence[int],  # e.g. [2, 0, -1, 2]
        ranks: Sequence[int],  # [S] e.g. [8, 64, 16]: the ranks the op will be called with
        device: torch.device,
    ) -> object | None:
        """What the LoRA ops precompute from their segments and ranks, built once per step for every layer with
        these ranks and passed as `plan`; None where the backend needs nothing."""


def kv_entry_bytes(k_cache: torch.Tensor) -> int:
    """`PlanAttention`'s entry_bytes for a layer's key cache [NB, BS, KVH, D]: one token's keys and values."""
    return 2 * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()


def no_attention_plan(
    *, query_starts: Sequence[int], seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int,
    entry_bytes: int, kv_heads: int, device: torch.device,
) -> None:
    """`PlanAttention` of a backend whose attention precomputes nothing."""


def no_lora_plan(*, seg_starts: Sequence[int], seg_slots: Sequence[int], ranks: Sequence[int], device: torch.device) -> None:
    """`PlanLora` of a backend whose LoRA ops precompute nothing."""


@dataclass(frozen=True)
class KernelOps:
    """One backend's implementation of every op; signatures and semantics are the Protocols above."""

    name: str
    store_kv: StoreKV
    paged_attention: PagedAttention
    write_prefix: WritePrefix
    copy_blocks: CopyBlocks
    lora_shrink: LoraShrink
    lora_expand: LoraExpand
    lora_apply: LoraApply  # lora_shrink then lora_expand for one projection, fused where the backend can
    bottleneck_apply: BottleneckApply  # the same for a bottleneck adapter, with its biases and non-linearity
    plan_attention: PlanAttention = no_attention_plan
    plan_lora: PlanLora = no_lora_plan
