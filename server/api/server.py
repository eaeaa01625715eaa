"""The gRPC server's lifecycle: listen, load the model, serve, drain.

    start()   listen; health says NOT_SERVING; calls that need the model get FAILED_PRECONDITION
    attach()  the model is loaded: restore adapters (start-up directory, upload store); health says SERVING
    stop()    health says NOT_SERVING; new calls are refused with UNAVAILABLE; calls in flight get
              `grace_seconds` to finish, then are cancelled; the engine stops

With `http_port` set, the OpenAI-compatible HTTP endpoint (quiver.http) runs beside gRPC in the same event
loop, over the same engine, tokens, TLS files and limits, and drains with it (HTTP 503 where gRPC says
FAILED_PRECONDITION or UNAVAILABLE). FastAPI and uvicorn are imported only then.
"""

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from quiver.adapters.store import AdapterStore
from quiver.api.adapters import AdapterServicer
from quiver.api.auth import AuthInterceptor
from quiver.api.cache_scope import CacheSalts, CacheScope
from quiver.api.decode import DecodeInterceptor
from quiver.api.errors import ErrorInterceptor
from quiver.api.generation import Generator
from quiver.api.inference import InferenceServicer
from quiver.api.prompts import DEFAULT_MAX_PROMPT_BYTES
from quiver.api.state import ServingState
from quiver.config import DEFAULT_ADAPTER_SERIES
from quiver.engine.request import RequestOutput
from quiver.engine.service import EngineService
from quiver.errors import QuiverError
from quiver.metrics import Metrics
from quiver.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
)


@dataclass(frozen=True)
class ServerConfig:
    store_dir: Path  # uploaded adapters, kept across restarts
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see QuiverServer.port)
    metrics_port: int | None = 9464  # the Prometheus endpoint (plain HTTP, no token); 0: any free port; None: none
    metrics_host: str = "127.0.0.1"  # where the Prometheus endpoint listens (not `host`: it has no auth)
    metrics_max_adapters: int = DEFAULT_ADAPTER_SERIES  # adapter ids with their own per-adapter series
    adapters_dir: Path | None = None  # every adapter directory in it is loaded at start, under its name
    adapter_roots: tuple[Path, ...] = ()  # where LoadAdapter may read from
    max_upload_bytes: int = 1 << 30
    max_stored_adapters: int | None = 1024  # uploaded adapters kept in the store; None: no limit
    max_concurrent_uploads: int = 4  # uploads in progress at once; more are refused at their header
    max_staged_bytes: int = 2 << 30  # bytes all uploads in progress may have staged together
    upload_idle_seconds: float = 30.0  # an upload that sends nothing for this long is ended
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # prompt text refused beyond this, before it is tokenised
    prefix_cache_scope: CacheScope = CacheScope.PER_TOKEN  # requests share cached blocks within a token's scope
    admin_token: str | None = None  # needed for LoadAdapter, UploadAdapter, UnloadAdapter
    client_tokens: tuple[str, ...] = ()  # one of them (or the admin token) needed for the other quiver.v1 calls
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    grace_seconds: float = 30.0  # how long calls in flight may run on after a shutdown starts
    http_port: int | None = None  # the OpenAI-compatible HTTP endpoint; 0: any free port; None: none
    http_host: str | None = None  # where it listens; None: `host`


