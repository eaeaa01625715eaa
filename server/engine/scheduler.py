"""Continuous batching with chunked prefill and preemption by recomputation. Pure Python.

Each step gets a token budget. Running requests come first, in arrival order: a decoding request takes
one token, a request still in its prompt takes the next chunk that fits. Then waiting requests are
admitted while budget, sequence slots and KV blocks last. When a running request cannot get a block,
the latest-arrived running request is preempted: its blocks are freed and it goes back to the front of
the queue, to be recomputed from its prompt and the tokens it already produced. Nothing is dropped.
"""

from collections import deque
from dataclasses import dataclass
from typing import Callable

from server.engine.block_manager import BlockManager
from server.engine.request import Request, Status


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
    """`place(request)` is asked before a request starts (or restarts) running, to put its adapter on the
    device; it may say no (no room now). `unplace(request)` is called when it stops running. `reclaim()` is
    asked to free KV blocks held by idle adapters (their shared prefixes) before anything is preempted or
    left waiting for lack of blocks; it says whether it freed any."""

    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        place: Callable[[Request], bool] = _always,
        unplace: Callable[[Request], None] = _nothing,
        reclaim: Callable[[], bool] = _never,
    ) -> None:
        self.blocks = blocks
        self.place = place
        self.unplace = unplace
        self.reclaim = reclaim
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies to do before the next forward

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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = min(request.num_tokens, budget)
            if not self.place(request):
                break
            if not self._take_blocks(request, n):
                self.unplace(request)
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            chunks.append(ScheduledChunk(request, n))
            budget -= n
        return chunks

    def _take_blocks(self, request: Request, n: int) -> bool:
        """Give a request about to start its prefix and room for its first n tokens; all or nothing."""
        while True:
            if self._link_prefix(request):
                if self.blocks.grow(request.block_table, request.prefix_len + n):
                    return True
                self.pending_copies = [c for c in self.pending_copies if c[1] not in request.block_table]
                self.blocks.release(request.block_table)
            if not self.reclaim():
                return False

    def _link_prefix(self, request: Request) -> bool:
        """Put the request's adapter prefix (if any) at the head of its block table."""
        if request.prefix_len == 0:
            return True
        copy = self.blocks.link_prefix(request.block_table, request.adapter.prefix_blocks, request.prefix_len)
        if copy is False:
            return False
        if copy is not None:
            self.pending_copies.append(copy)
        return True

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
        """Remove a request that finished or was aborted, wherever it is, and free its blocks."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
            self.unplace(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        self.blocks.release(request.block_table)
        request.status = Status.FINISHED
