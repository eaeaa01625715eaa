"""The `quiver` command: run the gRPC server, or talk to one.

    quiver serve                               load the model, serve gRPC (and Prometheus metrics; with
                                               --http-port, an OpenAI-compatible HTTP endpoint too)
    quiver generate "Hi!" [--adapter ID]       stream a reply to the terminal
    quiver adapters list | load ID PATH | upload ID DIR | unload ID
    quiver info                                what the server runs
    quiver deploy ray --store-dir DIR          many replicas behind Ray Serve's gRPC proxy (pip install -e .[ray])
"""

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path

import grpc

from quiver.api.cache_scope import CacheScope
from quiver.api.prompts import DEFAULT_MAX_PROMPT_BYTES
from quiver.client import QuiverClient
from quiver.config import DEFAULT_ADAPTER_SERIES, EngineConfig, default_threads
from quiver.deploy.routing import AdapterRoutingInterceptor
from quiver.errors import QuiverError
from quiver.v1 import adapters_pb2

DEFAULT_TARGET = "127.0.0.1:50051"


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local Hugging Face Llama/Qwen2/Mistral folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights and KV dtype (auto: fp32 on CPU, bf16 on CUDA)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--cache-dir", type=Path, default=None, help="where the default model is converted once (default: ~/.cache/quiver)")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, default=16, help="KV entries per block")
    e.add_argument("--kv-cache-bytes", type=int, default=None, help="KV pool budget (default: 90%% of free GPU memory, 1 GiB on CPU)")
    e.add_argument("--max-num-seqs", type=int, default=128, help="requests running at once")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    e.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit (default: the model's)")
    e.add_argument("--max-queue-len", type=int, default=4096, help="waiting requests before new ones are refused")
    e.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"], help="auto: triton on CUDA, torch on CPU")
    e.add_argument("--adapter-slots", type=int, default=8, help="LoRA/bottleneck adapters on the device at once")
    e.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank accepted")
    e.add_argument("--max-bottleneck-size", type=int, default=64, help="largest bottleneck size accepted")
    e.add_argument("--host-cache-bytes", type=int, default=2 << 30, help="parsed adapter weights kept in host memory")
    e.add_argument("--threads", type=int, default=None,
                   help="torch threads for the engine's steps (default: every core but one, see README)")
    e.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (graphs: CUDA with the triton backend)")
    e.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt in full instead of reusing the KV blocks of prompts that begin the same way")


def _engine_config(args) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size, kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_queue_len=args.max_queue_len, kernel_backend=args.kernel_backend, adapter_slots=args.adapter_slots,
        max_lora_rank=args.max_lora_rank, max_bottleneck_size=args.max_bottleneck_size,
        host_cache_bytes=args.host_cache_bytes, enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads if args.threads is not None else default_threads(), enforce_eager=args.enforce_eager,
    )


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port, logged)")
    g.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: any free port, logged)")
    g.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics listens on; it is plain HTTP without a token whatever --host, TLS and tokens say")
    g.add_argument("--metrics-max-adapters", type=int, default=DEFAULT_ADAPTER_SERIES,
                   help="adapter ids with their own per-adapter series (the most requested); the rest are summed as adapter=\"other\"")
    g.add_argument("--adapters-dir", type=Path, default=Path("adapters"), help="every adapter directory in it is loaded at start, under its name")
    g.add_argument("--max-upload-bytes", type=int, default=1 << 30, help="largest adapter upload")
    g.add_argument("--max-prompt-bytes", type=int, default=DEFAULT_MAX_PROMPT_BYTES,
                   help="largest prompt text (chat: all messages' contents) in UTF-8 bytes, refused before tokenising (INVALID_ARGUMENT)")
    g.add_argument("--prefix-cache-scope", default="per-token", choices=[s.value for s in CacheScope],
                   help="which requests share cached prompt blocks: per-token (each client token its own, so no client can "
                        "time another's prompts; one scope when there are no tokens) or global (all requests)")
    g.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key: serve TLS only)")
    g.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    g.add_argument("--grace-period", type=float, default=30.0, help="seconds calls in flight may run on after SIGTERM/SIGINT")
    g.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP endpoint (/v1/completions, /v1/chat/completions, /v1/models) "
                        "on this port too (0: any free port, logged), with the same tokens, TLS and limits; off by "
                        "default: Quiver's API is gRPC, and the endpoint needs the http extra (FastAPI, uvicorn)")
    g.add_argument("--http-host", default=None, help="address the HTTP endpoint listens on (default: --host)")


