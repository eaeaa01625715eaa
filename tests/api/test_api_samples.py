"""n samples over gRPC (unary: every sample, sample 0 also at the top level; streaming: each message tagged with
its sample), seeded samples that reproduce single requests with seed + i, and responses that say which adapter
version served them, the version changing when the adapter is replaced."""

import re
import urllib.request
from collections import defaultdict

from quiver.client import QuiverClient
from quiver.v1 import inference_pb2 as pb
from tests.support.harness import pace_steps, start_server

PROMPT = [7, 8, 9, 10]


def test_unary_n_returns_every_sample_each_as_a_single_seeded_request(running):
    with QuiverClient(running.target) as client:
        out = client.generate(token_ids=PROMPT, max_new_tokens=10, ignore_eos=True, temperature=1.0, seed=11, n=3)
        singles = [client.generate(token_ids=PROMPT, max_new_tokens=10, ignore_eos=True, temperature=1.0, seed=11 + i)
                   for i in range(3)]
        again = client.generate(token_ids=PROMPT, max_new_tokens=10, ignore_eos=True, temperature=1.0, seed=11, n=3)
    assert [s.index for s in out.samples] == [0, 1, 2]
    assert [list(s.token_ids) for s in out.samples] == [list(s.token_ids) for s in singles]
    assert [s.text for s in out.samples] == [s.text for s in singles]
    assert len({tuple(s.token_ids) for s in out.samples}) > 1  # the samples differ
    assert all(s.finish_reason == pb.FINISH_REASON_LENGTH and s.usage.completion_tokens == 10 for s in out.samples)
    assert all(s.usage.prompt_tokens == len(PROMPT) for s in out.samples)
    first = out.samples[0]
    assert (list(out.token_ids), out.text, out.finish_reason, out.usage) == (
        list(first.token_ids), first.text, first.finish_reason, first.usage)
    assert [list(s.token_ids) for s in again.samples] == [list(s.token_ids) for s in out.samples]
    assert out.request_id and again.request_id != out.request_id


def test_the_seed_wraps_around_2_to_the_64(running):
    with QuiverClient(running.target) as client:
        out = client.generate(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=2**64 - 1, n=2)
        zero = client.generate(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=0)
    assert list(out.samples[1].token_ids) == list(zero.token_ids)


def test_streaming_tags_each_message_with_its_sample(running):
    with QuiverClient(running.target) as client:
        request = client.request(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=5, n=3,
                                 top_logprobs=2)
        whole = client.generate(request)
        messages = list(client.generate_stream(request))
    by_index = defaultdict(list)
    for m in messages:
        by_index[m.index].append(m)
    assert sorted(by_index) == [0, 1, 2] and len({m.request_id for m in messages}) == 1
    for sample in whole.samples:
        pieces = by_index[sample.index]
        assert [t for p in pieces for t in p.token_ids] == list(sample.token_ids)
        assert "".join(p.text for p in pieces) == sample.text
        assert [e for p in pieces for e in p.logprobs] == list(sample.logprobs)
        assert [p.finish_reason for p in pieces] == [pb.FINISH_REASON_UNSPECIFIED] * (len(pieces) - 1) + [
            pb.FINISH_REASON_LENGTH]
        assert pieces[-1].usage == sample.usage


def test_greedy_samples_are_equal_and_n_1_has_no_samples_list(running):
    with QuiverClient(running.target) as client:
        out = client.generate(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True, n=2)
        one = client.generate(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True, n=1)
    assert list(out.samples[0].token_ids) == list(out.samples[1].token_ids) == list(one.token_ids)
    assert not one.samples


def test_responses_say_which_adapter_version_served_them(model_path, tmp_path, zoo):
    running = start_server(model_path, tmp_path)
    try:
        with QuiverClient(running.target) as client:
            base = client.generate(token_ids=PROMPT, max_new_tokens=3)
            assert (base.adapter_id, base.adapter_version) == ("", 0)
            client.upload_adapter("tuned", zoo["lora"])
            first = client.generate(token_ids=PROMPT, max_new_tokens=3, adapter_id="tuned")
            streamed = list(client.generate_stream(token_ids=PROMPT, max_new_tokens=3, adapter_id="tuned"))
            assert first.adapter_id == "tuned" and first.adapter_version > 0
            assert {(m.adapter_id, m.adapter_version) for m in streamed} == {("tuned", first.adapter_version)}
            client.upload_adapter("tuned", zoo["lora"], replace=True)
            second = client.generate(token_ids=PROMPT, max_new_tokens=3, adapter_id="tuned")
            assert second.adapter_id == "tuned" and second.adapter_version > first.adapter_version
            other = client.generate(token_ids=PROMPT, max_new_tokens=3, n=2)
            assert (other.adapter_id, other.adapter_version) == ("", 0)
    finally:
        running.stop()


def test_cancelling_a_stream_of_samples_aborts_every_sample(running, monkeypatch):
    pace_steps(monkeypatch, running.service)
    with QuiverClient(running.target) as client:
        stream = client.generate_stream(token_ids=PROMPT, max_new_tokens=400, ignore_eos=True, temperature=1.0, n=3)
        seen = set()
        for message in stream:
            seen.add(message.index)
            if len(seen) == 3:
                stream.cancel()
                break
    running.wait_idle()


def _scraped(running, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def test_prometheus_shows_the_prompt_computed_once_for_n_samples(running):
    """A 43-token prompt, n = 4: 43 prompt tokens for sample 0, and for each other sample only its last partial
    block (the full blocks come from the prefix cache; its last token is always computed, for its logits)."""
    prompt = [(7 * i) % 150 + 3 for i in range(43)]
    with QuiverClient(running.target) as client:
        block = client.server_info().limits.kv_block_size
        before = _scraped(running, "quiver_prompt_tokens_computed_total")
        client.generate(token_ids=prompt, max_new_tokens=3, ignore_eos=True, temperature=1.0, seed=5, n=4)
        computed = _scraped(running, "quiver_prompt_tokens_computed_total") - before
    tail = 43 - block * ((43 - 1) // block)
    assert 0 < tail < 43 and computed == 43 + 3 * tail
