"""Load generator: replays a workload against a Quiver server over gRPC, in its own process, and records
each request's timings as the client sees them.

    python -m benchmarks.loadgen --target 127.0.0.1:50051 --workload w.json --out records.json

The workload is `{"requests": [{"at": s, "chat": str, "adapter_id": str, "max_new_tokens": n}, ...]}`:
request i is sent `at` seconds after the start (an open loop: it does not wait for earlier requests) as a
streaming chat request that generates exactly `max_new_tokens` tokens (EOS ignored). The records are
`{"wall_s": s, "records": [Record, ...]}` in workload order.
"""

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from quiver.client import QuiverClient
from quiver.v1 import inference_pb2_grpc


@dataclass
class Record:
    adapter_id: str
    at: float  # when it was due, seconds after the start
    sent: float  # when it was sent, seconds after the start
    status: str  # a gRPC status name
    prompt_tokens: int = 0
    tokens: int = 0  # output tokens received
    ttft: float | None = None  # sent -> first output token, seconds
    tpot: float | None = None  # first -> last output token over (tokens - 1), seconds
    e2e: float | None = None  # sent -> last message, seconds
    max_gap: float | None = None  # the longest wait between two messages that carried tokens, seconds
    token_times: list[float] | None = None  # with keep_times: when each token-carrying message came, after the start


async def stream_one(stub: inference_pb2_grpc.InferenceServiceStub, item: dict, *, start: float,
                     timeout: float, keep_times: bool = False) -> Record:
    """Send one workload item now and follow its stream to the end (`start`: the run's perf_counter origin)."""
    request = QuiverClient.request(chat=item["chat"], adapter_id=item["adapter_id"],
                                   max_new_tokens=item["max_new_tokens"], ignore_eos=True)
    sent = time.perf_counter()
    record = Record(item["adapter_id"], at=item.get("at", 0.0), sent=sent - start, status="OK",
                    token_times=[] if keep_times else None)
    first = last = None
    try:
        async for message in stub.GenerateStream(request, timeout=timeout):
            now = time.perf_counter()
            if message.token_ids:
                if first is None:
                    first = now
                else:
                    record.max_gap = max(record.max_gap or 0.0, now - last)
                last = now
                record.tokens += len(message.token_ids)
                if keep_times:
                    record.token_times.append(now - start)
            if message.HasField("usage"):
                record.prompt_tokens = message.usage.prompt_tokens
    except grpc.aio.AioRpcError as e:
        record.status = e.code().name
    if first is not None:
        record.ttft = first - sent
        record.e2e = last - sent
        if record.tokens > 1:
            record.tpot = (last - first) / (record.tokens - 1)
    return record


async def replay(target: str, requests: list[dict], *, timeout: float) -> tuple[list[Record], float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()

        async def at(item: dict) -> Record:
            await asyncio.sleep(max(0.0, start + item["at"] - time.perf_counter()))
            return await stream_one(stub, item, start=start, timeout=timeout)

        records = await asyncio.gather(*(at(item) for item in requests))
        return list(records), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="host:port of the server")
    p.add_argument("--workload", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each request, seconds")
    args = p.parse_args()
    requests = json.loads(args.workload.read_text())["requests"]
    records, wall = asyncio.run(replay(args.target, requests, timeout=args.timeout))
    args.out.write_text(json.dumps({"wall_s": wall, "records": [asdict(r) for r in records]}))


if __name__ == "__main__":
    main()