def _add_store_flags(p: argparse.ArgumentParser, *, store_dir_help: str, store_dir_required: bool) -> None:
    """The adapter store, its upload budgets and the bearer tokens: the same for `serve` and `deploy ray`."""
    g = p.add_argument_group("adapter store and tokens")
    g.add_argument("--store-dir", type=Path, default=None, required=store_dir_required, help=store_dir_help)
    g.add_argument("--adapter-root", type=Path, action="append", default=None,
                   help="a directory LoadAdapter may read from; repeatable (quiver serve's default: --adapters-dir)")
    g.add_argument("--max-stored-adapters", type=int, default=1024, help="adapters kept in the store; more uploads of new ids are refused")
    g.add_argument("--max-concurrent-uploads", type=int, default=4,
                   help="uploads in progress at once (per replica); more are refused (RESOURCE_EXHAUSTED)")
    g.add_argument("--max-staged-bytes", type=int, default=2 << 30,
                   help="bytes all uploads in progress may have staged together; a chunk beyond is refused (RESOURCE_EXHAUSTED)")
    g.add_argument("--upload-idle-seconds", type=float, default=30.0,
                   help="an upload that sends no message for this long is ended (RESOURCE_EXHAUSTED) and its files removed")
    g.add_argument("--admin-token-file", type=Path, default=None, help="file holding the bearer token needed to load, upload and unload adapters")
    g.add_argument("--client-token-file", type=Path, default=None,
                   help="file holding the bearer tokens needed to generate: one client a line (blank lines and # comments ignored)")


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--server", default=DEFAULT_TARGET, help="host:port of the Quiver server")
    g.add_argument("--token", default=os.environ.get("QUIVER_TOKEN"), help="bearer token (default: $QUIVER_TOKEN)")
    g.add_argument("--tls-ca", type=Path, default=None, help="PEM certificates to trust: connect with TLS")
    g.add_argument("--timeout", type=float, default=None, help="deadline of each call, seconds")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text instead of a chat message")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = no cut")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string; repeatable")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help, unless its help states its default already or it has none to
    show (None, False, an empty list): each default is said once."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="quiver", description="Serve many task adapters over one frozen base model.",
                                     epilog="quiver train / quiver eval: train adapters and score them (see quiver train --help).", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the gRPC server", formatter_class=fmt)
    _add_model_flags(serve_p)
    _add_server_flags(serve_p)
    _add_store_flags(serve_p, store_dir_help="where uploaded adapters are kept (default: CACHE_DIR/store)",
                     store_dir_required=False)
    gen = sub.add_parser("generate", help="stream a reply from a running server", formatter_class=fmt)
    gen.add_argument("prompt", help="the user message (the model's chat template is applied unless --raw)")
    _add_sampling_flags(gen)
    info = sub.add_parser("info", help="describe a running server", formatter_class=fmt)
    adapters = sub.add_parser("adapters", help="manage a running server's adapters", formatter_class=fmt)
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="the adapters being served", formatter_class=fmt)
    load = actions.add_parser("load", help="load a directory on the server (under an adapter root)", formatter_class=fmt)
    load.add_argument("adapter_id")
    load.add_argument("path", help="the directory, as the server sees it")
    upload = actions.add_parser("upload", help="upload a local adapter directory", formatter_class=fmt)
    upload.add_argument("adapter_id")
    upload.add_argument("directory", type=Path)
    unload = actions.add_parser("unload", help="stop serving an adapter (and delete it if uploaded)", formatter_class=fmt)
    unload.add_argument("adapter_id")
    for p in (load, upload):
        p.add_argument("--replace", action="store_true", help="replace an adapter already served under this id")
    for p in (gen, info, *actions.choices.values()):
        _add_client_flags(p)
    deploy = sub.add_parser("deploy", help="run replicas on a cluster", formatter_class=fmt)
    targets = deploy.add_subparsers(dest="target", required=True)
    ray_p = targets.add_parser("ray", help="Ray Serve: one replica per GPU, requests routed by adapter id (see README)",
                               formatter_class=fmt)
    _add_model_flags(ray_p)
    _add_ray_flags(ray_p)
    _add_store_flags(ray_p, store_dir_help="the shared adapter store: a directory every node mounts at this path",
                     store_dir_required=True)
    return parser


