"""A thread-safe, async-friendly front of the engine: one background thread runs the step loop.

Callers submit requests and iterate their outputs as they are produced, synchronously (`for out in
stream`) or asynchronously (`async for out in stream`); they can abort a request at any time (its KV
blocks are freed at the next loop turn), or run a whole batch with `generate`. Only the loop thread
touches the `Engine`; callers talk to it through a command queue.
"""

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from quiver.adapters.snapshots import Snapshot
from quiver.adapters.weights import AdapterKind, AdapterWeights
from quiver.engine import openmp
from quiver.engine.engine import Engine, EngineStats
from quiver.engine.request import FinishReason, RequestOutput, SamplingParams
from quiver.engine.samples import sample_ids
from quiver.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request, in order; the last one has `finished` set. `index`: which sample of its call
    it is (submit_samples); `adapter`: the (adapter id, version) it pinned, None for the base model."""

    def __init__(
        self, request_id: str, service: "EngineService", loop: asyncio.AbstractEventLoop | None, index: int = 0
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.adapter: tuple[str, int] | None = None  # set when the engine adds the request
        self._service = service
        self._loop = loop
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._done = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        """Called by the loop thread only. A reader whose event loop was closed is gone: its request is aborted
        (putting to that loop would raise on the loop thread and stop it)."""
        if self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:
                if self._loop.is_closed():
                    self._service.abort(self.request_id)  # ignored once it has ended
                    return
                raise
        else:
            self._sync.put(item)

    def abort(self) -> None:
        """Stop generating; the stream then ends with an ABORT output. Safe to call more than once."""
        if not self._done:
            self._service.abort(self.request_id)

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> RequestOutput:
        if self._done:
            raise StopIteration
        return self._unwrap(self._sync.get())

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        assert self._async is not None, "this stream was submitted with submit(); iterate it synchronously"
        return self._unwrap(await self._async.get())

    def _unwrap(self, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item


@dataclass(frozen=True)
class Completion:
    """A finished request, as returned by `EngineService.generate`."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason


@dataclass(frozen=True)
class AdapterInfo:
    """One loaded adapter, as `EngineService.list_adapters` reports it."""

    adapter_id: str
    kind: AdapterKind
    summary: str  # e.g. "LORA: 28 modules, ranks 8..16, 1,234 params"
    rank: int  # LoRA max rank or bottleneck size; 0 for prefix/prompt kinds
    num_virtual_tokens: int  # prefix/prompt kinds; 0 otherwise
    num_params: int
    nbytes: int
    location: str  # device, host or disk
    requests_served: int


