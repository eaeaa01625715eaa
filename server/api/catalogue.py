"""The adapter catalogue behind quiver.v1's AdapterService, for both front ends (`quiver serve`'s servicer and
each Ray Serve replica): upload (to the durable store), load (from a directory under an adapter root),
unload, list. It lives in quiver.api, above the engine and the store, because it joins the two (and
quiver.adapters imports nothing from the engine).

    upload   header → stage (the store's budgets) → chunks (each within the idle deadline) → finish → validate
             → commit → serve → settle, or revert the store if the engine refuses it
    load     one server: serve the directory, then drop any stored copy of the id;
             shared store: copy the directory into the store, then as an upload from "validate" on
    unload   delete the stored copy (if any), stop serving the id
    list     one server: what the engine serves; shared store: what the store holds

Changes to what an id serves and stores run one at a time (an asyncio lock; with a shared store also an
flock on STORE/.lock, held across replicas and nodes), and an upload's commit-and-serve runs to its end even
if the call is cancelled meanwhile, so the store and the engine always agree on what each id holds.

An upload holds a share of the store's budgets (uploads at once, bytes staged) from its header until it is
committed or refused, and is ended (ResourceExhausted) when it sends nothing for `upload_idle_seconds`; its
chunks are written, and its finished files parsed to validate them, in worker threads, never on the event
loop. Errors are typed (`quiver.errors`; `quiver.api.errors.status_code` maps them) and name an upload's
files by their names in the upload, never by the staging directory.
"""

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

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

log = logging.getLogger(__name__)


class AdapterEngine(Protocol):
    """How a front end's engine starts and stops serving an id (the catalogue has changed the store first)."""

    async def load(self, adapter_id: str, path: Path, *, replace: bool) -> AdapterInfo:
        """Serve the adapter directory `path` as `adapter_id` (raises AlreadyExists, InvalidArgument, ...)."""

    async def unload(self, adapter_id: str) -> None:
        """Stop serving `adapter_id`; NotFound if it is not served."""


class ServiceEngine:
    """One server's engine (`quiver serve`): adapters are registered in its EngineService directly."""

    def __init__(self, state: ServingState) -> None:
        self._state = state

    async def load(self, adapter_id: str, path: Path, *, replace: bool) -> AdapterInfo:
        return await asyncio.to_thread(self._state.engine().load_adapter, adapter_id, path, replace=replace)

    async def unload(self, adapter_id: str) -> None:
        await asyncio.to_thread(self._state.engine().unload_adapter, adapter_id)


