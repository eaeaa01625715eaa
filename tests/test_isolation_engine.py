"""One bad request (a tiny temperature, an overflowing adapter, a placement that fails, an adapter with no free
slot) or a failed forward must not stop, stall or change anyone else's work: the victims streaming beside it
finish with exactly the tokens they get when it never came, and the bad one gets its own precise outcome."""

import pytest
import torch

from quiver.engine.request import Request, SamplingParams
from quiver.engine.sampler import Sampler
from quiver.errors import FailedPrecondition
from tests.support.adapter_zoo import huge_lora
from tests.support.handles import adapter_handle
from tests.support.harness import make_service
from tests.support.idle import wait_idle
from tests.support.models import engine_for
from tests.support.streams import run

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
# base-model and adapter rows of every placement: slots (LoRA, bottleneck), prefix blocks, prompt prefill
VICTIMS = [
    ([5, 9, 14, 3], None),
    ([7, 8, 9, 10, 11, 12, 13], "lora"),
    ([20, 21, 22], "prefix"),
    ([30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], "prompt"),
    ([44, 45, 46, 47, 48], "bottleneck"),
]
BAD_PROMPT = [60, 61, 62, 63, 64, 65]


def victims() -> list[tuple[list[int], str | None, SamplingParams]]:
    return [(prompt, adapter, GREEDY) for prompt, adapter in VICTIMS]


@pytest.fixture(scope="module")
def service(model_path, zoo):
    # a small pool, so that the blocks a failed request held are soon handed to the victims
    service = make_service(model_path, num_kv_blocks=40)
    for name in ("lora", "lora-all-r4", "prefix", "prompt", "bottleneck"):
        service.load_adapter(name, zoo[name])
    yield service
    service.shutdown(timeout=30)


@pytest.fixture(scope="module")
def reference(service):
    """The victims' tokens when they run alone."""
    out = run(service, victims())
    assert all(error is None for _, error in out)
    return [tokens for tokens, _ in out]


def check_victims(service, reference, got) -> None:
    assert [error for _, error in got] == [None] * len(reference)
    assert [tokens for tokens, _ in got] == reference
    assert wait_idle(service) == []


def test_the_sampler_ends_non_finite_rows_alone_and_samples_huge_finite_ones():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [3e38, 3e38, -3e38, 1.0],  # finite, though its sum overflows
        [0.0, nan, 1.0, 2.0],
        [1.0, -inf, 3.0, 2.0],
        [2e38, 3e38, -3e38, 0.0],  # a tiny temperature over the widest finite spread
        [0.5, 0.25, 2.0, 1.0],
    ])
    temperatures = [0.0, 0.0, 0.7, 1e-40, 1e-300]
    requests = [Request(str(i), [1], SamplingParams(temperature=t, seed=i), adapter=adapter_handle("x") if i == 2 else None)
                for i, t in enumerate(temperatures)]
    got = Sampler().sample(logits, requests)
    assert got[0] == 0 and got[3] == 1 and got[4] == 2
    assert isinstance(got[1], FailedPrecondition) and "the base model" in str(got[1])
    assert isinstance(got[2], FailedPrecondition) and "adapter 'x'" in str(got[2])


def test_a_tiny_temperature_is_greedy_and_harms_no_one(service, reference):
    bad = [(BAD_PROMPT, None, SamplingParams(temperature=t, seed=1, top_k=k, max_new_tokens=8, ignore_eos=True))
           for t, k in ((1e-40, 0), (1e-50, 5), (5e-324, 0))]
    bad.append((BAD_PROMPT, "lora-all-r4", SamplingParams(temperature=1e-45, top_p=0.5, max_new_tokens=8, ignore_eos=True)))
    got = run(service, victims() + bad)
    check_victims(service, reference, got[: len(VICTIMS)])
    want = [run(service, [(prompt, adapter, GREEDY)])[0] for prompt, adapter, _ in bad]
    assert got[len(VICTIMS):] == want and all(error is None for _, error in want)


