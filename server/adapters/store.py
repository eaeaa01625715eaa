"""The durable on-disk store of uploaded adapters: one directory per adapter id under a root.

An upload is written into a staging directory, every file and the directory fsynced, then renamed into
place, so a crash or an interrupted upload never leaves a half adapter where the server looks for
adapters; leftovers in the staging area are removed when the store is opened. A replace first renames
the old adapter to `.previous.<id>` and keeps it there until the new one is served (`settle`) or refused
(`revert`); opening the store after a crash keeps the new adapter if it was moved in, else puts the old one
back, so an id always holds the old or the new adapter, whole. Ids are plain names (`validate_adapter_id`),
so an id can never name a path outside the root.

Uploads in progress share two budgets: how many may be staged at once (`max_uploads`) and how many bytes
all of them together may have staged (`max_staged_bytes`); a staged adapter holds its share from `stage`
until it is committed or discarded. Error messages name adapters by id, never by a path on the server.

    root/
      my-lora/adapter_config.json, adapter_model.safetensors
      .previous.my-lora/...         the adapter a replace in progress displaced
      .staging/<random>/...         an upload in progress, or a directory being removed
"""

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from quiver.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_STAGING = ".staging"
_PREVIOUS = ".previous."


def validate_adapter_id(adapter_id: str) -> str:
    """Return `adapter_id` if it is a plain name (no path separators, no `..`, no NUL); else InvalidArgument."""
    if not adapter_id or len(adapter_id) > MAX_ID_LENGTH or not _ID.fullmatch(adapter_id):
        raise InvalidArgument(
            f"adapter id {adapter_id[:MAX_ID_LENGTH + 8]!r} is not valid: use 1 to {MAX_ID_LENGTH} characters "
            "of A-Z a-z 0-9 . _ -, not starting with a dot"
        )
    return adapter_id


def validate_file_name(name: str) -> str:
    """An adapter file's name: a plain name, no directories."""
    if not name or len(name) > 255 or not _ID.fullmatch(name):
        raise InvalidArgument(f"file name {name[:263]!r} is not valid: a plain name of A-Z a-z 0-9 . _ - is expected")
    return name


class StagedAdapter:
    """An upload being written. Write files with `write`, then `commit` them to the store or `discard` them.
    `write`, `finish` and `discard` may run on different threads (one at a time: each holds a lock)."""

    def __init__(self, store: "AdapterStore", adapter_id: str) -> None:
        self.adapter_id = adapter_id
        self.path = Path(tempfile.mkdtemp(dir=store.root / _STAGING, prefix=f"{adapter_id}."))
        self.num_bytes = 0
        self._store = store
        self._lock = threading.Lock()
        self._ended = False  # committed or discarded: its share of the budgets is given back
        self._open: tuple[str, object] | None = None  # (file name, open file) being appended to
        self._done: set[str] = set()

    def write(self, *, file_name: str, data: bytes) -> None:
        """Append `data` to `file_name`; a file's chunks come in order and files one after another.
        ResourceExhausted if the upload would exceed `max_adapter_bytes`, or the uploads in progress together
        the store's `max_staged_bytes`."""
        validate_file_name(file_name)
        with self._lock:
            if self._ended:
                raise FailedPrecondition(f"the upload of {self.adapter_id!r} has already ended")
            if self.num_bytes + len(data) > self._store.max_adapter_bytes:
                raise ResourceExhausted(f"the upload exceeds the server's limit of {self._store.max_adapter_bytes} bytes")
            self._store._reserve(len(data))
            self.num_bytes += len(data)
            if self._open is None or self._open[0] != file_name:
                self._close()
                if file_name in self._done:
                    raise InvalidArgument(f"file {file_name!r} was sent in two separate runs of chunks")
                if len(self._done) >= self._store.max_files:
                    raise InvalidArgument(f"an adapter has at most {self._store.max_files} files")
                self._open = (file_name, open(self.path / file_name, "xb"))
            self._open[1].write(data)

    def finish(self) -> Path:
        """Flush and fsync every file; the staged directory is then complete (still staged)."""
        with self._lock:
            self._close()
        if not self._done:
            raise InvalidArgument("the upload has no files")
        _fsync_dir(self.path)
        return self.path

    def commit(self, *, replace: bool) -> Path:
        """Move the finished upload into the store atomically and return its final directory."""
        return self._store._commit(self, replace=replace)

    def discard(self) -> None:
        """Remove the staged files (after any write in progress on another thread), then give back their share
        of the budgets: the bytes are off the disk before another upload may take them."""
        with self._lock:
            self._close()
            if not self._ended:
                shutil.rmtree(self.path, ignore_errors=True)
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._store._release(self)

    def _close(self) -> None:
        if self._open is not None:
            name, f = self._open
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._done.add(name)
            self._open = None


