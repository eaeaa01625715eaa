"""Every Prometheus metric of the server, defined once, in its own registry (one per server).

Labels are bounded: `adapter_kind` is "base", one of the six kinds (`AdapterKind.label`, e.g. "lora") or
"unknown" (an adapter id that is not loaded), `status` a gRPC status name, `location` and `tier`
device/host/disk, `source` store/path/host_cache/upload, `result` hit/write. The two per-adapter metrics
(`quiver_adapter_requests_total`, `quiver_adapter_tier`) are capped: only the `max_adapter_series` adapter ids
with the most requests get their own `adapter` label value, every other one is summed into adapter="other"
(an adapter whose id is "other" is always counted there), so a scrape of a server with 10,000 adapters stays
small. Engine-side values (queue lengths, KV blocks, adapters by location, evictions, preemptions,
prefix-cache hits, per-adapter requests and tiers, device-slot hits) are read from the engine service when
Prometheus scrapes, in one call on its loop thread, so that they agree with each other and with ListAdapters.
"""

import enum
import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from quiver.adapters.weights import AdapterKind
from quiver.config import DEFAULT_ADAPTER_SERIES
from quiver.engine.engine import Engine
from quiver.engine.request import RequestOutput
from quiver.engine.service import EngineService
from quiver.errors import FailedPrecondition

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class NoAdapter(enum.Enum):
    """The adapter_kind of a request that runs without a loaded adapter; its label is the value."""

    BASE = "base"  # the request names no adapter
    UNKNOWN = "unknown"  # it names an adapter id that is not loaded

    @property
    def label(self) -> str:
        return self.value


OTHER = "other"  # the adapter label value of every adapter without a series of its own
TIERS = ("device", "host", "disk")  # where an adapter's weights are, fastest first (ListAdapters' location)


