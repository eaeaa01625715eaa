"""Logprobs of sampled and prompt tokens, for every adapter kind in one mixed batch (greedy and sampled rows,
prompts chunked over several steps), against transformers' float32 forward (PEFT's for the PEFT kinds)."""

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from quiver.engine.request import SamplingParams
from tests.support.adapter_zoo import ALL, reference_model
from tests.support.models import eager, engine_for

NEW = 5
ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(model_path, zoo):
    engine = engine_for(model_path, num_kv_blocks=256, block_size=4, max_num_batched_tokens=24, max_num_seqs=32,
                        adapter_slots=4, max_lora_rank=8, max_bottleneck_size=8)
    for name in ALL:
        engine.register_adapter(name, engine.read_adapter(zoo[name]), source=zoo[name])
    return engine


def _run(engine, requests) -> dict[str, dict]:
    """requests: (id, prompt, params, adapter id), all added at once; per id its tokens, logprobs, prompt logprobs."""
    for request_id, prompt, params, adapter_id in requests:
        engine.add_request(request_id, prompt, params, adapter_id=adapter_id)
    got = {r[0]: {"tokens": [], "logprobs": [], "prompt": [], "outputs": 0} for r in requests}
    while engine.has_work():
        for out in engine.step():
            entry = got[out.request_id]
            assert out.error is None, out.error
            entry["tokens"] += out.new_token_ids
            entry["logprobs"] += out.logprobs
            if out.prompt_logprobs is not None:
                assert entry["outputs"] == 0, "prompt logprobs come on the first output only"
                entry["prompt"].append(out.prompt_logprobs)
            entry["outputs"] += 1
    return got


@torch.no_grad()
def _reference_logits(model, prompt, tokens) -> torch.Tensor:
    """float32 logits [len(prompt) + len(tokens), V] of the real tokens (a prompt adapter's virtual rows dropped)."""
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return logits[-ids.shape[1]:]


def _check(entry, want_lp: torch.Tensor, token: int, n_top: int, where: str):
    """entry: a TokenLogprob; want_lp: the reference log-softmax row [V]."""
    assert entry.token_id == token, where
    assert abs(entry.logprob - float(want_lp[token])) <= ATOL, (where, entry.logprob, float(want_lp[token]))
    assert entry.rank == 1 + int((want_lp > want_lp[token]).sum()), where
    want_top = want_lp.topk(n_top)
    assert [t for t, _ in entry.top] == want_top.indices.tolist(), where
    torch.testing.assert_close(torch.tensor([lp for _, lp in entry.top]), want_top.values, rtol=0, atol=ATOL)
    assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True), where


