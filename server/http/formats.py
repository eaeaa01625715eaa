"""Generation pieces (quiver.api.generation.Piece) → OpenAI's response bodies and stream chunks.

`Format.add(piece)` gathers a whole response (`response()`); `Format.chunk(piece)` turns one piece into a
stream chunk (None when it carries nothing to send). Each sample is a choice, its `index` the sample's.
Logprobs, in each API's shape:

    completions   {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [{text: lp}], "text_offset": [int]}
                  top_logprobs: the N most likely tokens and the sampled one (up to N + 1 entries, as OpenAI's)
    chat          {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
                  top_logprobs: the N most likely tokens

A token's text is the token decoded alone (quiver.api.generation.token_text). JSON has no -inf, so a logprob
below LOGPROB_FLOOR (a token the penalties or min_tokens excluded) is sent as LOGPROB_FLOOR, as vLLM does.
"""

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from quiver.api.generation import Finish, Piece
from quiver.engine.request import TokenLogprob

LOGPROB_FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # the API's per-token entries
    offset: int = 0  # completions' text_offset of the next token
    finish: Finish | None = None
    started: bool = False  # a chunk of it was sent (chat sends the role in the first)


class Format(abc.ABC):
    """What the two APIs share; subclasses say how a choice and its logprobs look."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, *, model: str, token_text: Callable[[int], str], logprobs: bool) -> None:
        self.model = model
        self.created = int(time.time())
        self._token_text = token_text
        self._logprobs = logprobs
        self._choices: dict[int, _Choice] = {}
        self.request_id = ""  # the call's, from its pieces
        self.adapter: tuple[str, int] | None = None  # the (adapter id, version) that served it; None: the base model

    def add(self, piece: Piece) -> None:
        choice = self._choice_of(piece)
        choice.text.append(piece.text)
        choice.logprobs += self._entries(choice, piece.logprobs)
        choice.finish = piece.finish

    def response(self) -> dict:
        choices = [self._whole_choice(i, c) for i, c in sorted(self._choices.items())]
        return self._envelope(self.object_name, choices, usage=self.usage())

    def chunk(self, piece: Piece) -> dict | None:
        choice = self._choice_of(piece)
        entries = self._entries(choice, piece.logprobs)
        choice.finish = piece.finish
        if not (piece.text or entries or piece.finish or not choice.started):
            return None
        delta = self._delta_choice(piece.index, piece.text, entries, piece.finish, first=not choice.started)
        choice.started = True
        return self._envelope(self.chunk_object_name, [delta])

    def usage_chunk(self) -> dict:
        """The last chunk of a stream whose stream_options.include_usage is set."""
        return self._envelope(self.chunk_object_name, [], usage=self.usage())

    def usage(self) -> dict:
        finishes = [c.finish for c in self._choices.values() if c.finish is not None]
        prompt = finishes[0].prompt_tokens if finishes else 0
        completion = sum(f.completion_tokens for f in finishes)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice_of(self, piece: Piece) -> _Choice:
        self.request_id, self.adapter = piece.request_id, piece.adapter
        return self._choices.setdefault(piece.index, _Choice())

    def _entries(self, choice: _Choice, logprobs: tuple[TokenLogprob, ...]) -> list:
        return [self._entry(choice, lp) for lp in logprobs] if self._logprobs else []

    def _envelope(self, object_name: str, choices: list[dict], **extra) -> dict:
        return {"id": self.request_id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    @abc.abstractmethod
    def _entry(self, choice: _Choice, logprob: TokenLogprob):
        """One token's logprobs, in the API's shape."""

    @abc.abstractmethod
    def _whole_choice(self, index: int, choice: _Choice) -> dict:
        """A choice of the whole response."""

    @abc.abstractmethod
    def _delta_choice(self, index: int, text: str, entries: list, finish: Finish | None, *, first: bool) -> dict:
        """A choice of a stream chunk."""


def _reason(finish: Finish | None) -> str | None:
    return finish.reason.value if finish is not None else None


class CompletionFormat(Format):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _entry(self, choice: _Choice, logprob: TokenLogprob) -> tuple[str, float, dict[str, float], int]:
        text = self._token_text(logprob.token_id)
        top = {self._token_text(token_id): _lp(lp) for token_id, lp in logprob.top}
        top.setdefault(text, _lp(logprob.logprob))
        offset, choice.offset = choice.offset, choice.offset + len(text)
        return text, _lp(logprob.logprob), top, offset

    def _logprobs_object(self, entries: list) -> dict | None:
        if not self._logprobs:
            return None
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}

    def _whole_choice(self, index: int, choice: _Choice) -> dict:
        return {"index": index, "text": "".join(choice.text), "logprobs": self._logprobs_object(choice.logprobs),
                "finish_reason": _reason(choice.finish)}

    def _delta_choice(self, index: int, text: str, entries: list, finish: Finish | None, *, first: bool) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs_object(entries), "finish_reason": _reason(finish)}


class ChatFormat(Format):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self._token_text(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode())}

    def _entry(self, choice: _Choice, logprob: TokenLogprob) -> dict:
        return {**self._token(logprob.token_id, logprob.logprob),
                "top_logprobs": [self._token(token_id, lp) for token_id, lp in logprob.top]}

    def _logprobs_object(self, entries: list) -> dict | None:
        return {"content": entries} if self._logprobs else None

    def _whole_choice(self, index: int, choice: _Choice) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": self._logprobs_object(choice.logprobs), "finish_reason": _reason(choice.finish)}

    def _delta_choice(self, index: int, text: str, entries: list, finish: Finish | None, *, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": self._logprobs_object(entries), "finish_reason": _reason(finish)}
