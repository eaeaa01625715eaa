"""Scale-out through Ray Serve (deploy/): residency rules alone, then a real local Ray instance with two
replicas of the tiny model behind Serve's gRPC proxy, then two replicas on two simulated GPU nodes.

The Ray tests are skipped when Ray is not installed (`make test` installs it). Each Ray start costs ~15 s
and ~1.5 GiB; the module starts Ray twice.
"""

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import random
import shutil
import socket
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from quiver.client import QuiverClient
from quiver.deploy.residency import Residency
from quiver.deploy.routing import AdapterRoutingInterceptor, CallDetails, _with_adapter
from quiver.errors import NotFound
from quiver.v1 import inference_pb2
from tests.support.harness import SMALL_ENGINE, make_service, start_server

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")  # Ray's pydantic models
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install -e .[ray])")

PROMPTS = ["Hello there", "The quick brown fox", "世界 é"]
MAX_NEW_TOKENS = 12
ADMIN, CLIENT = "admin-secret", "client-secret"


# ---- residency rules, without Ray -----------------------------------------------------------------------


@pytest.fixture
def residency(model_path, zoo, tmp_path):
    store = tmp_path / "store"
    for name in ("lora", "prefix"):
        shutil.copytree(zoo[name], store / name)
    events = []
    service = make_service(model_path)
    yield Residency(service, store_root=store, max_adapter_bytes=1 << 20, on_event=lambda e, a: events.append((e, a))), events, service, store
    service.shutdown()


def test_eviction_is_idempotent_and_waits_for_requests(residency):
    res, events, service, _ = residency
    lease = res.lease("lora")
    held = res.acquire("lora")  # a request is running on it
    lease.__del__()  # Serve's eviction ...
    lease.__del__()  # ... and the garbage collector's call
    assert [e for e in events if e[0] != "evict-again"] == [("load", "lora"), ("evict", "lora")]
    assert "lora" in {i.adapter_id for i in service.list_adapters()}  # still pinned by the request
    assert res.release(held)
    res.unload(held)
    res.unload(held)
    assert [e for e in events if e[0] == "unload"] == [("unload", "lora")]
    assert "lora" not in {i.adapter_id for i in service.list_adapters()}
    del lease
    assert [e for e in events if e[0] == "unload"] == [("unload", "lora")]


def test_a_new_lease_keeps_an_evicted_adapter_in_use(residency):
    res, events, _service, _ = residency
    old = res.lease("prefix")
    held = res.acquire("prefix")
    old.__del__()
    new = res.lease("prefix")  # Serve missed and loaded it again while the request ran: no second load
    assert not res.release(held)
    old.__del__()
    assert [e for e in events if e[0] in ("load", "unload")] == [("load", "prefix")]
    assert res.held_ids() == ["prefix"] and new.adapter_id == "prefix"


def test_the_store_is_the_source_of_truth(residency, zoo):
    res, events, service, store = residency
    res.lease("lora")
    held = res.acquire("lora")
    assert res.current(held)
    shutil.rmtree(store / "lora")
    shutil.copytree(zoo["lora-all-r4"], store / "lora")  # another replica replaced it
    assert not res.current(held)
    assert res.refresh(held).rank == 4
    shutil.rmtree(store / "lora")  # another replica deleted it
    with pytest.raises(NotFound):
        res.refresh(held)
    assert "lora" not in {i.adapter_id for i in service.list_adapters()}
    assert [e for e in events if e[0] in ("load", "unload")] == [("load", "lora"), ("load", "lora"), ("unload", "lora")]
    with pytest.raises(NotFound):
        res.lease("missing")
    assert res.held_ids() == ["lora"]


def test_routing_interceptor_copies_the_adapter_id(model_path, tmp_path):
    details = CallDetails("/quiver.v1.InferenceService/Generate", None, [("a", "1")], None, None, None)
    routed = _with_adapter(details, inference_pb2.GenerateRequest(adapter_id="x"))
    assert routed.metadata == [("a", "1"), ("multiplexed_model_id", "x")]
    assert _with_adapter(details, inference_pb2.GenerateRequest()) is details
    server = start_server(model_path, tmp_path)  # a plain server ignores the metadata
    try:
        with QuiverClient(server.target, interceptors=(AdapterRoutingInterceptor(),)) as client:
            assert len(client.generate(client.request(text="hi", max_new_tokens=3)).token_ids) == 3
            assert list(client.generate_stream(client.request(text="hi", max_new_tokens=3)))
            with pytest.raises(grpc.RpcError) as e:
                client.generate(client.request(text="hi", adapter_id="nope", max_new_tokens=3))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


