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
    seed: int | None = None  # per-request generator, in [0, 2^64): the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end it before this many tokens
    repetition_penalty: float = 1.0  # transformers': over prompt and output tokens, logit < 0 times it, else over it
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often a token was generated, in [-2, 2]
    logprobs: int | None = None  # None: none; 0: each sampled token's; 1..MAX_TOP_LOGPROBS: and that many alternatives
    prompt_logprobs: bool = False  # each prompt token's logprob (its alternatives as `logprobs` says)

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**64),
               f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        _check(all(isinstance(s, str) and s for s in self.stop_strings),
               f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        _check(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               f"min_new_tokens must be an integer in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_new_tokens!r}")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be a finite number > 0 (1: none), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
               f"logprobs (alternatives per token) must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


MAX_TOP_LOGPROBS = 20
MAX_SAMPLES = 16  # samples of one prompt per call (EngineService.submit_samples)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the distribution it was drawn from: log_softmax((logits after penalties)
    / T), T = 1 when greedy, before any top-k / top-p cut; in float32. Prompt tokens: raw logits (T = 1)."""

    token_id: int
    logprob: float
    rank: int  # 1: the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely tokens, most likely first


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
    stop_ids: frozenset[int] = frozenset()  # the ids that end it: EOS (unless ignore_eos), the stop token ids (min_new_tokens masks them)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, if params.logprobs
    # if params.prompt_logprobs: [None, lp(t1), ...], filled as its prompt rows are computed (in one step or over
    # several chunks), or given whole (another sample of the same prompt computed them)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    extras: bool = field(init=False)  # whether its logits need more than a plain pick (penalties, logprobs, ...)

    def __post_init__(self) -> None:
        p = self.params
        self.extras = p.penalized or p.min_new_tokens > 0 or p.logprobs is not None or p.prompt_logprobs
        if p.prompt_logprobs and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def needs_prompt_rows(self) -> bool:
        """Whether its prompt rows must go through the LM head: its prompt logprobs are not all known yet
        (it then takes no blocks from the prefix cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

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

    def token_ids(self, begin: int, end: int) -> list[int]:
        """all_token_ids[begin:end], without copying the rest (a decode step reads one token of each request)."""
        n = len(self.prompt_token_ids)
        if begin >= n:
            return self.output_token_ids[begin - n : end - n]
        if end <= n:
            return self.prompt_token_ids[begin:end]
        return self.prompt_token_ids[begin:] + self.output_token_ids[: end - n]

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
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token when params.logprobs is not None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on the first output, if asked; first entry None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
