"""AdapterService: load (from the server's adapter roots), upload (to the durable store), unload, list.

Changes to what an id serves and stores (the end of a load, upload or unload) run one at a time under one
lock, and an upload's commit-and-load runs to its end even if the call is cancelled meanwhile, so the store
and the engine always agree on what each id holds.

An upload holds a share of the store's budgets (uploads at once, bytes staged) from its header until it is
committed or refused, and is ended (RESOURCE_EXHAUSTED) when it sends nothing for `upload_idle_seconds`; its
chunks are written, and its finished files parsed to validate them, in worker threads, never on the event
loop. Errors name an upload's files by their names in the upload, never by the staging directory.
"""

import asyncio
import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc

from quiver.adapters.store import AdapterStore, StagedAdapter, validate_adapter_id
from quiver.api.convert import adapter_message
from quiver.api.state import ServingState
from quiver.engine.service import AdapterInfo, EngineService
from quiver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuiverError,
    ResourceExhausted,
)
from quiver.metrics import Metrics
from quiver.v1 import adapters_pb2 as pb
from quiver.v1 import adapters_pb2_grpc

log = logging.getLogger(__name__)


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(
        self, *, state: ServingState, store: AdapterStore, roots: tuple[Path, ...], metrics: Metrics,
        upload_idle_seconds: float,
    ) -> None:
        self._state = state
        self._store = store
        self._roots = roots
        self._metrics = metrics
        self._idle_seconds = upload_idle_seconds
        self._changing = asyncio.Lock()  # held while an id's served and stored adapter change

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        async with self._state.admit() as service:
            adapter_id = validate_adapter_id(request.adapter_id)
            path = confine(request.path, roots=self._roots)
            async with self._changing:
                with _as_client_names(path, files=f"{request.path.rstrip('/')}/", whole=request.path):
                    info = await self._load(service, adapter_id, path, replace=request.replace, source="path")
                if adapter_id in self._store:  # the stored copy must not come back after a restart
                    self._store.delete(adapter_id)
            return pb.LoadAdapterResponse(adapter=adapter_message(info, stored=False))

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadAdapterResponse:
        async with self._state.admit() as service:
            messages = aiter(request_iterator)
            first = await self._next(messages)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgument("an upload starts with its header (adapter_id, replace), then file chunks")
            adapter_id = validate_adapter_id(first.header.adapter_id)
            replace = first.header.replace
            if adapter_id in self._state.adapter_kinds and not replace:
                raise AlreadyExists(f"adapter {adapter_id!r} is already loaded; ask for replacement to upload it again")
            self._store.check_room(adapter_id)
            staged = self._store.stage(adapter_id)
            try:
                while (message := await self._next(messages)) is not None:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidArgument("only file chunks may follow an upload's header")
                    await asyncio.to_thread(staged.write, file_name=message.chunk.file_name, data=message.chunk.data)
                with _as_client_names(staged.path, files="", whole="the upload"):
                    staged_dir = await asyncio.to_thread(staged.finish)
                    await asyncio.to_thread(service.read_adapter, staged_dir)  # refuse a bad adapter before it replaces anything
            except BaseException:
                await asyncio.shield(asyncio.to_thread(staged.discard))  # after a write still running in its thread
                raise
            install = asyncio.ensure_future(self._install(service, staged, replace=replace))
            install.add_done_callback(_seen)  # if this call is cancelled, nobody awaits the install's outcome
            info = await asyncio.shield(install)
            return pb.UploadAdapterResponse(adapter=adapter_message(info, stored=True), bytes_received=staged.num_bytes)

    async def _install(self, service: EngineService, staged: StagedAdapter, *, replace: bool) -> AdapterInfo:
        """Commit a validated upload to the store and serve it; if the engine refuses it, the store goes back
        to what it held."""
        adapter_id = staged.adapter_id
        async with self._changing:
            path = staged.commit(replace=replace)
            try:
                with _as_client_names(path, files="", whole=f"adapter {adapter_id!r}"):
                    info = await self._load(service, adapter_id, path, replace=replace, source="upload")
            except BaseException:
                self._store.revert(adapter_id)
                raise
            self._store.settle(adapter_id)
            return info

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        async with self._state.admit() as service:
            adapter_id = validate_adapter_id(request.adapter_id)
            async with self._changing:
                stored = adapter_id in self._store
                try:
                    await asyncio.to_thread(service.unload_adapter, adapter_id)
                except NotFound:
                    if not stored:  # a stored adapter that failed to load at start-up can still be deleted
                        raise
                self._state.adapter_kinds.pop(adapter_id, None)
                if stored:
                    self._store.delete(adapter_id)
            return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        async with self._state.admit() as service:
            infos = await asyncio.to_thread(service.list_adapters)
            return pb.ListAdaptersResponse(
                adapters=[adapter_message(i, stored=i.adapter_id in self._store) for i in sorted(infos, key=lambda i: i.adapter_id)]
            )

    async def _next(self, messages: AsyncIterator[pb.UploadAdapterRequest]) -> pb.UploadAdapterRequest | None:
        """The upload's next message (None at its end); ResourceExhausted if none comes within the idle deadline."""
        try:
            return await asyncio.wait_for(anext(messages, None), self._idle_seconds)
        except TimeoutError:
            raise ResourceExhausted(
                f"the upload sent nothing for {self._idle_seconds:g} s (the server's --upload-idle-seconds) and was "
                "ended: uploads in progress hold staging space"
            ) from None

    async def _load(self, service: EngineService, adapter_id: str, path: Path, *, replace: bool, source: str) -> AdapterInfo:
        with self._metrics.adapter_load_seconds.labels(source).time():
            info = await asyncio.to_thread(service.load_adapter, adapter_id, path, replace=replace)
        self._state.adapter_kinds[adapter_id] = info.kind
        log.info("adapter %r loaded from %s: %s", adapter_id, path, info.summary)
        return info


