"""An OpenAI request body → the generation core's `GenerationInput` (quiver.api.generation).

The prompt becomes the same `quiver.v1.Prompt` a gRPC client would send (text or token ids for completions,
chat messages for chat completions), and the sampling fields the engine's `SamplingParams`, so that a request
gives the same tokens over HTTP as over gRPC. Field by field:

    max_tokens (chat: max_completion_tokens, else max_tokens, else 256)   max_new_tokens
    temperature, top_p, seed, presence_penalty, frequency_penalty        the same names
    stop (a string or a list)                                             stop_strings
    logprobs: N (completions); logprobs: true + top_logprobs: N (chat)    logprobs = N (0 without top_logprobs)
    top_k (0 or -1: none), repetition_penalty, min_tokens                 top_k, repetition_penalty, min_new_tokens
    stop_token_ids, ignore_eos                                            the same names
    n                                                                     samples (sample i seeded seed + i)
"""

from quiver.api.convert import DEFAULT_MAX_NEW_TOKENS
from quiver.api.generation import GenerationInput
from quiver.engine.request import SamplingParams
from quiver.errors import InvalidArgument
from quiver.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from quiver.v1 import inference_pb2 as pb

_ROLES = {
    "system": pb.CHAT_ROLE_SYSTEM,
    "developer": pb.CHAT_ROLE_SYSTEM,
    "user": pb.CHAT_ROLE_USER,
    "assistant": pb.CHAT_ROLE_ASSISTANT,
}


def completion_input(body: CompletionRequest, *, cache_salt: str | None) -> GenerationInput:
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], (str, list)) else body.prompt
    message = pb.Prompt(text=prompt) if isinstance(prompt, str) else pb.Prompt(token_ids=pb.TokenIds(ids=prompt))
    params = _params(body, max_new_tokens=body.max_tokens, logprobs=body.logprobs)
    return GenerationInput(prompt=message, params=params, n=body.n, cache_salt=cache_salt)


def chat_input(body: ChatCompletionRequest, *, cache_salt: str | None) -> GenerationInput:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs: true")
    messages = [pb.ChatMessage(role=_ROLES[m.role], content=m.text) for m in body.messages]
    max_new_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_NEW_TOKENS
    params = _params(body, max_new_tokens=max_new_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    return GenerationInput(prompt=pb.Prompt(chat=pb.ChatMessages(messages=messages)), params=params, n=body.n,
                           cache_salt=cache_salt)


def _params(body: SamplingFields, *, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
    """InvalidArgument (from SamplingParams) for values the engine refuses."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature,
        top_k=max(body.top_k, 0),
        top_p=body.top_p,
        seed=body.seed,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        stop_strings=body.stop_strings,
        ignore_eos=body.ignore_eos,
        min_new_tokens=body.min_tokens,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
    )
