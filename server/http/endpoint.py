"""Uvicorn serving the HTTP app as a task on the gRPC server's event loop, in the same process.

The socket is bound before serving, so that `port` is known (and a port in use fails `start`) at once.
Signals are left to `quiver serve`, which drains gRPC and HTTP together: uvicorn's own handlers are not
installed. `stop(timeout)` closes the listening socket and idle connections, lets responses in progress run
for up to `timeout` seconds, then cancels them (a cancelled generation is aborted in the engine).
"""

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """SIGTERM and SIGINT stay with `quiver serve` (see quiver.api.server.serve)."""
        yield


class HttpEndpoint:
    def __init__(self, app, *, host: str, port: int, tls_cert: Path | None, tls_key: Path | None) -> None:
        self._config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_config=None, access_log=False,
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
        )
        self._server = _Server(self._config)
        self._socket: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Listen and serve; raises for a port in use or unreadable TLS files."""
        self._config.load()  # the app and the TLS context: a bad certificate fails here
        family, kind, proto, _, address = socket.getaddrinfo(
            self._config.host, self._config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # startup failed: raise why
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float) -> None:
        if self._task is None:
            return
        self._config.timeout_graceful_shutdown = max(0.1, timeout)
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._socket.close()
