"""Scale out through Ray Serve: one Quiver engine per replica (one replica per GPU), the same quiver.v1 gRPC
service through Serve's gRPC proxy, each request routed to a replica that already holds its adapter.

    client ──► Serve gRPC proxy ──(multiplexed_model_id = adapter id)──► replica k: QuiverReplica
                                                                          engine + Residency
                                                    shared adapter store (a directory all replicas see)

- Routing: the adapter id is Serve's multiplexed model id. Clients send it as `multiplexed_model_id`
  metadata (`quiver.deploy.routing.AdapterRoutingInterceptor`; the `quiver` CLI always does). The deployment's
  request router (`quiver.deploy.adapter_router`) prefers a replica that reports the adapter on its device
  (its routing stats), then one that holds it in host memory or on disk; when those are all busy
  (`max_ongoing_requests`), the request spills to another replica, which loads the adapter from the store.
- Residency: Serve's per-replica LRU of adapters decides what each engine keeps registered
  (`quiver.deploy.residency`). Its size is tied to the engine's host cache: `host_cache_bytes // max_adapter_bytes`
  adapters, so an adapter Serve keeps on a replica is never re-read from disk.
- Adapters: uploads (and loads of a directory under an adapter root) are written to the shared store, not
  to one replica; any replica loads an id from the store on its first request for it. A replaced adapter is
  loaded again by each replica at its next request; a deleted one is unloaded there and is NOT_FOUND.
- Calls are answered as `quiver serve` answers them: same messages, status codes and bearer tokens; the
  adapter calls are the same catalogue (`quiver.api.catalogue`) over the shared store (LoadAdapter copies a
  directory into it; ListAdapters lists it). Health is Serve's own (`/ray.serve.RayServeAPIService/Healthz`),
  not grpc.health.v1. Each response carries `quiver-replica` and `quiver-node` trailing metadata.
- Resources: a replica takes `num_gpus` GPUs; by default 1 on a cluster with GPUs and 0 (replicas on CPU) on
  one without, where a replica asking for a GPU would wait for one forever.

Start it with `quiver deploy ray` (see `start`). Ray is an optional dependency: `pip install -e .[ray]`.
"""

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig, gRPCOptions

from quiver.adapters.store import AdapterStore, validate_adapter_id
from quiver.api.auth import AuthInterceptor
from quiver.api.cache_scope import CacheSalts, CacheScope
from quiver.api.catalogue import AdapterCatalogue
from quiver.api.errors import client_message, status_code
from quiver.api.inference import InferenceServicer, server_info
from quiver.api.prompts import DEFAULT_MAX_PROMPT_BYTES
from quiver.api.state import ServingState
from quiver.config import EngineConfig, ModelConfig
from quiver.deploy.adapter_router import DEVICE_STAT, AdapterResidencyRouter
from quiver.deploy.residency import ReplicaEngine, Residency
from quiver.errors import FailedPrecondition, QuiverError
from quiver.metrics import Metrics
from quiver.v1 import adapters_pb2, inference_pb2

log = logging.getLogger(__name__)

SERVICER_FUNCTIONS = [
    "quiver.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server",
    "quiver.v1.adapters_pb2_grpc.add_AdapterServiceServicer_to_server",
]
DEPLOYMENT_NAME = "Quiver"


