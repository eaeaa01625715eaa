"""The per-step object: built once per step by the runner, read by the forward's layers and every adapter layer.

All of a step's tokens are packed into one row. Running example: sequence 0 decodes its 40th token,
sequence 1 prefills a 3-token chunk after 14 computed tokens (block size 16):
    input rows        [t0 | t1 t2 t3]
    positions         [39 | 14 15 16]
    slot_mapping      [4*16+7 | 1*16+14, 1*16+15, 2*16+0]   block tables [[0, 3, 4], [5, 1, 2]]
    seq_lens          [40, 17]
    query_starts      [0, 1, 4]
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quiver.kernels import KernelOps
from quiver.kernels.ops import kv_entry_bytes
from quiver.model.step_inputs import FreshInputs, InputBuffers


@dataclass(frozen=True)
class StepBatch:
    """One step's metadata and the backend's plans for it: every layer of the step reads this one object."""

    kv_cache: torch.Tensor  # [L, 2, NB, BS, KVH, D]
    ops: KernelOps
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [B, MAXB] int32: each sequence's blocks (rows padded with 0)
    seq_lens: torch.Tensor  # [B] int32: KV entries per sequence after this step
    query_starts: torch.Tensor  # [B+1] int32: rows of sequence b are query_starts[b]:query_starts[b+1]
    attention_plan: object | None  # ops.plan_attention of this metadata, the same at every layer
    adapters: "AdapterBatch | None"  # None: no token uses a weight adapter


@dataclass(frozen=True)
class AdapterBatch:
    """Which weight adapter (LoRA or bottleneck) each token uses this step, as segments of tokens.

    Running example: rows [r0 | r1 r2 r3 | r4] of requests using slots 2, none, 0:
        seg_starts [0, 1, 4, 5]    seg_slots [2, -1, 0]
    """

    seg_starts: torch.Tensor  # [N+1] int32
    seg_slots: torch.Tensor  # [N] int32, -1 = no weight adapter
    activations: frozenset[str]  # the bottleneck non-linearities of the slots in this batch
    slots: frozenset[int]  # the slots present (>= 0): layers where none holds weights skip the ops
    lora_plans: tuple[object | None, ...]  # [adapter layer index]: ops.plan_lora for that layer's LoRA ranks
    bottleneck_plans: tuple[dict[str, object | None], ...]  # [adapter layer index]: activation -> ops.plan_lora


class StepContext:
    """Where the layers find the current step: one per runner, held by the forward and every adapter layer
    (not a module global); `step` is set by the runner for the duration of one forward.
    """

    def __init__(self) -> None:
        self.step: StepBatch | None = None

    @contextmanager
    def stepping(self, step: StepBatch) -> Iterator[StepBatch]:
        """`step` is the current step inside the block, and none after it."""
        self.step = step
        try:
            yield step
        finally:
            self.step = None


def build_step(
    *, kv_cache: torch.Tensor, ops: KernelOps, slot_mapping: list[int], block_tables: list[list[int]],
    seq_lens: list[int], query_starts: list[int], adapters: AdapterBatch | None, device: torch.device,
    inputs: InputBuffers | FreshInputs,
) -> StepBatch:
    """The step object of this metadata (host lists; block table rows may differ in length), with its attention
    plan; its tensors are written through `inputs` (a decode step's persistent buffers, or fresh tensors)."""
    width = max(len(t) for t in block_tables)
    tables = [t + [0] * (width - len(t)) for t in block_tables]
    return StepBatch(
        kv_cache=kv_cache,
        ops=ops,
        slot_mapping=inputs.fill("slot_mapping", slot_mapping),
        block_tables=inputs.fill_tables(tables),
        seq_lens=inputs.fill("seq_lens", seq_lens),
        query_starts=inputs.fill("query_starts", query_starts),
        attention_plan=ops.plan_attention(
            query_starts=query_starts, seq_lens=seq_lens, block_tables=tables, block_size=kv_cache.shape[3],
            entry_bytes=kv_entry_bytes(kv_cache[0, 0]), kv_heads=kv_cache.shape[4], device=device,
        ),
        adapters=adapters,
    )
