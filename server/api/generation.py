"""The protocol-independent core of a generation call, shared by the gRPC servicer and the HTTP endpoint.

    generator = Generator(state=state, metrics=metrics, max_prompt_bytes=max_prompt_bytes)
    async for piece in generator.run(adapter_id, prepare, deadline_passed=...):
        ...  # turn each Piece into the protocol's message

`Generator.run(adapter_id, prepare, *, deadline_passed=...)` is an async generator. It

1. holds the call in `ServingState.admit()` (Unavailable while draining, FailedPrecondition while the model
   loads; these two are raised before any accounting starts);
2. starts the call's accounting: a metrics `RequestTimer` labelled by `adapter_id`'s kind and an access-log
   record (access_log.py); every later outcome is counted under the call's gRPC status name;
3. validates `adapter_id` (the client's string, "" for the base model; InvalidArgument for a bad name) and calls
   `prepare()` once, which turns the protocol's request into a `GenerationInput` and raises the typed errors
   (quiver.errors) of a malformed one;
4. tokenises the prompt in a worker thread (prompts.py: InvalidArgument / FailedPrecondition), then submits
   the n samples in one engine call (`EngineService.submit_samples_async`: InvalidArgument, NotFound,
   ResourceExhausted, ...);
5. yields `Piece`s as the samples produce tokens: each sample's tokens are detokenised incrementally
   (detokenize.TextStream), its text cut at the first stop string; a sample's pieces come in order, the samples'
   pieces interleave as they are produced. A sample's last piece has `finish` set; the generator returns once
   every sample has finished. A failure of one sample (its stream raises the engine's typed error) ends the call
   with that error.

Every piece carries the call's `request_id` and the adapter (id, version) it pinned. The metrics timer is
the call's (its tokens are those of all samples); the access line reports the call (access_log.py).

Ending early (the caller stops iterating and closes the generator, e.g. with contextlib.aclosing; or its task is
cancelled) aborts every
sample in the engine, freeing its KV blocks, and records the call as CANCELLED, or DEADLINE_EXCEEDED when
`deadline_passed()` says the call's deadline has passed. An error raised inside is recorded with its status
(errors.status_code) and re-raised unchanged. Either way the metrics and the access line are written once,
when the generator ends.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import grpc

from quiver.adapters.store import validate_adapter_id
from quiver.api.access_log import AccessRecord
from quiver.api.detokenize import TextStream
from quiver.api.errors import status_code
from quiver.api.prompts import prompt_token_ids
from quiver.api.state import ServingState
from quiver.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from quiver.engine.service import RequestStream
from quiver.metrics import Metrics
from quiver.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class GenerationInput:
    """What `prepare()` returns: the call's request, in engine terms."""

    prompt: pb.Prompt  # text, token ids or chat messages (an HTTP request builds one too)
    params: SamplingParams
    n: int = 1  # samples of the prompt, 1..MAX_SAMPLES (the engine refuses others with InvalidArgument)
    cache_salt: str | None = None  # the prefix-cache scope (cache_scope.py)


@dataclass(frozen=True)
class Finish:
    """How a sample ended; on its last piece."""

    reason: FinishReason  # STOP (EOS, a stop token id or a stop string) or LENGTH
    prompt_tokens: int  # the prompt's tokens (the adapter's virtual tokens not included)
    completion_tokens: int  # this sample's generated tokens, those of a stop string included


@dataclass(frozen=True)
class Piece:
    """What one sample produced since its previous piece."""

    index: int  # the sample: 0..n-1
    request_id: str  # the call's id (the engine's request id when n == 1; its samples' ids are f"{request_id}.{i}")
    adapter: tuple[str, int] | None  # the (adapter id, version) that serves the call; None: the base model
    text: str  # text delta: never half a character, never a stop string or what may be the start of one
    token_ids: tuple[int, ...]  # tokens generated since the previous piece (a stop string's included)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id when logprobs were asked for (token_text names them)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on a sample's first piece, if asked; [0] is None
    finish: Finish | None = None  # on the sample's last piece only


