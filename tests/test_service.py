"""The thread-safe / async API the gRPC layer uses: submit and stream, abort, batch generate, errors."""

import asyncio
import os

import pytest
import torch

from quiver.config import default_threads
from quiver.engine.request import FinishReason, SamplingParams
from quiver.engine.service import EngineService
from quiver.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from tests.support.models import engine_for, save_tiny


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models"))


@pytest.fixture
def service(path):
    s = EngineService(engine_for(path, num_kv_blocks=32, block_size=8, max_queue_len=8))
    yield s
    s.shutdown(timeout=30)


def test_batch_generate_equals_the_engine_run_directly(path, service):
    prompts = [[5, 6, 7], list(range(3, 40)), [9] * 11]
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    got = service.generate(prompts, params)
    direct = engine_for(path, num_kv_blocks=64, block_size=8)
    for i, p in enumerate(prompts):
        direct.add_request(str(i), p, params)
    want: dict[str, list[int]] = {}
    while direct.has_work():
        for out in direct.step():
            want.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [c.token_ids for c in got] == [want[str(i)] for i in range(3)]
    assert all(c.finish_reason is FinishReason.LENGTH for c in got)


def test_async_stream_yields_tokens_as_they_come_and_abort_frees_blocks(service):
    async def scenario():
        stream = await service.submit_async([3, 4, 5], SamplingParams(max_new_tokens=200, ignore_eos=True))
        seen = []
        async for out in stream:
            seen.append(out)
            if len(seen) == 3:
                stream.abort()
        return seen

    seen = asyncio.run(scenario())
    assert all(len(o.new_token_ids) == 1 for o in seen[:3])
    assert seen[-1].finish_reason is FinishReason.ABORT and seen[-1].new_token_ids == ()
    service.shutdown(timeout=30)
    assert service.engine.blocks.num_used == 0


def test_bad_requests_raise_typed_errors_to_the_caller(service):
    with pytest.raises(InvalidArgument, match="empty"):
        service.submit([], SamplingParams())
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        service.submit([1, 10_000], SamplingParams())
    with pytest.raises(InvalidArgument, match="context holds 512"):
        service.submit([1] * 600, SamplingParams())
    with pytest.raises(InvalidArgument, match="exceeds the KV cache"):
        service.submit([1] * 10, SamplingParams(max_new_tokens=300))
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(InvalidArgument, match="temperature"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams(top_p=0.0)
    service.submit([1, 2], SamplingParams(max_new_tokens=50), request_id="dup")
    with pytest.raises(AlreadyExists):
        service.submit([1, 2], SamplingParams(), request_id="dup")


def test_a_full_queue_is_refused_and_shutdown_refuses_new_work(path):
    service = EngineService(engine_for(path, num_kv_blocks=64, block_size=8, max_queue_len=2, max_num_seqs=1))
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    streams = []
    with pytest.raises(ResourceExhausted, match="queue is full"):
        for _ in range(10):
            streams.append(service.submit([1, 2, 3], params))
    for s in streams:
        s.abort()
    service.shutdown(timeout=30)
    with pytest.raises(FailedPrecondition):
        service.submit([1], params)
    assert service.engine.blocks.num_used == 0


def test_stop_token_ids_and_max_new_tokens(service):
    free = service.generate([[7, 8, 9]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    stop_at = free.token_ids[2]
    stopped = service.generate([[7, 8, 9]], SamplingParams(max_new_tokens=6, stop_token_ids=(stop_at,), ignore_eos=True))[0]
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason is FinishReason.STOP


def test_submit_many_starts_the_whole_batch_in_one_step(path):
    first_steps: list[int] = []
    service = EngineService(engine_for(path, num_kv_blocks=64, block_size=8),
                            on_step=lambda outputs: first_steps.append(len(outputs)))
    prompts = [[5, 6, 7], [8, 9], list(range(3, 20)), [4] * 5, [11, 12, 13, 14]]
    streams = service.submit_many(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))
    tokens = [[t for out in s for t in out.new_token_ids] for s in streams]
    service.shutdown(timeout=30)
    assert first_steps[0] == len(prompts)  # every request was prefilled and sampled in the first step
    assert all(len(t) == 3 for t in tokens)


def test_submit_many_is_all_or_none(service):
    good = [[5, 6, 7], [8, 9]]
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        service.submit_many(good + [[1, 10_000]], SamplingParams(max_new_tokens=50, ignore_eos=True))
    with pytest.raises(InvalidArgument, match="differ in length"):
        service.submit_many(good, [SamplingParams()])
    service.shutdown(timeout=30)
    assert not service.engine.has_work() and service.engine.blocks.num_used == 0


def test_cache_salts_reach_the_engine_through_every_submit(service):
    prompt = list(range(3, 30))  # 3 full blocks of 8 can be shared
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)

    def hit_tokens() -> int:
        return service._call(lambda engine: engine.stats().prefix_cache_hit_tokens).result()

    async def submit_async(salt):
        return [out async for out in await service.submit_async(prompt, params, cache_salt=salt)]

    list(service.submit(prompt, params, cache_salt="a"))
    assert hit_tokens() == 0
    asyncio.run(submit_async("b"))
    assert hit_tokens() == 0
    [stream] = service.submit_many([prompt], params, cache_salts=["b"])
    list(stream)
    assert hit_tokens() == 24
    list(service.submit(prompt, params, cache_salt="a"))
    assert hit_tokens() == 48
    with pytest.raises(InvalidArgument, match="differ in length"):
        service.submit_many([prompt], params, cache_salts=[])


def test_the_engine_thread_runs_with_the_configured_thread_count(path):
    """EngineConfig.num_threads is what the engine's own thread computes with (the CLI's default: every core
    but one, `default_threads`)."""
    before = torch.get_num_threads()
    try:
        service = EngineService(engine_for(path, num_kv_blocks=16, block_size=4, num_threads=1))
        try:
            assert service._call(lambda engine: torch.get_num_threads()).result() == 1
        finally:
            service.shutdown()
    finally:
        torch.set_num_threads(before)
    assert default_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