@dataclass(frozen=True)
class RayDeployConfig:
    store_dir: Path  # the shared adapter store: on storage every node mounts at this path
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # each replica's; its host cache sizes Serve's cache
    max_adapter_bytes: int = 64 << 20  # largest adapter accepted (weights, and upload size)
    max_stored_adapters: int | None = 1024  # adapters the shared store keeps; None: no limit
    max_concurrent_uploads: int | None = 4  # uploads in progress at once, per replica; None: no limit
    max_staged_bytes: int | None = 2 << 30  # bytes a replica's uploads in progress may have staged together
    upload_idle_seconds: float = 30.0  # an upload that sends nothing for this long is ended
    adapter_roots: tuple[Path, ...] = ()  # where LoadAdapter may copy a directory from (on every replica's node)
    admin_token: str | None = None  # needed for LoadAdapter, UploadAdapter, UnloadAdapter
    client_tokens: tuple[str, ...] = ()  # one of them (or the admin token) needed for the other quiver.v1 calls
    num_replicas: int = 1  # ignored when `autoscaling` is set
    autoscaling: dict | None = None  # Serve's autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 32}
    max_ongoing_requests: int = 128  # requests a replica takes at once (beyond: queued at the proxy, or spilled)
    num_gpus: float | None = None  # per replica; None: 1 (one replica per GPU) if the cluster has GPUs, else 0 (CPU)
    num_cpus: float = 1.0  # per replica (0 lets CPU-only replicas share a node freely, as tests do)
    max_replicas_per_node: int | None = None
    events_dir: Path | None = None  # each replica appends its adapter loads/unloads/evictions here (JSON lines)
    routing_stats_period_s: float = 2.0  # how often each replica reports the adapters on its device to the router
    app_name: str = "quiver"

    @property
    def max_adapters_per_replica(self) -> int:
        """Serve's multiplexed cache per replica: as many adapters as the engine's host cache holds at the
        largest accepted size, so an adapter Serve keeps on a replica is never re-read from disk."""
        return self.engine.host_cache_bytes // self.max_adapter_bytes

    def __post_init__(self) -> None:
        if self.max_adapters_per_replica < 1:
            raise ValueError(f"the host cache ({self.engine.host_cache_bytes:,} bytes) holds no adapter of "
                             f"max_adapter_bytes ({self.max_adapter_bytes:,}); raise one or lower the other")
        if self.max_staged_bytes is not None and self.max_staged_bytes < self.max_adapter_bytes:
            raise ValueError(f"max_staged_bytes ({self.max_staged_bytes:,}) is below max_adapter_bytes "
                             f"({self.max_adapter_bytes:,}): no upload of the largest size could finish")


def _status_on_context(empty: type):
    """For a method with one response: an error (its status already set on the context by `_call`) ends the
    call with an `empty` message instead of an exception; the client sees the same status, and Serve does not
    log a traceback in the proxy and the replica for every client error. Streaming responses must raise."""

    def wrap(method):
        @functools.wraps(method)
        async def call(self, request, grpc_context):
            try:
                return await method(self, request, grpc_context)
            except Exception:  # noqa: BLE001 - every error: `_call` has set its status on the context
                return empty()

        return call

    return wrap