# ---- the request router's ranking, without Ray's routing loop -------------------------------------------


@dataclasses.dataclass(eq=False)
class _FakeReplica:
    name: str
    multiplexed_model_ids: set = dataclasses.field(default_factory=set)
    routing_stats: dict = dataclasses.field(default_factory=dict)


@needs_ray
def test_the_router_ranks_the_device_then_holders_then_the_emptiest():
    from quiver.deploy.adapter_router import DEVICE_STAT, rank_replicas

    dev = _FakeReplica("dev", {"x", "y"}, {DEVICE_STAT: ["x"]})
    dev2 = _FakeReplica("dev2", {"x"}, {DEVICE_STAT: ["x", "z"]})
    host = _FakeReplica("host", {"x", "z"}, {DEVICE_STAT: ["z"]})
    empty = [_FakeReplica(f"empty{i}") for i in range(3)]
    busy = _FakeReplica("busy", {"a", "b", "c"})
    fresh = _FakeReplica("fresh")  # no routing stats reported yet
    replicas = [busy, host, *empty, dev, fresh, dev2]
    names = lambda ranks: [sorted(r.name for r in rank) for rank in ranks]
    rng = random.Random(0)
    ranks = rank_replicas("x", replicas, rng=rng)
    assert names(ranks[:2]) == [["dev", "dev2"], ["host"]]
    assert len(ranks) == 3 and len(ranks[2]) == 2 and {r.name for r in ranks[2]} <= {"empty0", "empty1", "empty2", "fresh"}
    assert names(rank_replicas("z", [busy, dev, host], rng=rng)) == [["host"], ["dev"]]  # then the one with fewer
    assert names(rank_replicas("b", [busy, dev, host], rng=rng)) == [["busy"], ["dev", "host"]]  # held, then the emptiest
    assert names(rank_replicas("new", [dev, host], rng=rng)) == [["dev", "host"]]  # held nowhere: fewest held
    base = rank_replicas("", replicas, rng=rng)  # no adapter: two at random, the shorter queue wins
    assert len(base) == 1 and len(base[0]) == 2
    assert rank_replicas("x", []) == [] and rank_replicas("", []) == []


@needs_ray
def test_a_replica_reports_the_adapters_on_its_device(model_path, zoo):
    """QuiverReplica.record_routing_stats, called as Serve's controller calls it, on a replica's engine."""
    import asyncio
    import types

    from quiver.deploy.adapter_router import DEVICE_STAT
    from quiver.deploy.ray_serve import QuiverReplica
    from quiver.engine.request import SamplingParams

    service = make_service(model_path, adapter_slots=1)
    try:
        for name in ("lora", "bottleneck", "prefix"):
            service.load_adapter(name, zoo[name])
        replica = types.SimpleNamespace(_service=service)
        record = QuiverReplica.func_or_class.record_routing_stats
        assert asyncio.run(record(replica)) == {DEVICE_STAT: []}
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        for name in ("lora", "bottleneck", "prefix"):  # one slot: the bottleneck takes the lora's
            service.generate([[5, 9]], params, adapter_ids=[name])
        assert asyncio.run(record(replica)) == {DEVICE_STAT: ["bottleneck", "prefix"]}
        service.shutdown()
        assert asyncio.run(record(replica)) == {DEVICE_STAT: []}
    finally:
        service.shutdown()


# ---- a real Ray instance --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(model_path, zoo, tmp_path_factory):
    """Outputs of a plain single server (`quiver serve`) for every adapter and prompt: token ids."""
    server = start_server(model_path, tmp_path_factory.mktemp("ref"))
    try:
        with QuiverClient(server.target) as client:
            for name, path in zoo.items():
                client.upload_adapter(name, path)
            return {(name, p): list(client.generate(client.request(text=p, adapter_id=name, max_new_tokens=MAX_NEW_TOKENS)).token_ids)
                    for name in ("", *zoo) for p in PROMPTS}
    finally:
        server.stop()


@contextlib.contextmanager
def _ray_tmpdir() -> Iterator[None]:
    """A short, fresh RAY_TMPDIR (Ray's socket paths must fit 108 bytes), removed afterwards."""
    path, before = tempfile.mkdtemp(prefix="rq", dir="/tmp"), os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(path, ignore_errors=True)


