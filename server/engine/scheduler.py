"""Continuous batching with chunked prefill and preemption by recomputation. Pure Python.

Each step gets a token budget. Running requests come first, in arrival order: a decoding request takes
one token, a request still in its prompt takes the next chunk that fits. Then waiting requests are
admitted while budget, sequence slots and KV blocks last. When a running request cannot get a block,
the latest-arrived running request is preempted: its blocks are freed and it goes back to the front of
the queue, to be recomputed from its prompt and the tokens it already produced. Nothing is dropped.

Admission keeps arrival order but does not let one request hold up the others: a waiting request whose
adapter cannot be placed now (every slot held by running requests) is passed over, and the ones behind it
that can run are admitted. So that it is not starved, once it has been passed over in more than
`max_skipped_steps` steps it becomes a barrier: nothing behind it is admitted until it is placed (the
running requests finish and give their adapters' room back). Lack of KV blocks, which every request
needs, stops admission at once.

Prefix caching: a request admitted (or readmitted) shares the cached blocks its tokens begin with and
computes only the rest; after each step the full blocks a request completed are registered for others.
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from quiver.engine.block_manager import BlockManager, block_key, root_key
from quiver.engine.request import Request, Status


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int  # new tokens to run this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so its last row yields the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


def _always(request: Request) -> bool:
    return True


def _nothing(request: Request) -> None:
    return None


def _never() -> bool:
    return False


class Scheduler:
    """`place(request)` is asked before a request starts (or restarts) running, to reserve its adapter's room
    on the device (bookkeeping only: the runner writes the adapter before the forward); it may say no (no
    room now), and requests with the same `kv_adapter` get the same answer within a step. If it raises, that
    request alone fails: it leaves the scheduler and goes with its error to `take_failed()`. `unplace(request)`
    is called when it stops running. `reclaim()` is asked to free KV blocks held by idle adapters (their
    shared prefixes) before anything is preempted or left waiting for lack of blocks; it says whether it
    freed any. `prefix_caching` turns on sharing of cached full blocks between requests whose tokens begin
    the same way (and have the same cache salt)."""

    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        place: Callable[[Request], bool] = _always,
        unplace: Callable[[Request], None] = _nothing,
        reclaim: Callable[[], bool] = _never,
        prefix_caching: bool = True,
        max_skipped_steps: int = 32,
    ) -> None:
        self.blocks = blocks
        self.place = place
        self.unplace = unplace
        self.reclaim = reclaim
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_caching = prefix_caching
        self.max_skipped_steps = max_skipped_steps
        self.waiting: deque[Request] = deque()
        self.failed: list[tuple[Request, Exception]] = []  # requests whose placement raised, for the engine to end
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies to do before the next forward
        self.prefix_cache_queried_tokens = 0  # known tokens of requests admitted through the prefix cache
        self.prefix_cache_hit_tokens = 0  # of those, tokens whose KV was found there instead of computed
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (again, after a preemption)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.grow(request.block_table, request.prefix_len + request.num_computed_tokens + n):
                if self.reclaim():
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
            else:
                chunks.append(ScheduledChunk(request, n))
                budget -= n
                i += 1
                continue
            break  # `request` itself was preempted: it was the last running one
        passed: list[Request] = []  # passed over this step: put back at the front of the queue, in order
        try:
            self._admit(chunks, budget, passed)
        finally:
            self.waiting.extendleft(reversed(passed))
        return chunks

    def _admit(self, chunks: list[ScheduledChunk], budget: int, passed: list[Request]) -> None:
        """Start waiting requests, in order, while budget, sequence slots and blocks last (see the module
        docstring); append their first chunks to `chunks`, and the requests passed over to `passed`."""
        unplaceable: set[tuple[str, int] | None] = set()  # kv_adapter of the requests place() said no to
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.popleft()
            if request.kv_adapter in unplaceable:
                placed = False
            else:
                try:
                    placed = self.place(request)
                except Exception as error:  # noqa: BLE001 -- its own failure (e.g. its adapter cannot be read): it alone ends
                    request.status = Status.FINISHED  # out of the queue; a waiting request holds no blocks
                    self.failed.append((request, error))
                    continue
            if not placed:
                unplaceable.add(request.kv_adapter)
                request.skipped_steps += 1
                passed.append(request)
                if request.skipped_steps > self.max_skipped_steps:
                    return  # a barrier: nothing behind it starts before it
                continue
            n = self._take_blocks(request, budget)
            if n is None:
                self.unplace(request)
                self.waiting.appendleft(request)
                return
            request.skipped_steps = 0
            request.status = Status.RUNNING
            self.running.append(request)
            chunks.append(ScheduledChunk(request, n))
            budget -= n

    def _take_blocks(self, request: Request, budget: int) -> int | None:
        """Give a request about to start its prefix, the cached blocks its tokens begin with, and room for a
        first chunk of at most `budget` tokens: that chunk's size. All or nothing: None when blocks are short."""
        while True:
            if self._link_prefix(request):
                self._share_cached(request)
                n = min(request.num_tokens - request.num_computed_tokens, budget)
                if self.blocks.grow(request.block_table, request.prefix_len + request.num_computed_tokens + n):
                    self._count_cache_use(request)
                    return n
                self.pending_copies = [c for c in self.pending_copies if c[1] not in request.block_table]
                self.blocks.release(request.block_table)
                request.num_computed_tokens = 0
            if not self.reclaim():
                return None

    def _link_prefix(self, request: Request) -> bool:
        """Put the request's adapter prefix (if any) at the head of its block table."""
        if request.prefix_len == 0:
            return True
        copy = self.blocks.link_prefix(request.block_table, request.adapter.ref.prefix_blocks, request.prefix_len)
        if copy is False:
            return False
        if copy is not None:
            self.pending_copies.append(copy)
        return True

    def _caches(self, request: Request) -> bool:
        """Whether the request's tokens go through the prefix cache: they must start at a block boundary
        (no adapter prefix, or one of whole blocks), so that its blocks hold nothing but its tokens."""
        return self.prefix_caching and request.prefix_len % self.blocks.block_size == 0

    def _looks_up(self, request: Request) -> bool:
        """Whether the request may take blocks from the prefix cache: not while it needs its prompt rows computed
        (prompt logprobs); its own full blocks are still registered for others."""
        return self._caches(request) and not request.needs_prompt_rows

    def _share_cached(self, request: Request) -> None:
        """Append the cached blocks holding the start of the request's tokens to its block table and skip
        computing them. Its last token is always computed: its row yields the next token."""
        if not self._looks_up(request):
            return
        tokens = request.all_token_ids
        limit = (request.num_tokens - 1) // self.blocks.block_size
        matched = 0
        while matched < limit and self.blocks.share_cached(request.block_table, self._block_key(request, matched, tokens)):
            matched += 1
        request.num_computed_tokens = matched * self.blocks.block_size

    def _count_cache_use(self, request: Request) -> None:
        """At admission: what the request looked up in the prefix cache and what it found."""
        if self._looks_up(request):
            self.prefix_cache_queried_tokens += request.num_tokens
            self.prefix_cache_hit_tokens += request.num_computed_tokens

    def computed(self, chunks: list[ScheduledChunk]) -> None:
        """After a step: mark the chunks' tokens computed, and register the full blocks they completed in the
        prefix cache, for later requests whose tokens begin the same way."""
        bs = self.blocks.block_size
        for chunk in chunks:
            request = chunk.request
            if request.num_computed_tokens < len(request.prompt_token_ids):
                end = min(request.num_computed_tokens + chunk.num_tokens, len(request.prompt_token_ids))
                self.prompt_tokens_computed += end - request.num_computed_tokens
            begin = request.num_computed_tokens // bs
            request.num_computed_tokens += chunk.num_tokens
            end = request.num_computed_tokens // bs
            if begin == end or not self._caches(request):  # most decode steps complete no block
                continue
            tokens = request.all_token_ids
            first = request.prefix_len // bs  # the adapter prefix's blocks come first
            for i in range(begin, end):
                self.blocks.register(request.block_table[first + i], self._block_key(request, i, tokens))

    def _block_key(self, request: Request, i: int, tokens: list[int]) -> bytes:
        """The key of the request's i-th full block of tokens. Keys are kept on the request, each computed
        once from its parent's: tokens never change, so they stay valid across preemption."""
        bs = self.blocks.block_size
        keys = request.block_keys
        while len(keys) <= i:
            j = len(keys)
            assert (j + 1) * bs <= len(tokens), "only full blocks have keys"
            parent = keys[-1] if keys else root_key(request.kv_adapter, request.cache_salt)
            keys.append(block_key(parent, tokens[j * bs:(j + 1) * bs]))
        return keys[i]

    def take_failed(self) -> list[tuple[Request, Exception]]:
        """The requests whose placement raised since the last call (already out of the scheduler), with errors."""
        failed, self.failed = self.failed, []
        return failed

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.release(request.block_table)
        self.unplace(request)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Remove a request that finished or was aborted, wherever it is, and free its blocks. Idempotent."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
            self.unplace(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        self.blocks.release(request.block_table)
        request.status = Status.FINISHED
