"""Examples → token ids, the same way for training and for evaluation through the engine."""

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from quiver.errors import InvalidArgument
from quiver.trainer.data import Example

IGNORE = -100  # label of tokens the loss skips (prompt, padding)


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]  # the chat-templated prompt, ending with the assistant turn's opening
    completion: list[int]  # the answer's tokens and then end-of-sequence


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as a user turn of the chat template (when the tokenizer has one), ready for the answer."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer.encode(prompt)


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, *, max_length: int) -> Encoded:
    """Prompt and completion ids; a prompt too long for `max_length` keeps its last tokens."""
    completion = tokenizer.encode(example.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(completion) >= max_length:
        raise InvalidArgument(
            f"a completion of {len(completion)} tokens leaves no room for its prompt in max_length {max_length}: "
            f"{example.completion[:60]!r}"
        )
    prompt = encode_prompt(tokenizer, example.prompt)
    return Encoded(prompt=prompt[-(max_length - len(completion)):], completion=completion)


def collate(batch: list[Encoded], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` [B, T]; labels are IGNORE outside completions."""
    width = max(len(e.prompt) + len(e.completion) for e in batch)
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE)
    for row, e in enumerate(batch):
        n, p = len(e.prompt) + len(e.completion), len(e.prompt)
        ids[row, :n] = torch.tensor(e.prompt + e.completion)
        mask[row, :n] = 1
        labels[row, p:n] = torch.tensor(e.completion)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
