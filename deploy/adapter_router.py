"""Ray Serve's request router for Quiver: a request goes first to a replica that has its adapter on the device.

Serve's own multiplexed routing knows only which replicas hold an adapter id (Serve's per-replica cache), not
whether its weights are on that replica's device or must be written there (or read again from disk) first.
Each replica reports the adapters on its device in its routing stats (`QuiverReplica.record_routing_stats`,
which Serve's controller polls every `RayDeployConfig.routing_stats_period_s`); for a request naming an
adapter (its multiplexed model id), `rank_replicas` orders the replicas in ranks:

    1. those that reported the adapter on the device
    2. those that hold it otherwise (Serve's multiplexed ids: registered, weights in host memory or on disk)
    3. two of the replicas holding the fewest adapters (chosen at random), which load it from the store

Serve tries the ranks in order and, within one, takes the replica with the shortest queue that accepts the
request (`max_ongoing_requests`), so a request spills to the next rank only when every replica of the
better ones is busy. A request without an adapter goes to the shorter queue of two random replicas.
Routing stats are at most one period old: a replica that has since evicted the adapter from its device still
serves it (from host memory or disk).
"""

import random
from collections.abc import Sequence
from typing import Protocol

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

DEVICE_STAT = "adapters_on_device"  # the routing stat that lists the adapter ids on a replica's device


class Replica(Protocol):
    """What the ranking reads of a replica (Serve's `RunningReplica`)."""

    @property
    def multiplexed_model_ids(self) -> set[str]: ...
    @property
    def routing_stats(self) -> dict: ...


def rank_replicas(adapter_id: str, replicas: Sequence[Replica], *, rng: random.Random | None = None) -> list[list[Replica]]:
    """The replicas to try for a request with `adapter_id` ("" for the base model), best rank first; empty
    ranks left out (see the module docstring)."""
    rng = rng or random
    if not adapter_id:
        return [_two(list(replicas), rng)] if replicas else []
    on_device = [r for r in replicas if adapter_id in (r.routing_stats or {}).get(DEVICE_STAT, ())]
    held = [r for r in replicas if adapter_id in r.multiplexed_model_ids and r not in on_device]
    rest = [r for r in replicas if r not in on_device and r not in held]
    if rest:
        fewest = min(len(r.multiplexed_model_ids) for r in rest)
        rest = _two([r for r in rest if len(r.multiplexed_model_ids) == fewest], rng)
    return [rank for rank in (on_device, held, rest) if rank]


def _two(replicas: list[Replica], rng: random.Random) -> list[Replica]:
    return rng.sample(replicas, 2) if len(replicas) > 2 else replicas


class AdapterResidencyRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Serve's request router of the Quiver deployment (set in `quiver.deploy.ray_serve.application`)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        adapter_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        return rank_replicas(adapter_id, candidate_replicas)
