"""The access log: one line per finished generation call, at INFO on the logger "quiver.access".

A line is space-separated key=value pairs, always these keys, in this order:

    request_id=req-7 adapter=lora adapter_version=3 n=1 prompt_tokens=12 output_tokens=40 finish=length
    status=OK ttft_ms=18.2 total_ms=401.7

- request_id: the id the response carries (GenerateResponse.request_id); "-" if the call ended before the
  engine took it (a malformed request, a full queue).
- adapter, adapter_version: the adapter version that served it; "-" and 0 for the base model. A call refused
  before its adapter was pinned shows the adapter id it asked for if that id is a valid name ("-" otherwise)
  and version 0.
- n: the samples asked for (1 if the request was refused before that was known).
- prompt_tokens: the prompt's tokens once tokenised (0 if it never was); output_tokens: tokens generated,
  all samples together.
- finish: each sample's finish reason ("stop" or "length"), comma-separated in sample order, "-" for a sample
  that did not finish (the call was cancelled or failed first).
- status: the call's gRPC status name (OK, CANCELLED, DEADLINE_EXCEEDED, INVALID_ARGUMENT, ...).
- ttft_ms: milliseconds from the call's admission to its first generated token, "-" if none came;
  total_ms: milliseconds from admission to the end of the call.

No value holds a space or a client's free text: the prompt, its tokens and the generated text are never
logged (ids are validated names, the rest numbers and fixed words).
"""

import logging

from quiver.engine.request import FinishReason
from quiver.metrics import RequestTimer

log = logging.getLogger("quiver.access")


class AccessRecord:
    """What one call's access line reports, filled in as the call goes; `emit` writes the line once, with the
    times and token count of the call's metrics timer."""

    def __init__(self) -> None:
        self.request_id = "-"
        self.adapter: tuple[str, int] | None = None  # (id, version) pinned, or (asked-for id, 0) before that
        self.n = 1
        self.prompt_tokens = 0
        self.finish: list[FinishReason | None] = [None]  # one per sample

    def started(self, *, request_id: str, n: int, prompt_tokens: int, adapter: tuple[str, int] | None) -> None:
        """The engine took the call's `n` samples."""
        self.request_id = request_id
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.adapter = adapter
        self.finish = [None] * n

    def finished(self, index: int, reason: FinishReason) -> None:
        self.finish[index] = reason

    def emit(self, status: str, timer: RequestTimer) -> None:
        total_ms = timer.elapsed() * 1e3
        first = timer.first_token_seconds
        ttft = f"{first * 1e3:.1f}" if first is not None else "-"
        adapter_id, version = self.adapter if self.adapter is not None else ("-", 0)
        finish = ",".join(r.value if r is not None else "-" for r in self.finish)
        log.info(
            "request_id=%s adapter=%s adapter_version=%d n=%d prompt_tokens=%d output_tokens=%d finish=%s status=%s "
            "ttft_ms=%s total_ms=%.1f",
            self.request_id, adapter_id, version, self.n, self.prompt_tokens, timer.num_tokens, finish, status, ttft,
            total_ms,
        )