def _add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray serve")
    g.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: start a local one")
    g.add_argument("--grpc-port", type=int, default=9000, help="port of Serve's gRPC proxy (it listens on every interface)")
    g.add_argument("--http-port", type=int, default=8000, help="port of Serve's HTTP proxy (127.0.0.1; quiver.v1 is gRPC only)")
    g.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly"], help="where Serve runs its proxies")
    g.add_argument("--num-replicas", type=int, default=1, help="replicas (ignored with --max-replicas)")
    g.add_argument("--min-replicas", type=int, default=1, help="autoscaling: fewest replicas")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas (enables autoscaling)")
    g.add_argument("--target-ongoing-requests", type=float, default=32, help="autoscaling: requests per replica to aim for")
    g.add_argument("--max-ongoing-requests", type=int, default=128, help="requests a replica takes at once; beyond, they wait or spill to another replica")
    g.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (default: 1 if the cluster has GPUs, else 0: replicas run on CPU)")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    g.add_argument("--max-adapter-bytes", type=int, default=64 << 20,
                   help="largest adapter accepted; each replica keeps host-cache-bytes / this many adapters loaded (LRU)")


def _serve(args) -> None:
    # The server side (torch, transformers) is imported here only: client commands start in a blink.
    from quiver.api.server import ServerConfig, serve
    from quiver.config import ModelConfig, default_cache_dir
    from quiver.engine.engine import Engine
    from quiver.engine.service import EngineService
    from quiver.model.loader import load_model

    cache_dir = args.cache_dir or default_cache_dir()
    model_config = ModelConfig(path=args.model, dtype=args.dtype, device=args.device, cache_dir=cache_dir)
    store_dir = args.store_dir or cache_dir / "store"
    # versions' snapshots beside the store, on its file system: hard links, not copies, of uploaded adapters
    engine_config = dataclasses.replace(_engine_config(args), adapter_snapshot_dir=store_dir / ".snapshots")
    adapters_dir = args.adapters_dir if args.adapters_dir.is_dir() else None
    config = ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, adapters_dir=adapters_dir,
        adapter_roots=tuple(args.adapter_root or ([adapters_dir] if adapters_dir else [])),
        store_dir=store_dir, max_upload_bytes=args.max_upload_bytes,
        max_stored_adapters=args.max_stored_adapters, max_concurrent_uploads=args.max_concurrent_uploads,
        max_staged_bytes=args.max_staged_bytes, upload_idle_seconds=args.upload_idle_seconds,
        max_prompt_bytes=args.max_prompt_bytes, prefix_cache_scope=CacheScope(args.prefix_cache_scope),
        metrics_host=args.metrics_host, metrics_max_adapters=args.metrics_max_adapters, admin_token=_read_token(args.admin_token_file),
        client_tokens=read_tokens(args.client_token_file) if args.client_token_file else (),
        tls_cert=args.tls_cert, tls_key=args.tls_key, grace_seconds=args.grace_period,
        http_port=args.http_port, http_host=args.http_host,
    )

    def load(on_step) -> "EngineService":
        loaded = load_model(model_config)
        return EngineService(Engine(loaded, engine_config), on_step=on_step)

    asyncio.run(serve(config, load=load))


