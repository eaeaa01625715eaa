"""Bearer-token auth, TLS with a generated certificate, reflection, and the Prometheus endpoint."""

import re
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from quiver.client import QuiverClient
from tests.support.harness import health, self_signed_certificate, start_server


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_tokens_guard_generation_and_adapter_management(model_path, tmp_path, zoo):
    running = start_server(model_path, tmp_path, admin_token="admin-secret", client_tokens=("client-secret",),
                           adapter_roots=(zoo["lora"].parent,))
    request = QuiverClient.request(text="a", max_new_tokens=2, ignore_eos=True)
    try:
        for token in (None, "wrong", "Bearer"):
            with QuiverClient(running.target, token=token) as c:
                assert _code(lambda: c.generate(request)) == grpc.StatusCode.UNAUTHENTICATED
                assert _code(lambda: c.load_adapter("l", "lora")) == grpc.StatusCode.UNAUTHENTICATED
        with QuiverClient(running.target, token="client-secret") as c:
            assert c.generate(request).usage.completion_tokens == 2
            assert c.list_adapters() == [] and c.server_info().version
            assert _code(lambda: c.load_adapter("l", "lora")) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: c.unload_adapter("l")) == grpc.StatusCode.PERMISSION_DENIED
        with QuiverClient(running.target, token="admin-secret") as c:
            assert c.load_adapter("l", "lora").adapter_id == "l"
            assert c.generate(request).usage.completion_tokens == 2
        assert health(running.target) == health_pb2.HealthCheckResponse.SERVING  # health needs no token
    finally:
        running.stop()


def test_tls_with_a_generated_certificate(model_path, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    running = start_server(model_path, tmp_path, tls_cert=cert, tls_key=key)
    try:
        with QuiverClient(running.target, tls_ca=cert) as c:
            assert c.generate(c.request(chat="hi", max_new_tokens=3, ignore_eos=True)).usage.completion_tokens == 3
        with QuiverClient(running.target, timeout=5) as plain:
            assert _code(plain.server_info) == grpc.StatusCode.UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        assert health(running.target, credentials=credentials) == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


def test_reflection_lists_the_services(running):
    with grpc.insecure_channel(running.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"quiver.v1.InferenceService", "quiver.v1.AdapterService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        generate = db.FindFileContainingSymbol("quiver.v1.InferenceService")
        assert generate.name == "quiver/v1/inference.proto"


def _scrape(running) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+(?:\{[^}]*\})?) (\S+)", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_metrics_move_as_requests_run(model_path, tmp_path, zoo):
    running = start_server(model_path, tmp_path, adapter_roots=(zoo["lora"].parent,))
    try:
        before = _scrape(running)
        assert before['quiver_kv_blocks_total'] == 128 and before['quiver_requests_running'] == 0
        with QuiverClient(running.target) as c:
            c.load_adapter("l", "lora")
            c.generate(c.request(token_ids=[4, 5, 6], max_new_tokens=6, ignore_eos=True, adapter_id="l"))
            c.generate(c.request(token_ids=[4, 5], max_new_tokens=4, ignore_eos=True))
            _code(lambda: c.generate(c.request(text="a", adapter_id="missing")))
            stream = c.generate_stream(c.request(token_ids=[3], max_new_tokens=480, ignore_eos=True))
            next(stream)
            during = _scrape(running)
            stream.cancel()
        after = _scrape(running)
        for _ in range(200):  # the abort reaches the engine at its next turn
            if after['quiver_kv_blocks_used'] == 0:
                break
            time.sleep(0.01)
            after = _scrape(running)
    finally:
        running.stop()
    if during['quiver_requests_running'] == 1:  # the stream had not finished when scraped (it usually has not)
        assert during['quiver_kv_blocks_used'] > 0
        assert after.get('quiver_requests_total{adapter_kind="base",status="CANCELLED"}') == 1, [k for k in after if k.startswith('quiver_requests_total')]
    assert after['quiver_requests_running'] == after['quiver_kv_blocks_used'] == 0
    assert after['quiver_requests_total{adapter_kind="lora",status="OK"}'] == 1
    assert after['quiver_requests_total{adapter_kind="base",status="OK"}'] >= 1
    assert after['quiver_requests_total{adapter_kind="unknown",status="NOT_FOUND"}'] == 1
    assert after['quiver_prompt_tokens_total{adapter_kind="lora"}'] == 3
    assert after['quiver_generation_tokens_total{adapter_kind="lora"}'] == 6
    assert after['quiver_time_to_first_token_seconds_count{adapter_kind="base"}'] >= 2
    assert after['quiver_time_per_output_token_seconds_count{adapter_kind="lora"}'] == 1
    assert after['quiver_e2e_request_latency_seconds_count{adapter_kind="lora"}'] == 1
    assert after['quiver_batch_size_count'] >= 10
    assert after['quiver_adapter_load_seconds_count{source="path"}'] == 1
    assert after['quiver_adapters{location="device"}'] == 1
    assert 'quiver_preemptions_total' in after and 'quiver_adapter_evictions_total' in after
