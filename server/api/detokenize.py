"""Token ids → text deltas, incrementally, never half a character, never past a stop string.

Decoding one token at a time is wrong for byte-level vocabularies (one character's UTF-8 bytes may be
split across tokens) and for SentencePiece (a token's leading space depends on the one before). So each
step decodes a short window — the tokens since the previous emission plus the ones before them for
context — and emits the new part only when it does not end in U+FFFD (an incomplete character).

With stop strings, the last `len(longest stop) - 1` characters are held back, since they may be the start
of a stop string; text is cut just before the first stop string found.
"""

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, stop_strings: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = stop_strings
        self._holdback = max((len(s) for s in stop_strings), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # e.g. 7: tokens [prefix, read) were decoded and emitted; they give context only
        self._read = 0  # e.g. 9: tokens from here on are not decoded yet
        self._text = ""  # the complete characters decoded so far
        self._emitted = 0  # characters of _text already returned
        self.stopped = False  # a stop string was found: no more text

    def push(self, token_ids: tuple[int, ...] | list[int]) -> str:
        """Add generated tokens; return the text that is now safe to send (maybe empty)."""
        self._ids += token_ids
        self._text += self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: return everything not sent yet (up to a stop string)."""
        self._text += self._decode_new(final=True)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """All text sent so far."""
        return self._text[: self._emitted]

    def _decode_new(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(context) or (window.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        start = self._emitted
        hits = [i for i in (self._text.find(s, start) for s in self._stop_strings) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        else:
            end = len(self._text) if final else max(start, len(self._text) - self._holdback)
        self._emitted = end
        return self._text[start:end]
