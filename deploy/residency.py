"""Which adapters one replica's engine serves, driven by Ray Serve's multiplexed-model cache.

Serve keeps an LRU cache of "models" per replica: on a miss it calls our loader (`Residency.lease`), and to
make room it evicts the least recently used entry by calling its `__del__` — without waiting for the
requests that still use it, and a second time when the object is garbage collected. So the cache entry is
a `Lease`, and the engine registration behind it (`Held`) is unloaded only once no lease and no request
holds it:

    lease(id)      Serve's loader: register the stored adapter `id` in the engine (once), hand out a lease
    acquire(id)    each request pins the id's registration; `refresh` first if the store entry changed
    Lease.__del__  Serve's eviction (and the garbage collector's call): idempotent; unloads when unused
    release        a request ends; the last one of an evicted adapter unloads it (`unload`)

The shared store is the source of truth: an id whose store entry was replaced (another replica took an
upload) is loaded again on its next request, and one deleted from the store is unloaded and NOT_FOUND.
Engine registrations change under one lock (`_engine`), in worker threads, so an unload can never land
after a newer load of the same id; counters change under a short lock (`_state`) that the event loop takes.

`ReplicaEngine` is how the adapter catalogue (`quiver.api.catalogue`) serves and unloads ids on a replica:
through the residency and Serve's cache, never the engine directly.
"""

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from quiver.engine.service import AdapterInfo, EngineService
from quiver.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

Stamp = tuple[int, int]  # (inode, mtime_ns) of an adapter's store directory: a new upload is a new directory


