"""Adapter load: how long LoadAdapter and UploadAdapter take, and what loading costs requests that run meanwhile.

A real `quiver serve` runs in a child process on the default model. The adapter is a LoRA r=16 on every
linear layer of the model (made with PEFT, B ~ N(0, 0.02)), 19.5 MB of fp32 safetensors.

1. LoadAdapter (a directory under the server's adapter root) and UploadAdapter (the files streamed in 1 MiB
   chunks), each `--tries` times on an idle server under a fresh id; each is unloaded again, untimed.
2. `--streams` clients stream requests back to back (chatterbot questions, `--new-tokens` tokens each,
   EOS ignored, each on one of `--streams` LoRA adapters loaded beforehand): first for `--idle-seconds`
   with nothing else going on, then while `--loads` more adapters are loaded one after another, then
   for `--idle-seconds` again (the machine's other load drifts; the two quiet phases bracket it). Reported
   for each phase's window: the gaps between consecutive tokens of a request (p50/p99/max; their mean is
   the time per output token), the TPOT of the requests that ran wholly inside the window, and output
   tokens per second; and the LoadAdapter latency under that traffic.

    python -m benchmarks.adapter_load --quick    # 5 tries, 30 loads under traffic: about a minute
    python -m benchmarks.adapter_load            # 20 tries, 100 loads under traffic
"""

import argparse
import asyncio
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import grpc
from transformers import AutoTokenizer

from benchmarks import data, machine
from benchmarks.loadgen import Record, stream_one
from benchmarks.server_proc import ServerProcess
from benchmarks.stats import summary
from quiver.client import QuiverClient
from quiver.config import default_cache_dir
from quiver.model.loader import default_model_dir
from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import adapters_pb2_grpc, inference_pb2_grpc


def timed_rpcs(client: QuiverClient, path: Path, rel: str, tries: int) -> dict:
    """LoadAdapter and UploadAdapter latency on an idle server, seconds per call."""
    load, upload = [], []
    for i in range(tries):
        start = time.perf_counter()
        client.load_adapter(f"load{i}", rel)
        load.append(time.perf_counter() - start)
        client.unload_adapter(f"load{i}")
        start = time.perf_counter()
        client.upload_adapter(f"upload{i}", path)
        upload.append(time.perf_counter() - start)
        client.unload_adapter(f"upload{i}")
    return {"load_adapter": summary(load), "upload_adapter": summary(upload)}