class AdapterStore:
    def __init__(
        self, root: Path, *, max_adapter_bytes: int, max_files: int = 16, max_adapters: int | None = None,
        max_uploads: int | None = None, max_staged_bytes: int | None = None, recover: bool = True,
    ) -> None:
        """`max_adapters`: the most adapters the store holds (None: no limit); uploads of new ids beyond it are refused.
        `max_uploads`: adapters staged at once; `max_staged_bytes`: bytes staged by all of them together (None:
        no limit). `recover=False` skips the clean-up at open, for a store that other live servers share (Ray
        replicas): their uploads and replaces in progress are not leftovers."""
        self.root = Path(root)
        self.max_adapter_bytes = max_adapter_bytes
        self.max_files = max_files
        self.max_adapters = max_adapters
        self.max_uploads = max_uploads
        self.max_staged_bytes = max_staged_bytes
        self.num_staged = 0  # adapters staged now
        self.staged_bytes = 0  # bytes they hold
        self._budget = threading.Lock()
        (self.root / _STAGING).mkdir(parents=True, exist_ok=True)
        if recover:
            self._recover()

    def ids(self) -> list[str]:
        """The stored adapters, sorted."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def path(self, adapter_id: str) -> Path:
        return self.root / validate_adapter_id(adapter_id)

    def __contains__(self, adapter_id: str) -> bool:
        return self.path(adapter_id).is_dir()

    def check_room(self, adapter_id: str) -> None:
        """ResourceExhausted if storing `adapter_id` would take the store past `max_adapters` (a replace takes no room)."""
        if self.max_adapters is not None and adapter_id not in self and len(self.ids()) >= self.max_adapters:
            raise ResourceExhausted(
                f"the adapter store is full ({self.max_adapters} adapters, the server's --max-stored-adapters); "
                "unload an uploaded adapter first"
            )

    def stage(self, adapter_id: str) -> StagedAdapter:
        """Start staging an upload; ResourceExhausted if `max_uploads` are staged already."""
        validate_adapter_id(adapter_id)
        with self._budget:
            if self.max_uploads is not None and self.num_staged >= self.max_uploads:
                raise ResourceExhausted(
                    f"{self.num_staged} uploads are in progress, the most this server takes at once "
                    "(its --max-concurrent-uploads); retry later"
                )
            self.num_staged += 1
        try:
            return StagedAdapter(self, adapter_id)
        except BaseException:
            with self._budget:
                self.num_staged -= 1
            raise

    def delete(self, adapter_id: str) -> None:
        """Remove a stored adapter (renamed away first, so it is gone at once even if removal is cut short)."""
        target = self.path(adapter_id)
        if not target.is_dir():
            raise NotFound(f"adapter {adapter_id!r} is not in the store")
        self._remove(target)

    def settle(self, adapter_id: str) -> None:
        """The adapter just committed is served: drop the one its replace displaced, if any."""
        previous = self._previous(adapter_id)
        if previous.is_dir():
            self._remove(previous)

    def revert(self, adapter_id: str) -> None:
        """The adapter just committed was refused: remove it and put back the one its replace displaced, if any."""
        self.delete(adapter_id)
        previous = self._previous(adapter_id)
        if previous.is_dir():
            previous.rename(self.path(adapter_id))
            _fsync_dir(self.root)

    def _reserve(self, num_bytes: int) -> None:
        with self._budget:
            if self.max_staged_bytes is not None and self.staged_bytes + num_bytes > self.max_staged_bytes:
                raise ResourceExhausted(
                    f"the uploads in progress would stage more than the server's limit of {self.max_staged_bytes} bytes "
                    "(its --max-staged-bytes); retry later"
                )
            self.staged_bytes += num_bytes

    def _release(self, staged: StagedAdapter) -> None:
        with self._budget:
            self.num_staged -= 1
            self.staged_bytes -= staged.num_bytes

    def _commit(self, staged: StagedAdapter, *, replace: bool) -> Path:
        target = self.path(staged.adapter_id)
        try:
            if target.exists() and not replace:
                raise AlreadyExists(f"adapter {staged.adapter_id!r} is already stored; ask for replacement to upload it again")
            self.check_room(staged.adapter_id)
            if target.exists():
                previous = self._previous(staged.adapter_id)
                assert not previous.exists(), "a replace of this id was neither settled nor reverted"
                target.rename(previous)
            staged.path.rename(target)
        except BaseException:
            staged.discard()
            raise
        with staged._lock:
            staged._end()
        _fsync_dir(self.root)
        return target

    def _previous(self, adapter_id: str) -> Path:
        return self.root / f"{_PREVIOUS}{adapter_id}"

    def _remove(self, path: Path) -> None:
        doomed = Path(tempfile.mkdtemp(dir=self.root / _STAGING, prefix=f"{path.name}.deleted."))
        path.rename(doomed / path.name)
        _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def _recover(self) -> None:
        """Finish what a crash cut short: drop staged uploads and half-removed directories; end an interrupted
        replace with the new adapter if it was moved in, else with the old one."""
        for leftover in (self.root / _STAGING).iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        for previous in self.root.glob(f"{_PREVIOUS}*"):
            adapter_id = previous.name.removeprefix(_PREVIOUS)
            if (self.root / adapter_id).is_dir():
                self._remove(previous)
            else:
                previous.rename(self.root / adapter_id)
        _fsync_dir(self.root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
