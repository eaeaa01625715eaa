"""Logprobs over gRPC against transformers: each generated token's logprob and alternatives are float32
log_softmax of the eager model's logits after transformers' repetition penalty and OpenAI's presence and
frequency penalties, divided by the temperature (1 when greedy); prompt logprobs are those of the raw logits."""

import math

import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from quiver.client import QuiverClient
from tests.support.models import eager

PROMPT = [5, 17, 99, 3, 42]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(model_path):
    return eager(model_path)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def _logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] float32: row t predicts token t + 1."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def _expected(model, prompt: list[int], output: list[int], *, temperature: float = 0.0, repetition: float = 1.0,
              presence: float = 0.0, frequency: float = 0.0) -> list[torch.Tensor]:
    """The log-distribution each output token was drawn from."""
    logits = _logits(model, prompt + output)
    rows = []
    for j in range(len(output)):
        seen = torch.tensor([prompt + output[:j]])
        row = RepetitionPenaltyLogitsProcessor(repetition)(seen, logits[len(prompt) + j - 1][None].clone())[0]
        counts = torch.bincount(torch.tensor(output[:j], dtype=torch.int64), minlength=row.shape[0]).float()
        row = row - presence * (counts > 0).float() - frequency * counts
        rows.append(torch.log_softmax(row / (temperature or 1.0), dim=-1))
    return rows


def _check(entries, rows: list[torch.Tensor], token_ids: list[int], top: int, tokenizer) -> None:
    assert len(entries) == len(rows) == len(token_ids)
    for entry, row, token in zip(entries, rows, token_ids):
        assert entry.token_id == token and entry.text == tokenizer.decode([token])
        assert math.isclose(entry.logprob, row[token].item(), abs_tol=TOLERANCE)
        assert entry.rank == 1 + int((row > row[token]).sum())
        assert len(entry.alternatives) == top
        values = [a.logprob for a in entry.alternatives]
        assert values == sorted(values, reverse=True)
        want_lp, want_ids = row.topk(top)
        assert [a.token_id for a in entry.alternatives] == want_ids.tolist()
        assert all(math.isclose(a.logprob, w, abs_tol=TOLERANCE) for a, w in zip(entry.alternatives, want_lp.tolist()))
        assert all(a.text == tokenizer.decode([a.token_id]) for a in entry.alternatives)


def test_greedy_logprobs_and_prompt_logprobs_equal_transformers(running, reference, tokenizer):
    with QuiverClient(running.target) as client:
        out = client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True, top_logprobs=5, prompt_logprobs=True)
        plain = client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True)
    assert list(out.token_ids) == list(plain.token_ids) and not plain.logprobs and not plain.prompt_logprobs
    _check(out.logprobs, _expected(reference, PROMPT, list(out.token_ids)), list(out.token_ids), 5, tokenizer)
    assert all(entry.rank == 1 for entry in out.logprobs)  # greedy picks the most likely token
    raw = torch.log_softmax(_logits(reference, PROMPT), dim=-1)
    _check(out.prompt_logprobs, [raw[t - 1] for t in range(1, len(PROMPT))], PROMPT[1:], 5, tokenizer)


def test_sampled_logprobs_are_those_after_penalties_and_temperature(running, reference, tokenizer):
    settings = {"temperature": 0.7, "repetition": 1.3, "presence": 0.5, "frequency": 0.4}
    with QuiverClient(running.target) as client:
        out = client.generate(token_ids=PROMPT, max_new_tokens=12, ignore_eos=True, seed=7, top_k=20, top_p=0.9,
                              temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
                              top_logprobs=3)
    tokens = list(out.token_ids)
    _check(out.logprobs, _expected(reference, PROMPT, tokens, **settings), tokens, 3, tokenizer)


def test_top_logprobs_zero_gives_the_token_alone_and_the_stream_agrees(running, reference, tokenizer):
    with QuiverClient(running.target) as client:
        request = client.request(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=3,
                                 top_logprobs=0)
        whole = client.generate(request)
        pieces = list(client.generate_stream(request))
    tokens = list(whole.token_ids)
    _check(whole.logprobs, _expected(reference, PROMPT, tokens, temperature=1.0), tokens, 0, tokenizer)
    assert all(len(p.logprobs) == len(p.token_ids) for p in pieces)
    assert [e for p in pieces for e in p.logprobs] == list(whole.logprobs)