def token_text(tokenizer, token_id: int) -> str:
    """`token_id` decoded alone, special tokens included; part of a character's bytes decodes to U+FFFD."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _never() -> bool:
    return False


class Generator:
    def __init__(self, *, state: ServingState, metrics: Metrics, max_prompt_bytes: int) -> None:
        """`max_prompt_bytes`: the largest prompt text tokenised (see prompts.py)."""
        self._state = state
        self._metrics = metrics
        self._max_prompt_bytes = max_prompt_bytes

    def token_text(self, token_id: int) -> str:
        """`token_text` with the served model's tokenizer (for a Piece's logprobs)."""
        return token_text(self._state.engine().engine.tokenizer, token_id)

    async def run(
        self, adapter_id: str, prepare: Callable[[], GenerationInput], *, deadline_passed: Callable[[], bool] = _never
    ) -> AsyncIterator[Piece]:
        """See the module's docstring."""
        async with self._state.admit() as service:
            timer = self._metrics.request(self._state.request_kind(adapter_id))
            record = AccessRecord()
            status = grpc.StatusCode.CANCELLED  # unless it ends otherwise: the caller went away
            try:
                adapter = validate_adapter_id(adapter_id) if adapter_id else None
                record.adapter = (adapter, 0) if adapter is not None else None
                request = prepare()
                record.n = request.n
                engine = service.engine
                ids = await asyncio.to_thread(prompt_token_ids, request.prompt, engine.tokenizer,
                                              max_bytes=self._max_prompt_bytes, max_model_len=engine.max_model_len)
                streams = await service.submit_samples_async(ids, request.params, request.n, adapter_id=adapter,
                                                             cache_salt=request.cache_salt)
                timer.admitted(num_prompt_tokens=len(ids))
                # the engine names the samples f"{call id}.{i}" when n > 1, else the call id itself
                call_id = streams[0].request_id if len(streams) == 1 else streams[0].request_id.removesuffix(".0")
                served = streams[0].adapter
                record.started(request_id=call_id, n=len(streams), prompt_tokens=len(ids), adapter=served)
                pieces = _pieces(streams, engine.tokenizer, request.params, call_id, served)
                try:
                    async for piece in pieces:
                        timer.tokens(len(piece.token_ids), index=piece.index)
                        if piece.finish is not None:
                            record.finished(piece.index, piece.finish.reason)
                        yield piece
                finally:
                    await pieces.aclose()
                    for stream in streams:
                        stream.abort()  # a no-op once the stream has ended
                status = grpc.StatusCode.OK
            except Exception as e:
                status = status_code(e)
                raise
            finally:
                if status is grpc.StatusCode.CANCELLED and deadline_passed():
                    status = grpc.StatusCode.DEADLINE_EXCEEDED
                timer.finished(status.name)
                record.emit(status.name, timer)


async def _pieces(
    streams: list[RequestStream], tokenizer, params: SamplingParams, call_id: str, adapter: tuple[str, int] | None
) -> AsyncIterator[Piece]:
    """The samples' outputs as Pieces, until every sample has finished (or stopped at a stop string)."""
    texts = [TextStream(tokenizer, stop_strings=params.stop_strings) for _ in streams]
    ended: set[int] = set()
    async with contextlib.aclosing(_merged(streams, ended)) as outputs:
        async for index, out in outputs:
            text = texts[index]
            delta = text.push(out.new_token_ids)
            piece = Piece(index, call_id, adapter, delta, out.new_token_ids, out.logprobs, out.prompt_logprobs)
            if not (out.finished or text.stopped):
                if delta or out.new_token_ids or out.prompt_logprobs is not None:
                    yield piece
                continue
            ended.add(index)
            streams[index].abort()  # generation past a stop string is not needed (a no-op once finished)
            reason = FinishReason.STOP if text.stopped else out.finish_reason
            finish = Finish(reason, prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens)
            yield replace(piece, text=delta + text.finish(), finish=finish)


async def _merged(streams: list[RequestStream], ended: set[int]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(sample index, output) from every stream as each comes; a stream is read no further once its output
    is finished or its index is in `ended` (the consumer adds it before asking for the next item)."""
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                index = pending.pop(future)
                out = future.result()  # a sample's failure raises its typed error here
                yield index, out
                if not out.finished and index not in ended:
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for future in pending:
            future.cancel()
            future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    """Mark a dropped future's outcome as seen (no 'exception was never retrieved' warning)."""
    if not future.cancelled():
        future.exception()
