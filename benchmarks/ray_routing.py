"""Scale-out through Ray Serve (issue 9): what the proxy costs per request, and what a second replica buys.

    python benchmarks/ray_routing.py            # default model (SmolLM2-135M), ~6 minutes on 2 cores
    python benchmarks/ray_routing.py --quick    # fewer requests, ~3 minutes

1. Routing overhead: the same requests, one at a time, to a plain `quiver serve` (direct gRPC) and through
   Serve's gRPC proxy to one replica: GetServerInfo (no engine work: the bare path) and Generate of one token
   with a LoRA adapter (routed by adapter id). p50/p99 of the client-side latency.
2. Aggregate throughput: `--clients` concurrent streams over `--adapters` LoRA adapters, `--requests` in all,
   `--tokens` new tokens each (EOS ignored), against the plain server, 1 replica and 2 replicas.

Every engine gets `--threads` torch threads (a replica: that many Ray CPUs, so Ray sets its OMP threads), so
a replica is "one device" of fixed size. Writes benchmarks/out/ray_routing.json and prints a summary.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import adapter_sets, machine  # noqa: E402
from benchmarks.server_proc import ServerProcess, free_port  # noqa: E402
from benchmarks.stats import summary  # noqa: E402
from deploy.routing import AdapterRoutingInterceptor  # noqa: E402
from server.client import QuiverClient  # noqa: E402
from server.config import default_cache_dir  # noqa: E402
from server.model.loader import default_model_dir  # noqa: E402

PROMPT = "Write one sentence about the sea."


def latency(client: QuiverClient, *, n: int, adapter: str) -> dict:
    info, gen = [], []
    request = client.request(chat=PROMPT, adapter_id=adapter, max_new_tokens=1)
    for _ in range(5):  # warm-up: connection, adapter load
        client.server_info()
        client.generate(request)
    for _ in range(n):
        t = time.perf_counter()
        client.server_info()
        info.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.generate(request)
        gen.append(time.perf_counter() - t)
    return {"server_info_ms": summary(info), "generate_1_token_ms": summary(gen)}


def throughput(client: QuiverClient, *, requests: int, clients: int, tokens: int, adapters: list[str]) -> dict:
    """Also counts the requests each replica served (from the `quiver-replica` trailing metadata)."""
    served: dict[str, int] = {}

    def one(i: int) -> int:
        request = client.request(chat=f"{PROMPT} ({i})", adapter_id=adapters[i % len(adapters)], max_new_tokens=tokens,
                                 ignore_eos=True)
        call = client.generate_stream(request)
        produced = sum(len(m.token_ids) for m in call)
        replica = dict(call.trailing_metadata()).get("quiver-replica", "direct")
        served[replica] = served.get(replica, 0) + 1
        return produced

    for adapter in adapters:  # warm-up: every adapter loaded somewhere, and the routers told where
        client.generate(client.request(chat=PROMPT, adapter_id=adapter, max_new_tokens=2))
    time.sleep(2)
    served.clear()
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        produced = sum(pool.map(one, range(requests)))
    seconds = time.perf_counter() - began
    return {"requests": requests, "clients": clients, "tokens": produced, "seconds": seconds,
            "tokens_per_s": produced / seconds, "requests_by_replica": sorted(served.values(), reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a local HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--requests", type=int, default=64, help="throughput: requests in all")
    parser.add_argument("--clients", type=int, default=16, help="throughput: concurrent streams")
    parser.add_argument("--tokens", type=int, default=32, help="throughput: new tokens per request")
    parser.add_argument("--adapters", type=int, default=4, help="LoRA adapters (rank 16, all linear layers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine (Ray CPUs per replica)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ray_routing.json")
    args = parser.parse_args()
    if args.quick:
        args.latency_requests, args.requests = 50, 32

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the plain server's engine (a child process)
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rq", dir="/tmp"))
    model = args.model or default_model_dir(default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="ray-routing-"))
    _, made = adapter_sets.lora_set(model, work / "made", args.adapters)
    adapters_dir = work / "adapters"
    for name, path in made.items():
        shutil.copytree(path, adapters_dir / name)
    names = sorted(made)
    results: dict = {"machine": machine.describe(), "model": str(model), "args": {k: str(v) for k, v in vars(args).items()}}

    print("plain quiver serve ...", flush=True)
    with ServerProcess(["--model", str(model), "--adapters-dir", str(adapters_dir)], log_path=work / "serve.log") as direct:
        direct.wait_serving()
        with QuiverClient(direct.target, timeout=600) as client:
            results["direct"] = {"latency": latency(client, n=args.latency_requests, adapter=names[0]),
                                 "throughput": throughput(client, requests=args.requests, clients=args.clients,
                                                          tokens=args.tokens, adapters=names)}

    import ray
    from ray import serve

    from deploy.ray_serve import RayDeployConfig, application, start
    from server.config import ModelConfig

    port = free_port()
    began = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        config = RayDeployConfig(store_dir=work / "store", model=ModelConfig(path=str(model), device="cpu"),
                                 num_replicas=1, num_gpus=0, num_cpus=args.threads)
        start(config, grpc_port=port, http_port=free_port())
        results["ray_start_s"] = time.perf_counter() - began
        with QuiverClient(f"127.0.0.1:{port}", timeout=600, interceptors=(AdapterRoutingInterceptor(),)) as client:
            for name in names:
                client.upload_adapter(name, adapters_dir / name)
            print("through Ray Serve, 1 replica ...", flush=True)
            results["ray_1"] = {"latency": latency(client, n=args.latency_requests, adapter=names[0]),
                                "throughput": throughput(client, requests=args.requests, clients=args.clients,
                                                         tokens=args.tokens, adapters=names)}
            print("through Ray Serve, 2 replicas ...", flush=True)
            serve.run(application(dataclasses.replace(config, num_replicas=2)), name=config.app_name,
                      route_prefix="/")
            results["ray_2"] = {"throughput": throughput(client, requests=args.requests, clients=args.clients,
                                                         tokens=args.tokens, adapters=names)}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    _print(results)


def _print(r: dict) -> None:
    print(f"\nRay + Serve + 1 replica ready in {r['ray_start_s']:.1f} s")
    print("| path | GetServerInfo p50 / p99 ms | Generate (1 token, LoRA) p50 / p99 ms |")
    print("|---|---:|---:|")
    for key, label in (("direct", "direct gRPC to `quiver serve`"), ("ray_1", "through Serve's gRPC proxy, 1 replica")):
        lat = r[key]["latency"]
        info, gen = lat["server_info_ms"], lat["generate_1_token_ms"]
        print(f"| {label} | {info['p50']:.2f} / {info['p99']:.2f} | {gen['p50']:.2f} / {gen['p99']:.2f} |")
    print("\n| system | requests | seconds | tok/s | requests per replica |")
    print("|---|---:|---:|---:|---|")
    for key, label in (("direct", "plain `quiver serve`"), ("ray_1", "Ray Serve, 1 replica"), ("ray_2", "Ray Serve, 2 replicas")):
        t = r[key]["throughput"]
        split = " + ".join(map(str, t["requests_by_replica"]))
        print(f"| {label} | {t['requests']} | {t['seconds']:.1f} | {t['tokens_per_s']:.1f} | {split} |")


if __name__ == "__main__":
    main()