def stamp_of(path: Path) -> Stamp | None:
    """The identity of the store entry at `path`, or None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass(eq=False)
class Held:
    """One adapter id this replica serves: at most one per id, kept while Serve caches it or requests use it."""

    adapter_id: str
    stamp: Stamp | None = None  # the store entry it was registered from
    info: AdapterInfo | None = None  # set while registered in the engine
    uses: int = 0  # requests running on it
    lease: "Lease | None" = None  # the entry Serve's cache holds for it; None once evicted


class Lease:
    """Serve's cache entry for one adapter on one replica. Serve calls `__del__` when it evicts the entry
    (in a worker thread) and Python calls it again when the object is collected; only the first call counts."""

    def __init__(self, residency: "Residency", adapter_id: str) -> None:
        self.adapter_id = adapter_id
        self._residency = residency
        self._evicted = False

    def __del__(self) -> None:
        self._residency.evict(self)


class Residency:
    def __init__(
        self, service: EngineService, *, store_root: Path, max_adapter_bytes: int,
        on_event: Callable[[str, str], None] = lambda event, adapter_id: None,
    ) -> None:
        """`on_event(event, adapter_id)` is told of every "load", "unload", "evict" and "evict-again"."""
        self._service = service
        self._root = store_root
        self._max_bytes = max_adapter_bytes
        self._on_event = on_event
        self._engine = threading.Lock()  # held while an engine registration changes (taken before `_state`)
        self._state = threading.Lock()  # held briefly while uses/leases change; the event loop takes it
        self._held: dict[str, Held] = {}

    # ---- Serve's side ------------------------------------------------------------------------------

    def lease(self, adapter_id: str) -> Lease:
        """Serve's loader (blocking: run it in a thread). NotFound if the store has no such id."""
        with self._engine:
            with self._state:
                held = self._hold(adapter_id)
            try:
                self._sync(held)
            except BaseException:
                with self._state:
                    self._detach_if_idle(held)
                raise
            with self._state:
                held.lease = Lease(self, adapter_id)
                return held.lease

    def evict(self, lease: Lease) -> None:
        """Serve evicted `lease`, or it was collected: unload its adapter once no request uses it."""
        with self._state:
            again, lease._evicted = lease._evicted, True
        self._on_event("evict-again" if again else "evict", lease.adapter_id)
        if again:
            return
        with self._engine:
            with self._state:
                held = self._held.get(lease.adapter_id)
                if held is None or held.lease is not lease:
                    return  # a newer lease took over
                held.lease = None
                idle = self._detach_if_idle(held)
            if idle:
                self._unregister(held)

    # ---- requests (the event loop calls acquire/current/release; refresh and unload in a thread) -------

    def acquire(self, adapter_id: str) -> Held:
        """Pin `adapter_id` for one request; pair with `release`."""
        with self._state:
            held = self._hold(adapter_id)
            held.uses += 1
            return held

    def current(self, held: Held) -> bool:
        """Whether `held` is registered from the store's present entry (one stat)."""
        return held.info is not None and stamp_of(self._root / held.adapter_id) == held.stamp

    def refresh(self, held: Held) -> AdapterInfo:
        """Bring `held` in line with the store (blocking): register it, again if the store entry was replaced;
        unregister it and raise NotFound if the entry was deleted."""
        with self._engine:
            return self._sync(held)

    def release(self, held: Held) -> bool:
        """End one request on `held`; True if it must now be unloaded (then call `unload`, in a thread)."""
        with self._state:
            held.uses -= 1
            return held.uses == 0 and held.lease is None

    def unload(self, held: Held) -> None:
        """Unload `held` if nothing holds it any more (blocking)."""
        with self._engine:
            with self._state:
                idle = self._detach_if_idle(held)
            if idle:
                self._unregister(held)

    def held_ids(self) -> list[str]:
        with self._state:
            return sorted(self._held)

    # ---- under the locks -----------------------------------------------------------------------------

    def _hold(self, adapter_id: str) -> Held:
        """Under `_state`: the one Held of `adapter_id`, made if there is none."""
        held = self._held.get(adapter_id)
        if held is None:
            held = self._held[adapter_id] = Held(adapter_id)
        return held

    def _detach_if_idle(self, held: Held) -> bool:
        """Under `_engine` and `_state`: forget `held` if no lease and no request holds it; True if it was."""
        if held.uses > 0 or held.lease is not None or self._held.get(held.adapter_id) is not held:
            return False
        del self._held[held.adapter_id]
        return True

    def _sync(self, held: Held) -> AdapterInfo:
        """Under `_engine`."""
        stamp = stamp_of(self._root / held.adapter_id)
        if stamp is None:
            self._unregister(held)
            raise NotFound(f"no adapter {held.adapter_id!r} is stored; upload it first")
        if held.info is None or stamp != held.stamp:
            try:
                info = self._register(held.adapter_id)
            except BaseException:  # the engine may still serve the previous version: take it out too
                self._unregister(held)
                raise
            held.info, held.stamp = info, stamp
        return held.info

    def _register(self, adapter_id: str) -> AdapterInfo:
        """Under `_engine`."""
        info = self._service.load_adapter(adapter_id, self._root / adapter_id, replace=True)
        if info.nbytes > self._max_bytes:
            self._service.unload_adapter(adapter_id)
            raise InvalidArgument(
                f"adapter {adapter_id!r} holds {info.nbytes:,} bytes of weights, more than this deployment's "
                f"max_adapter_bytes ({self._max_bytes:,}), which sizes each replica's host cache"
            )
        self._on_event("load", adapter_id)
        log.info("adapter %r loaded: %s", adapter_id, info.summary)
        return info

    def _unregister(self, held: Held) -> None:
        """Under `_engine`: take `held` out of the engine if it is in."""
        if held.info is None:
            return
        held.info = None
        try:
            self._service.unload_adapter(held.adapter_id)
        except (NotFound, FailedPrecondition):  # FailedPrecondition: the engine has shut down
            return
        self._on_event("unload", held.adapter_id)
        log.info("adapter %r unloaded", held.adapter_id)


class ReplicaEngine:
    """The catalogue's engine on a replica (`quiver.api.catalogue.AdapterEngine`): an id is served through this
    replica's residency, from its entry in the shared store, and entered in Serve's cache of the replica."""

    def __init__(self, residency: Residency, *, lease: Callable[[str], Awaitable[object]]) -> None:
        """`lease`: Serve's multiplexed loader of this replica (a miss loads the id, and may evict another)."""
        self._residency = residency
        self._lease = lease

    async def load(self, adapter_id: str, path: Path, *, replace: bool) -> AdapterInfo:
        """Serve the id's store entry (just committed at `path`) here, entered in Serve's cache of this replica."""
        await self._lease(adapter_id)
        async with self.held(adapter_id) as held:
            return await asyncio.to_thread(self._residency.refresh, held)

    async def unload(self, adapter_id: str) -> None:
        """Its store entry is gone: unloaded here (NotFound); other replicas unload it at their next request for
        it, or when Serve evicts it."""
        async with self.held(adapter_id) as held:
            await asyncio.to_thread(self._residency.refresh, held)

    @contextlib.asynccontextmanager
    async def held(self, adapter_id: str) -> AsyncIterator[Held]:
        """Pin this replica's registration of `adapter_id`; unloaded at the end if Serve evicted it meanwhile."""
        held = self._residency.acquire(adapter_id)
        try:
            yield held
        finally:
            if self._residency.release(held):
                await asyncio.to_thread(self._residency.unload, held)
