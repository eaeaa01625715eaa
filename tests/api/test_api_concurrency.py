"""64 concurrent streams over gRPC, mixing the base model and all six adapter kinds, give the same tokens
as the engine run directly."""

import asyncio
import random

import grpc

from quiver.client import QuiverClient
from quiver.engine.request import SamplingParams
from quiver.v1 import inference_pb2_grpc
from tests.support.adapter_zoo import ALL
from tests.support.harness import start_server
from tests.support.models import engine_for

ENGINE = dict(num_kv_blocks=512, block_size=8, max_num_batched_tokens=256, adapter_slots=4)


def _direct(model_path, zoo, jobs, params) -> list[list[int]]:
    engine = engine_for(model_path, **ENGINE)
    for name in ALL:
        engine.register_adapter(name, engine.read_adapter(zoo[name]))
    for i, (adapter, prompt) in enumerate(jobs):
        engine.add_request(str(i), prompt, params, adapter_id=adapter or None)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(jobs))}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[str(i)] for i in range(len(jobs))]


async def _streams(target, jobs, max_new_tokens) -> list[list[int]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(adapter, prompt):
            request = QuiverClient.request(token_ids=prompt, adapter_id=adapter, max_new_tokens=max_new_tokens, ignore_eos=True)
            return [t async for message in stub.GenerateStream(request) for t in message.token_ids]

        return await asyncio.gather(*(one(a, p) for a, p in jobs))


def test_64_concurrent_streams_mixing_all_kinds_match_the_engine(model_path, zoo, tmp_path):
    rng = random.Random(0)
    kinds = ("", *ALL)
    jobs = [(kinds[i % len(kinds)], [rng.randrange(3, 160) for _ in range(rng.randrange(2, 12))]) for i in range(64)]
    running = start_server(model_path, tmp_path, engine=ENGINE, adapters_dir=zoo["lora"].parent)
    try:
        assert sorted(running.server.state.adapter_kinds) == sorted(ALL)
        got = asyncio.run(_streams(running.target, jobs, max_new_tokens=12))
    finally:
        running.stop()
    assert all(len(t) == 12 for t in got)
    assert got == _direct(model_path, zoo, jobs, SamplingParams(max_new_tokens=12, ignore_eos=True))
