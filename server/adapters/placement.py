"""An adapter version (the handle a request holds), its place on the device, and the device writes that
placing it queues for the runner.

The registry only does bookkeeping: placing a version reserves a slot or KV blocks and queues a write
(`SlotWrite`, `PrefixWrite`); the runner performs the queued writes before the step's forward, and records
on a write that failed why (`error`), so that the registry gives its room back and only the requests of
that version end. Nothing here imports the engine: the registry asks of the block manager only what
`BlockAllocator` says.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from quiver.adapters.snapshots import Snapshot
from quiver.adapters.weights import (
    AdapterKind,
    AdapterWeights,
    BottleneckWeights,
    LoraWeights,
    PrefixWeights,
    PromptWeights,
)


class BlockAllocator(Protocol):
    """What the registry needs of the KV block pool (implemented by `quiver.engine.block_manager.BlockManager`)."""

    num_blocks: int

    def blocks_for(self, num_tokens: int) -> int: ...
    def grow(self, block_table: list[int], num_tokens: int) -> bool: ...
    def release(self, block_table: list[int]) -> None: ...


class AdapterLimits(Protocol):
    """The device's adapter capacity (implemented by `quiver.engine.runner.ModelRunner`)."""

    num_adapter_slots: int
    max_lora_rank: int
    max_bottleneck_size: int


@dataclass(frozen=True)
class AdapterRef:
    """A version's place on the device, from placement until eviction."""

    adapter_id: str
    kind: AdapterKind
    slot: int = -1  # weight adapters (LoRA, bottleneck): their slot in the adapter layers
    activation: str | None = None  # bottleneck non-linearity
    prefix_blocks: tuple[int, ...] = ()  # prefix and prompt kinds: the blocks that hold the shared KV prefix
    prefix_len: int = 0  # KV entries in that prefix (the virtual tokens); real tokens start at this position


@dataclass(eq=False)
class AdapterVersion:
    """One immutable version of an adapter: the one handle a request holds (`Request.adapter`) from submission
    to finish. The registry owns its counters and placement; others read them."""

    adapter_id: str
    version: int
    kind: AdapterKind
    source: Snapshot | Path | None  # where to read the weights again after a host eviction; None: never evicted
    weights: AdapterWeights | None
    nbytes: int
    num_params: int
    summary: str
    pins: int = 0  # requests submitted and not finished
    placements: int = 0  # running requests using its device placement
    retired: bool = False  # unloaded or replaced: no new requests
    ref: AdapterRef | None = None  # its device placement, if any
    blocks: list[int] = field(default_factory=list)  # prefix kinds: the KV blocks it owns
    requests_served: int = 0
    weights_tokens: int = 0  # prefix and prompt kinds: the virtual tokens ahead of every prompt
    rank: int = 0  # LoRA: the largest rank; bottleneck: its size; 0 for prefix and prompt kinds

    @property
    def slot(self) -> int:
        """Its weight-adapter slot while placed; -1 when not placed or of a prefix kind."""
        return self.ref.slot if self.ref is not None else -1

    @property
    def activation(self) -> str | None:
        """A placed bottleneck's non-linearity; None otherwise."""
        return self.ref.activation if self.ref is not None else None

    @property
    def label(self) -> str:
        """How errors name it, e.g. "adapter 'x' (version 3)"."""
        return f"adapter {self.adapter_id!r} (version {self.version})"


@dataclass(eq=False)
class SlotWrite:
    """Put `weights` in `slot` of every adapter layer; `weights` None: clear the slot (its adapter was evicted)."""

    version: AdapterVersion | None  # None for a clear
    slot: int
    weights: LoraWeights | BottleneckWeights | None
    error: Exception | None = None  # set by the runner when performing it failed (the slot is then cleared)


@dataclass(eq=False)
class PrefixWrite:
    """Write a prefix adapter's keys and values, or run a prompt adapter's virtual tokens through the base model,
    into `blocks`; its KV must come out finite."""

    version: AdapterVersion
    blocks: tuple[int, ...]
    weights: PrefixWeights | PromptWeights
    error: Exception | None = None  # set by the runner when performing it failed (the blocks are then zeroed)


DeviceWrite = SlotWrite | PrefixWrite