@contextlib.contextmanager
def _as_client_names(directory: Path, *, files: str, whole: str) -> Iterator[None]:
    """Typed errors raised inside name `directory` as the client knows it: its files as `files` + their name
    (e.g. the path the client sent, or nothing for an upload), the directory itself as `whole`."""
    try:
        yield
    except QuiverError as e:
        e.args = (str(e).replace(f"{directory}{os.sep}", files).replace(str(directory), whole),)
        raise


def _seen(task: asyncio.Future) -> None:
    """Mark a task's exception as retrieved (its caller reported it, or went away)."""
    if not task.cancelled():
        task.exception()


def confine(path: str, *, roots: tuple[Path, ...]) -> Path:
    """The adapter directory `path` names, resolved; it and every file in it must lie inside one of `roots`
    (symlinks resolved), and `path` may not contain "..". Relative paths are taken from the first root.
    A path the filesystem refuses is InvalidArgument (too long) or NotFound (anything else)."""
    if not roots:
        raise FailedPrecondition("this server has no adapter roots; start it with --adapter-root DIR to load from its disk")
    if not path or "\0" in path:
        raise InvalidArgument("the adapter path is empty or contains a NUL character")
    shown = path if len(path) <= 200 else f"{path[:200]}..."
    raw = Path(path)
    if ".." in raw.parts:
        raise InvalidArgument(f"adapter path {shown!r} may not contain '..'")
    try:
        resolved = (raw if raw.is_absolute() else roots[0] / raw).resolve()
        root = next((r for r in (r.resolve() for r in roots) if resolved.is_relative_to(r)), None)
        if root is None:
            raise PermissionDenied(f"adapter path {shown!r} is outside the server's adapter roots")
        if not resolved.is_dir():
            raise NotFound(f"no adapter directory at {shown!r}")
        for item in resolved.iterdir():
            if not item.resolve().is_relative_to(root):
                raise PermissionDenied(f"{item.name!r} in adapter path {shown!r} links outside the server's adapter roots")
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise InvalidArgument(f"adapter path {shown!r} is too long for the server's filesystem") from None
        raise NotFound(f"adapter path {shown!r} cannot be read ({os.strerror(e.errno) if e.errno else type(e).__name__})") from None
    return resolved
