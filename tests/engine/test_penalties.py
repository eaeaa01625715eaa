"""Penalties and min_new_tokens, per request in one mixed batch, against references we did not write:
transformers' `generate` (base model and PEFT's LoRA model) for the repetition penalty and min_new_tokens,
and OpenAI's presence / frequency formula applied in a greedy loop over transformers' float32 forward."""

import pytest
import torch

from quiver.engine.request import FinishReason, SamplingParams
from tests.support.adapter_zoo import reference_model
from tests.support.models import eager, engine_for

N = 12
PROMPTS = [[5, 9, 11, 3, 17, 9, 40], [70, 71, 72, 73, 5, 5, 5, 90, 12, 13, 14], [100, 3, 100, 3, 8]]


@pytest.fixture(scope="module")
def base(model_path):
    return eager(model_path)


def _engine(model_path, zoo=None):
    engine = engine_for(model_path, num_kv_blocks=128, block_size=4, max_num_batched_tokens=16,
                        adapter_slots=2, max_lora_rank=8, max_bottleneck_size=8)
    if zoo is not None:
        engine.register_adapter("lora", engine.read_adapter(zoo["lora"]), source=zoo["lora"])
    return engine


def _run(engine, requests) -> dict[str, tuple[list[int], FinishReason]]:
    """requests: (id, prompt, params, adapter id), all added before the first step."""
    for request_id, prompt, params, adapter_id in requests:
        engine.add_request(request_id, prompt, params, adapter_id=adapter_id)
    got: dict[str, tuple[list[int], FinishReason]] = {r[0]: ([], None) for r in requests}
    while engine.has_work():
        for out in engine.step():
            tokens, _ = got[out.request_id]
            got[out.request_id] = (tokens + list(out.new_token_ids), out.finish_reason)
    assert engine.blocks.num_used == sum(len(v.blocks) for v in engine.adapters.current.values())
    return got


def _generate(model, prompt, **kwargs) -> list[int]:
    """transformers' greedy generate; min_new_tokens = N masks EOS exactly as the engine does (see _params)."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                             min_new_tokens=N, **kwargs)
    return out[0, len(prompt):].tolist()


def _params(**kwargs) -> SamplingParams:
    # min_new_tokens = max_new_tokens: EOS masked all along, as transformers' MinNewTokensLengthLogitsProcessor does
    return SamplingParams(max_new_tokens=N, min_new_tokens=N, **kwargs)


@torch.no_grad()
def _openai_greedy(model, prompt, *, presence=0.0, frequency=0.0, repetition=1.0) -> list[int]:
    """Greedy tokens with OpenAI's formula applied to a float32 forward's last row: logit[j] -= presence * (c[j] > 0)
    + frequency * c[j], c counting the OUTPUT tokens; after transformers' repetition penalty when one is given."""
    ids, out = list(prompt), []
    for _ in range(N):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        if repetition != 1:
            seen = torch.tensor(sorted(set(ids)))
            picked = logits[seen]
            logits[seen] = torch.where(picked < 0, picked * repetition, picked / repetition)
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=logits.shape[0]).double()
        logits = logits - (presence * (counts > 0) + frequency * counts)
        token = int(logits.argmax())
        ids.append(token)
        out.append(token)
    return out


def test_penalties_per_request_in_one_mixed_batch_match_their_references(model_path, zoo, base):
    engine = _engine(model_path, zoo)
    requests = [
        ("plain", PROMPTS[0], _params(), None),
        ("rep-1.3", PROMPTS[0], _params(repetition_penalty=1.3), None),
        ("rep-0.7", PROMPTS[1], _params(repetition_penalty=0.7), None),
        ("lora-rep-1.5", PROMPTS[2], _params(repetition_penalty=1.5), "lora"),
        ("lora-plain", PROMPTS[2], _params(), "lora"),
        ("presence", PROMPTS[1], _params(presence_penalty=1.5), None),
        ("frequency", PROMPTS[2], _params(frequency_penalty=0.9), None),
        ("negative", PROMPTS[0], _params(presence_penalty=-2.0, frequency_penalty=0.5), None),
        ("all-three", PROMPTS[1], _params(repetition_penalty=1.2, presence_penalty=0.6, frequency_penalty=0.4), None),
        ("sampled", PROMPTS[0], _params(temperature=0.8, seed=3, repetition_penalty=1.3), None),
    ]
    got = _run(engine, requests)
    lora = reference_model(model_path, "lora", zoo["lora"])
    want = {
        "plain": _generate(base, PROMPTS[0]),
        "rep-1.3": _generate(base, PROMPTS[0], repetition_penalty=1.3),
        "rep-0.7": _generate(base, PROMPTS[1], repetition_penalty=0.7),
        "lora-rep-1.5": _generate(lora, PROMPTS[2], repetition_penalty=1.5),
        "lora-plain": _generate(lora, PROMPTS[2]),
        "presence": _openai_greedy(base, PROMPTS[1], presence=1.5),
        "frequency": _openai_greedy(base, PROMPTS[2], frequency=0.9),
        "negative": _openai_greedy(base, PROMPTS[0], presence=-2.0, frequency=0.5),
        "all-three": _openai_greedy(base, PROMPTS[1], repetition=1.2, presence=0.6, frequency=0.4),
    }
    for name, tokens in want.items():
        assert got[name] == (tokens, FinishReason.LENGTH), name
    # each penalty changed the tokens (so the comparisons above could fail)
    unpenalised = {0: want["plain"], 1: _generate(base, PROMPTS[1]), 2: _generate(base, PROMPTS[2])}
    for name, prompt in (("rep-1.3", 0), ("rep-0.7", 1), ("presence", 1), ("frequency", 2), ("negative", 0),
                         ("all-three", 1)):
        assert want[name] != unpenalised[prompt], name
    assert want["lora-rep-1.5"] != want["lora-plain"]
    # the sampled request is drawn from the penalised logits with its own generator: the same alone
    alone = _run(_engine(model_path), [("sampled", *requests[-1][1:3], None)])
    assert got["sampled"] == alone["sampled"]