async def traffic(target: str, items: list[dict], streams: int, during) -> tuple[list[Record], object, tuple[float, float]]:
    """`streams` clients send `items` back to back (cycling) while the coroutine `during(channel)` runs;
    returns the records of the requests they sent (with token times), what `during` returned, and when it
    started and ended (seconds after the clients started)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        records: list[Record] = []
        done = asyncio.Event()
        start = time.perf_counter()
        source = itertools.cycle(items)

        async def client(k: int) -> None:
            while not done.is_set():
                item = next(source) | {"adapter_id": f"traffic{k}"}
                records.append(await stream_one(stub, item, start=start, timeout=300, keep_times=True))

        clients = [asyncio.ensure_future(client(k)) for k in range(streams)]
        await asyncio.sleep(1.0)  # every client has a request running
        began = time.perf_counter() - start
        try:
            result = await during(channel)
        finally:
            ended = time.perf_counter() - start
            done.set()
            await asyncio.gather(*clients)
        return records, result, (began, ended)


async def load_many(channel: grpc.aio.Channel, rel: str, n: int) -> list[float]:
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    seconds = []
    for i in range(n):
        start = time.perf_counter()
        await stub.LoadAdapter(apb.LoadAdapterRequest(adapter_id=f"many{i}", path=rel), timeout=300)
        seconds.append(time.perf_counter() - start)
    return seconds


def phase(records: list[Record], window: tuple[float, float], **extra) -> dict:
    """The traffic inside `window` (seconds after the clients started): the gaps between consecutive tokens
    of a request that both came inside it, and the TPOT of the requests that ran wholly inside it."""
    began, ended = window
    ok = [r for r in records if r.status == "OK"]
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:]) if a >= began and b <= ended]
    inside = [r for r in ok if r.sent >= began and r.sent + r.e2e <= ended]
    return {"seconds": ended - began, "failed": len(records) - len(ok),
            "inter_token": summary(gaps),
            "requests_inside": len(inside), "tpot": summary([r.tpot for r in inside if r.tpot is not None]),
            "tokens_per_s": sum(a >= began and a <= ended for r in ok for a in r.token_times) / (ended - began),
            **extra}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 tries, 30 loads under traffic, 15 s idle phase, 16-token requests")
    p.add_argument("--tries", type=int, default=20, help="timed LoadAdapter and UploadAdapter calls each")
    p.add_argument("--loads", type=int, default=100, help="adapters loaded one after another under traffic")
    p.add_argument("--streams", type=int, default=4, help="clients streaming back to back during phase 2")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens each traffic request generates")
    p.add_argument("--idle-seconds", type=float, default=40.0, help="length of the no-loading phase")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/adapter_load.json"))
    if "--quick" in sys.argv[1:]:  # new defaults; flags given explicitly still win
        p.set_defaults(tries=5, loads=30, idle_seconds=15.0, new_tokens=16)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *sys.argv])
    load_start = os.getloadavg()  # other work on the machine skews the timings: recorded beside them

    from benchmarks.adapter_sets import lora_set

    model_path = default_model_dir(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items = [{"chat": chat, "max_new_tokens": args.new_tokens}
             for chat, _ in data.chatterbot_requests(tokenizer, 64, seed=1)]
    result = {"model": model_path.name, "adapter": "LoRA r=16, alpha 32, all linear layers", "command": command}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _, dirs = lora_set(model_path, tmp / "adapters", 1, rank=16)
        path = dirs["lora0"]
        rel = str(path.relative_to(tmp / "adapters"))
        result["adapter_bytes_on_disk"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        flags = ["--adapters-dir", str(tmp / "none"), "--adapter-root", str(tmp / "adapters"), "--store-dir", str(tmp / "store")]
        with ServerProcess(flags, log_path=args.out.with_suffix(".server.log")) as server:
            server.wait_serving()
            with QuiverClient(server.target) as client:
                client.load_adapter("warmup", rel)  # first-call costs (imports, allocations) are not measured
                client.unload_adapter("warmup")
                result |= timed_rpcs(client, path, rel, args.tries)
                for k in range(args.streams):
                    client.load_adapter(f"traffic{k}", rel)

            async def idle(channel) -> None:
                await asyncio.sleep(args.idle_seconds)

            async def warm(channel) -> None:
                await asyncio.sleep(3)

            asyncio.run(traffic(server.target, items, args.streams, warm))
            records, _, window = asyncio.run(traffic(server.target, items, args.streams, idle))
            result["no_loading"] = phase(records, window)
            records, loads, window = asyncio.run(
                traffic(server.target, items, args.streams, lambda channel: load_many(channel, rel, args.loads)))
            result["while_loading"] = phase(records, window, loads=args.loads, load_adapter=summary(loads))
            records, _, window = asyncio.run(traffic(server.target, items, args.streams, idle))
            result["no_loading_after"] = phase(records, window)  # other work on the machine drifts: before and after
            with QuiverClient(server.target) as client:
                result["adapters_listed_after"] = len(client.list_adapters())
    result |= {"tries": args.tries, "streams": args.streams, "new_tokens": args.new_tokens,
               "machine": machine.describe() | {"loadavg_start": load_start, "loadavg_end": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    load_p = result["while_loading"]
    print(f"\n{'RPC (idle server)':<34}{'p50 ms':>9}{'p99 ms':>9}")
    for name in ("load_adapter", "upload_adapter"):
        print(f"{name:<34}{result[name]['p50']:>9.0f}{result[name]['p99']:>9.0f}")
    print(f"{'load_adapter under traffic':<34}{load_p['load_adapter']['p50']:>9.0f}{load_p['load_adapter']['p99']:>9.0f}")
    print(f"\n{'traffic, ' + str(args.streams) + ' streams (ms)':<30}{'secs':>6}{'gap mean':>10}{'gap p50':>9}{'gap p99':>9}{'gap max':>9}"
          f"{'reqs':>6}{'TPOT p50':>10}{'TPOT p99':>10}{'tok/s':>7}")
    for name, ph in (("no loading", result["no_loading"]), (f"{args.loads} adapters loading", load_p),
                     ("no loading, after", result["no_loading_after"])):
        g, t = ph["inter_token"], ph["tpot"]
        print(f"{name:<30}{ph['seconds']:>6.1f}{g['mean']:>10.0f}{g['p50']:>9.0f}{g['p99']:>9.0f}{g['max']:>9.0f}{ph['requests_inside']:>6}"
              f"{_ms(t['p50']):>10}{_ms(t['p99']):>10}{ph['tokens_per_s']:>7.1f}")
    print(f"load average (1 min) at start/end: {load_start[0]:.2f}/{result['machine']['loadavg_end'][0]:.2f}  -> {args.out}")
    print(f"command: {command}")


if __name__ == "__main__":
    main()
