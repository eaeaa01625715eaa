"""Scale-out through Ray Serve (issue 9): what the proxy costs per request, and what a second replica buys.

    python -m benchmarks.ray_routing            # default model (SmolLM2-135M), ~6 minutes on 2 cores
    python -m benchmarks.ray_routing --quick    # fewer requests, ~3 minutes

1. Routing overhead: the same requests, one at a time, to a plain `quiver serve` (direct gRPC) and through
   Serve's gRPC proxy to one replica, interleaved: GetServerInfo (no engine work: the bare path) and Generate
   of one token with a LoRA adapter (routed by adapter id). p50/p99 of the client-side latency.
2. Aggregate throughput: `--clients` concurrent streams over `--adapters` LoRA adapters, `--requests` in all,
   `--tokens` new tokens each (EOS ignored), against the plain server, 1 replica and 2 replicas (two Serve
   applications on one proxy and one shared store), in `--rounds` bursts interleaved between the three.

Every engine gets `--threads` torch threads (a replica: that many Ray CPUs, so Ray sets its OMP threads), so
a replica is "one device" of fixed size. Writes benchmarks/out/ray_routing.json and prints a summary.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import grpc

from benchmarks import adapter_sets, machine
from benchmarks.server_proc import ServerProcess, free_port
from benchmarks.stats import summary
from quiver.client import QuiverClient
from quiver.config import default_cache_dir
from quiver.deploy.routing import AdapterRoutingInterceptor, CallDetails
from quiver.model.loader import default_model_dir

PROMPT = "Write one sentence about the sea."


def latency(clients: dict[str, QuiverClient], *, n: int, adapter: str) -> dict:
    """The same calls to every client, interleaved (the order alternates each round), so that other load on
    the machine falls on all of them alike. {client name: {call: latency summary}}."""
    samples = {name: {"server_info_ms": [], "generate_1_token_ms": []} for name in clients}
    request = QuiverClient.request(chat=PROMPT, adapter_id=adapter, max_new_tokens=1)
    calls = {"server_info_ms": lambda c: c.server_info(), "generate_1_token_ms": lambda c: c.generate(request)}
    for _ in range(5):  # warm-up: connections, adapter loads
        for client in clients.values():
            for call in calls.values():
                call(client)
    order = list(clients)
    for _ in range(n):
        order.reverse()
        for name in order:
            for key, call in calls.items():
                t = time.perf_counter()
                call(clients[name])
                samples[name][key].append(time.perf_counter() - t)
    return {name: {key: summary(v) for key, v in by_call.items()} for name, by_call in samples.items()}


def warm_up(client: QuiverClient, adapters: list[str]) -> None:
    """Every adapter loaded somewhere, and Serve's routers told where."""
    for adapter in adapters:
        client.generate(client.request(chat=PROMPT, adapter_id=adapter, max_new_tokens=2))
    time.sleep(2)


def burst(client: QuiverClient, *, first: int, requests: int, clients: int, tokens: int, adapters: list[str]) -> dict:
    """`requests` streams, `clients` at a time; tokens, seconds, and requests by replica (`quiver-replica`)."""
    served: dict[str, int] = {}

    def one(i: int) -> int:
        request = client.request(chat=f"{PROMPT} ({i})", adapter_id=adapters[i % len(adapters)], max_new_tokens=tokens,
                                 ignore_eos=True)
        call = client.generate_stream(request)
        produced = sum(len(m.token_ids) for m in call)
        replica = dict(call.trailing_metadata()).get("quiver-replica", "direct")
        served[replica] = served.get(replica, 0) + 1
        return produced

    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        produced = sum(pool.map(one, range(first, first + requests)))
    return {"tokens": produced, "seconds": time.perf_counter() - began, "served": served}


def throughput(clients: dict[str, QuiverClient], *, rounds: int, requests: int, concurrency: int, tokens: int,
               adapters: list[str]) -> dict:
    """Each system gets `requests` in all, in `rounds` bursts interleaved with the other systems' (the order
    rotates), so that other load on the machine falls on all of them alike."""
    for client in clients.values():
        warm_up(client, adapters)
    totals = {name: {"tokens": 0, "seconds": 0.0, "served": {}} for name in clients}
    order = list(clients)
    per_round = requests // rounds
    for r in range(rounds):
        order = order[1:] + order[:1]
        for name in order:
            out = burst(clients[name], first=r * per_round, requests=per_round, clients=concurrency, tokens=tokens,
                        adapters=adapters)
            totals[name]["tokens"] += out["tokens"]
            totals[name]["seconds"] += out["seconds"]
            for replica, n in out["served"].items():
                totals[name]["served"][replica] = totals[name]["served"].get(replica, 0) + n
    return {name: {"requests": per_round * rounds, "clients": concurrency, "tokens": t["tokens"], "seconds": t["seconds"],
                   "tokens_per_s": t["tokens"] / t["seconds"], "requests_by_replica": sorted(t["served"].values(), reverse=True)}
            for name, t in totals.items()}


