"""Every Prometheus metric of the server, defined once, in its own registry (one per server).

Labels are bounded: `adapter_kind` is "base", one of the six kinds (`AdapterKind.label`, e.g. "lora") or
"unknown" (an adapter id that is not loaded), `status` a gRPC status name,
`location` device/host/disk, `source` path/upload. No metric is labelled by adapter id, whose count is
unbounded. Engine-side values (queue lengths, KV blocks, adapters by location, evictions, preemptions,
prefix-cache hits) are read from the engine service when Prometheus scrapes.
"""

import enum
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from quiver.adapters.weights import AdapterKind
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


class Metrics:
    def __init__(self) -> None:
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
        self.adapter_load_seconds = Histogram("quiver_adapter_load_seconds",
                                              "Reading, validating and registering an adapter, by where it came from",
                                              ["source"], buckets=_LATENCY_BUCKETS, registry=r)

    def watch(self, service: EngineService) -> None:
        """Report the engine's own counters and gauges from `service` at each scrape."""
        self.registry.register(_EngineCollector(service))

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
        self._tokens = 0

    def admitted(self, *, num_prompt_tokens: int) -> None:
        self._m.prompt_tokens.labels(self._kind).inc(num_prompt_tokens)

    def tokens(self, n: int) -> None:
        if n == 0:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._m.time_to_first_token.labels(self._kind).observe(now - self._start)
        self._last = now
        self._tokens += n
        self._m.generation_tokens.labels(self._kind).inc(n)

    def finished(self, status: str) -> None:
        self._m.requests.labels(status, self._kind).inc()
        if self._last is None:
            return
        self._m.e2e_latency.labels(self._kind).observe(self._last - self._start)
        if self._tokens > 1:
            self._m.time_per_output_token.labels(self._kind).observe((self._last - self._first) / (self._tokens - 1))


class _EngineCollector(Collector):
    def __init__(self, service: EngineService) -> None:
        self._service = service

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
        yield _counter("quiver_adapter_evictions", "Adapters taken off the device to make room",
                       self._service.engine.adapters.num_evictions)
        adapters = GaugeMetricFamily("quiver_adapters", "Adapters being served, by where their weights are now",
                                     labels=["location"])
        counts = {"device": 0, "host": 0, "disk": 0}
        try:
            for info in self._service.list_adapters():
                counts[info.location] += 1
        except FailedPrecondition:  # shutting down: report what was last seen as nothing
            log.debug("adapters not listed: the engine is stopping")
        for location, n in counts.items():
            adapters.add_metric([location], n)
        yield adapters


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
