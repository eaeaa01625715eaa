"""A real `quiver serve` in a child process on a free loopback port, for the benchmarks that talk gRPC."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`quiver serve --port P --metrics-port 0 <flags>`; `target` is its address once `wait_serving` returns."""

    def __init__(self, flags: list[str], *, log_path: Path) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self._log = log_path.open("w")
        command = [sys.executable, "-m", "quiver.cli", "serve", "--port", str(self.port), "--metrics-port", "0", *flags]
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self.log_path = log_path

    def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"quiver serve exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"quiver serve did not say SERVING within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM (drain), then SIGKILL if it is still up after 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
