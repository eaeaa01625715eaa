"""What the servicers share: the engine service once the model is loaded, in-flight calls, draining."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from quiver.adapters.weights import AdapterKind
from quiver.engine.service import EngineService
from quiver.errors import FailedPrecondition, Unavailable
from quiver.metrics import NoAdapter


class ServingState:
    def __init__(self) -> None:
        self.service: EngineService | None = None  # set once the model is loaded
        self.adapter_kinds: dict[str, AdapterKind] = {}  # adapter id -> its kind, for metrics labels
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def engine(self) -> EngineService:
        """The engine service; FailedPrecondition while the model is still loading."""
        if self.service is None:
            raise FailedPrecondition("the server is starting and the model is still loading; retry when its health check says SERVING")
        return self.service

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[EngineService]:
        """Hold one call that uses the engine; refused with Unavailable while draining (a retry on another
        server, or on this one after its restart, may succeed), waited for by `wait_idle`."""
        if self._draining:
            raise Unavailable("the server is shutting down and takes no new calls; retry on another server or after its restart")
        service = self.engine()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield service
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def drain(self) -> None:
        """Refuse new calls from now on."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for the calls in flight to end; False if some were still running after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def request_kind(self, adapter_id: str) -> AdapterKind | NoAdapter:
        """What a request's metrics are labelled by: its adapter's kind, BASE without one, UNKNOWN for an id
        not loaded."""
        if not adapter_id:
            return NoAdapter.BASE
        return self.adapter_kinds.get(adapter_id, NoAdapter.UNKNOWN)