def test_an_overflowing_adapter_fails_alone_and_leaves_no_trace(service, reference):
    """A LoRA held in memory (trusted, not bounded) whose B entries and scale are ~1e30, so that its output
    overflows: its request ends with FailedPrecondition naming it; the victims beside it, and after it on
    the blocks it held, are exact."""
    service.register_adapter("huge", huge_lora(service.engine, 1e30, scale=1e30))
    try:
        for _ in range(5):  # again and again: the blocks it wrote go round the small pool to the victims
            got = run(service, victims() + [(BAD_PROMPT, "huge", GREEDY), (BAD_PROMPT[:3], "huge", GREEDY)])
            check_victims(service, reference, got[: len(VICTIMS)])
            for tokens, error in got[len(VICTIMS):]:
                assert isinstance(error, FailedPrecondition) and tokens == []
                assert "adapter 'huge'" in str(error) and "not finite" in str(error)
            check_victims(service, reference, run(service, victims()))
    finally:
        service.unload_adapter("huge")


@pytest.mark.parametrize("error", [FailedPrecondition("the adapter 'doomed' cannot be read"), RuntimeError("a bug")])
def test_a_placement_that_raises_ends_only_its_request(service, reference, zoo, monkeypatch, error):
    """The registry cannot make one version ready (e.g. a failed re-read): that request gets the error, typed
    (or, for a bug, as it is: reported as INTERNAL); the base-model and adapter requests beside it go on."""
    service.load_adapter("doomed", zoo["lora-all-r4"])
    registry = service.engine.adapters
    place = registry.place

    def failing(version):
        if version.adapter_id == "doomed":
            raise error
        return place(version)

    monkeypatch.setattr(registry, "place", failing)
    try:
        got = run(service, [(BAD_PROMPT, "doomed", GREEDY)] + victims() + [(BAD_PROMPT, "doomed", GREEDY)])
        assert [e for _, e in (got[0], got[-1])] == [error, error] and got[0][0] == got[-1][0] == []
        check_victims(service, reference, got[1:-1])
    finally:
        monkeypatch.undo()
        service.unload_adapter("doomed")


def test_a_failed_forward_ends_only_its_step_and_the_engine_serves_on(model_path, zoo, monkeypatch):
    """A forward that raises cannot be blamed on a request: the requests of that step end with the error;
    the one still waiting (max_num_seqs=2) is untouched, and later requests get their reference tokens."""
    service = make_service(model_path, max_num_seqs=2)
    try:
        for name in ("lora", "prefix"):
            service.load_adapter(name, zoo[name])
        requests = victims()[:3]
        want = [run(service, [r])[0] for r in requests]
        execute = service.engine.runner.execute
        calls = []

        def once(chunks, queued):
            calls.append(len(chunks))
            if len(calls) == 1:
                raise RuntimeError("device lost")
            return execute(chunks, queued)

        monkeypatch.setattr(service.engine.runner, "execute", once)
        got = run(service, requests)
        assert calls[0] == 2
        assert [(tokens, str(error)) for tokens, error in got[:2]] == [([], "device lost")] * 2
        assert got[2] == want[2]
        assert run(service, requests) == want
        assert wait_idle(service) == []
    finally:
        service.shutdown(timeout=30)


