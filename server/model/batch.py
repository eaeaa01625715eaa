"""The per-step batch metadata, built by the runner and read by the attention function.

All of a step's tokens are packed into one row. Running example: sequence 0 decodes its 40th token,
sequence 1 prefills a 3-token chunk after 14 computed tokens (block size 16):
    input rows        [t0 | t1 t2 t3]
    positions         [39 | 14 15 16]
    slot_mapping      [4*16+7 | 1*16+14, 1*16+15, 2*16+0]   block tables [[0, 3, 4], [5, 1, 2]]
    seq_lens          [40, 17]
    query_starts      [0, 1, 4]
"""

from dataclasses import dataclass

import torch

from quiver.kernels import KernelOps


@dataclass(frozen=True)
class StepBatch:
    kv_cache: torch.Tensor  # [L, 2, NB, BS, KVH, D]
    ops: KernelOps
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [B, MAXB] int32: each sequence's blocks (rows padded with 0)
    seq_lens: torch.Tensor  # [B] int32: KV entries per sequence after this step
    query_starts: torch.Tensor  # [B+1] int32: rows of sequence b are query_starts[b]:query_starts[b+1]


@dataclass(frozen=True)
class AdapterBatch:
    """Which weight adapter (LoRA or bottleneck) each token uses this step, as segments of tokens.

    Running example: rows [r0 | r1 r2 r3 | r4] of requests using slots 2, none, 0:
        seg_starts [0, 1, 4, 5]    seg_slots [2, -1, 0]
    """

    seg_starts: torch.Tensor  # [N+1] int32
    seg_slots: torch.Tensor  # [N] int32, -1 = no weight adapter
    activations: frozenset[str]  # the bottleneck non-linearities of the slots in this batch
    slots: frozenset[int] = frozenset()  # the slots present (>= 0): layers where none holds weights skip the ops


class StepContext:
    """The runner's per-step state that adapter layers read; set before each forward, cleared after.

    One object per runner, handed to every adapter layer when it is built (not a module global).
    """

    def __init__(self) -> None:
        self.adapters: AdapterBatch | None = None