def _config(model_path: Path, store: Path, events: Path, **kw):
    from quiver.config import EngineConfig, ModelConfig
    from quiver.deploy.ray_serve import RayDeployConfig

    return RayDeployConfig(
        store_dir=store, model=ModelConfig(path=str(model_path), device="cpu", dtype="float32"),
        # host cache = 3 adapters of max_adapter_bytes: Serve keeps 3 adapters per replica
        engine=EngineConfig(**SMALL_ENGINE, host_cache_bytes=3 << 20), max_adapter_bytes=1 << 20,
        num_gpus=0, num_cpus=0, events_dir=events, **kw,
    )


class Proxy:
    """A client of Serve's gRPC proxy that records which replica and node answered each call."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.client = QuiverClient(f"127.0.0.1:{port}", token=token, interceptors=(AdapterRoutingInterceptor(),), timeout=120)

    def generate(self, adapter: str, prompt: str) -> tuple[list[int], str, str]:
        response, call = self.client.inference.Generate.with_call(
            self.client.request(text=prompt, adapter_id=adapter, max_new_tokens=MAX_NEW_TOKENS), timeout=120, metadata=self.metadata)
        return list(response.token_ids), *_tags(call.trailing_metadata())

    def stream(self, adapter: str, prompt: str) -> tuple[list[int], str, str]:
        call = self.client.inference.GenerateStream(
            self.client.request(text=prompt, adapter_id=adapter, max_new_tokens=MAX_NEW_TOKENS), timeout=120, metadata=self.metadata)
        tokens = [t for message in call for t in message.token_ids]
        return tokens, *_tags(call.trailing_metadata())


def _tags(metadata) -> tuple[str, str]:
    tags = dict(metadata)
    return tags["quiver-replica"], tags["quiver-node"]


def _events(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("*.jsonl")) for line in f.read_text().splitlines()]


def _wait_for_routing() -> None:
    """Replicas push the adapters they hold to Serve's controller every 0.1 s; routers hear of it by long poll."""
    time.sleep(1.5)


@pytest.fixture(scope="class")
def local_app(model_path, zoo, tmp_path_factory):
    import ray
    from ray import serve

    from quiver.deploy.ray_serve import start

    store, events = tmp_path_factory.mktemp("ray-store"), tmp_path_factory.mktemp("ray-events")
    port = _free_port()
    began = time.monotonic()
    with _ray_tmpdir():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            start(_config(model_path, store, events, num_replicas=2, max_ongoing_requests=4, admin_token=ADMIN,
                          client_tokens=(CLIENT,), adapter_roots=(zoo["lora"].parent,)), grpc_port=port, http_port=_free_port())
            proxy = Proxy(port, ADMIN)
            started = time.monotonic() - began
            yield proxy, store, events, started
            proxy.client.close()
        finally:
            serve.shutdown()
            ray.shutdown()


def _holders(events: Path, adapter_id: str) -> set[str]:
    """The replicas whose engine holds `adapter_id` now, from their event logs."""
    balance = Counter()
    for e in _events(events):
        if e["adapter_id"] == adapter_id and e["event"] in ("load", "unload"):
            balance[e["replica"]] += 1 if e["event"] == "load" else -1
    return {replica for replica, n in balance.items() if n > 0}


