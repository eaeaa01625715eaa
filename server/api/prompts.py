"""A request's prompt (text, token ids or chat messages) → the token ids the engine runs."""

from transformers import PreTrainedTokenizerBase

from server.api.gen import inference_pb2 as pb
from server.errors import FailedPrecondition, InvalidArgument

_ROLES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant"}


def prompt_token_ids(prompt: pb.Prompt, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Raises InvalidArgument for an empty or malformed prompt, FailedPrecondition for chat without a template."""
    kind = prompt.WhichOneof("kind")
    if kind == "token_ids":
        return list(prompt.token_ids.ids)
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument("the prompt text is empty")
        return list(tokenizer(prompt.text)["input_ids"])
    if kind == "chat":
        return _chat(prompt.chat, tokenizer)
    raise InvalidArgument("the prompt is empty: set one of text, token_ids or chat")


def _chat(chat: pb.ChatMessages, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if not chat.messages:
        raise InvalidArgument("the chat prompt has no messages")
    if not tokenizer.chat_template:
        raise FailedPrecondition("this model has no chat template; send the prompt as text or token ids")
    messages = []
    for i, m in enumerate(chat.messages):
        if m.role not in _ROLES:
            raise InvalidArgument(f"chat message {i} has no role: set system, user or assistant")
        messages.append({"role": _ROLES[m.role], "content": m.content})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)