class AdapterCatalogue:
    def __init__(
        self, *, state: ServingState, store: AdapterStore, engine: AdapterEngine, roots: tuple[Path, ...],
        metrics: Metrics, upload_idle_seconds: float, shared: bool = False,
    ) -> None:
        """`engine`: how ids are served (`ServiceEngine` for one server). `roots`: where LoadAdapter may read.
        `shared`: the store is shared by many replicas (Ray Serve) and is the catalogue: its changes also take
        an flock, LoadAdapter copies the directory into it, "already exists" and ListAdapters mean stored."""
        self._state = state
        self._store = store
        self._engine = engine
        self._roots = roots
        self._metrics = metrics
        self._idle_seconds = upload_idle_seconds
        self._shared = shared
        self._changing = asyncio.Lock()  # held while an id's served and stored adapter change

    async def upload(self, messages: AsyncIterator[pb.UploadAdapterRequest]) -> pb.UploadAdapterResponse:
        async with self._state.admit() as service:
            messages = aiter(messages)
            first = await self._next(messages)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgument("an upload starts with its header (adapter_id, replace), then file chunks")
            adapter_id, replace = validate_adapter_id(first.header.adapter_id), first.header.replace
            staged = self._stage(adapter_id, replace=replace)
            try:
                while (message := await self._next(messages)) is not None:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidArgument("only file chunks may follow an upload's header")
                    await asyncio.to_thread(staged.write, file_name=message.chunk.file_name, data=message.chunk.data)
                await self._validate(service, staged, files="", whole="the upload")
            except BaseException:
                await asyncio.shield(asyncio.to_thread(staged.discard))  # after a write still running in its thread
                raise
            info = await self._install(staged, replace=replace, source="upload")
            return pb.UploadAdapterResponse(adapter=adapter_message(info, stored=True), bytes_received=staged.num_bytes)

    async def load(self, adapter_id: str, path: str, *, replace: bool) -> pb.LoadAdapterResponse:
        """Serve the directory `path` (under an adapter root) as `adapter_id`; with a shared store, copied into it."""
        async with self._state.admit() as service:
            adapter_id = validate_adapter_id(adapter_id)
            directory = confine(path, roots=self._roots)
            files, whole = f"{path.rstrip('/')}/", path
            if self._shared:
                staged = self._stage(adapter_id, replace=replace)
                try:
                    await asyncio.to_thread(_copy_files, directory, staged)
                    await self._validate(service, staged, files=files, whole=whole)
                except BaseException:
                    await asyncio.shield(asyncio.to_thread(staged.discard))
                    raise
                info = await self._install(staged, replace=replace, source="path")
                return pb.LoadAdapterResponse(adapter=adapter_message(info, stored=True))
            async with self._change():
                with _as_client_names(directory, files=files, whole=whole):
                    info = await self._serve(adapter_id, directory, replace=replace, source="path")
                if adapter_id in self._store:  # the stored copy must not come back after a restart
                    self._store.delete(adapter_id)
            return pb.LoadAdapterResponse(adapter=adapter_message(info, stored=False))

    async def unload(self, adapter_id: str) -> pb.UnloadAdapterResponse:
        """Delete the stored copy and stop serving the id; NotFound if it is neither stored nor served. (Other
        replicas sharing the store unload it at their next request for it, which is NotFound.)"""
        async with self._state.admit():
            adapter_id = validate_adapter_id(adapter_id)
            async with self._change():
                stored = adapter_id in self._store
                if stored:
                    self._store.delete(adapter_id)
                try:
                    await self._engine.unload(adapter_id)
                except NotFound:
                    if not stored:  # a stored adapter that failed to load can still be deleted
                        raise
                self._state.adapter_kinds.pop(adapter_id, None)
            return pb.UnloadAdapterResponse()

    async def list(self) -> pb.ListAdaptersResponse:
        """The served adapters (one server), or the stored ones (shared store; those this replica serves with
        their details, the others as on disk), sorted by id."""
        async with self._state.admit() as service:
            served = {i.adapter_id: i for i in await asyncio.to_thread(service.list_adapters)}
            stored = set(await asyncio.to_thread(self._store.ids))
            if self._shared:
                adapters = [adapter_message(served[i], stored=True) if i in served
                            else pb.Adapter(adapter_id=i, stored=True, location=pb.ADAPTER_LOCATION_DISK) for i in sorted(stored)]
            else:
                adapters = [adapter_message(served[i], stored=i in stored) for i in sorted(served)]
            return pb.ListAdaptersResponse(adapters=adapters)

    # ---- steps -------------------------------------------------------------------------------------------

    def _stage(self, adapter_id: str, *, replace: bool) -> StagedAdapter:
        """A new staged adapter for `adapter_id`, holding its share of the store's budgets."""
        if not replace and (adapter_id in self._store if self._shared else adapter_id in self._state.adapter_kinds):
            held = "stored" if self._shared else "loaded"
            raise AlreadyExists(f"adapter {adapter_id!r} is already {held}; ask for replacement to upload it again")
        self._store.check_room(adapter_id)
        return self._store.stage(adapter_id)

    @staticmethod
    async def _validate(service: EngineService, staged: StagedAdapter, *, files: str, whole: str) -> None:
        """Finish a staged adapter's files and parse them: a bad adapter is refused before it replaces anything."""
        with _as_client_names(staged.path, files=files, whole=whole):
            await asyncio.to_thread(service.read_adapter, await asyncio.to_thread(staged.finish))

    async def _install(self, staged: StagedAdapter, *, replace: bool, source: str) -> AdapterInfo:
        """Commit a validated adapter to the store and serve it; if the engine refuses it, the store goes back
        to what it held. Runs to its end even if the call is cancelled meanwhile. `source`: its load metric's
        label (upload, or path for a directory LoadAdapter copied into a shared store)."""
        install = asyncio.ensure_future(self._commit_and_serve(staged, replace=replace, source=source))
        install.add_done_callback(_seen)  # if the call is cancelled, nobody awaits the install's outcome
        return await asyncio.shield(install)

    async def _commit_and_serve(self, staged: StagedAdapter, *, replace: bool, source: str) -> AdapterInfo:
        adapter_id = staged.adapter_id
        async with self._change():
            path = staged.commit(replace=replace)
            try:
                with _as_client_names(path, files="", whole=f"adapter {adapter_id!r}"):
                    info = await self._serve(adapter_id, path, replace=replace, source=source)
            except BaseException:
                self._store.revert(adapter_id)
                raise
            self._store.settle(adapter_id)
            return info

    async def _serve(self, adapter_id: str, path: Path, *, replace: bool, source: str) -> AdapterInfo:
        with self._metrics.adapter_load_seconds.labels(source).time():
            info = await self._engine.load(adapter_id, path, replace=replace)
        self._state.adapter_kinds[adapter_id] = info.kind
        log.info("adapter %r loaded from %s: %s", adapter_id, path, info.summary)
        return info

    @contextlib.asynccontextmanager
    async def _change(self) -> AsyncIterator[None]:
        """Hold the right to change what ids store and serve: this process's lock, and with a shared store
        the flock on STORE/.lock every replica takes."""
        async with self._changing:
            if not self._shared:
                yield
                return
            f = await asyncio.to_thread(open, self._store.root / ".lock", "a")
            with f:  # closing it releases the flock
                await asyncio.to_thread(fcntl.flock, f.fileno(), fcntl.LOCK_EX)
                yield

    async def _next(self, messages: AsyncIterator[pb.UploadAdapterRequest]) -> pb.UploadAdapterRequest | None:
        """The upload's next message (None at its end); ResourceExhausted if none comes within the idle deadline."""
        try:
            return await asyncio.wait_for(anext(messages, None), self._idle_seconds)
        except TimeoutError:
            raise ResourceExhausted(
                f"the upload sent nothing for {self._idle_seconds:g} s (the server's --upload-idle-seconds) and was "
                "ended: uploads in progress hold staging space"
            ) from None


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


def _copy_files(source: Path, staged: StagedAdapter) -> None:
    """Stage the files of the adapter directory `source`, as an upload of them would."""
    for path in sorted(p for p in source.iterdir() if p.is_file()):
        with path.open("rb") as f:
            staged.write(file_name=path.name, data=f.read())


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
