"""Adapter id → weights in host memory → a place on the device, with pins, eviction and versions.

Two levels of residency:
- host: the parsed weights (bounded in bytes); an adapter loaded from a directory can be dropped from host
  memory when unpinned and read again on demand;
- device: a weight adapter (LoRA, bottleneck) takes one of a bounded number of slots in the adapter
  layers; a prefix or prompt adapter takes KV blocks holding its shared prefix (computed once).

Both evict the least recently used idle entries first, with one exception: a weight adapter that needs a
slot when all are taken evicts one of the EVICTION_WINDOW least recently used idle ones, the one whose slot
keeps the slots in order of LoRA rank (see `_slot_for`).

Requests pin an adapter *version* from submission to finish (`pin`/`unpin`), and its device placement
while they run (`place`/`unplace`). Placing is bookkeeping only: it reserves a slot or blocks and queues
the write (`take_writes`), which the runner performs before the step's forward; the engine then hands the
writes back (`written`), and the room of one that failed is given back. Unloading or replacing an id retires the old version: new requests
see the new one (or NotFound), requests already submitted finish on the version they pinned, and a retired
version's memory (and its snapshot) is freed when its last pin goes. A version loaded from a directory is
read again from a private snapshot of the files it was loaded from (`server/adapters/snapshots.py`), so no
unload, replace or deletion of the directory changes what its requests run. Only the engine thread calls
this class (`snapshots.take` is the exception: any thread may call it).

For metrics, it counts (read at scrape time; only this class changes them): requests pinned, placements that
found the version already on the device (`num_device_hits`) or queued its write (`num_device_writes`),
evictions, re-reads; and it tells `on_load(source, seconds)`, if set, how long each placement that needed a
write took to be ready: from the placement (before any re-read) to the write performed, at the end of that step
(`written`). `source` is where the weights came from: "host_cache" (host memory), or, re-read from disk, "store"
(the version's snapshot: the files the server kept when it was loaded) or "path" (a directory registered as
its own source).
"""

import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from quiver.adapters.placement import (
    AdapterLimits,
    AdapterRef,
    AdapterVersion,
    BlockAllocator,
    DeviceWrite,
    PrefixWrite,
    SlotWrite,
)
from quiver.adapters.snapshots import Snapshot, Snapshots
from quiver.adapters.weights import PREFIX_KINDS, AdapterKind, AdapterWeights, BottleneckWeights, LoraWeights
from quiver.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, QuiverError

log = logging.getLogger(__name__)

EVICTION_WINDOW = 16  # when every slot is taken: the least recently used idle adapters one may be evicted from