def _first_greedy_tokens(engine, prompt, n):
    return _run(engine, [("probe", prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), None)])["probe"][0]


def test_min_new_tokens_masks_eos_and_stop_token_ids_until_reached(model_path, base):
    engine = _engine(model_path)
    prompt = PROMPTS[1]
    probe = _first_greedy_tokens(engine, prompt, 8)
    stop = probe[1]  # a token the model produces early: as a stop token id, and as EOS
    engine.eos_token_ids = frozenset({stop})
    got = _run(engine, [
        ("stop-early", prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)), None),
        ("stop-min", prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,), min_new_tokens=5), None),
        ("eos-early", prompt, SamplingParams(max_new_tokens=10), None),
        ("eos-min", prompt, SamplingParams(max_new_tokens=10, min_new_tokens=5), None),
        ("eos-ignored", prompt, SamplingParams(max_new_tokens=6, min_new_tokens=3, ignore_eos=True), None),
    ])
    early = probe[:probe.index(stop) + 1]
    assert got["stop-early"] == (early, FinishReason.STOP) and got["eos-early"] == (early, FinishReason.STOP)
    assert len(early) < 5
    # transformers' MinNewTokensLengthLogitsProcessor with this EOS is the reference
    x = torch.tensor([prompt])
    with torch.no_grad():
        ref = base.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=5,
                            do_sample=False, eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
    assert stop not in ref[:5]
    reason = FinishReason.STOP if ref[-1] == stop else FinishReason.LENGTH
    assert got["stop-min"] == (ref, reason) and got["eos-min"] == (ref, reason)
    # ignore_eos: EOS ends nothing, so it is not masked either (the plain greedy tokens)
    assert got["eos-ignored"] == (probe[:6], FinishReason.LENGTH)


def test_a_batch_asking_nothing_more_never_reaches_the_penalties_or_logprobs(model_path, monkeypatch):
    """The plain path (greedy and sampled rows, no penalty, min_new_tokens or logprobs) stays as it was."""
    from quiver.engine import logprobs, runner

    def boom(*args, **kwargs):
        raise AssertionError("called on the plain path")

    monkeypatch.setattr(runner, "apply_penalties", boom)
    monkeypatch.setattr(logprobs, "record_sampled", boom)
    monkeypatch.setattr(logprobs, "record_prompt", boom)
    got = _run(_engine(model_path), [
        ("greedy", PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True), None),
        ("sampled", PROMPTS[1], SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.9, seed=1), None),
    ])
    assert all(reason is FinishReason.LENGTH for _, reason in got.values())


def test_extreme_accepted_penalties_never_make_a_row_fail(model_path):
    """A tiny repetition penalty pushes seen logits past float32's range: they are held at its edge, so the
    request goes on (it is not taken for a model whose output overflowed)."""
    engine = _engine(model_path)
    got = _run(engine, [
        (f"{p}-{t}", PROMPTS[2], SamplingParams(max_new_tokens=5, ignore_eos=True, repetition_penalty=p,
                                                 frequency_penalty=2.0, temperature=t, seed=2, logprobs=3), None)
        for p in (1e-39, 1e-300, 1e300) for t in (0.0, 0.5, 1e-40)
    ])
    assert all(len(tokens) == 5 and reason is FinishReason.LENGTH for tokens, reason in got.values()), got
