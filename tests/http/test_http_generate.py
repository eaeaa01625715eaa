"""The OpenAI-compatible endpoint, driven by the official `openai` client: completions, chat completions,
streaming, logprobs, n samples, adapters as models, /v1/models; every output equal to the gRPC API's for the
same request (greedy and seeded sampling)."""

import pytest

from quiver.client import QuiverClient
from quiver.v1 import inference_pb2 as pb

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
GREEDY = {"temperature": 0.0}
# seeded sampling with every knob: values exact in float32, as gRPC carries them
SEEDED = {"temperature": 0.75, "top_p": 0.875, "seed": 1234, "presence_penalty": 0.5, "frequency_penalty": 0.25}
SEEDED_EXTRA = {"top_k": 40, "repetition_penalty": 1.25}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 世界"}]


@pytest.fixture(scope="module")
def grpc_client(served):
    with QuiverClient(served.target) as client:
        yield client


@pytest.fixture(scope="module")
def base(grpc_client):
    return grpc_client.server_info().model.name


def _grpc(client: QuiverClient, *, prompt: str | list[dict], sampling: dict, extra: dict, max_tokens: int,
          adapter_id: str = "", n: int = 0, top_logprobs: int | None = None) -> pb.GenerateResponse:
    request = client.request(text=prompt if isinstance(prompt, str) else None, chat="" if isinstance(prompt, list) else None,
                             adapter_id=adapter_id, max_new_tokens=max_tokens, ignore_eos=True, n=n,
                             top_logprobs=top_logprobs, **sampling, **extra)
    if isinstance(prompt, list):
        roles = {"system": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER}
        del request.prompt.chat.messages[:]
        request.prompt.chat.messages.extend(pb.ChatMessage(role=roles[m["role"]], content=m["content"]) for m in prompt)
    return client.generate(request)


def _samples(response: pb.GenerateResponse) -> list:
    return list(response.samples) or [response]


@pytest.mark.parametrize("sampling,extra", [(GREEDY, {}), (SEEDED, SEEDED_EXTRA)], ids=["greedy", "seeded"])
def test_completions_equal_grpc(oai, grpc_client, base, sampling, extra):
    http = oai.completions.create(model=base, prompt="hello world", max_tokens=12, logprobs=3,
                                  extra_body={"ignore_eos": True, **extra}, **sampling)
    want = _grpc(grpc_client, prompt="hello world", sampling=sampling, extra=extra, max_tokens=12, top_logprobs=3)
    (choice,) = http.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, want.text, FINISH[want.finish_reason])
    assert (http.usage.prompt_tokens, http.usage.completion_tokens) == (want.usage.prompt_tokens, 12)
    assert http.usage.total_tokens == want.usage.prompt_tokens + 12
    assert http.model == base and http.object == "text_completion" and http.id.startswith("req-")
    lp = choice.logprobs
    assert lp.tokens == [t.text for t in want.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], rel=1e-6)
    for top, token in zip(lp.top_logprobs, want.logprobs):
        alternatives = {a.text: a.logprob for a in token.alternatives}
        alternatives.setdefault(token.text, token.logprob)
        assert top == pytest.approx(alternatives, rel=1e-6)
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets


@pytest.mark.parametrize("sampling,extra", [(GREEDY, {}), (SEEDED, SEEDED_EXTRA)], ids=["greedy", "seeded"])
def test_chat_completions_equal_grpc(oai, grpc_client, base, sampling, extra):
    http = oai.chat.completions.create(model=base, messages=CHAT, max_tokens=10, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True, **extra}, **sampling)
    want = _grpc(grpc_client, prompt=CHAT, sampling=sampling, extra=extra, max_tokens=10, top_logprobs=2)
    (choice,) = http.choices
    assert (choice.message.role, choice.message.content) == ("assistant", want.text)
    assert choice.finish_reason == FINISH[want.finish_reason] and http.object == "chat.completion"
    assert (http.usage.prompt_tokens, http.usage.completion_tokens) == (want.usage.prompt_tokens, 10)
    content = choice.logprobs.content
    assert [(c.token, c.bytes) for c in content] == [(t.text, list(t.text.encode())) for t in want.logprobs]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in want.logprobs], rel=1e-6)
    for entry, token in zip(content, want.logprobs):
        assert [a.token for a in entry.top_logprobs] == [a.text for a in token.alternatives]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([a.logprob for a in token.alternatives], rel=1e-6)


