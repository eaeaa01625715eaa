"""n samples of one prompt (EngineService.submit_samples): ids, indexes and seeds, the prompt computed once,
aborts, and the adapter version each stream reports."""

import asyncio

import pytest

from quiver.engine.request import MAX_SAMPLES, FinishReason, SamplingParams
from quiver.engine.service import EngineService
from quiver.errors import AlreadyExists, InvalidArgument
from tests.support.idle import wait_idle
from tests.support.models import engine_for

BS = 8
PROMPT = list(range(30, 51))  # 21 tokens: two full blocks of 8 and 5 more


@pytest.fixture
def service(model_path):
    s = EngineService(engine_for(model_path, num_kv_blocks=96, block_size=BS, max_num_batched_tokens=64,
                                 adapter_slots=2, max_lora_rank=8, max_bottleneck_size=8))
    yield s
    s.shutdown(timeout=30)


def _stats(service):
    return service._call(lambda engine: engine.stats()).result(timeout=30)


def _drain(stream) -> tuple[list[int], FinishReason, list]:
    tokens, reason, outputs = [], None, []
    for out in stream:
        tokens += out.new_token_ids
        reason = out.finish_reason
        outputs.append(out)
    return tokens, reason, outputs


def test_n_samples_compute_the_prompt_once_then_only_each_ones_last_partial_block(service):
    """Samples 1..n-1 wait for sample 0's prompt, then take its 2 full blocks from the cache and compute the
    5 tokens after them (the last prompt token is always computed): P + (n - 1) * (P mod 8) prompt tokens."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=7, ignore_eos=True)
    before = _stats(service)
    streams = service.submit_samples(PROMPT, params, 4, request_id="call")
    assert [(s.request_id, s.index, s.adapter) for s in streams] == [(f"call.{i}", i, None) for i in range(4)]
    results = [_drain(s) for s in streams]
    assert all(len(tokens) == 4 and reason is FinishReason.LENGTH for tokens, reason, _ in results)
    assert wait_idle(service) == []
    after = _stats(service)
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 21 + 3 * 5
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 3 * 16


def test_prompt_logprobs_are_computed_once_and_given_to_every_sample(service):
    prompt = [p + 1 for p in PROMPT]
    params = SamplingParams(max_new_tokens=2, temperature=0.9, seed=1, ignore_eos=True, prompt_logprobs=True,
                            logprobs=2)
    before = _stats(service)
    results = [_drain(s) for s in service.submit_samples(prompt, params, 3)]
    after = _stats(service)
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 21 + 2 * 5
    firsts = [outputs[0].prompt_logprobs for _, _, outputs in results]
    assert firsts[0] is not None and len(firsts[0]) == len(prompt) and firsts[0][0] is None
    assert firsts[1] == firsts[0] and firsts[2] == firsts[0]
    assert all(len(o.logprobs) == len(o.new_token_ids) for _, _, outputs in results for o in outputs)


def test_seeded_samples_reproduce_and_sample_i_is_a_lone_request_with_seed_plus_i(service):
    for seed in (123, 2**64 - 2):  # the second wraps: sample 2 draws with seed 0
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed, ignore_eos=True)
        first = [_drain(s)[0] for s in service.submit_samples(PROMPT, params, 4)]
        again = [_drain(s)[0] for s in service.submit_samples(PROMPT, params, 4)]
        assert first == again
        assert len({tuple(t) for t in first}) > 1  # different seeds, different draws
        for i in range(4):
            lone = SamplingParams(max_new_tokens=8, temperature=1.0, seed=(seed + i) % 2**64, ignore_eos=True)
            assert _drain(service.submit(PROMPT, lone))[0] == first[i], (seed, i)


def test_one_sample_keeps_the_request_id_and_n_is_bounded(service):
    (stream,) = service.submit_samples(PROMPT, SamplingParams(max_new_tokens=2), 1, request_id="solo")
    assert (stream.request_id, stream.index) == ("solo", 0)
    _drain(stream)
    generated = service.submit_samples(PROMPT, SamplingParams(max_new_tokens=2), 2)
    assert [s.request_id.rsplit(".", 1)[1] for s in generated] == ["0", "1"]
    for s in generated:
        _drain(s)
    for n in (0, MAX_SAMPLES + 1, -3):
        with pytest.raises(InvalidArgument, match="n "):
            service.submit_samples(PROMPT, SamplingParams(), n)
    assert len(service.submit_samples(PROMPT, SamplingParams(max_new_tokens=1), MAX_SAMPLES)) == MAX_SAMPLES
    assert wait_idle(service) == []


def test_samples_are_all_or_none(service):
    taken = service.submit(PROMPT, SamplingParams(max_new_tokens=100, ignore_eos=True), request_id="dup.2")
    with pytest.raises(AlreadyExists):
        service.submit_samples(PROMPT, SamplingParams(), 3, request_id="dup")
    assert "dup.0" not in service.engine.requests and "dup.1" not in service.engine.requests
    taken.abort()
    assert wait_idle(service) == []


def test_aborting_every_stream_ends_the_call_held_samples_included(service):
    streams = service.submit_samples(PROMPT, SamplingParams(max_new_tokens=300, ignore_eos=True), 4)
    for stream in streams:
        stream.abort()
    for stream in streams:
        _, reason, _ = _drain(stream)
        assert reason is FinishReason.ABORT
    assert wait_idle(service) == []


def test_async_samples_stream_and_aborting_them_ends_the_call(service):
    async def scenario():
        streams = await service.submit_samples_async(PROMPT, SamplingParams(max_new_tokens=300, ignore_eos=True), 3)
        first = await streams[0].__anext__()
        for s in streams:
            s.abort()
        reasons = []
        for s in streams:  # drained within the loop: the engine thread hands outputs to it
            async for out in s:
                if out.finished:
                    reasons.append(out.finish_reason)
        return streams, first, reasons

    streams, first, reasons = asyncio.run(scenario())
    assert first.new_token_ids and [s.index for s in streams] == [0, 1, 2]
    assert reasons == [FinishReason.ABORT] * 3
    assert wait_idle(service) == []


def test_held_samples_are_queued_anyway_when_sample_0_ends_first(model_path):
    engine = engine_for(model_path, num_kv_blocks=96, block_size=BS)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine.add_samples(["a.0", "a.1", "a.2"], PROMPT, params)
    assert engine.stats().num_waiting == 3  # one queued, two held
    engine.abort("a.0")  # before its prompt was computed
    engine.abort("a.2")  # a held one just ends
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.finish_reason is FinishReason.LENGTH
    assert list(got) == ["a.1"] and len(got["a.1"]) == 3
    assert engine.stats().prompt_tokens_computed == len(PROMPT)
    assert engine.blocks.num_used == 0 and not engine.requests


def test_streams_report_the_adapter_version_they_pinned(service, zoo):
    service.load_adapter("lora", zoo["lora"])
    version = service.engine.adapters.current["lora"].version
    streams = service.submit_samples(PROMPT, SamplingParams(max_new_tokens=2), 2, adapter_id="lora")
    assert [s.adapter for s in streams] == [("lora", version)] * 2
    base = service.submit(PROMPT, SamplingParams(max_new_tokens=2))
    one = service.submit(PROMPT, SamplingParams(max_new_tokens=2), adapter_id="lora")
    assert base.adapter is None and one.adapter == ("lora", version)
    for s in [*streams, base, one]:
        _drain(s)
    assert wait_idle(service) == []


def test_a_reader_whose_event_loop_closed_is_aborted_and_the_engine_serves_on(service):
    async def scenario():
        streams = await service.submit_samples_async(PROMPT, SamplingParams(max_new_tokens=300, ignore_eos=True), 2)
        await streams[0].__anext__()  # then the loop closes with both streams unread

    asyncio.run(scenario())
    assert wait_idle(service) == []
    assert service._thread.is_alive()
    assert len(_drain(service.submit(PROMPT, SamplingParams(max_new_tokens=2)))[0]) == 2