@needs_ray
class TestTwoLocalReplicas:
    """One Ray instance for the class: ~15 s to start."""

    def test_uploads_go_to_the_shared_store(self, local_app, zoo):
        proxy, store, _events, started = local_app
        print(f"Ray + Serve + 2 replicas ready in {started:.1f} s")
        for name, path in zoo.items():
            adapter = proxy.client.upload_adapter(name, path)
            assert adapter.adapter_id == name and adapter.stored
        assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == sorted(zoo)
        assert sorted(a.adapter_id for a in proxy.client.list_adapters()) == sorted(zoo)
        with pytest.raises(grpc.RpcError) as e:
            proxy.client.upload_adapter("lora", zoo["lora"])
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


    def test_outputs_equal_a_single_server_unary_and_streaming(self, local_app, zoo, reference):
        proxy, *_ = local_app
        for name in ("", *zoo):
            for prompt in PROMPTS:
                unary, *_ = proxy.generate(name, prompt)
                streamed, *_ = proxy.stream(name, prompt)
                assert unary == streamed == reference[(name, prompt)], (name, prompt)
        for call in (proxy.generate, proxy.stream):
            with pytest.raises(grpc.RpcError) as e:
                call("no-such-adapter", "hi")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

    def test_tokens_are_checked_as_quiver_serve_does(self, local_app, zoo):
        proxy, *_ = local_app
        for token, call, code in (
            (None, lambda c: c.generate(c.request(text="hi", max_new_tokens=2)), grpc.StatusCode.UNAUTHENTICATED),
            ("wrong", lambda c: list(c.generate_stream(c.request(text="hi", max_new_tokens=2))), grpc.StatusCode.UNAUTHENTICATED),
            (CLIENT, lambda c: c.upload_adapter("sneaky", zoo["lora"]), grpc.StatusCode.PERMISSION_DENIED),
            (CLIENT, lambda c: c.unload_adapter("lora"), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with Proxy(proxy.port, token).client as client, pytest.raises(grpc.RpcError) as e:
                call(client)
            assert e.value.code() == code
        with Proxy(proxy.port, CLIENT).client as client:
            assert client.generate(client.request(text="hi", adapter_id="lora", max_new_tokens=2)).token_ids


    def test_requests_stick_to_the_replica_holding_their_adapter(self, local_app, zoo, reference):
        proxy, _store, events, _ = local_app
        names = {"sticky-lora": "lora", "sticky-prefix": "prefix", "sticky-bottleneck": "bottleneck"}
        for name, source in names.items():  # fresh ids: each is loaded by the replica that takes its upload
            proxy.client.upload_adapter(name, zoo[source])
        _wait_for_routing()
        home = {name: _holders(events, name) for name in names}
        assert all(len(h) == 1 for h in home.values()), home
        served = defaultdict(set)
        for _ in range(3):
            for name, source in names.items():
                for call in (proxy.generate, proxy.stream):
                    tokens, replica, _node = call(name, PROMPTS[1])
                    assert tokens == reference[(source, PROMPTS[1])]
                    served[name].add(replica)
        assert served == home


    def test_a_hot_adapter_spills_to_the_second_replica_and_is_loaded_there(self, local_app, zoo, reference):
        proxy, _store, events, _ = local_app
        proxy.client.upload_adapter("hot", zoo["ptuning"])  # a new id: loaded on the replica that took the upload
        _wait_for_routing()
        (home,) = _holders(events, "hot")
        with concurrent.futures.ThreadPoolExecutor(24) as pool:  # 24 streams at once; a replica takes 4
            results = list(pool.map(lambda i: proxy.stream("hot", PROMPTS[i % len(PROMPTS)]), range(24)))
        for i, (tokens, _replica, _node) in enumerate(results):
            assert tokens == reference[("ptuning", PROMPTS[i % len(PROMPTS)])]
        served = Counter(r for _, r, _ in results)
        assert len(served) == 2 and served[home] >= 4, served
        assert _holders(events, "hot") == set(served)  # the second replica loaded it from the store


    def test_evicted_adapters_are_unloaded_once(self, local_app, zoo, reference):
        proxy, _store, events, _ = local_app
        for _ in range(2):  # seven adapters over two replicas that keep three each: Serve evicts
            for name in zoo:
                tokens, *_ = proxy.generate(name, PROMPTS[2])
                assert tokens == reference[(name, PROMPTS[2])]
        log = _events(events)
        by_replica_adapter = defaultdict(list)
        for e in log:
            if e["event"] in ("load", "unload"):
                by_replica_adapter[(e["replica"], e["adapter_id"])].append(e["event"])
        for key, sequence in by_replica_adapter.items():  # load, unload, load, ...: never unloaded twice
            assert all(a != b for a, b in itertools.pairwise(sequence)) and sequence[0] == "load", (key, sequence)
        kinds = Counter(e["event"] for e in log)
        assert kinds["unload"] >= 1 and kinds["evict"] >= kinds["unload"]
        assert kinds["evict-again"] >= 1  # Serve called __del__ a second time (the garbage collector); ignored
        for replica in {e["replica"] for e in log}:
            loaded = Counter()
            for e in log:
                if e["replica"] == replica and e["event"] in ("load", "unload"):
                    loaded[e["adapter_id"]] += 1 if e["event"] == "load" else -1
            assert sum(loaded.values()) <= 3  # what the replica's engine holds now: within Serve's cache


    def test_load_copies_a_directory_under_an_adapter_root_into_the_store(self, local_app, zoo, reference):
        proxy, store, *_ = local_app
        adapter = proxy.client.load_adapter("copied", "bottleneck")
        assert adapter.adapter_id == "copied" and adapter.stored and (store / "copied").is_dir()
        tokens, *_ = proxy.generate("copied", PROMPTS[0])
        assert tokens == reference[("bottleneck", PROMPTS[0])]
        for path, code in (("../x", grpc.StatusCode.INVALID_ARGUMENT), ("/etc", grpc.StatusCode.PERMISSION_DENIED),
                           ("missing", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as e:
                proxy.client.load_adapter("copied-too", path)
            assert e.value.code() == code and str(zoo["lora"].parent) not in e.value.details(), path
        with pytest.raises(grpc.RpcError) as e:
            proxy.client.load_adapter("copied", "lora")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        proxy.client.unload_adapter("copied")
        assert not (store / "copied").exists()

    def test_replicas_ask_for_no_gpu_where_the_cluster_has_none(self, local_app):
        from quiver.deploy.ray_serve import gpus_per_replica

        assert gpus_per_replica(None) == 0.0 and gpus_per_replica(0.5) == 0.5

    def test_unload_deletes_from_the_store_for_every_replica(self, local_app, zoo):
        proxy, store, *_ = local_app
        proxy.client.unload_adapter("lora-all-r4")
        assert not (store / "lora-all-r4").exists()
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                proxy.generate("lora-all-r4", "hi")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        proxy.client.upload_adapter("lora-all-r4", zoo["lora-all-r4"])
        tokens, *_ = proxy.generate("lora-all-r4", PROMPTS[0])
        assert tokens


# ---- simulated nodes --------------------------------------------------------------------------------------


@needs_ray
def test_replicas_on_distinct_fake_gpu_nodes(model_path, zoo, reference, tmp_path):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from quiver.deploy.ray_serve import gpus_per_replica, start

    with _ray_tmpdir():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        port = _free_port()
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            config = dataclasses.replace(_config(model_path, tmp_path / "store", tmp_path / "events", num_replicas=2),
                                         num_gpus=1.0)  # one replica per fake-GPU node
            assert gpus_per_replica(None) == 1.0  # the default where the cluster has GPUs
            start(config, grpc_port=port, http_port=_free_port(), proxy_location="HeadOnly")
            proxy = Proxy(port)
            for name in ("lora", "prefix"):
                proxy.client.upload_adapter(name, zoo[name])
            nodes = {}
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                calls = [(name, PROMPTS[i % 3]) for i in range(16) for name in ("lora", "prefix", "")]
                for (name, prompt), (tokens, replica, node) in zip(calls, pool.map(lambda c: proxy.generate(*c), calls)):
                    assert tokens == reference[(name, prompt)]
                    nodes[replica] = node
            proxy.client.close()
            assert len(nodes) == 2 and len(set(nodes.values())) == 2, nodes
            assert set(nodes.values()) == {w.node_id for w in workers}
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


@needs_ray
def test_requests_go_to_the_replica_with_their_adapter_on_the_device(model_path, zoo, tmp_path):
    """Two replicas hold adapter "a"; one slot each. Once the other replica has written "b" over "a", the routing
    stats say which replica has "a" on its device, and every request for "a" goes there (Serve's own multiplexed
    routing would pick either holder)."""
    import ray
    from ray import serve

    from quiver.deploy.ray_serve import start

    events = tmp_path / "events"
    config = _config(model_path, tmp_path / "store", events, num_replicas=2, max_ongoing_requests=4)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, adapter_slots=1), routing_stats_period_s=0.3)
    port = _free_port()
    with _ray_tmpdir():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            start(config, grpc_port=port, http_port=_free_port())
            proxy = Proxy(port)
            proxy.client.upload_adapter("a", zoo["lora"])
            proxy.client.upload_adapter("b", zoo["bottleneck"])
            _wait_for_routing()
            with concurrent.futures.ThreadPoolExecutor(24) as pool:  # a replica takes 4 at once: "a" spills
                list(pool.map(lambda i: proxy.stream("a", PROMPTS[0]), range(24)))
            assert len(_holders(events, "a")) == 2
            (writer,) = _holders(events, "b")
            _, replica, _ = proxy.generate("b", PROMPTS[0])  # "b" takes the writer's one slot from "a"
            assert replica == writer
            time.sleep(3)  # the replicas report their devices every 0.3 s; the proxy's router hears by long poll
            served = Counter(proxy.generate("a", PROMPTS[i % 3])[1] for i in range(10))
            assert len(served) == 1 and writer not in served, served
            proxy.client.close()
        finally:
            serve.shutdown()
            ray.shutdown()