def test_a_request_with_no_free_slot_neither_delays_others_nor_starves(model_path, zoo):
    """Two slots, both held by long requests for two LoRAs that a steady stream keeps busy. A bottleneck
    request (no slot for it) must not hold up a base-model request queued after it, and must still run once
    it has waited long enough (the stream then queues behind it), with its reference tokens."""
    engine = engine_for(model_path, num_kv_blocks=256, block_size=8, adapter_slots=2, max_lora_rank=8,
                        max_bottleneck_size=8)
    for name in ("lora", "lora-all-r4", "bottleneck"):
        engine.register_adapter(name, engine.read_adapter(zoo[name]), source=zoo[name])
    long = SamplingParams(max_new_tokens=60, ignore_eos=True)
    short = SamplingParams(max_new_tokens=5, ignore_eos=True)
    engine.add_request("hold-a", [3, 4, 5], long, adapter_id="lora")
    engine.add_request("hold-b", [6, 7, 8], long, adapter_id="lora-all-r4")
    engine.step()
    engine.add_request("blocked", [44, 45, 46, 47], short, adapter_id="bottleneck")
    engine.add_request("base", [5, 9, 14, 3], short)
    tokens: dict[str, list[int]] = {}
    done: dict[str, int] = {}
    for step in range(1, 400):
        engine.add_request(f"stream-{step}", [9, step % 100 + 3], GREEDY, adapter_id=("lora", "lora-all-r4")[step % 2])
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                done[out.request_id] = step
        if "blocked" in done:
            break
    assert done["base"] == 5  # admitted at once: one token a step
    assert "blocked" in done, "the request without a slot was starved"
    for request_id, prompt, adapter_id in (("blocked", [44, 45, 46, 47], "bottleneck"), ("base", [5, 9, 14, 3], None)):
        alone = engine_for(model_path, num_kv_blocks=64, block_size=8, adapter_slots=2, max_lora_rank=8,
                           max_bottleneck_size=8)
        if adapter_id:
            alone.register_adapter(adapter_id, alone.read_adapter(zoo[adapter_id]), source=zoo[adapter_id])
        alone.add_request("0", prompt, short, adapter_id=adapter_id)
        want = []
        while alone.has_work():
            want += [t for out in alone.step() for t in out.new_token_ids]
        assert tokens[request_id] == want, request_id



def test_an_overflow_in_a_prompt_chunk_ends_the_request_at_that_chunk(model_path):
    """Chunked prefill: the first chunk samples nothing, yet its hidden states already overflowed (and so did
    the KV it wrote); the request ends at that step, not later, and its blocks are free and clean."""
    engine = engine_for(model_path, num_kv_blocks=16, block_size=4, max_num_batched_tokens=8, adapter_slots=1,
                        max_lora_rank=4)
    engine.register_adapter("huge", huge_lora(engine, 1e30, scale=1e30))
    engine.add_request("bad", list(range(3, 33)), GREEDY, adapter_id="huge")
    [out] = engine.step()
    assert isinstance(out.error, FailedPrecondition) and out.finished and not engine.has_work()
    assert engine.blocks.num_used == 0 and engine.blocks.num_cached == 0
    assert torch.count_nonzero(engine.runner.kv_cache) == 0  # its 2 blocks were zeroed: the only ones written


@pytest.mark.parametrize("fault", ["not finite", "raises"])
def test_a_prompt_adapter_whose_prefill_fails_ends_only_its_requests(service, reference, zoo, monkeypatch, fault):
    """A prompt adapter's shared prefix is computed when it is placed. If its virtual tokens' KV is not finite
    (embeddings held in memory, trusted, with a NaN) or the prefill raises, its requests end with the error,
    its blocks go back to the pool zeroed (the victims reuse them: 40 blocks), and the others are exact."""
    weights = service.engine.read_adapter(zoo["prompt"])
    if fault == "not finite":
        embeddings = weights.embeddings.clone()
        embeddings[2, 5] = float("nan")
        weights = type(weights)(kind=weights.kind, embeddings=embeddings)
    else:
        prefill = service.engine.runner.prefill_embeddings

        def failing(embeddings, blocks):
            prefill(embeddings, blocks)
            raise FailedPrecondition("the prefill failed half-way")

        monkeypatch.setattr(service.engine.runner, "prefill_embeddings", failing)
    service.register_adapter("bad-prompt", weights)
    try:
        for _ in range(3):
            got = run(service, [(BAD_PROMPT, "bad-prompt", GREEDY)] + victims())
            assert got[0][0] == [] and isinstance(got[0][1], FailedPrecondition)
            if fault == "not finite":
                assert "adapter 'bad-prompt'" in str(got[0][1]) and "not finite" in str(got[0][1])
            check_victims(service, reference, got[1:])
        assert bool(torch.isfinite(service.engine.runner.kv_cache).all())
    finally:
        monkeypatch.undo()
        service.unload_adapter("bad-prompt")