@serve.deployment(name=DEPLOYMENT_NAME)
class QuiverReplica:
    """One engine behind Serve's gRPC proxy. Method names are the quiver.v1 RPC names: the proxy calls them."""

    def __init__(self, config: RayDeployConfig) -> None:
        from quiver.engine.engine import Engine
        from quiver.engine.service import EngineService
        from quiver.model.loader import load_model

        self._config = config
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._node = ray.get_runtime_context().get_node_id()
        self._tags = [("quiver-replica", self._replica), ("quiver-node", self._node)]
        loaded = load_model(config.model)
        self._service = EngineService(Engine(loaded, config.engine))
        self._state = ServingState()
        self._state.service = self._service
        self._metrics = Metrics()
        salts = CacheSalts(CacheScope.PER_TOKEN, tokens_checked=bool(config.client_tokens))
        self._inference = InferenceServicer(state=self._state, metrics=self._metrics, max_upload_bytes=config.max_adapter_bytes,
                                            max_prompt_bytes=DEFAULT_MAX_PROMPT_BYTES, cache_salts=salts)
        self._auth = AuthInterceptor(admin_token=config.admin_token, client_tokens=config.client_tokens)
        self._server_dirs = (config.store_dir, *config.adapter_roots)  # named to clients relative to themselves
        self._events = _EventLog(config.events_dir, replica=self._replica, node=self._node)
        self._residency = Residency(self._service, store_root=config.store_dir, max_adapter_bytes=config.max_adapter_bytes,
                                    on_event=self._events.write)

        async def load(adapter_id: str):
            return await asyncio.to_thread(self._residency.lease, adapter_id)

        # Serve's cache of adapters on this replica; made here because its size is configured
        self._lease = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(load)
        store = AdapterStore(config.store_dir, max_adapter_bytes=config.max_adapter_bytes, max_adapters=config.max_stored_adapters,
                             max_uploads=config.max_concurrent_uploads, max_staged_bytes=config.max_staged_bytes, recover=False)
        self._adapters = ReplicaEngine(self._residency, lease=self._lease)
        self._catalogue = AdapterCatalogue(state=self._state, store=store, engine=self._adapters, roots=config.adapter_roots,
                                           metrics=self._metrics, upload_idle_seconds=config.upload_idle_seconds, shared=True)
        log.info("replica %s on node %s: serving", self._replica, self._node)

    def __del__(self) -> None:
        """Serve's graceful shutdown (and the garbage collector): let running requests finish, stop the engine."""
        service = getattr(self, "_service", None)  # None if the constructor failed before the engine started
        if service is not None:
            service.shutdown(timeout=30)

    # ---- InferenceService ------------------------------------------------------------------------------

    @_status_on_context(inference_pb2.GenerateResponse)
    async def Generate(self, request: inference_pb2.GenerateRequest, grpc_context) -> inference_pb2.GenerateResponse:
        async with self._call("/quiver.v1.InferenceService/Generate", grpc_context), self._adapter(request.adapter_id):
            return await self._inference.Generate(request, _ProxyContext(grpc_context))

    async def GenerateStream(self, request: inference_pb2.GenerateRequest, grpc_context) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        async with self._call("/quiver.v1.InferenceService/GenerateStream", grpc_context), self._adapter(request.adapter_id):
            async for message in self._inference.GenerateStream(request, _ProxyContext(grpc_context)):
                yield message

    @_status_on_context(inference_pb2.GetServerInfoResponse)
    async def GetServerInfo(self, request: inference_pb2.GetServerInfoRequest, grpc_context) -> inference_pb2.GetServerInfoResponse:
        async with self._call("/quiver.v1.InferenceService/GetServerInfo", grpc_context):
            return server_info(self._service, max_upload_bytes=self._config.max_adapter_bytes,
                               max_prompt_bytes=DEFAULT_MAX_PROMPT_BYTES)

    # ---- AdapterService: the catalogue over the shared store ---------------------------------------------

    @_status_on_context(adapters_pb2.UploadAdapterResponse)
    async def UploadAdapter(self, request_stream, grpc_context) -> adapters_pb2.UploadAdapterResponse:
        async with self._call("/quiver.v1.AdapterService/UploadAdapter", grpc_context):
            return await self._catalogue.upload(request_stream)

    @_status_on_context(adapters_pb2.LoadAdapterResponse)
    async def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest, grpc_context) -> adapters_pb2.LoadAdapterResponse:
        async with self._call("/quiver.v1.AdapterService/LoadAdapter", grpc_context):
            return await self._catalogue.load(request.adapter_id, request.path, replace=request.replace)

    @_status_on_context(adapters_pb2.UnloadAdapterResponse)
    async def UnloadAdapter(self, request: adapters_pb2.UnloadAdapterRequest, grpc_context) -> adapters_pb2.UnloadAdapterResponse:
        async with self._call("/quiver.v1.AdapterService/UnloadAdapter", grpc_context):
            return await self._catalogue.unload(request.adapter_id)

    @_status_on_context(adapters_pb2.ListAdaptersResponse)
    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest, grpc_context) -> adapters_pb2.ListAdaptersResponse:
        async with self._call("/quiver.v1.AdapterService/ListAdapters", grpc_context):
            return await self._catalogue.list()

    # ---- Serve's request router --------------------------------------------------------------------------

    async def record_routing_stats(self) -> dict:
        """Serve's controller polls this every `routing_stats_period_s`: the adapter ids on this replica's device,
        which `AdapterResidencyRouter` prefers for their requests."""
        try:
            adapters = await asyncio.to_thread(self._service.list_adapters)
        except FailedPrecondition:  # the engine is stopping: nothing to prefer this replica for
            return {DEVICE_STAT: []}
        return {DEVICE_STAT: sorted(a.adapter_id for a in adapters if a.location == "device")}

    # ---- helpers -------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _call(self, method: str, grpc_context) -> AsyncIterator[None]:
        """Auth, this replica's tags, and typed errors → status codes, as `quiver serve`'s interceptors do."""
        grpc_context.set_trailing_metadata(self._tags)
        try:
            self._auth.authorize(method, grpc_context.invocation_metadata())
            yield
        except QuiverError as e:
            grpc_context.set_code(status_code(e))
            grpc_context.set_details(client_message(e, server_dirs=self._server_dirs))
            raise
        except Exception:
            log.exception("bug in %s", method)
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details(f"internal error in {method}; see replica {self._replica}'s log")
            raise

    @contextlib.asynccontextmanager
    async def _adapter(self, adapter_id: str) -> AsyncIterator[None]:
        """Hold `adapter_id` (none: the base model) on this replica for one request, loading it if needed."""
        if not adapter_id:
            yield
            return
        await self._lease(validate_adapter_id(adapter_id))  # Serve's cache: loads on a miss, may evict another
        async with self._adapters.held(adapter_id) as held:
            if not self._residency.current(held):
                await asyncio.to_thread(self._residency.refresh, held)
            self._state.adapter_kinds[adapter_id] = held.info.kind
            yield