def _deploy_ray(args) -> None:
    # Ray and the server side are imported here only: `pip install -e .[ray]` is optional.
    import signal
    import threading

    import ray
    from ray import serve

    from quiver.config import ModelConfig, default_cache_dir
    from quiver.deploy.ray_serve import RayDeployConfig, start

    autoscaling = None
    if args.max_replicas is not None:
        autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                       "target_ongoing_requests": args.target_ongoing_requests}
    config = RayDeployConfig(
        store_dir=args.store_dir.resolve(),
        model=ModelConfig(path=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir or default_cache_dir()),
        engine=_engine_config(args),
        max_adapter_bytes=args.max_adapter_bytes,
        max_stored_adapters=args.max_stored_adapters, max_concurrent_uploads=args.max_concurrent_uploads,
        max_staged_bytes=args.max_staged_bytes, upload_idle_seconds=args.upload_idle_seconds,
        adapter_roots=tuple(r.resolve() for r in args.adapter_root or ()), admin_token=_read_token(args.admin_token_file),
        client_tokens=read_tokens(args.client_token_file) if args.client_token_file else (),
        num_replicas=args.num_replicas, autoscaling=autoscaling, max_ongoing_requests=args.max_ongoing_requests,
        num_gpus=args.num_gpus, num_cpus=args.num_cpus,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=args.address)
    try:
        start(config, grpc_port=args.grpc_port, http_port=args.http_port, proxy_location=args.proxy_location)
        logging.getLogger(__name__).info("serving quiver.v1 through Ray Serve on port %d; Ctrl-C stops", args.grpc_port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def read_tokens(path: Path) -> tuple[str, ...]:
    """The tokens in a token file: one a line, surrounding blanks stripped; blank lines and lines starting
    with # are ignored. QuiverError if it holds none."""
    lines = (line.strip() for line in path.read_text().splitlines())
    tokens = tuple(line for line in lines if line and not line.startswith("#"))
    if not tokens:
        raise QuiverError(f"{path} holds no token")
    return tokens


def _read_token(path: Path | None) -> str | None:
    """The one token of a token file (see `read_tokens`), or None without a file."""
    if path is None:
        return None
    tokens = read_tokens(path)
    if len(tokens) > 1:
        raise QuiverError(f"{path} holds {len(tokens)} tokens; one is expected here")
    return tokens[0]


def _generate(client: QuiverClient, args) -> None:
    request = client.request(
        **({"text": args.prompt} if args.raw else {"chat": args.prompt}), adapter_id=args.adapter,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=tuple(args.stop),
    )
    for piece in client.generate_stream(request):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _print_adapter(adapter: adapters_pb2.Adapter) -> None:
    kind = adapters_pb2.AdapterKind.Name(adapter.kind).removeprefix("ADAPTER_KIND_")
    where = adapters_pb2.AdapterLocation.Name(adapter.location).removeprefix("ADAPTER_LOCATION_").lower()
    size = f"rank {adapter.rank}" if adapter.rank else f"{adapter.num_virtual_tokens} virtual tokens"
    print(f"{adapter.adapter_id}\t{kind}\t{size}\t{adapter.num_params:,} params\t{adapter.num_bytes:,} bytes\t"
          f"{where}{' (stored)' if adapter.stored else ''}\t{adapter.requests_served} requests")


def _client_command(args) -> None:
    with QuiverClient(args.server, token=args.token, tls_ca=args.tls_ca, timeout=args.timeout,
                      interceptors=(AdapterRoutingInterceptor(),)) as client:
        if args.command == "generate":
            _generate(client, args)
        elif args.command == "info":
            print(client.server_info(), end="")
        elif args.action == "list":
            for adapter in client.list_adapters():
                _print_adapter(adapter)
        elif args.action == "load":
            _print_adapter(client.load_adapter(args.adapter_id, args.path, replace=args.replace))
        elif args.action == "upload":
            _print_adapter(client.upload_adapter(args.adapter_id, args.directory, replace=args.replace))
        else:
            client.unload_adapter(args.adapter_id)
            print(f"unloaded {args.adapter_id}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["eval"]):  # the trainer's commands; the server itself never imports it
        from quiver.trainer.cli import main as trainer_main

        return trainer_main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "deploy":
            _deploy_ray(args)
        else:
            _client_command(args)
    except QuiverError as e:
        print(f"quiver: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"quiver: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
