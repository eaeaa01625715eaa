"""A real Quiver gRPC server on 127.0.0.1 (port 0) over a tiny model, run on a background event loop (with
`http_port=0`, its OpenAI-compatible HTTP endpoint too)."""

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quiver.api.server import QuiverServer, ServerConfig
from quiver.config import EngineConfig, ModelConfig
from quiver.engine.engine import Engine
from quiver.engine.service import EngineService
from quiver.model.loader import load_model

SMALL_ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256, "adapter_slots": 4}


def pace_steps(monkeypatch, service: EngineService, seconds: float = 0.005) -> None:
    """Every engine step of `service` takes `seconds` more: a long generation outlasts the client's next actions
    (a deadline, a cancel, a second call) however fast the engine has become."""
    engine = service.engine
    step = engine.step

    def paced():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(engine, "step", paced)


def make_service(model_path: Path, *, on_step=None, **engine_config) -> EngineService:
    """A fresh engine (its own model copy) over the tiny model at `model_path`, with its tokenizer."""
    loaded = load_model(ModelConfig(path=str(model_path), device="cpu", dtype="float32"))
    return EngineService(Engine(loaded, EngineConfig(**{**SMALL_ENGINE, **engine_config})), on_step=on_step)


class RunningServer:
    def __init__(self, config: ServerConfig) -> None:
        self.server = QuiverServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.run(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"
        # the OpenAI-compatible endpoint's base URL, when the config sets http_port
        self.http_url = f"http://127.0.0.1:{self.server.http_port}/v1" if self.server.http_port is not None else None

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def attach(self, service: EngineService) -> "RunningServer":
        self.run(self.server.attach(service))
        return self

    @property
    def service(self) -> EngineService:
        return self.server.state.service

    def run_async(self, coroutine) -> Future:
        """Start `coroutine` on the server's loop; its result comes through the returned future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def wait_idle(self, timeout: float = 10) -> None:
        """Until the KV blocks are free and the loop's stats snapshot (taken after its turn, so it can trail
        the freed blocks) shows nothing running; asserts both."""
        def idle() -> bool:
            return self.service.engine.blocks.num_used == 0 and self.service.stats().num_running == 0

        end = time.monotonic() + timeout
        while not idle() and time.monotonic() < end:
            time.sleep(0.02)
        assert self.service.engine.blocks.num_used == 0 and self.service.stats().num_running == 0

    def stop(self) -> None:
        self.run(self.server.stop())
        self.close()

    def close(self) -> None:
        """End the event loop (after the server has stopped)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def start_server(model_path: Path, tmp: Path, *, engine: dict | None = None, **config) -> RunningServer:
    """A started server whose engine (EngineConfig fields `engine`) is attached: it says SERVING."""
    config.setdefault("store_dir", tmp / "store")
    config.setdefault("port", 0)
    config.setdefault("metrics_port", 0)
    running = RunningServer(ServerConfig(**config))
    return running.attach(make_service(model_path, on_step=running.server.on_step, **(engine or {})))


def health(target: str, service: str = "", credentials: grpc.ChannelCredentials | None = None) -> int:
    with (grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def self_signed_certificate(tmp: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, valid for a day, and its key: tmp/cert.pem, tmp/key.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1)).add_extension(names, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"


@contextlib.contextmanager
def serve_process(model_path: Path, tmp: Path, *flags: str, find: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`quiver serve` on the tiny model in a child process, any free ports, store under `tmp`, plus `flags`:
    (the process, the first group of regex `find` in its log) once it logs "serving:". Killed on exit if it
    still runs."""
    process = subprocess.Popen(
        [sys.executable, "-m", "quiver.cli", "serve", "--model", str(model_path), "--device", "cpu", "--port", "0",
         "--metrics-port", "0", "--store-dir", str(tmp / "store"), "--kv-cache-bytes", str(1 << 20), *flags],
        cwd=tmp, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        found = None
        for line in process.stderr:
            if found is None and (match := re.search(find, line)):
                found = match.group(1)
            if "serving:" in line:
                break
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe from filling
        yield process, found
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
