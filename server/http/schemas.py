"""The request bodies of /v1/completions and /v1/chat/completions, as OpenAI defines them, plus vLLM's extras.

Unknown fields are refused (400) rather than ignored: a field this server does not implement (echo,
best_of, logit_bias, suffix, tools, response_format, ...) would otherwise change nothing without the client
knowing. Ranges the engine checks itself (SamplingParams, the number of samples) are left to it, so that
the message is the same as over gRPC; the ranges here are OpenAI's own.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from quiver.engine.request import MAX_TOP_LOGPROBS

UINT64 = 2**64
TokenId = Annotated[int, Field(ge=0, lt=2**32)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk, with no choices, carries the usage


class SamplingFields(BaseModel):
    """What both APIs share."""

    model_config = ConfigDict(extra="forbid")

    model: str  # the base model's name (GET /v1/models) or a loaded adapter's id
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0  # OpenAI's default; 0 is greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    seed: Annotated[int, Field(ge=0, lt=UINT64)] | None = None  # sample i draws with seed + i
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; not used
    # vLLM's extras (the openai client sends them with extra_body=...)
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1: no top-k cut
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    cache_scope: str | None = None  # the gRPC request's cache_scope: a named prefix-cache scope

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions. One prompt per request: a string or token ids (a list of one of them is taken too)."""

    prompt: str | list[TokenId] | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[
        list[list[TokenId]], Field(min_length=1, max_length=1)
    ]
    max_tokens: Annotated[int, Field(ge=1)] = 16  # OpenAI's default
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # the N most likely per token


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None  # accepted for compatibility; chat templates do not show it

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. Text messages only: no tools, images or audio."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # needs logprobs: true
