"""Every typed error reaches the client as its status code with a readable message; INTERNAL only for bugs."""

import time

import grpc
import pytest

from quiver.api.server import ServerConfig
from quiver.client import QuiverClient
from quiver.v1 import inference_pb2 as pb
from tests.support.harness import RunningServer, health, make_service, pace_steps, start_server


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_bad_requests_are_invalid_argument_or_not_found(running):
    with QuiverClient(running.target) as c:
        bad = {
            "the prompt is empty": pb.GenerateRequest(),
            "outside the vocabulary": c.request(token_ids=[1, 999]),
            "temperature": c.request(text="a", temperature=-1),
            "top_p": c.request(text="a", top_p=0.0),
            "no role": pb.GenerateRequest(prompt=pb.Prompt(chat=pb.ChatMessages(messages=[pb.ChatMessage(content="x")]))),
            "the context holds 512": c.request(token_ids=[1] * 600),
        }
        for message, request in bad.items():
            code, details = _code(lambda: c.generate(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, (message, details)
        code, details = _code(lambda: c.generate(c.request(text="a", adapter_id="nope")))
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
        code, _ = _code(lambda: c.unload_adapter("nope"))
        assert code == grpc.StatusCode.NOT_FOUND
        code, details = _code(lambda: c.load_adapter("a", "/tmp"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "--adapter-root" in details


def test_a_full_queue_is_resource_exhausted(model_path, tmp_path, monkeypatch):
    running = RunningServer(ServerConfig(store_dir=tmp_path / "store", port=0, metrics_port=None))
    running.attach(make_service(model_path, max_num_seqs=1, max_queue_len=1))
    pace_steps(monkeypatch, running.service)
    try:
        with QuiverClient(running.target) as c:
            long = c.request(token_ids=[3, 4], max_new_tokens=400, ignore_eos=True)
            first = c.generate_stream(long)
            next(first)  # running
            second = c.generate_stream(long)
            deadline = time.monotonic() + 10
            while running.service.stats().num_waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            code, details = _code(lambda: c.generate(long))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details
            first.cancel(), second.cancel()
    finally:
        running.stop()


def test_calls_before_the_model_is_loaded_fail_with_failed_precondition(model_path, tmp_path):
    running = RunningServer(ServerConfig(store_dir=tmp_path / "store", port=0, metrics_port=None))
    try:
        assert health(running.target) == health_pb2_status("NOT_SERVING")
        assert health(running.target, "quiver.v1.InferenceService") == health_pb2_status("NOT_SERVING")
        with QuiverClient(running.target) as c:
            code, details = _code(lambda: c.generate(c.request(text="a")))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "starting" in details
            running.attach(make_service(model_path))
            assert health(running.target) == health(running.target, "quiver.v1.AdapterService") == health_pb2_status("SERVING")
            assert c.generate(c.request(text="a", max_new_tokens=2, ignore_eos=True)).usage.completion_tokens == 2
    finally:
        running.stop()


def test_a_bug_is_internal_and_says_little(running, monkeypatch):
    def broken():
        raise RuntimeError("secret detail")

    monkeypatch.setattr(running.service, "list_adapters", broken)
    with QuiverClient(running.target) as c:
        code, details = _code(c.list_adapters)
    assert code == grpc.StatusCode.INTERNAL and "secret" not in details and "ListAdapters" in details


def test_draining_reports_not_serving_refuses_new_calls_and_finishes_running_ones(model_path, tmp_path):
    running = start_server(model_path, tmp_path, grace_seconds=30)
    with QuiverClient(running.target) as c:
        stream = c.generate_stream(c.request(token_ids=[3, 4], max_new_tokens=300, ignore_eos=True))
        first = next(stream)
        stopping = running.run_async(running.server.stop())
        deadline = time.monotonic() + 10
        while health(running.target) != health_pb2_status("NOT_SERVING") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health(running.target) == health_pb2_status("NOT_SERVING")
        for call in (lambda: c.generate(c.request(text="a")), c.list_adapters, lambda: c.unload_adapter("a")):
            code, details = _code(call)  # UNAVAILABLE: the code clients retry (here on another server)
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(first.token_ids) + sum(len(p.token_ids) for p in rest) == 300
    stopping.result(30)
    assert running.service.engine.blocks.num_used == 0
    running.close()


def health_pb2_status(name: str) -> int:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckResponse.ServingStatus.Value(name)
