"""Generate and GenerateStream over a real server: prompt forms, streaming text, stop strings, the
incremental detokenizer, cancellation and deadlines freeing KV blocks."""

import grpc
import pytest
from transformers import AutoTokenizer

from quiver.api.detokenize import TextStream
from quiver.client import QuiverClient
from tests.support.harness import pace_steps
from quiver.v1 import inference_pb2 as pb


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def test_stream_and_unary_agree_for_every_prompt_form(running, tokenizer):
    prompts = {
        "text": {"text": "héllo 世界"},
        "token_ids": {"token_ids": [5, 17, 99, 3]},
        "chat": {"chat": "hi there"},
    }
    with QuiverClient(running.target) as client:
        for form, prompt in prompts.items():
            request = client.request(**prompt, max_new_tokens=12, ignore_eos=True)
            whole = client.generate(request)
            pieces = list(client.generate_stream(request))
            assert [t for p in pieces for t in p.token_ids] == list(whole.token_ids), form
            assert "".join(p.text for p in pieces) == whole.text == tokenizer.decode(whole.token_ids, skip_special_tokens=True)
            assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not p.HasField("usage") for p in pieces[:-1])
            assert pieces[-1].finish_reason == whole.finish_reason == pb.FINISH_REASON_LENGTH
            assert len({p.request_id for p in pieces}) == 1 and pieces[0].request_id
            want_prompt = {
                "text": len(tokenizer("héllo 世界")["input_ids"]),
                "token_ids": 4,
                "chat": len(tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                                          tokenize=True, return_dict=False)),
            }[form]
            assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (want_prompt, 12)


def test_stop_strings_cut_the_text_and_end_the_generation(running):
    with QuiverClient(running.target) as client:
        full = client.generate(client.request(token_ids=[7, 8, 9], max_new_tokens=40, ignore_eos=True))
        text = full.text
        start = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2] and text[i:i + 2] not in text[:i + 1])
        stop = text[start:start + 2]
        request = client.request(token_ids=[7, 8, 9], max_new_tokens=40, ignore_eos=True, stop=(stop,))
        cut = client.generate(request)
        pieces = list(client.generate_stream(request))
    assert cut.text == text[:start] and cut.finish_reason == pb.FINISH_REASON_STOP
    assert "".join(p.text for p in pieces) == text[:start]
    assert len(cut.token_ids) < 40 and list(cut.token_ids) == list(full.token_ids[: len(cut.token_ids)])


def test_detokenizer_never_emits_half_a_character_nor_a_stop_string(tokenizer):
    ids = tokenizer("héllo 世界!")["input_ids"]
    stream = TextStream(tokenizer)
    deltas = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(deltas) == "héllo 世界!" and not any("\ufffd" in d for d in deltas)
    assert deltas[1] == ""  # the first byte of "é" alone is held back

    stream = TextStream(tokenizer, stop_strings=("lo 世",))
    deltas = [stream.push([i]) for i in ids]
    assert stream.stopped and "".join(deltas) + stream.finish() == "hél" and stream.text == "hél"


def test_cancelling_a_stream_aborts_the_request_and_frees_its_blocks(running, monkeypatch):
    pace_steps(monkeypatch, running.service)
    with QuiverClient(running.target) as client:
        stream = client.generate_stream(client.request(token_ids=[3, 4], max_new_tokens=400, ignore_eos=True))
        for i, _ in enumerate(stream):
            if i == 3:
                assert running.service.engine.blocks.num_used > 0
                stream.cancel()
                break
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    running.wait_idle()


def test_a_deadline_ends_the_call_and_aborts_the_request(running, monkeypatch):
    pace_steps(monkeypatch, running.service)  # 480 tokens take >= 2.4 s: the 0.3 s deadline passes first
    with QuiverClient(running.target, timeout=0.3) as client:
        for call in (client.generate, lambda r: list(client.generate_stream(r))):
            with pytest.raises(grpc.RpcError) as e:
                call(client.request(token_ids=[3, 4], max_new_tokens=480, ignore_eos=True))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            running.wait_idle()


def test_min_new_tokens_keeps_a_stop_token_from_ending_the_generation_early(running):
    with QuiverClient(running.target) as client:
        free = client.generate(token_ids=[7, 8, 9], max_new_tokens=8, ignore_eos=True)
        stop = free.token_ids[0]
        early = client.generate(token_ids=[7, 8, 9], max_new_tokens=8, ignore_eos=True, stop_token_ids=[stop])
        held = client.generate(token_ids=[7, 8, 9], max_new_tokens=8, ignore_eos=True, stop_token_ids=[stop],
                               min_new_tokens=4)
    assert list(early.token_ids) == [stop] and early.finish_reason == pb.FINISH_REASON_STOP
    assert len(held.token_ids) >= 4 and stop not in held.token_ids[:4]
