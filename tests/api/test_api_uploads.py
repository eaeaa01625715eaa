"""Uploads in flight share budgets: how many at once, how many bytes staged together, and how long one may
send nothing. Whatever many uploaders do, the staging area stays within its budget, the extra uploads are
refused with RESOURCE_EXHAUSTED, and nothing is left staged after."""

import os
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from quiver.client import QuiverClient
from quiver.v1 import adapters_pb2 as apb
from tests.support.harness import start_server

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _header(adapter_id: str) -> apb.UploadAdapterRequest:
    return apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id=adapter_id))


def _chunk(name: str, data: bytes) -> apb.UploadAdapterRequest:
    return apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=name, data=data))


def _staged_bytes(staging: Path) -> int:
    """Bytes in the staging directory now, files vanishing under the walk counted as gone."""
    total = 0
    for root, _, files in os.walk(staging):  # os.walk skips directories removed under it
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class _Sampler:
    """The largest staging size seen, sampled in a thread until `stop`."""

    def __init__(self, staging: Path) -> None:
        self.largest = 0
        self._staging = staging
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.largest = max(self.largest, _staged_bytes(self._staging))
            time.sleep(0.002)

    def stop(self) -> int:
        self._done.set()
        self._thread.join(10)
        return self.largest


def test_forty_concurrent_uploads_stay_within_the_budgets(model_path, tmp_path, zoo):
    files = [(f.name, f.read_bytes()) for f in sorted(zoo["lora"].iterdir())]
    size = sum(len(data) for _, data in files)
    budget = 3 * size  # four uploads' first parts fit (4 x 57%), then the first to send its last part (+43%) does too
    running = start_server(model_path, tmp_path, max_upload_bytes=size, max_staged_bytes=budget, max_concurrent_uploads=4)
    staging = tmp_path / "store" / ".staging"
    go = threading.Event()

    def messages(i: int) -> Iterator[apb.UploadAdapterRequest]:
        """Every file but the last half of the last, then (once every upload has started) that half."""
        yield _header(f"up-{i}")
        *whole, (name, data) = files
        yield from (_chunk(n, d) for n, d in whole)
        yield _chunk(name, data[: len(data) // 2])
        go.wait(60)
        yield _chunk(name, data[len(data) // 2:])

    sampler = _Sampler(staging)
    try:
        with QuiverClient(running.target) as c:
            calls = [c.adapters.UploadAdapter.future(messages(i), timeout=60) for i in range(40)]
            deadline = time.monotonic() + 60
            while sum(call.done() for call in calls) < 36 and time.monotonic() < deadline:
                time.sleep(0.01)
            go.set()
            errors = [call.exception(timeout=60) for call in calls]
            largest = sampler.stop()
            refused = [e for e in errors if e is not None]
            assert all(e.code() == EXHAUSTED for e in refused), [(e.code(), e.details()) for e in refused]
            at_header = [e for e in refused if "--max-concurrent-uploads" in e.details()]
            over_bytes = [e for e in refused if "--max-staged-bytes" in e.details()]
            assert len(at_header) == 36 and len(at_header) + len(over_bytes) == len(refused)
            served = sorted(f"up-{i}" for i, e in enumerate(errors) if e is None)
            assert 1 <= len(served) <= 4 and sorted(a.adapter_id for a in c.list_adapters()) == served
    finally:
        go.set()
        sampler.stop()
        running.stop()
    assert size < largest <= budget  # more than one upload was staged at once, never over the budget
    assert list(staging.iterdir()) == []


def test_an_idle_upload_is_ended_and_others_go_on(model_path, tmp_path, zoo):
    running = start_server(model_path, tmp_path, upload_idle_seconds=1.0)
    staging = tmp_path / "store" / ".staging"
    release = threading.Event()

    def idle() -> Iterator[apb.UploadAdapterRequest]:
        yield _header("idle")
        yield _chunk("adapter_config.json", (zoo["lora"] / "adapter_config.json").read_bytes())
        release.wait(60)

    try:
        with QuiverClient(running.target, timeout=60) as c:
            call = c.adapters.UploadAdapter.future(idle(), timeout=60)
            assert c.upload_adapter("busy", zoo["prompt"]).stored  # another upload meanwhile
            with pytest.raises(grpc.RpcError) as e:
                call.result(timeout=30)  # ended by the server after 1 s without a message, not by the client's 60 s
            assert e.value.code() == EXHAUSTED and "sent nothing for 1 s (the server's --upload-idle-seconds)" in e.value.details()
            release.set()
            deadline = time.monotonic() + 5
            while list(staging.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert list(staging.iterdir()) == []
            assert [a.adapter_id for a in c.list_adapters()] == ["busy"]
            assert c.upload_adapter("idle", zoo["lora"]).stored  # its id was left free
    finally:
        release.set()
        running.stop()
