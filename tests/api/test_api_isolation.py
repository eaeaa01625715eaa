"""One client's huge prompts stall no one: a prompt's text is bounded before it is tokenised, and tokenising
runs off the event loop, so other streams, health checks and every other call go on meanwhile."""

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quiver.client import QuiverClient
from tests.support.harness import start_server

VICTIMS = [[5 + i, 6, 7, 8, 9] for i in range(3)]
HEALTH_DEADLINE = 2.0  # seconds; tokenising the 3.8 MB prompt on the event loop took about 4 s here


class _Prober:
    """Health checks one after another, each with HEALTH_DEADLINE, until `stop`."""

    def __init__(self, target: str) -> None:
        self.answered, self.failed = 0, []
        self._done = threading.Event()
        self._channel = grpc.insecure_channel(target)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._channel)
        while not self._done.is_set():
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_DEADLINE)
                self.answered += 1
            except grpc.RpcError as e:
                self.failed.append(e.code())
            time.sleep(0.02)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)
        self._channel.close()


def test_huge_prompts_stall_no_stream_and_no_health_check(model_path, tmp_path):
    running = start_server(model_path, tmp_path, max_prompt_bytes=3_900_000)
    bad = {"4 MB": "a" * 4_000_000, "3.8 MB": "a" * 3_800_000}  # over the bound; under it (tokenised, then too long)
    try:
        with QuiverClient(running.target, timeout=120) as c:
            assert c.server_info().limits.max_prompt_bytes == 3_900_000
            requests = [c.request(token_ids=p, max_new_tokens=40, ignore_eos=True) for p in VICTIMS]
            reference = [list(c.generate(r).token_ids) for r in requests]  # each alone, before any bad prompt
            outcomes: dict[str, tuple[grpc.StatusCode, str]] = {}
            tokens: list[list[int]] = [[] for _ in requests]

            def send_bad(name: str) -> None:
                try:
                    c.generate(c.request(text=bad[name], max_new_tokens=1))
                    outcomes[name] = (grpc.StatusCode.OK, "")
                except grpc.RpcError as e:
                    outcomes[name] = (e.code(), e.details())

            def victim(i: int) -> None:
                for piece in c.generate_stream(requests[i]):
                    tokens[i] += piece.token_ids

            prober = _Prober(running.target)
            bad_threads = [threading.Thread(target=send_bad, args=(name,)) for name in bad]
            for t in bad_threads:
                t.start()
            time.sleep(0.5)  # the bad prompts have arrived; the victims start while they are being handled
            victims = [threading.Thread(target=victim, args=(i,)) for i in range(len(requests))]
            for t in victims:
                t.start()
            for t in bad_threads + victims:
                t.join(120)
            prober.stop()
    finally:
        running.stop()
    assert tokens == reference
    assert prober.failed == [] and prober.answered >= 5, (prober.failed, prober.answered)
    assert outcomes["4 MB"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "4,000,000 bytes, over the server's limit of 3,900,000 (--max-prompt-bytes)" in outcomes["4 MB"][1]
    assert outcomes["3.8 MB"][0] == grpc.StatusCode.INVALID_ARGUMENT and "the context holds 512" in outcomes["3.8 MB"][1]