class AdapterRegistry:
    def __init__(
        self,
        *,
        device: AdapterLimits,
        blocks: BlockAllocator,
        read: Callable[[Path], AdapterWeights],
        host_cache_bytes: int,
        snapshot_dir: Path | None = None,
    ) -> None:
        """`read(directory)` parses an adapter directory; `snapshot_dir`: where `snapshots` keeps its files
        (None: the system's temporary directory)."""
        self.device = device
        self.blocks = blocks
        self.read = read
        self.host_cache_bytes = host_cache_bytes
        self.snapshots = Snapshots(snapshot_dir)
        self.current: dict[str, AdapterVersion] = {}  # id -> the version new requests get
        self._versions = itertools.count(1)
        self._free_slots = list(range(device.num_adapter_slots))
        self._on_device: OrderedDict[AdapterVersion, None] = OrderedDict()  # LRU order, oldest first
        self._on_host: OrderedDict[AdapterVersion, None] = OrderedDict()
        self._slot_ranks: Counter[int] = Counter()  # LoRA rank (0: bottleneck) -> current weight adapters with it
        self._writes: list[DeviceWrite] = []  # queued for the runner, in order
        self.num_evictions = 0  # adapters taken off the device to make room
        self.num_reads = 0  # adapters read again from their source after the host cache dropped them
        self.num_requests = 0  # requests pinned to any adapter (`pin`)
        self.num_device_hits = 0  # placements that found the version on the device already
        self.num_device_writes = 0  # placements that reserved room and queued the version's write
        self.on_load: Callable[[str, float], None] | None = None  # see the module docstring
        self._loading: dict[AdapterVersion, tuple[str, float]] = {}  # placed, write not yet performed: (source, start)

    # ---- ids ----------------------------------------------------------------------------------------

    def register(
        self, adapter_id: str, weights: AdapterWeights, *, source: Snapshot | Path | None, replace: bool = False
    ) -> AdapterVersion:
        """Make `adapter_id` serve `weights`, read from `source`: a snapshot (from `snapshots.take`), which the
        version then owns and releases when it is dropped; a directory, read again as it is then; None: the
        weights stay in host memory. Raises AlreadyExists unless `replace` (the caller keeps the snapshot)."""
        old = self.current.get(adapter_id)
        if old is not None and not replace:
            raise AlreadyExists(f"adapter {adapter_id!r} is already loaded; ask for replacement to load it again")
        self._check_fits(weights)
        version = AdapterVersion(
            adapter_id=adapter_id, version=next(self._versions), kind=weights.kind, source=source, weights=weights,
            nbytes=weights.nbytes, num_params=weights.num_params, summary=weights.describe(),
            weights_tokens=weights.num_virtual_tokens if weights.kind in PREFIX_KINDS else 0,
            rank=_rank(weights),
        )
        self.current[adapter_id] = version
        if version.kind not in PREFIX_KINDS:
            self._slot_ranks[_lora_rank(version)] += 1
        self._on_host[version] = None
        if old is not None:
            self._retire(old)
        self._trim_host()
        return version

    def unregister(self, adapter_id: str) -> None:
        """New requests for `adapter_id` fail with NotFound; running ones finish on what they pinned."""
        version = self.current.pop(adapter_id, None)
        if version is None:
            raise NotFound(f"no adapter {adapter_id!r} is loaded")
        self._retire(version)

    def _check_fits(self, weights: AdapterWeights) -> None:
        if weights.kind in PREFIX_KINDS:
            need = self.blocks.blocks_for(weights.num_virtual_tokens)
            if need >= self.blocks.num_blocks:
                raise InvalidArgument(f"{weights.num_virtual_tokens} virtual tokens do not fit the KV cache")
        elif self.device.num_adapter_slots == 0:
            raise InvalidArgument("this server has no adapter slots (start it with --adapter-slots N)")
        elif isinstance(weights, LoraWeights) and weights.max_rank > self.device.max_lora_rank:
            raise InvalidArgument(f"LoRA rank {weights.max_rank} exceeds this server's --max-lora-rank {self.device.max_lora_rank}")
        elif isinstance(weights, BottleneckWeights) and weights.bottleneck_size > self.device.max_bottleneck_size:
            raise InvalidArgument(
                f"bottleneck size {weights.bottleneck_size} exceeds this server's --max-bottleneck-size "
                f"{self.device.max_bottleneck_size}"
            )

    def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        if version.kind not in PREFIX_KINDS:
            self._slot_ranks[_lora_rank(version)] -= 1
        if version.pins == 0:
            self._drop(version)

    def _drop(self, version: AdapterVersion) -> None:
        self._evict_from_device(version)
        self._loading.pop(version, None)
        self._on_host.pop(version, None)
        version.weights = None
        if isinstance(version.source, Snapshot):
            version.source.release()

    # ---- requests -----------------------------------------------------------------------------------

    def pin(self, adapter_id: str) -> AdapterVersion:
        """At submission: the version this request will use, until `unpin`."""
        version = self.current.get(adapter_id)
        if version is None:
            raise NotFound(f"no adapter {adapter_id!r} is loaded")
        version.pins += 1
        version.requests_served += 1
        self.num_requests += 1
        return version

    def unpin(self, version: AdapterVersion) -> None:
        assert version.pins > 0
        version.pins -= 1
        if version.pins == 0 and version.retired:
            self._drop(version)
        elif version.pins == 0:
            self._trim_host()

    def place(self, version: AdapterVersion) -> AdapterRef | None:
        """When a request starts running: reserve its adapter's room on the device (evicting unused ones),
        queue the write if it is not there yet, and hold it there. None when there is no room now (every slot
        or block is held by running requests). Raises FailedPrecondition, and changes nothing, if the
        version's weights must be read again and cannot be."""
        if version.ref is not None:
            self.num_device_hits += 1
        else:
            start = time.perf_counter()
            if not self._put_on_device(version):
                return None
            self.num_device_writes += 1
            self._loading.setdefault(version, ("host_cache", start))  # a re-read set it already
        version.placements += 1
        self._on_device.move_to_end(version)
        return version.ref

    def unplace(self, version: AdapterVersion) -> None:
        assert version.placements > 0
        version.placements -= 1

    def take_writes(self) -> list[DeviceWrite]:
        """The device writes queued since the last call, in order, for the runner to perform."""
        writes, self._writes = self._writes, []
        return writes

    def written(self, writes: list[DeviceWrite]) -> None:
        """After the runner performed `writes`: take each version whose write failed (`error` set; the runner
        cleared its slot or zeroed its blocks) off the device, so that it is written again when next placed.
        Its running requests end with that error (the engine ends them); they unplace it then."""
        now = time.perf_counter()
        for write in writes:
            loading = self._loading.pop(write.version, None) if write.version is not None else None
            if write.error is not None and write.version is not None and write.version.ref is not None:
                self._give_room_back(write.version)
            elif loading is not None and self.on_load is not None:
                source, start = loading
                self.on_load(source, now - start)

    # ---- residency ----------------------------------------------------------------------------------

    def _put_on_device(self, version: AdapterVersion) -> bool:
        weights = self._host_weights(version)
        if version.kind in PREFIX_KINDS:
            n = weights.num_virtual_tokens
            blocks: list[int] = []
            while not self.blocks.grow(blocks, n):
                if not self._evict_one():
                    return False
            version.blocks = blocks
            version.ref = AdapterRef(version.adapter_id, version.kind, prefix_blocks=tuple(blocks), prefix_len=n)
            self._writes.append(PrefixWrite(version, tuple(blocks), weights))
        else:
            slot = self._slot_for(version)
            if slot is None:
                return False
            activation = weights.non_linearity if isinstance(weights, BottleneckWeights) else None
            version.ref = AdapterRef(version.adapter_id, version.kind, slot=slot, activation=activation)
            self._writes.append(SlotWrite(version, slot, weights))
        self._on_device[version] = None
        return True

    def _slot_for(self, version: AdapterVersion) -> int | None:
        """A device slot for a weight adapter, taken so that the slots stay in order of LoRA rank: the CPU path
        reads each band of slots at its own largest rank (kernels/torch_lora.py, _banded), so rank-8 adapters
        next to each other cost an eighth of rank-64 ones. A free slot if there is one, else the slot of one of
        the EVICTION_WINDOW least recently used adapters no running request holds (evicted); among those, the
        one leaving fewest adapters out of rank order, then the nearest to where its rank's band would be
        centred if the slots were shared out like the loaded adapters' ranks, then the least recently used.
        None if every slot is held by running requests."""
        n = self.device.num_adapter_slots
        rank_at: list[int | None] = [None] * n
        idle = []
        for v in self._on_device:  # LRU order
            if v.ref.slot >= 0:
                rank_at[v.ref.slot] = _lora_rank(v)
                if v.placements == 0 and len(idle) < EVICTION_WINDOW:
                    idle.append(v)
        candidates = [(slot, None) for slot in self._free_slots] or [(v.ref.slot, v) for v in idle]
        if not candidates:
            return None
        rank = _lora_rank(version)
        disorder = _disorder(rank_at, rank)
        below = sum(count for r, count in self._slot_ranks.items() if r < rank)
        home = n * (below + self._slot_ranks[rank] / 2) / max(sum(self._slot_ranks.values()), 1) - 0.5
        # min keeps the first of equals: among idle adapters, the least recently used
        slot, victim = min(candidates, key=lambda c: (disorder[c[0]], abs(c[0] - home)))
        if victim is not None:
            self._evict_from_device(victim)  # gives its slot back to _free_slots
            self.num_evictions += 1
        self._free_slots.remove(slot)
        return slot

    def reclaim_blocks(self) -> bool:
        """Free the KV blocks of the least recently used prefix or prompt adapter no running request holds."""
        return self._evict_one(blocks_only=True)

    def _evict_one(self, *, blocks_only: bool = False) -> bool:
        """Take the least recently used adapter that no running request holds off the device."""
        for version in self._on_device:
            uses_slot = version.ref.slot >= 0
            if version.placements == 0 and not (blocks_only and uses_slot):
                self._evict_from_device(version)
                self.num_evictions += 1
                return True
        return False

    def _evict_from_device(self, version: AdapterVersion) -> None:
        if version.ref is None:
            return
        assert version.placements == 0, "evicting an adapter that running requests use"
        self._writes = [w for w in self._writes if w.version is not version]  # a write not performed yet
        self._loading.pop(version, None)
        if version.ref.slot >= 0:
            self._writes.append(SlotWrite(None, version.ref.slot, None))  # clear the slot
        self._give_room_back(version)

    def _give_room_back(self, version: AdapterVersion) -> None:
        """Free the version's slot or KV blocks and forget its placement."""
        if version.ref.slot >= 0:
            self._free_slots.append(version.ref.slot)
        else:
            self.blocks.release(version.blocks)
            version.blocks = []
        version.ref = None
        del self._on_device[version]

    def _host_weights(self, version: AdapterVersion) -> AdapterWeights:
        if version.weights is None:
            start = time.perf_counter()
            version.weights = self._read_again(version)
            self.num_reads += 1
            self._loading[version] = ("store" if isinstance(version.source, Snapshot) else "path", start)
            self._on_host[version] = None
            self._trim_host(keep=version)
        self._on_host.move_to_end(version)
        return version.weights

    def _read_again(self, version: AdapterVersion) -> AdapterWeights:
        """The version's weights from its source, which must still hold what it was loaded from."""
        source = version.source
        assert source is not None, "a version without a source is never dropped from host memory"
        what = version.label
        try:
            if isinstance(source, Snapshot):
                source.verify()
                source = source.path
            weights = self.read(source)
        except QuiverError as e:
            raise FailedPrecondition(f"{what} cannot be read again: {e}") from e
        except OSError as e:
            raise FailedPrecondition(f"{what} cannot be read again ({e.strerror})") from e
        if weights.kind is not version.kind or weights.describe() != version.summary:
            raise FailedPrecondition(f"{what}: its files now hold another adapter ({weights.describe()}); load it again")
        return weights

    def _trim_host(self, keep: AdapterVersion | None = None) -> None:
        """Drop host copies (oldest first) of adapters that can be read again, until within budget."""
        total = sum(v.nbytes for v in self._on_host)
        for version in list(self._on_host):
            if total <= self.host_cache_bytes:
                return
            if version is not keep and version.source is not None and version.pins == 0:
                version.weights = None
                del self._on_host[version]
                total -= version.nbytes

    # ---- reporting ----------------------------------------------------------------------------------

    def where(self, version: AdapterVersion) -> str:
        return "device" if version.ref is not None else "host" if version.weights is not None else "disk"

    @property
    def host_bytes(self) -> int:
        return sum(v.nbytes for v in self._on_host)


def _lora_rank(version: AdapterVersion) -> int:
    return version.rank if version.kind is AdapterKind.LORA else 0


def _disorder(rank_at: list[int | None], rank: int) -> list[int]:
    """For each slot p: how many of the other slots' adapters (rank_at, None where empty) would be out of rank
    order with an adapter of `rank` in p — higher ranks before p, lower ones after it."""
    out = [0] * len(rank_at)
    seen = 0
    for p, r in enumerate(rank_at):
        out[p] = seen
        seen += r is not None and r > rank
    seen = 0
    for p in reversed(range(len(rank_at))):
        out[p] += seen
        seen += rank_at[p] is not None and rank_at[p] < rank
    return out


def _rank(weights: AdapterWeights) -> int:
    if isinstance(weights, LoraWeights):
        return weights.max_rank
    if isinstance(weights, BottleneckWeights):
        return weights.bottleneck_size
    return 0
