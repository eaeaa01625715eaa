"""A request's parameters, state and outputs."""

import enum
import math
from dataclasses import dataclass, field

from quiver.adapters.placement import AdapterVersion
from quiver.errors import InvalidArgument


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens, or the model's context length
    ABORT = "abort"  # cancelled by the client or a deadline, or ended by an error (RequestOutput.error)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    `temperature == 0` is greedy (argmax). A temperature T > 0 draws from softmax((logits - max) / T),
    computed in float32 with T held within float32's normal range: the most likely token's logit becomes
    0 and the others' become negative. A T so small that those differences overflow (e.g. 1e-40) is
    therefore greedy in effect: every token less likely than the top one gets probability 0 (tokens tied
    with it exactly are drawn among uniformly). No temperature accepted here can make sampling fail.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None  # per-request generator: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        _check(all(isinstance(s, str) and s for s in self.stop_strings),
               f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


@dataclass(eq=False)
class Request:
    """One generation. The engine owns it; only the engine thread mutates it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterVersion | None = None  # the adapter version it pinned (and its placement); None: the base model
    arrival: int = 0  # order of arrival, for the scheduler's first-come-first-served policy
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # real tokens whose K/V are in this request's blocks
    block_table: list[int] = field(default_factory=list)  # e.g. [4, 9, 2]: KV blocks in order, prefix first
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its first full blocks of tokens
    cache_salt: str | None = None  # prefix-cache scope: blocks are shared only between requests with equal salts
    num_preemptions: int = 0
    skipped_steps: int = 0  # scheduling steps it waited because its adapter could not be placed (see Scheduler)

    @property
    def kv_adapter(self) -> tuple[str, int] | None:
        """The adapter (id, version) its KV depends on; None: the base model."""
        return (self.adapter.adapter_id, self.adapter.version) if self.adapter is not None else None

    @property
    def prefix_len(self) -> int:
        """KV entries before the first real token (an adapter's virtual tokens); its position too."""
        return self.adapter.weights_tokens if self.adapter is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request: its new tokens (usually one) and, last, why it ended.

    `error` is set on the last output of a request that a failure of its own ended (finish reason ABORT):
    a QuiverError saying what went wrong (e.g. FailedPrecondition for an adapter whose output was not
    finite), or, for a bug, the exception itself (reported as INTERNAL). Other requests are not affected.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
