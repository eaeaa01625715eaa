"""Where the adapter registry puts LoRA adapters among the device slots: in order of rank, so that the CPU
LoRA path reads each band of slots at its own rank; and what it evicts when every slot is taken."""

import random

import torch

from quiver.adapters.registry import EVICTION_WINDOW, AdapterRegistry, _disorder
from quiver.adapters.weights import LoraModule, LoraWeights
from quiver.engine.block_manager import BlockManager


class FakeDevice:
    """The slots as the runner would leave them after performing the registry's queued writes."""

    max_bottleneck_size = 0

    def __init__(self, num_slots: int, max_rank: int = 64) -> None:
        self.num_adapter_slots = num_slots
        self.max_lora_rank = max_rank
        self.registry: AdapterRegistry | None = None
        self._rank_at: list[int | None] = [None] * num_slots

    @property
    def rank_at(self) -> list[int | None]:
        """Each slot's LoRA rank (None: empty), once the writes queued so far are performed."""
        for write in self.registry.take_writes():
            if write.weights is not None:
                assert self._rank_at[write.slot] is None, "wrote over a slot in use"
            self._rank_at[write.slot] = write.weights.max_rank if write.weights is not None else None
        return self._rank_at


def lora(rank: int) -> LoraWeights:
    return LoraWeights(modules={"layers.0.q_proj": LoraModule(a=torch.zeros(rank, 8), b=torch.zeros(8, rank), scale=1.0)})


def registry(num_slots: int) -> tuple[AdapterRegistry, FakeDevice]:
    device = FakeDevice(num_slots)
    blocks = BlockManager(num_blocks=4, block_size=16)
    device.registry = AdapterRegistry(device=device, blocks=blocks, read=lambda path: None, host_cache_bytes=1 << 30)
    return device.registry, device


def run_once(reg: AdapterRegistry, adapter_id: str):
    """One request's use of the adapter: placed while it runs, then idle on the device."""
    version = reg.current[adapter_id]
    ref = reg.place(version)
    reg.unplace(version)
    return ref


def inversions(ranks: list[int | None]) -> int:
    present = [r for r in ranks if r is not None]
    return sum(a > b for i, a in enumerate(present) for b in present[i + 1 :])


def random_ranks(seed: int) -> list[int]:
    """16 ranks drawn from the benchmark bank's mix (seeded)."""
    rng = random.Random(seed)
    return [rng.choice([8, 16, 32, 64]) for _ in range(16)]


def test_disorder_counts_the_adapters_out_of_rank_order():
    assert _disorder([64, None, 8, None], 16) == [1, 2, 1, 1]
    assert _disorder([None, None], 8) == [0, 0]


def test_adapters_loaded_first_fill_the_free_slots_in_rank_order_whatever_order_they_are_used_in():
    for seed in range(20):
        rng, ranks, (reg, device) = random.Random(seed), random_ranks(seed), registry(16)
        for i, r in enumerate(ranks):
            reg.register(f"a{i}", lora(r), source=None)
        for i in rng.sample(range(16), 16):
            run_once(reg, f"a{i}")
        assert reg.num_evictions == 0 and device.rank_at == sorted(ranks), (seed, device.rank_at)


def test_adapters_loaded_one_by_one_while_serving_still_fill_closer_to_rank_order():
    in_layout = in_arrival = 0
    for seed in range(20):
        ranks, (reg, device) = random_ranks(seed), registry(16)
        for i, r in enumerate(ranks):
            reg.register(f"a{i}", lora(r), source=None)
            run_once(reg, f"a{i}")
        in_layout, in_arrival = in_layout + inversions(device.rank_at), in_arrival + inversions(ranks)
    assert in_layout < in_arrival * 0.6, (in_layout, in_arrival)  # seen: 400 against 902


def test_under_churn_the_layout_sorts_itself():
    """More adapters than slots, requests coming and going (the 2,048-adapter benchmark's regime): what each
    placement evicts is chosen to restore the order, so the slots end up in bands of one rank."""
    rng = random.Random(0)
    reg, device = registry(64)
    for i in range(512):
        reg.register(f"a{i}", lora(rng.choice([8, 16, 32, 64])), source=None)
    running = []
    for _ in range(3000):
        if len(running) >= 40:
            reg.unplace(running.pop(rng.randrange(len(running))))
        version = reg.current[f"a{rng.randrange(512)}"]
        if reg.place(version) is not None:
            running.append(version)
    assert reg.num_evictions > 2000
    assert inversions(device.rank_at) <= 40, device.rank_at  # of 2,016 pairs; seen: 20


def test_a_free_slot_is_taken_before_any_idle_adapter_is_evicted():
    reg, device = registry(4)
    for i, r in enumerate([64, 64, 8]):
        reg.register(f"a{i}", lora(r), source=None)
        run_once(reg, f"a{i}")
    reg.register("new", lora(8), source=None)
    run_once(reg, "new")
    assert reg.num_evictions == 0 and sorted(r for r in device.rank_at if r) == [8, 8, 64, 64]


def test_when_full_it_evicts_an_idle_adapter_that_keeps_the_order():
    reg, device = registry(8)
    for i, r in enumerate([8, 8, 16, 16, 32, 32, 64, 64, 64]):
        reg.register(f"a{i}", lora(r), source=None)
    for i in range(8):
        run_once(reg, f"a{i}")
    assert device.rank_at == [8, 8, 16, 16, 32, 32, 64, 64]
    ref = run_once(reg, "a8")
    assert reg.num_evictions == 1
    assert device.rank_at == sorted(device.rank_at), device.rank_at  # a 64 went where a 64 or the last 32 was
    assert ref.slot >= 5


def test_only_idle_adapters_among_the_least_recently_used_are_evicted():
    n = EVICTION_WINDOW + 4
    reg, device = registry(n)
    versions = []
    for i in range(n):
        reg.register(f"a{i}", lora(8 if i < EVICTION_WINDOW else 64), source=None)
        versions.append(reg.current[f"a{i}"])
        reg.place(versions[-1])
    for v in versions[: EVICTION_WINDOW // 2]:  # half the oldest finish; the others still run
        reg.unplace(v)
    reg.register("new", lora(64), source=None)
    run_once(reg, "new")
    evicted = [v for v in versions if v.ref is None]
    assert len(evicted) == 1 and evicted[0] in versions[: EVICTION_WINDOW // 2]


def test_no_slot_while_every_adapter_runs():
    reg, _ = registry(2)
    for i in range(2):
        reg.register(f"a{i}", lora(8), source=None)
        reg.place(reg.current[f"a{i}"])
    reg.register("new", lora(8), source=None)
    assert reg.place(reg.current["new"]) is None
    assert reg.num_evictions == 0
