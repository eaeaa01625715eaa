"""Immutable sources for adapter versions: private snapshots of adapter directories.

A version loaded from a directory must be read again from exactly the files it was loaded from when the host
cache has dropped its weights, whatever happened to the directory since: an unload deletes it, a replace
commits other files into the same path (the store renames the new directory into place before the engine
serves it). `Snapshots.take(path)` hard-links the adapter's two files into a private directory (copies them
where a hard link cannot be made, e.g. across file systems) before they are read, and records each file's
size and modification time. A rename, delete or replace of the original then leaves the snapshot as it was;
an in-place edit of the original changes a hard-linked snapshot too, and is caught by `Snapshot.verify`
(FailedPrecondition) before a re-read.

Layout and clean-up: each `Snapshots` (one per registry, so per engine) owns a directory
`<parent>/quiver-snapshots-XXXXXXXX/`, with one subdirectory per snapshot. `parent` is
`EngineConfig.adapter_snapshot_dir`, by default the system's temporary directory; `quiver serve` uses
`STORE/.snapshots`, on the store's file system, so that uploaded adapters are linked, not copied. A snapshot
is deleted when its version is dropped (`Snapshot.release`, called by the registry); the engine's directory is
deleted when its `Snapshots` is garbage collected or the process exits. A directory left by a crash is deleted
by the next `Snapshots` made with the same parent: each live one holds an exclusive `flock` on its directory,
so one that nobody holds is a leftover.
"""

import errno
import fcntl
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

from quiver.adapters.formats import adapter_files
from quiver.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

_PREFIX = "quiver-snapshots-"
_NEW = ".new-quiver-snapshots-"  # a directory not yet locked: never taken for a leftover


class Snapshot:
    """The files of one adapter version, as they were when it was loaded."""

    def __init__(self, path: Path, stamps: dict[str, tuple[int, int]]) -> None:
        self.path = path  # the snapshot directory: read it with `formats.load_adapter`
        self._stamps = stamps  # file name -> (size, mtime_ns) when taken

    def verify(self) -> None:
        """FailedPrecondition if a file is no longer as it was when the snapshot was taken."""
        for name, stamp in self._stamps.items():
            try:
                now = _stamp(self.path / name)
            except OSError as e:
                raise FailedPrecondition(f"{name}: the adapter's snapshot cannot be read ({e.strerror})") from e
            if now != stamp:
                raise FailedPrecondition(
                    f"{name} was changed in place after the adapter was loaded (its size or modification time "
                    "differs); write a new file and load it again instead of editing a served adapter's files"
                )

    def release(self) -> None:
        """Delete the snapshot (its version is dropped)."""
        shutil.rmtree(self.path, ignore_errors=True)


class Snapshots:
    def __init__(self, parent: Path | None = None) -> None:
        """`parent`: where the engine's snapshot directory is made (None: the system's temporary directory).
        Leftovers of crashed engines under it are deleted now."""
        self._parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        self._root: Path | None = None  # made at the first `take`
        self._lock = threading.Lock()
        if self._parent.is_dir():
            _remove_leftovers(self._parent)

    def take(self, path: Path) -> Snapshot:
        """Snapshot the adapter directory `path` (its config and weights files, checked as `load_adapter`
        checks them). Safe to call from any thread. Raises InvalidArgument for a bad directory."""
        files = adapter_files(path)
        try:
            target = Path(tempfile.mkdtemp(dir=self._root_dir(), prefix="v"))
        except OSError as e:  # the server's side: no file of the adapter is involved yet
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted("no space left on the server for the adapter's snapshot") from e
            raise FailedPrecondition(f"the server cannot make the adapter's snapshot ({e.strerror})") from e
        try:
            for file in files:
                _link_or_copy(file.resolve(), target / file.name)
            return Snapshot(target, {file.name: _stamp(target / file.name) for file in files})
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    @property
    def root(self) -> Path | None:
        """The engine's snapshot directory, once made."""
        return self._root

    def _root_dir(self) -> Path:
        with self._lock:
            if self._root is None:
                self._parent.mkdir(parents=True, exist_ok=True)
                fresh = Path(tempfile.mkdtemp(dir=self._parent, prefix=_NEW))
                fd = os.open(fresh, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)  # held until the process ends or the finalizer runs
                root = self._parent / (_PREFIX + fresh.name.removeprefix(_NEW))
                fresh.rename(root)
                self._root = root
                weakref.finalize(self, _remove_root, root, fd)
            return self._root


def _stamp(file: Path) -> tuple[int, int]:
    status = os.stat(file)
    return status.st_size, status.st_mtime_ns


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
        return
    except FileNotFoundError as e:
        raise _refusal(target.name, e) from e
    except OSError:  # another file system, one without hard links, or not allowed (protected_hardlinks)
        pass
    try:
        shutil.copyfile(source, target)
    except OSError as e:
        raise _refusal(target.name, e) from e


def _refusal(name: str, e: OSError) -> Exception:
    """The typed error for failing to snapshot file `name` (no server path in it)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted("no space left on the server for the adapter's snapshot")
    if isinstance(e, FileNotFoundError):
        return InvalidArgument(f"{name}: missing")
    if isinstance(e, PermissionError):
        return InvalidArgument(f"{name}: cannot be read (permission denied)")
    return FailedPrecondition(f"{name}: cannot be snapshotted ({e.strerror})")


def _remove_leftovers(parent: Path) -> None:
    """Delete the snapshot directories under `parent` that no live `Snapshots` holds."""
    for entry in parent.glob(_PREFIX + "*"):
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live engine's
            os.close(fd)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        os.close(fd)


def _remove_root(root: Path, fd: int) -> None:
    shutil.rmtree(root, ignore_errors=True)
    os.close(fd)