class _ProxyContext:
    """The servicer context `InferenceServicer` reads: the call's metadata (its bearer token sets its
    prefix-cache scope) and no deadline (Serve's proxy enforces deadlines itself)."""

    def __init__(self, grpc_context) -> None:
        self._metadata = tuple(grpc_context.invocation_metadata())

    def invocation_metadata(self) -> tuple:
        return self._metadata

    @staticmethod
    def time_remaining() -> None:
        return None


class _EventLog:
    """Adapter residency events of one replica, as JSON lines in events_dir/<replica>.jsonl (or nowhere)."""

    def __init__(self, directory: Path | None, *, replica: str, node: str) -> None:
        self._path = directory / f"{replica}.jsonl" if directory else None
        self._replica, self._node = replica, node
        self._lock = threading.Lock()
        if directory:
            directory.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, adapter_id: str) -> None:
        if self._path is None:
            return
        line = json.dumps({"time": time.time(), "replica": self._replica, "node": self._node, "event": event, "adapter_id": adapter_id})
        with self._lock, self._path.open("a") as f:
            f.write(line + "\n")


def application(config: RayDeployConfig):
    """The Serve application: QuiverReplica with the replica count (or autoscaling) and resources of `config`,
    routed by `AdapterResidencyRouter`."""
    scaling = {"autoscaling_config": config.autoscaling} if config.autoscaling else {"num_replicas": config.num_replicas}
    return QuiverReplica.options(
        **scaling,
        max_ongoing_requests=config.max_ongoing_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=AdapterResidencyRouter, request_routing_stats_period_s=config.routing_stats_period_s
        ),
        ray_actor_options={"num_gpus": gpus_per_replica(config.num_gpus), "num_cpus": config.num_cpus},
        max_replicas_per_node=config.max_replicas_per_node,
    ).bind(config)


def gpus_per_replica(asked: float | None) -> float:
    """GPUs each replica asks for: `asked`, or when None 1 if the connected cluster has GPUs and 0 (replicas on
    CPU) if it has none; a replica asking for a GPU on a cluster without one would wait for it forever."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if asked is None:
        asked = 1.0 if gpus else 0.0
        log.info("the cluster has %g GPUs: each replica takes %g (--num-gpus sets it)", gpus, asked)
    elif asked and not gpus:
        log.warning("the cluster has no GPU: replicas asking for %g (--num-gpus) wait until a GPU node joins", asked)
    return asked


def start(
    config: RayDeployConfig, *, grpc_port: int, http_host: str = "127.0.0.1", http_port: int = 8000,
    proxy_location: str = "EveryNode",
) -> None:
    """Start Serve on the connected Ray cluster (call `ray.init` first) and deploy Quiver; returns once every
    replica is ready. Serve's gRPC proxy listens on every interface at `grpc_port`: set tokens (and keep the
    port behind a firewall) on a shared network. The store is opened here once, finishing what a crash cut
    short; replicas open it without that clean-up, as others may be writing to it. `proxy_location`:
    EveryNode (a proxy on each node) or HeadOnly (one; e.g. several simulated nodes on one machine)."""
    AdapterStore(config.store_dir, max_adapter_bytes=config.max_adapter_bytes, max_adapters=config.max_stored_adapters)
    serve.start(
        proxy_location=proxy_location,
        http_options={"host": http_host, "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    serve.run(application(config), name=config.app_name, route_prefix="/")
