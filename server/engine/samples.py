"""n samples of one prompt: their ids and seeds, and the engine's hold on samples 1..n-1.

The prompt's KV is computed once: sample 0 is queued at once, the others are held until its prompt is
computed (its prefill done, its full blocks registered in the prefix cache), then queued, so that each takes
those blocks from the cache and computes only the rest: its last block's tokens (a whole block when the
prompt is a whole number of blocks, because a request's last prompt token is always computed: its row gives
the first output token). If sample 0 ends first (an abort, an error), the others are queued anyway; ending
one of them while held just drops it. Sample 0's prompt logprobs, when complete, are given to the others,
which then need not compute their prompt rows and may use the cache.
"""

from dataclasses import replace

from quiver.engine.request import MAX_SAMPLES, Request, SamplingParams
from quiver.errors import InvalidArgument


def sample_ids(request_id: str, n: int) -> list[str]:
    """The request ids of the n samples of a call: `request_id` itself when n == 1, else "{request_id}.{i}".
    Raises InvalidArgument unless 1 <= n <= MAX_SAMPLES."""
    if not (isinstance(n, int) and 1 <= n <= MAX_SAMPLES):
        raise InvalidArgument(f"n (samples of the prompt) must be an integer in [1, {MAX_SAMPLES}], got {n!r}")
    return [request_id] if n == 1 else [f"{request_id}.{i}" for i in range(n)]


def sample_params(params: SamplingParams, i: int) -> SamplingParams:
    """Sample i's parameters: seed (seed + i) mod 2^64 when a seed is given, the rest unchanged."""
    if params.seed is None or i == 0:
        return params
    return replace(params, seed=(params.seed + i) % 2**64)


class HeldSamples:
    """Samples 1..n-1 of each call, held until sample 0's prompt is computed (engine thread only)."""

    def __init__(self) -> None:
        self._groups: list[tuple[Request, list[Request]]] = []  # (sample 0, the samples held for it)

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __len__(self) -> int:
        return sum(len(rest) for _, rest in self._groups)

    def hold(self, first: Request, rest: list[Request]) -> None:
        self._groups.append((first, list(rest)))

    def discard(self, request: Request) -> bool:
        """Drop `request` if it is held (it ends before it was queued); whether it was."""
        if not self._groups:
            return False
        for _, rest in self._groups:
            if request in rest:
                rest.remove(request)
                return True
        return False

    def ready(self) -> list[Request]:
        """The held samples to queue now, in order: those whose sample 0 computed its prompt or ended."""
        out: list[Request] = []
        keep = []
        for first, rest in self._groups:
            if not (first.finished or first.num_computed_tokens >= len(first.prompt_token_ids)):
                keep.append((first, rest))
                continue
            if first.prompt_logprobs is not None and not first.needs_prompt_rows:
                for request in rest:
                    request.prompt_logprobs = list(first.prompt_logprobs)
            out += rest
        self._groups = keep
        return out