class QuiverServer:
    def __init__(self, config: ServerConfig) -> None:
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if config.max_staged_bytes < config.max_upload_bytes:
            raise ValueError(f"--max-staged-bytes ({config.max_staged_bytes}) is below --max-upload-bytes "
                             f"({config.max_upload_bytes}): no upload of the largest size could finish")
        self.config = config
        self.metrics = Metrics(max_adapter_series=config.metrics_max_adapters)
        self.state = ServingState()
        self.store = AdapterStore(
            config.store_dir, max_adapter_bytes=config.max_upload_bytes, max_adapters=config.max_stored_adapters,
            max_uploads=config.max_concurrent_uploads, max_staged_bytes=config.max_staged_bytes,
        )
        self.health = health_aio.HealthServicer()
        self.port: int | None = None  # the gRPC port, once started
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # the OpenAI-compatible endpoint's port, once started (if on)
        self._grpc: grpc.aio.Server | None = None  # made in start(), on the event loop that serves it
        self._metrics_http = None
        self._openai = None  # quiver.http.endpoint.HttpEndpoint when http_port is set

    def on_step(self, outputs: list[RequestOutput]) -> None:
        """Give this to the EngineService (its per-step hook) so that batch sizes are measured."""
        self.metrics.on_step(outputs)

    async def start(self) -> None:
        state, config = self.state, self.config
        openai = _openai_module() if config.http_port is not None else None  # before listening: fail early
        server_dirs = (config.store_dir, *config.adapter_roots, *([config.adapters_dir] if config.adapters_dir else []))
        auth = AuthInterceptor(admin_token=config.admin_token, client_tokens=config.client_tokens)
        self._grpc = grpc.aio.server(interceptors=[ErrorInterceptor(server_dirs=server_dirs), auth, DecodeInterceptor()])
        salts = CacheSalts(config.prefix_cache_scope, tokens_checked=bool(config.client_tokens))
        inference = InferenceServicer(state=state, metrics=self.metrics, max_upload_bytes=config.max_upload_bytes,
                                      max_prompt_bytes=config.max_prompt_bytes, cache_salts=salts)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, self._grpc)
        adapters = AdapterServicer(state=state, store=self.store, roots=config.adapter_roots, metrics=self.metrics,
                                   upload_idle_seconds=config.upload_idle_seconds)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(adapters, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self._grpc
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        if config.metrics_port is not None:
            self._metrics_http, _ = start_http_server(config.metrics_port, addr=config.metrics_host,
                                                      registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        scheme = "TLS" if config.tls_cert else "plaintext"
        log.info("listening on %s:%d (%s); metrics on %s", config.host, self.port, scheme,
                 f"{config.metrics_host}:{self.metrics_port} (plain HTTP, no token)" if self._metrics_http else "none")
        if openai is not None:
            generator = Generator(state=state, metrics=self.metrics, max_prompt_bytes=config.max_prompt_bytes)
            app = openai.app.build_app(state=state, auth=auth, salts=salts, generator=generator, server_dirs=server_dirs)
            host = config.http_host or config.host
            endpoint = openai.endpoint.HttpEndpoint(app, host=host, port=config.http_port, tls_cert=config.tls_cert,
                                                    tls_key=config.tls_key)
            try:
                await endpoint.start()
            except BaseException:  # e.g. the port is taken: stop listening elsewhere too
                await self._grpc.stop(0)
                self._close_metrics()
                raise
            self._openai, self.http_port = endpoint, endpoint.port
            log.info("OpenAI-compatible HTTP endpoint on %s://%s:%d/v1", "https" if config.tls_cert else "http", host,
                     self.http_port)

    async def attach(self, service: EngineService) -> None:
        """The model is loaded: restore adapters, then report SERVING."""
        self.state.service = service
        self.metrics.watch(service)
        found = sorted(p for p in self.config.adapters_dir.iterdir() if p.is_dir()) if self.config.adapters_dir else []
        for path in found:
            await self._restore(service, path.name, path, source="path")
        for adapter_id in self.store.ids():
            await self._restore(service, adapter_id, self.store.path(adapter_id), source="store")
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving: %d adapters", len(self.state.adapter_kinds))

    async def stop(self) -> None:
        """Drain and stop; returns when the engine has stopped."""
        deadline = time.monotonic() + self.config.grace_seconds
        await self.health.enter_graceful_shutdown()
        self.state.drain()
        if not await self.state.wait_idle(self.config.grace_seconds):
            log.warning("calls still running after the %.0f s grace period are cancelled", self.config.grace_seconds)
        remaining = max(0.0, deadline - time.monotonic())
        await asyncio.gather(self._grpc.stop(remaining), *([self._openai.stop(remaining)] if self._openai else []))
        if self.state.service is not None:
            await asyncio.to_thread(self.state.service.shutdown, max(1.0, deadline - time.monotonic()))
        self._close_metrics()
        log.info("stopped")

    def _close_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def _restore(self, service: EngineService, adapter_id: str, path: Path, *, source: str) -> None:
        try:
            with self.metrics.adapter_load_seconds.labels(source).time():
                info = await asyncio.to_thread(service.load_adapter, adapter_id, path, replace=True)
        except QuiverError as e:
            log.error("adapter %r at %s is not served: %s", adapter_id, path, e)
            return
        self.state.adapter_kinds[adapter_id] = info.kind
        log.info("adapter %r loaded from %s: %s", adapter_id, path, info.summary)

    async def _set_health(self, status) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)


def _openai_module():
    """quiver.http's app and endpoint modules; QuiverError naming the extra to install if FastAPI or uvicorn is missing."""
    try:
        import quiver.http.app
        import quiver.http.endpoint
    except ModuleNotFoundError as e:
        raise QuiverError(f"--http-port needs FastAPI and uvicorn ({e}): pip install -e '.[http]'") from e
    return quiver.http


async def serve(config: ServerConfig, *, load: Callable[[Callable[[list[RequestOutput]], None]], EngineService]) -> None:
    """Run a server until SIGTERM or SIGINT, then drain and return. `load(on_step)` builds the engine
    service (in a worker thread, while health says NOT_SERVING)."""
    server = QuiverServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    loading = asyncio.ensure_future(asyncio.to_thread(load, server.on_step))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        if loading.exception() is not None:  # the model did not load: stop listening, report why
            await server.stop()
            raise loading.exception()
        await server.attach(loading.result())
        await stopping
    log.info("shutting down: finishing the calls in flight (up to %.0f s)", config.grace_seconds)
    await server.stop()
    if not loading.done():  # a signal during model loading: let the load end, then stop its engine
        (await loading).shutdown()