class EngineService:
    def __init__(self, engine: Engine, *, on_step: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """`on_step(outputs)`, if given, is called on the loop thread after each engine step (for metrics)."""
        self.engine = engine
        self._on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # (function of the engine, Future) or _STOP
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._stats = engine.stats()
        openmp.release_thread_pool()  # the engine thread's OpenMP team is then the only one (see openmp.py)
        self._thread = threading.Thread(target=self._loop, name="quiver-engine", daemon=True)
        self._thread.start()

    # ---- caller side ------------------------------------------------------------------------------

    def submit(
        self, prompt_token_ids: list[int], params: SamplingParams, *, adapter_id: str | None = None,
        request_id: str | None = None, cache_salt: str | None = None,
    ) -> RequestStream:
        """Queue a request and return its stream. Raises the engine's typed errors for bad requests. A failure
        of the request's own (see Engine) is raised, typed, to whoever iterates its stream. `cache_salt`: its
        prefix-cache scope (see Engine.add_request)."""
        return self._submit(prompt_token_ids, params, adapter_id, request_id, cache_salt, loop=None).result()

    async def submit_async(
        self, prompt_token_ids: list[int], params: SamplingParams, *, adapter_id: str | None = None,
        request_id: str | None = None, cache_salt: str | None = None,
    ) -> RequestStream:
        """Like `submit`, for a caller in an event loop; iterate the stream with `async for`."""
        future = self._submit(
            prompt_token_ids, params, adapter_id, request_id, cache_salt, loop=asyncio.get_running_loop()
        )
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the caller went away (a cancel, a deadline) while the submit was queued
            future.add_done_callback(_abort_if_added)
            raise

    def submit_many(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
        adapter_ids: list[str | None] | None = None, cache_salts: list[str | None] | None = None,
    ) -> list[RequestStream]:
        """Queue a batch of requests in one loop turn, so that they all start in the same step (submitting
        them one by one would let the loop step between them). All or none: if one is refused, none runs,
        and its typed error is raised. The streams are iterated synchronously, like `submit`'s."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapter_ids = adapter_ids if adapter_ids is not None else [None] * len(prompts)
        cache_salts = cache_salts if cache_salts is not None else [None] * len(prompts)
        if not len(prompts) == len(params_list) == len(adapter_ids) == len(cache_salts):
            raise InvalidArgument("prompts, params, adapter_ids and cache_salts differ in length")
        requests = [
            (f"req-{next(self._ids)}", list(p), q, a, salt)
            for p, q, a, salt in zip(prompts, params_list, adapter_ids, cache_salts)
        ]
        streams = [RequestStream(r[0], self, None) for r in requests]

        def add_all(engine: Engine) -> list[RequestStream]:
            added = []
            try:
                for request_id, prompt, request_params, adapter_id, salt in requests:
                    request = engine.add_request(request_id, prompt, request_params, adapter_id=adapter_id, cache_salt=salt)
                    added.append(request_id)
                    streams[len(added) - 1].adapter = request.kv_adapter
            except Exception:
                for request_id in added:
                    engine.abort(request_id)
                raise
            self._streams.update((s.request_id, s) for s in streams)
            return streams

        return self._call(add_all).result()

    def _submit(self, prompt, params, adapter_id, request_id, cache_salt, *, loop) -> Future:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = RequestStream(request_id, self, loop)

        def add(engine: Engine) -> RequestStream:
            request = engine.add_request(request_id, list(prompt), params, adapter_id=adapter_id, cache_salt=cache_salt)
            stream.adapter = request.kv_adapter
            self._streams[request_id] = stream
            return stream

        return self._call(add)

    def submit_samples(
        self, prompt_token_ids: list[int], params: SamplingParams, n: int, *, adapter_id: str | None = None,
        request_id: str | None = None, cache_salt: str | None = None,
    ) -> list[RequestStream]:
        """Queue n samples of one prompt (1 <= n <= MAX_SAMPLES, else InvalidArgument); stream i has `index` i and
        request id f"{request_id}.{i}" (request_id itself when n == 1), and draws with seed (seed + i) mod 2^64
        when a seed is given. The prompt is computed once: see samples.py. All or none, like `submit_many`.
        Aborting every stream aborts the call."""
        return self._submit_samples(prompt_token_ids, params, n, adapter_id, request_id, cache_salt, loop=None).result()

    async def submit_samples_async(
        self, prompt_token_ids: list[int], params: SamplingParams, n: int, *, adapter_id: str | None = None,
        request_id: str | None = None, cache_salt: str | None = None,
    ) -> list[RequestStream]:
        """Like `submit_samples`, for a caller in an event loop; iterate the streams with `async for`."""
        future = self._submit_samples(
            prompt_token_ids, params, n, adapter_id, request_id, cache_salt, loop=asyncio.get_running_loop()
        )
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the caller went away: every sample it added is aborted
            future.add_done_callback(_abort_if_added)
            raise

    def _submit_samples(self, prompt, params, n, adapter_id, request_id, cache_salt, *, loop) -> Future:
        ids = sample_ids(request_id if request_id is not None else f"req-{next(self._ids)}", n)
        streams = [RequestStream(sample_id, self, loop, index=i) for i, sample_id in enumerate(ids)]

        def add(engine: Engine) -> list[RequestStream]:
            requests = engine.add_samples(ids, list(prompt), params, adapter_id=adapter_id, cache_salt=cache_salt)
            for stream, request in zip(streams, requests, strict=True):
                stream.adapter = request.kv_adapter
                self._streams[stream.request_id] = stream
            return streams

        return self._call(add)

    def abort(self, request_id: str) -> None:
        """Abort a running or waiting request; a finished or unknown id is ignored."""
        if not self._thread.is_alive():
            return
        self._commands.put((lambda engine: self._abort(request_id), Future()))

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, adapter_ids: list[str | None] | None = None
    ) -> list[Completion]:
        """Run a batch of prompts to completion, all at once; results in the order of `prompts`."""
        streams = self.submit_many(prompts, params, adapter_ids=adapter_ids)
        completions = []
        for stream in streams:
            tokens: list[int] = []
            reason = None
            for out in stream:
                tokens += out.new_token_ids
                reason = out.finish_reason
            completions.append(Completion(stream.request_id, tokens, reason))
        return completions

    def load_adapter(self, adapter_id: str, path: Path, *, replace: bool = False) -> AdapterInfo:
        """Snapshot the adapter directory, read and validate the snapshot here (off the engine thread), then
        serve it as a new version of `adapter_id`. The version is read again only from its snapshot, so
        whatever later happens to `path` (an unload, a replace committed into it, its deletion), requests that
        pinned the version run it (an in-place edit of a hard-linked file is refused: FailedPrecondition).
        Raises InvalidArgument for a bad directory, AlreadyExists unless `replace`."""
        snapshot = self.engine.adapters.snapshots.take(path)
        try:
            weights = self.read_adapter(snapshot.path)
            snapshot.verify()  # not edited while it was read
            return self.register_adapter(adapter_id, weights, source=snapshot, replace=replace)
        except Exception:
            snapshot.release()
            raise

    def read_adapter(self, path: Path) -> AdapterWeights:
        """Read and validate an adapter directory on the caller's thread (raises InvalidArgument). A big one
        can make torch start an OpenMP team on this thread; it is given back (see openmp.py)."""
        try:
            return self.engine.read_adapter(path)
        finally:
            openmp.release_thread_pool()

    def register_adapter(
        self, adapter_id: str, weights: AdapterWeights, *, source: Snapshot | Path | None = None, replace: bool = False
    ) -> AdapterInfo:
        """Serve weights already parsed (e.g. made in memory). Without a `source` they stay in host memory
        for as long as they are served, whatever the host cache's budget. Raises AlreadyExists unless `replace`."""
        return self._call(lambda engine: self._info(engine.register_adapter(adapter_id, weights, source=source, replace=replace))).result()

    def unload_adapter(self, adapter_id: str) -> None:
        """New requests for it fail with NotFound; running ones finish. Raises NotFound for an unknown id."""
        self._call(lambda engine: engine.unregister_adapter(adapter_id)).result()

    def list_adapters(self) -> list[AdapterInfo]:
        return self._call(lambda engine: [self._info(v) for v in engine.adapters.current.values()]).result()

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's idle blocks (see Engine.reset_prefix_cache); returns how many blocks."""
        return self._call(lambda engine: engine.reset_prefix_cache()).result()

    def stats(self) -> EngineStats:
        """A snapshot taken by the loop thread after its last turn."""
        return self._stats

    def shutdown(self, timeout: float | None = None) -> None:
        """Take no new requests, let the running ones finish, stop the loop thread."""
        self._stopping = True
        self._commands.put(_STOP)
        self._thread.join(timeout)

    def _call(self, fn: Callable[[Engine], object]) -> Future:
        """Run `fn(engine)` on the loop thread; its result or exception comes back through the future."""
        if self._stopping:
            raise FailedPrecondition("the engine is shutting down and takes no new work")
        future: Future = Future()
        self._commands.put((fn, future))
        return future

    def _info(self, version) -> AdapterInfo:
        adapters = self.engine.adapters
        return AdapterInfo(
            adapter_id=version.adapter_id, kind=version.kind, summary=version.summary, rank=version.rank,
            num_virtual_tokens=version.weights_tokens, num_params=version.num_params, nbytes=version.nbytes,
            location=adapters.where(version), requests_served=version.requests_served,
        )

    # ---- loop thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        stop = False
        while not (stop and not self.engine.has_work()):
            block = not self.engine.has_work() and not stop
            stop = self._run_commands(block=block) or stop
            if self.engine.has_work():
                self._step()
            self._stats = self.engine.stats()
        self._fail_pending()

    def _run_commands(self, *, block: bool) -> bool:
        """Apply queued commands (waiting for one if `block`); return whether a stop was asked."""
        stop = False
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return stop
            block = False
            if command is _STOP:
                stop = True
                continue
            fn, future = command
            if not future.set_running_or_notify_cancel():
                continue  # its caller went away before it ran
            try:
                future.set_result(fn(self.engine))
            except Exception as e:  # noqa: BLE001 -- typed errors go back to the caller
                future.set_exception(e)

    def _fail_pending(self) -> None:
        """After the loop stops: commands that raced with shutdown get a clear error, not silence."""
        while True:
            try:
                command = self._commands.get(block=False)
            except queue.Empty:
                return
            if command is not _STOP and command[1].set_running_or_notify_cancel():
                command[1].set_exception(FailedPrecondition("the engine has shut down"))

    def _abort(self, request_id: str) -> None:
        try:
            out = self.engine.abort(request_id)
        except NotFound:
            return
        self._streams.pop(request_id)._put(out)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # the engine contains request and forward failures: this is a bug in its own state
            log.exception("engine step failed; aborting the requests it held")
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
                self._streams.pop(request_id)._put(e)
            return
        if self._on_step is not None:
            self._on_step(outputs)
        for out in outputs:
            if not out.finished:
                self._streams[out.request_id]._put(out)
            else:  # a request's own failure goes to its stream alone, raised to its reader
                self._streams.pop(out.request_id)._put(out.error if out.error is not None else out)


def _abort_if_added(future: Future) -> None:
    """For a submit whose caller went away once it had started: abort the request(s) it added, if it did."""
    if not future.cancelled() and future.exception() is None:
        added = future.result()
        for stream in added if isinstance(added, list) else [added]:
            stream.abort()


_STOP = object()