def test_n_seeded_samples_equal_grpc(oai, grpc_client, base):
    http = oai.completions.create(model=base, prompt="hello world", max_tokens=8, n=3, extra_body={"ignore_eos": True},
                                  **SEEDED)
    want = _samples(_grpc(grpc_client, prompt="hello world", sampling=SEEDED, extra={}, max_tokens=8, n=3))
    assert [c.index for c in http.choices] == [0, 1, 2]
    assert [c.text for c in http.choices] == [s.text for s in want]
    assert http.usage.completion_tokens == 3 * 8 and http.usage.prompt_tokens == want[0].usage.prompt_tokens


def test_streams_equal_the_whole_responses(oai, base):
    kwargs = {"model": base, "prompt": "hello world", "max_tokens": 12, "logprobs": 2, "temperature": 0.0,
              "extra_body": {"ignore_eos": True}}
    whole = oai.completions.create(**kwargs).choices[0]
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    parts = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in parts) == whole.text
    assert [t for c in parts for t in c.choices[0].logprobs.tokens] == whole.logprobs.tokens
    assert [o for c in parts for o in c.choices[0].logprobs.text_offset] == whole.logprobs.text_offset
    assert [c.choices[0].finish_reason for c in parts] == [None] * (len(parts) - 1) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1

    chat = {"model": base, "messages": CHAT, "max_tokens": 10, "temperature": 0.0, "logprobs": True,
            "extra_body": {"ignore_eos": True}}
    whole = oai.chat.completions.create(**chat).choices[0]
    chunks = list(oai.chat.completions.create(stream=True, **chat))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert [t.token for c in chunks for t in c.choices[0].logprobs.content] == [t.token for t in whole.logprobs.content]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_stop_strings_cut_the_text_as_grpc(oai, grpc_client, base):
    full = oai.completions.create(model=base, prompt="hello world", max_tokens=30, temperature=0.0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1) if "\ufffd" not in full[i:i + 2]
                and full[i:i + 2] not in full[:i + 1])
    cut = oai.completions.create(model=base, prompt="hello world", max_tokens=30, temperature=0.0, stop=[stop],
                                 extra_body={"ignore_eos": True}).choices[0]
    want = grpc_client.generate(text="hello world", max_new_tokens=30, ignore_eos=True, stop=(stop,))
    assert (cut.text, cut.finish_reason) == (want.text, "stop") and stop not in cut.text


def test_an_uploaded_adapter_is_a_model(served, oai, grpc_client, base, zoo):
    with QuiverClient(served.target) as admin:
        admin.upload_adapter("http-lora", zoo["lora"], replace=True)
    ids = [m.id for m in oai.models.list().data]
    assert ids[0] == base and "http-lora" in ids
    raw = oai.chat.completions.with_raw_response.create(model="http-lora", messages=CHAT, max_tokens=8, temperature=0.0,
                                                        extra_body={"ignore_eos": True})
    http = raw.parse()
    want = _grpc(grpc_client, prompt=CHAT, sampling=GREEDY, extra={}, max_tokens=8, adapter_id="http-lora")
    assert http.choices[0].message.content == want.text and http.model == "http-lora"
    assert raw.headers["x-quiver-adapter"] == want.adapter_id == "http-lora"
    assert raw.headers["x-quiver-adapter-version"] == str(want.adapter_version) != "0"
    assert raw.headers["x-request-id"] == http.id and http.id.startswith("req-")

    base_raw = oai.chat.completions.with_raw_response.create(model=base, messages=CHAT, max_tokens=8, temperature=0.0)
    assert base_raw.headers["x-quiver-adapter-version"] == "0" and "x-quiver-adapter" not in base_raw.headers
