"""SIGKILL during an upload and during a replace: after a restart every stored id holds the old or the new
adapter, byte for byte, never a mix, a partial one or nothing; the restarted server serves it.

The server runs as a real `quiver serve` process over the tiny model and is killed at real points: while a
client's upload stream is held half-way (its first file already on the server's disk), and at several
delays after a replace's last chunk was sent (while the server validates, commits and loads it); a replace
the server acknowledged before the kill must be the one found after it. The rename
window inside a commit is too short to hit that way; a child process replacing an adapter in a loop is
killed at random times for it, and the two states a crash there can leave are built and recovered directly.
"""

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

from quiver.adapters.store import AdapterStore
from quiver.client import QuiverClient
from quiver.v1 import adapters_pb2 as apb

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"


class ServerProcess:
    """`quiver serve` on a free loopback port, logging to a file."""

    def __init__(self, model: Path, store: Path, work: Path) -> None:
        self.log = work / f"server-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "quiver.cli", "serve", "--model", str(model), "--store-dir", str(store),
                   "--port", "0", "--metrics-port", "0", "--kv-cache-bytes", str(4 << 20),
                   "--adapters-dir", str(work / "no-adapters"), "--grace-period", "1"]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 90
        while "serving:" not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.1)
        self.target = "127.0.0.1:" + re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text())[1]

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-2000:]


def files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