class _Application(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Sends `application` metadata: which Serve application the proxy routes the call to."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _details(self, details):
        return CallDetails(details.method, details.timeout, [*(details.metadata or ()), ("application", self._name)],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a local HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--requests", type=int, default=64, help="throughput: requests in all")
    parser.add_argument("--clients", type=int, default=16, help="throughput: concurrent streams")
    parser.add_argument("--tokens", type=int, default=32, help="throughput: new tokens per request")
    parser.add_argument("--rounds", type=int, default=4, help="throughput: bursts per system, interleaved")
    parser.add_argument("--adapters", type=int, default=4, help="LoRA adapters (rank 16, all linear layers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine (Ray CPUs per replica)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ray_routing.json")
    args = parser.parse_args()
    if args.quick:
        args.latency_requests, args.requests = 50, 32

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the plain server's engine (a child process)
    ray_tmp = None
    if "RAY_TMPDIR" not in os.environ:  # a short path (Ray's socket names must fit 108 bytes), removed at the end
        ray_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rq", dir="/tmp")
    model = args.model or default_model_dir(default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="ray-routing-"))
    _, made = adapter_sets.lora_set(model, work / "made", args.adapters)
    adapters_dir = work / "adapters"
    for name, path in made.items():
        shutil.copytree(path, adapters_dir / name)
    names = sorted(made)
    results: dict = {"machine": machine.describe(), "model": str(model), "args": {k: str(v) for k, v in vars(args).items()},
                     "load_average_at_start": os.getloadavg()}

    import ray
    from ray import serve

    from quiver.config import ModelConfig
    from quiver.deploy.ray_serve import RayDeployConfig, application, start

    port = free_port()
    began = time.perf_counter()
    # logical CPUs for 3 replicas of `--threads` each (Ray does not pin them; the machine has what it has)
    ray.init(num_cpus=3 * args.threads, include_dashboard=False, log_to_driver=False)
    try:
        # two Serve applications on one shared store: 1 replica and 2 replicas, side by side
        one = RayDeployConfig(store_dir=work / "store", model=ModelConfig(path=str(model), device="cpu"),
                              num_replicas=1, num_gpus=0, num_cpus=args.threads, app_name="quiver-1")
        start(one, grpc_port=port, http_port=free_port())
        results["ray_start_s"] = time.perf_counter() - began
        two = dataclasses.replace(one, num_replicas=2, app_name="quiver-2")
        serve.run(application(two), name=two.app_name, route_prefix="/quiver-2")
        target = f"127.0.0.1:{port}"
        proxies = {name: QuiverClient(target, timeout=600, interceptors=(AdapterRoutingInterceptor(), _Application(name)))
                   for name in (one.app_name, two.app_name)}
        for name in names:
            proxies[one.app_name].upload_adapter(name, adapters_dir / name)
        with ServerProcess(["--model", str(model), "--adapters-dir", str(adapters_dir)], log_path=work / "serve.log") as plain:
            plain.wait_serving()
            with QuiverClient(plain.target, timeout=600) as direct:
                print(time.strftime("%T"), "latency: direct and through the proxy, interleaved ...", flush=True)
                results["latency"] = latency({"direct": direct, "ray_1": proxies[one.app_name]}, n=args.latency_requests,
                                             adapter=names[0])
                print(time.strftime("%T"), "throughput: direct, 1 replica, 2 replicas, interleaved ...", flush=True)
                results["throughput"] = throughput(
                    {"direct": direct, "ray_1": proxies[one.app_name], "ray_2": proxies[two.app_name]}, rounds=args.rounds,
                    requests=args.requests, concurrency=args.clients, tokens=args.tokens, adapters=names)
        print(time.strftime("%T"), "done", flush=True)
        for client in proxies.values():
            client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        if ray_tmp is not None:
            shutil.rmtree(ray_tmp, ignore_errors=True)

    results["load_average_at_end"] = os.getloadavg()  # other work on the machine shows here
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    _print(results)


def _print(r: dict) -> None:
    print(f"\nload average (1, 5, 15 min) at start {r['load_average_at_start']}, at end {r['load_average_at_end']}")
    print(f"Ray + Serve + 1 replica ready in {r['ray_start_s']:.1f} s")
    print("| path | GetServerInfo p50 / p99 ms | Generate (1 token, LoRA) p50 / p99 ms |")
    print("|---|---:|---:|")
    for key, label in (("direct", "direct gRPC to `quiver serve`"), ("ray_1", "through Serve's gRPC proxy, 1 replica")):
        lat = r["latency"][key]
        info, gen = lat["server_info_ms"], lat["generate_1_token_ms"]
        print(f"| {label} | {info['p50']:.2f} / {info['p99']:.2f} | {gen['p50']:.2f} / {gen['p99']:.2f} |")
    print("\n| system | requests | seconds | tok/s | requests per replica |")
    print("|---|---:|---:|---:|---|")
    for key, label in (("direct", "plain `quiver serve`"), ("ray_1", "Ray Serve, 1 replica"), ("ray_2", "Ray Serve, 2 replicas")):
        t = r["throughput"][key]
        split = " + ".join(map(str, t["requests_by_replica"]))
        print(f"| {label} | {t['requests']} | {t['seconds']:.1f} | {t['tokens_per_s']:.1f} | {split} |")


if __name__ == "__main__":
    main()