def test_logprobs_of_every_kind_greedy_and_sampled_in_one_batch_match_the_references(model_path, zoo, engine):
    g = torch.Generator().manual_seed(5)
    requests, specs = [], {}
    for k, name in enumerate([*ALL, None]):
        for mode in ("greedy", "sampled"):
            length = int(torch.randint(3, 34, (1,), generator=g))  # up to 33 tokens: chunked over steps of 24
            prompt = torch.randint(3, 160, (length,), generator=g).tolist()
            temperature = 0.0 if mode == "greedy" else 0.7
            n_top = [0, 3, 5, 20][(2 * k + (mode == "sampled")) % 4]
            params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=temperature, seed=11 + k,
                                    logprobs=n_top, prompt_logprobs=mode == "greedy")
            request_id = f"{name}-{mode}"
            requests.append((request_id, prompt, params, name))
            specs[request_id] = (name, prompt, params)
    penalised = SamplingParams(max_new_tokens=NEW, ignore_eos=True, repetition_penalty=0.6, logprobs=4,
                               prompt_logprobs=True)
    prompt = [7, 8, 9, 7, 8, 9, 10, 11]
    requests.append(("penalised", prompt, penalised, None))
    specs["penalised"] = (None, prompt, penalised)
    requests.append(("plain", [3, 4, 5], SamplingParams(max_new_tokens=NEW, ignore_eos=True), None))
    got = _run(engine, requests)
    assert got["plain"]["logprobs"] == [] and got["plain"]["prompt"] == []
    base = eager(model_path)
    for request_id, (name, prompt, params) in specs.items():
        entry = got[request_id]
        tokens = entry["tokens"]
        assert len(tokens) == NEW and len(entry["logprobs"]) == NEW, request_id
        model = reference_model(model_path, name, zoo[name]) if name else base
        logits = _reference_logits(model, prompt, tokens)
        temperature = params.temperature or 1.0
        for j, token in enumerate(tokens):
            row = logits[len(prompt) - 1 + j].clone()
            if params.repetition_penalty != 1:
                processor = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                row = processor(torch.tensor([prompt + tokens[:j]]), row[None])[0]
            want = torch.log_softmax(row / temperature, dim=-1)
            if params.greedy:
                assert token == int(row.argmax()), request_id
            _check(entry["logprobs"][j], want, token, params.logprobs, f"{request_id} token {j}")
        if not params.prompt_logprobs:
            assert entry["prompt"] == [], request_id
            continue
        (prompt_lps,) = entry["prompt"]
        assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None, request_id
        want_prompt = torch.log_softmax(logits[:len(prompt) - 1], dim=-1)
        for p in range(1, len(prompt)):
            _check(prompt_lps[p], want_prompt[p - 1], prompt[p], params.logprobs, f"{request_id} prompt {p}")
    # the sampled tokens come from the distributions reported: not all of them are the most likely
    assert any(lp.rank > 1 for r in specs if r.endswith("sampled") for lp in got[r]["logprobs"])


def test_prompt_logprobs_compute_every_prompt_row_despite_the_prefix_cache(model_path, engine):
    prompt = list(range(20, 50))  # 30 tokens: 7 full blocks of 4
    plain = SamplingParams(max_new_tokens=2, ignore_eos=True)
    _run(engine, [("warm", prompt, plain, None)])
    before = engine.stats()
    got = _run(engine, [("asks", prompt, SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=True,
                                                          logprobs=2), None)])
    after = engine.stats()
    assert after.prefix_cache_hit_tokens == before.prefix_cache_hit_tokens  # it took nothing from the cache
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == len(prompt)
    (prompt_lps,) = got["asks"]["prompt"]
    want = torch.log_softmax(_reference_logits(eager(model_path), prompt, [])[:-1], dim=-1)
    for p in range(1, len(prompt)):
        _check(prompt_lps[p], want[p - 1], prompt[p], 2, f"prompt {p}")
    # the cache still serves a later plain request: all but its last block
    _run(engine, [("again", prompt, plain, None)])
    assert engine.stats().prefix_cache_hit_tokens - after.prefix_cache_hit_tokens == 28


def test_logprobs_survive_preemption_and_recomputation(model_path):
    """A pool too small for every request: some are preempted (mid-prompt or mid-output) and recomputed; each
    still gets one logprob per token and its prompt logprobs once, all equal to the reference."""
    engine = engine_for(model_path, num_kv_blocks=12, block_size=8, max_num_batched_tokens=24)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 160, (n,), generator=g).tolist() for n in (17, 33, 5, 40, 12, 26)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=True)
    got = _run(engine, [(str(i), p, params, None) for i, p in enumerate(prompts)])
    assert engine.scheduler.num_preemptions > 0
    base = eager(model_path)
    for i, prompt in enumerate(prompts):
        entry = got[str(i)]
        logits = _reference_logits(base, prompt, entry["tokens"])
        want = torch.log_softmax(logits, dim=-1)
        assert len(entry["logprobs"]) == len(entry["tokens"]) == 10
        for j, token in enumerate(entry["tokens"]):
            _check(entry["logprobs"][j], want[len(prompt) - 1 + j], token, 2, f"{i} token {j}")
        (prompt_lps,) = entry["prompt"]
        assert len(prompt_lps) == len(prompt)
        for p in range(1, len(prompt)):
            _check(prompt_lps[p], want[p - 1], prompt[p], 2, f"{i} prompt {p}")