def held_upload(client: QuiverClient, adapter_id: str, source: Path, *, replace: bool, hold: bool):
    """Start an upload of `source` (each file in two halves). With `hold`, it stops after the first half of
    the weights file until released. Returns (call, sent: set once it stops or has sent everything, release);
    keep the call referenced: a call that is garbage-collected is cancelled."""
    sent, release = threading.Event(), threading.Event()

    def messages() -> Iterator[apb.UploadAdapterRequest]:
        yield apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id=adapter_id, replace=replace))
        for f in sorted(source.iterdir()):
            data = f.read_bytes()
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=f.name, data=data[: len(data) // 2]))
            if hold and f.name == WEIGHTS:
                sent.set()
                release.wait(30)
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=f.name, data=data[len(data) // 2:]))
        sent.set()

    return client.adapters.UploadAdapter.future(messages(), timeout=60), sent, release


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def staged_weights(store: Path) -> bool:
    return any((d / WEIGHTS).exists() for d in (store / ".staging").iterdir())


def assert_serves(server: ServerProcess, store: Path, expected: dict[str, dict[str, dict[str, bytes]]]) -> None:
    """Every id in `expected` is stored as exactly one of its allowed versions (name -> files), nothing else is
    stored or left over, and the server serves each id with the kind of the version on disk. (`.snapshots` holds
    the running server's hard links to the versions it serves, see server/adapters/snapshots.py.)"""
    assert sorted(p.name for p in store.iterdir() if p.name != ".snapshots") == sorted([".staging", *expected])
    assert list((store / ".staging").iterdir()) == []
    with QuiverClient(server.target, timeout=30) as c:
        kinds = {a.adapter_id: apb.AdapterKind.Name(a.kind) for a in c.list_adapters()}
        assert sorted(kinds) == sorted(expected)
        for adapter_id, versions in expected.items():
            on_disk = files(store / adapter_id)
            match = [name for name, version in versions.items() if version == on_disk]
            assert len(match) == 1, (adapter_id, sorted(on_disk), list(versions))
            assert kinds[adapter_id] == f"ADAPTER_KIND_{KINDS[match[0]]}"
            out = c.generate(c.request(token_ids=[4, 5, 6], max_new_tokens=3, ignore_eos=True, adapter_id=adapter_id))
            assert out.usage.completion_tokens == 3


KINDS = {"lora": "LORA", "prompt": "PROMPT_TUNING", "bottleneck": "BOTTLENECK"}


def test_sigkill_during_uploads_and_replaces_keeps_old_or_new(model_path, zoo, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    versions = {name: files(zoo[name]) for name in KINDS}
    server = ServerProcess(model_path, store, tmp_path)
    faults = 0
    try:
        with QuiverClient(server.target, timeout=30) as c:
            c.upload_adapter("keep", zoo["lora"])
            call, sent, release = held_upload(c, "new", zoo["prompt"], replace=False, hold=True)
            wait_for(lambda: sent.is_set() and staged_weights(store))
            server.kill()
            faults += 1
            release.set()
            assert call.exception(timeout=30) is not None
        server = ServerProcess(model_path, store, tmp_path)
        assert_serves(server, store, {"keep": {"lora": versions["lora"]}})

        with QuiverClient(server.target, timeout=30) as c:  # a replace held half-way through its files
            call, sent, release = held_upload(c, "keep", zoo["bottleneck"], replace=True, hold=True)
            wait_for(lambda: sent.is_set() and staged_weights(store))
            server.kill()
            faults += 1
            release.set()
            assert call.exception(timeout=30) is not None
        server = ServerProcess(model_path, store, tmp_path)
        assert_serves(server, store, {"keep": {"lora": versions["lora"]}})

        current = "lora"
        for delay in (0.0, 0.02, 0.06):  # replaces killed while the server validates, commits and loads them
            new = "prompt" if current == "lora" else "lora"
            with QuiverClient(server.target, timeout=30) as c:
                call, sent, _ = held_upload(c, "keep", zoo[new], replace=True, hold=False)
                wait_for(sent.is_set)
                time.sleep(delay)
                server.kill()
                faults += 1
                acknowledged = call.exception(timeout=30) is None
            server = ServerProcess(model_path, store, tmp_path)
            allowed = {new: versions[new]} if acknowledged else {current: versions[current], new: versions[new]}
            assert_serves(server, store, {"keep": allowed})
            current = next(name for name, v in allowed.items() if v == files(store / "keep"))
    finally:
        server.stop()
    assert faults == 5


# ---- the commit's rename window ----------------------------------------------------------------------------------

_REPLACER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from quiver.adapters.store import AdapterStore
    store = AdapterStore(Path(sys.argv[1]), max_adapter_bytes=1 << 24)
    for i in range(100_000):
        tag = b"AB"[i % 2 : i % 2 + 1]
        staged = store.stage("x")
        staged.write(file_name="adapter_config.json", data=b'{"v": "' + tag + b'"}')
        staged.write(file_name="weights", data=tag * 65536)
        staged.finish()
        staged.commit(replace=True)
        store.settle("x")
        if i == 0:
            print("ready", flush=True)
""")


def _version(tag: bytes) -> dict[str, bytes]:
    return {"adapter_config.json": b'{"v": "' + tag + b'"}', "weights": tag * 65536}


def test_sigkill_while_replacing_in_a_loop_never_loses_the_adapter(tmp_path):
    root, rng = tmp_path / "store", random.Random(8)
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", _REPLACER, str(root)], cwd=REPO, stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        store = AdapterStore(root, max_adapter_bytes=1 << 24)
        assert store.ids() == ["x"] and files(root / "x") in (_version(b"A"), _version(b"B"))
        assert sorted(p.name for p in root.iterdir()) == [".staging", "x"] and list((root / ".staging").iterdir()) == []


def _write(directory: Path, version: dict[str, bytes]) -> None:
    directory.mkdir()
    for name, data in version.items():
        (directory / name).write_bytes(data)


def test_a_crash_inside_a_replace_is_recovered_at_open(tmp_path):
    old, new = _version(b"A"), _version(b"B")
    between = tmp_path / "between"  # the old one moved aside, the new one not yet moved in
    between.mkdir()
    _write(between / ".previous.x", old)
    after = tmp_path / "after"  # both renames done, the old one not yet dropped
    after.mkdir()
    _write(after / ".previous.x", old)
    _write(after / "x", new)
    for root, want in ((between, old), (after, new)):
        assert AdapterStore(root, max_adapter_bytes=1 << 20).ids() == ["x"]
        assert files(root / "x") == want and sorted(p.name for p in root.iterdir()) == [".staging", "x"]
