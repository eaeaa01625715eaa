"""The engine against transformers' eager model, on tiny random Llama and Qwen2 models (GQA)."""

import dataclasses

import pytest
import torch

from quiver.engine.request import SamplingParams
from quiver.model import batch as batch_module
from tests.support.models import RecordingSampler, eager, engine_for, run_staggered, save_tiny, without_cpu_fast_paths

PROMPT_LENS = [1, 5, 17, 33, 64, 3, 90, 12]
ARRIVE_AT = [0, 0, 1, 3, 4, 7, 9, 15]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp("models"))


def _prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 160, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _check_against_eager(path, engine, max_new_tokens=12):
    ref = eager(path)
    prompts = _prompts()
    recorder = RecordingSampler()
    engine.runner.sampler = recorder
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    tokens = run_staggered(engine, prompts, params, ARRIVE_AT)
    for i, prompt in enumerate(prompts):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
        assert tokens[str(i)] == expected[0, len(prompt):].tolist(), f"prompt {i}"
        full = torch.tensor([prompt + tokens[str(i)]])
        with torch.no_grad():
            ref_logits = ref(full).logits[0]  # [n, V]
        got = torch.stack(recorder.logits[str(i)])  # one row per generated token
        want = ref_logits[len(prompt) - 1 : len(prompt) - 1 + max_new_tokens]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert engine.blocks.num_used == 0


def test_greedy_and_logits_match_eager_with_staggered_arrivals(tiny):
    _check_against_eager(tiny, engine_for(tiny, num_kv_blocks=256, block_size=8, max_num_batched_tokens=48))


def test_without_the_c_kernels_too(tiny, monkeypatch):
    """The pure-torch forward and attention, as on a machine without a C compiler (float32 on the CPU otherwise
    runs the C kernels of quiver.kernels.native and oneDNN's packed linears)."""
    without_cpu_fast_paths(monkeypatch)
    _check_against_eager(tiny, engine_for(tiny, num_kv_blocks=256, block_size=8, max_num_batched_tokens=48))


def test_preemption_recomputes_and_every_request_finishes(tiny):
    engine = engine_for(tiny, num_kv_blocks=24, block_size=8, max_num_batched_tokens=48)
    _check_against_eager(tiny, engine)
    assert engine.scheduler.num_preemptions > 0


def test_one_token_budget_still_matches(tiny):
    """Prefill chunks of a single token: the most extreme chunking."""
    engine = engine_for(tiny, num_kv_blocks=256, block_size=4, max_num_batched_tokens=9)
    _check_against_eager(tiny, engine, max_new_tokens=4)


def test_abort_mid_generation_frees_blocks(tiny):
    engine = engine_for(tiny, num_kv_blocks=64, block_size=8)
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)
    for i, p in enumerate(_prompts()[:4]):
        engine.add_request(str(i), p, params)
    for _ in range(5):
        engine.step()
    assert engine.blocks.num_used > 0
    out = engine.abort("1")
    assert out.finish_reason.value == "abort"
    engine.abort("0")
    while engine.has_work():
        engine.step()
    assert engine.blocks.num_used == 0 and not engine.requests


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = _prompts()[3]
    alone = engine_for(tiny, num_kv_blocks=256, block_size=8)
    alone.add_request("x", prompt, params)
    solo = _drain(alone)["x"]
    crowded = engine_for(tiny, num_kv_blocks=256, block_size=8, max_num_batched_tokens=40)
    others = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    for i, p in enumerate(_prompts(seed=9)):
        crowded.add_request(f"o{i}", p, others)
    crowded.step()
    crowded.add_request("x", prompt, params)
    assert _drain(crowded)["x"] == solo
    reseeded = engine_for(tiny, num_kv_blocks=256, block_size=8)
    reseeded.add_request("x", prompt, SamplingParams(**{**params.__dict__, "seed": 99}))
    assert _drain(reseeded)["x"] != solo


def _drain(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_triton_backend_wiring_matches_eager(tiny):
    """The engine on the Triton kernels (under the interpreter here): a few steps, staggered, chunked."""
    engine = engine_for(tiny, num_kv_blocks=32, block_size=4, max_num_batched_tokens=12, kernel_backend="triton")
    assert engine.runner.ops.name == "triton"
    ref = eager(tiny)
    prompts = [p[:9] for p in _prompts()[:3]]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    tokens = run_staggered(engine, prompts, params, [0, 0, 2])
    for i, prompt in enumerate(prompts):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, min_new_tokens=3)
        assert tokens[str(i)] == expected[0, len(prompt):].tolist()
    assert engine.blocks.num_used == 0


def test_the_step_object_is_built_once_per_step_whatever_the_number_of_layers(tiny, monkeypatch):
    """One StepBatch and one attention plan per forward; every layer's attention call reads that step's plan."""
    engine = engine_for(tiny, num_kv_blocks=64, block_size=8, max_num_batched_tokens=24)
    layers = engine.runner.model.config.num_hidden_layers
    assert layers > 1
    built, planned, attended, forwards = [], [], [], []

    class CountedStep(batch_module.StepBatch):
        def __init__(self, **fields):
            built.append(1)
            super().__init__(**fields)

    def plan_attention(**metadata):
        planned.append(ops.plan_attention(**metadata))
        return planned[-1]

    def paged_attention(*tensors, plan, **metadata):
        attended.append(plan)
        return ops.paged_attention(*tensors, plan=plan, **metadata)

    def execute(*args, **kwargs):
        forwards.append(1)
        return run(*args, **kwargs)

    ops, run = engine.runner.ops, engine.runner.execute
    monkeypatch.setattr(batch_module, "StepBatch", CountedStep)
    engine.runner.ops = dataclasses.replace(ops, plan_attention=plan_attention, paged_attention=paged_attention)
    engine.runner.execute = execute
    run_staggered(engine, _prompts()[:4], SamplingParams(max_new_tokens=4, ignore_eos=True), [0, 0, 1, 2])
    assert len(forwards) > 3 and len(built) == len(planned) == len(forwards)
    assert [id(plan) for plan in attended] == [id(plan) for plan in planned for _ in range(layers)]