class Metrics:
    def __init__(self, *, max_adapter_series: int = DEFAULT_ADAPTER_SERIES) -> None:
        """`max_adapter_series`: how many adapter ids (those with the most requests) get per-adapter series."""
        if max_adapter_series < 0:
            raise ValueError(f"max_adapter_series must be >= 0, got {max_adapter_series}")
        self.max_adapter_series = max_adapter_series
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quiver_requests", "Generation requests finished, by gRPC status and adapter kind",
                                ["status", "adapter_kind"], registry=r)
        self.time_to_first_token = Histogram("quiver_time_to_first_token_seconds", "From arrival to the first token",
                                             ["adapter_kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("quiver_time_per_output_token_seconds",
                                               "Mean time between output tokens of one request, after the first",
                                               ["adapter_kind"], buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram("quiver_e2e_request_latency_seconds", "From arrival to the last token",
                                     ["adapter_kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("quiver_prompt_tokens", "Prompt tokens of admitted requests", ["adapter_kind"], registry=r)
        self.generation_tokens = Counter("quiver_generation_tokens", "Tokens generated", ["adapter_kind"], registry=r)
        self.batch_size = Histogram("quiver_batch_size", "Requests that produced a token in one engine step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.adapter_load_seconds = Histogram(
            "quiver_adapter_load_seconds",
            "Making an adapter ready, by where its weights came from. Loads (read, validate, register): upload "
            "(UploadAdapter), store (an uploaded adapter restored at start), path (LoadAdapter, --adapters-dir). Device "
            "placements that needed a write (from the placement to the write performed, at the end of its step): "
            "host_cache (weights in host memory), store or path (read again from disk: the server's snapshot of its "
            "files, or the directory it was registered from)",
            ["source"], buckets=_LATENCY_BUCKETS, registry=r)

    def watch(self, service: EngineService) -> None:
        """Report the engine's own counters and gauges from `service` at each scrape, and time its adapter
        placements (the registry calls `on_load` on the engine's loop thread)."""
        service.engine.adapters.on_load = lambda source, seconds: self.adapter_load_seconds.labels(source).observe(seconds)
        self.registry.register(_EngineCollector(service, max_adapter_series=self.max_adapter_series))

    def on_step(self, outputs: list[RequestOutput]) -> None:
        """The engine service's per-step hook (called on its loop thread)."""
        if outputs:
            self.batch_size.observe(len(outputs))

    def request(self, adapter_kind: AdapterKind | NoAdapter) -> "RequestTimer":
        return RequestTimer(self, adapter_kind)


class RequestTimer:
    """The timings and token counts of one generation request."""

    def __init__(self, metrics: Metrics, adapter_kind: AdapterKind | NoAdapter) -> None:
        self._m = metrics
        self._kind = adapter_kind.label  # the adapter_kind label value
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self._tokens: dict[int, int] = {}  # tokens by sample index (a call with n samples decodes them side by side)

    def admitted(self, *, num_prompt_tokens: int) -> None:
        self._m.prompt_tokens.labels(self._kind).inc(num_prompt_tokens)

    def tokens(self, n: int, *, index: int = 0) -> None:
        """`n` new tokens of sample `index`."""
        if n == 0:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._m.time_to_first_token.labels(self._kind).observe(now - self._start)
        self._last = now
        self._tokens[index] = self._tokens.get(index, 0) + n
        self._m.generation_tokens.labels(self._kind).inc(n)

    @property
    def num_tokens(self) -> int:
        """Tokens generated so far, all samples together."""
        return sum(self._tokens.values())

    @property
    def first_token_seconds(self) -> float | None:
        """From the call's start to its first token; None before one came."""
        return self._first - self._start if self._first is not None else None

    def elapsed(self) -> float:
        """Seconds since the call's start."""
        return time.perf_counter() - self._start

    def finished(self, status: str) -> None:
        self._m.requests.labels(status, self._kind).inc()
        if self._last is None:
            return
        self._m.e2e_latency.labels(self._kind).observe(self._last - self._start)
        longest = max(self._tokens.values(), default=0)  # the samples' tokens come side by side: the longest paces
        if longest > 1:
            self._m.time_per_output_token.labels(self._kind).observe((self._last - self._first) / (longest - 1))


@dataclass(frozen=True)
class _AdapterSnapshot:
    """What one scrape reads of the adapter registry, on the engine's loop thread."""

    adapters: list[tuple[str, int, str, int]]  # (id, version, tier, requests served by that version), current ones
    num_requests: int  # requests pinned to any adapter, all versions and ids ever
    num_evictions: int
    num_device_hits: int
    num_device_writes: int


def _read_adapters(engine: Engine) -> _AdapterSnapshot:
    """Runs on the engine's loop thread (through the service's command queue): reads, changes nothing."""
    registry = engine.adapters
    return _AdapterSnapshot(
        adapters=[(v.adapter_id, v.version, registry.where(v), v.requests_served) for v in registry.current.values()],
        num_requests=registry.num_requests, num_evictions=registry.num_evictions,
        num_device_hits=registry.num_device_hits, num_device_writes=registry.num_device_writes,
    )


class _EngineCollector(Collector):
    def __init__(self, service: EngineService, *, max_adapter_series: int) -> None:
        self._service = service
        self._requests = _AdapterRequests(max_adapter_series)
        self._last: _AdapterSnapshot | None = None  # the last snapshot read, reported while the engine stops

    def collect(self):
        stats = self._service.stats()
        yield _gauge("quiver_requests_running", "Requests in the running batch", stats.num_running)
        yield _gauge("quiver_requests_waiting", "Requests waiting to run", stats.num_waiting)
        yield _gauge("quiver_kv_blocks_used", "KV cache blocks in use", stats.kv_blocks_used)
        yield _gauge("quiver_kv_blocks_total", "KV cache blocks in the pool", stats.kv_blocks_total)
        yield _counter("quiver_preemptions", "Running requests preempted for KV space", stats.num_preemptions)
        yield _counter("quiver_prefix_cache_queried_tokens", "Tokens of admitted requests looked up in the prefix cache",
                       stats.prefix_cache_queried_tokens)
        yield _counter("quiver_prefix_cache_hit_tokens", "Tokens whose KV was found in the prefix cache, not computed",
                       stats.prefix_cache_hit_tokens)
        yield _counter("quiver_prompt_tokens_computed", "Prompt tokens run through the model (not taken from the prefix "
                       "cache; the samples of an n > 1 call share their prompt's full blocks)", stats.prompt_tokens_computed)
        try:
            snap = self._last = self._service._call(_read_adapters).result()
            current = snap.adapters
        except FailedPrecondition:  # shutting down: no adapter is served any more; counters keep their last value
            log.debug("adapters not read: the engine is stopping")
            snap, current = self._last, []
        if snap is None:
            return
        yield _counter("quiver_adapter_evictions", "Adapters taken off the device to make room", snap.num_evictions)
        placements = CounterMetricFamily(
            "quiver_adapter_placements", "Requests that started running with an adapter: hit when it was on the device "
            "already, write when it needed a device write (the device-slot hit rate is hit / (hit + write))",
            labels=["result"])
        placements.add_metric(["hit"], snap.num_device_hits)
        placements.add_metric(["write"], snap.num_device_writes)
        yield placements
        counts = dict.fromkeys(TIERS, 0)
        for _, _, tier, _ in current:
            counts[tier] += 1
        adapters = GaugeMetricFamily("quiver_adapters", "Adapters being served, by where their weights are now",
                                     labels=["location"])
        for location, n in counts.items():
            adapters.add_metric([location], n)
        yield adapters
        labelled, other = self._requests.update(current, snap.num_requests)
        requests = CounterMetricFamily(
            "quiver_adapter_requests", "Requests submitted with an adapter: the adapter ids with the most requests "
            f"each (counted from when the id got its series), every other one summed into adapter=\"{OTHER}\"",
            labels=["adapter"])
        for adapter_id, n in labelled.items():
            requests.add_metric([adapter_id], n)
        requests.add_metric([OTHER], other)
        yield requests
        tiers = GaugeMetricFamily(
            "quiver_adapter_tier", "Where each adapter's weights are now (1 in its tier, 0 in the others), for the "
            f"adapter ids with a requests series; adapter=\"{OTHER}\": how many of the others are in each tier",
            labels=["adapter", "tier"])
        rest = dict.fromkeys(TIERS, 0)
        for adapter_id, _, tier, _ in current:
            if adapter_id in labelled:
                for t in TIERS:
                    tiers.add_metric([adapter_id, t], int(t == tier))
            else:
                rest[tier] += 1
        for t, n in rest.items():
            tiers.add_metric([OTHER, t], n)
        yield tiers


class _AdapterRequests:
    """Requests per adapter id as counters that only grow, whatever the ids do. At each scrape the ids with the
    most requests (their current version's, ties by id; at most `limit`, none named "other", none without a
    request) hold a series of their own; each request since the last scrape is added to its id's series if
    the id holds one, else to "other" (requests of versions replaced or unloaded since: "other" too). An id
    that loses its series loses its count; if it gets one again, its count starts again from 0."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()  # scrapes may run at once (one thread each)
        self._seen: dict[str, tuple[int, int]] = {}  # id -> (version, its requests served) at the last scrape
        self._total = 0  # the registry's num_requests at the last scrape
        self._labelled: dict[str, float] = {}
        self._other = 0.0

    def update(self, adapters: list[tuple[str, int, str, int]], total: int) -> tuple[dict[str, float], float]:
        with self._lock:
            top = sorted((a for a in adapters if a[3] > 0 and a[0] != OTHER), key=lambda a: (-a[3], a[0]))
            keep = {a[0] for a in top[:self._limit]}
            self._labelled = {i: n for i, n in self._labelled.items() if i in keep}
            counted = 0
            seen = {}
            for adapter_id, version, _, served in adapters:
                last_version, last_served = self._seen.get(adapter_id, (version, 0))
                new = served - last_served if version == last_version else served
                seen[adapter_id] = (version, served)
                counted += new
                if adapter_id in keep:
                    self._labelled[adapter_id] = self._labelled.get(adapter_id, 0) + new
                else:
                    self._other += new
            self._other += total - self._total - counted
            self._seen, self._total = seen, total
            return dict(self._labelled), self._other


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
