"""A request's prompt (text, token ids or chat messages) → the token ids the engine runs.

Tokenising costs time in proportion to the text (seconds for megabytes), so callers run `prompt_token_ids`
off the event loop, and the text's size is bounded before any of it is tokenised. A prompt longer than the
context is refused here too, before the engine thread would spend time checking every one of its tokens.
"""

from typing import TYPE_CHECKING

from quiver.errors import FailedPrecondition, InvalidArgument
from quiver.v1 import inference_pb2 as pb

if TYPE_CHECKING:  # transformers is not imported at run time: the CLI reads DEFAULT_MAX_PROMPT_BYTES from here
    from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_PROMPT_BYTES = 1 << 20  # twice a 128k-token context of English text (about 4 bytes a token)

_ROLES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant"}


def prompt_token_ids(
    prompt: pb.Prompt, tokenizer: "PreTrainedTokenizerBase", *, max_bytes: int, max_model_len: int
) -> list[int]:
    """Raises InvalidArgument for an empty or malformed prompt, a text (or chat messages' contents, together)
    over `max_bytes` UTF-8 bytes (checked before tokenising), or one of `max_model_len` tokens or more;
    FailedPrecondition for chat without a template."""
    ids = _token_ids(prompt, tokenizer, max_bytes=max_bytes)
    if len(ids) >= max_model_len:
        raise InvalidArgument(f"the prompt has {len(ids)} tokens; the context holds {max_model_len} (prompt + output)")
    return ids


def _token_ids(prompt: pb.Prompt, tokenizer: "PreTrainedTokenizerBase", *, max_bytes: int) -> list[int]:
    kind = prompt.WhichOneof("kind")
    if kind == "token_ids":
        return list(prompt.token_ids.ids)
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument("the prompt text is empty")
        _check_size(len(prompt.text.encode()), max_bytes=max_bytes)
        return list(tokenizer(prompt.text)["input_ids"])
    if kind == "chat":
        return _chat(prompt.chat, tokenizer, max_bytes=max_bytes)
    raise InvalidArgument("the prompt is empty: set one of text, token_ids or chat")


def _chat(chat: pb.ChatMessages, tokenizer: "PreTrainedTokenizerBase", *, max_bytes: int) -> list[int]:
    if not chat.messages:
        raise InvalidArgument("the chat prompt has no messages")
    if not tokenizer.chat_template:
        raise FailedPrecondition("this model has no chat template; send the prompt as text or token ids")
    _check_size(sum(len(m.content.encode()) for m in chat.messages), max_bytes=max_bytes)
    messages = []
    for i, m in enumerate(chat.messages):
        if m.role not in _ROLES:
            raise InvalidArgument(f"chat message {i} has no role: set system, user or assistant")
        messages.append({"role": _ROLES[m.role], "content": m.content})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def _check_size(num_bytes: int, *, max_bytes: int) -> None:
    if num_bytes > max_bytes:
        raise InvalidArgument(
            f"the prompt's text is {num_bytes:,} bytes, over the server's limit of {max_bytes:,} "
            "(--max-prompt-bytes); send a shorter prompt"
        )
