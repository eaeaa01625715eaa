"""What the servicers share: the engine service once the model is loaded, in-flight calls, draining."""

import asyncio
import contextlib
from typing import AsyncIterator

from quiver.engine.service import EngineService
from quiver.errors import FailedPrecondition, Unavailable
from quiver.metrics import BASE


class ServingState:
    def __init__(self) -> None:
        self.service: EngineService | None = None  # set once the model is loaded
        self.adapter_kinds: dict[str, str] = {}  # adapter id -> its AdapterKind value, for metrics labels
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

    def kind_label(self, adapter_id: str) -> str:
        """The adapter_kind metrics label of a request: "base", a kind, or "unknown" for an id not loaded."""
        if not adapter_id:
            return BASE
        return self.adapter_kinds.get(adapter_id, "unknown").lower()
