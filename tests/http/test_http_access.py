"""The HTTP endpoint's tokens, TLS, cache scopes, limits, OpenAI-shaped errors, loading and draining, and the
abort of a generation whose client went away."""

import http.client
import json
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request

import openai
import pytest

from quiver.api.server import ServerConfig
from quiver.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from quiver.http.errors import status_of
from tests.support.harness import RunningServer, pace_steps, self_signed_certificate, start_server


def _post(url: str, body: bytes | dict, headers: dict | None = None, context=None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST, error statuses included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _is_openai_error(body: dict) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def test_tokens_as_grpc_and_a_scope_per_token(model_path, tmp_path):
    running = start_server(model_path, tmp_path, http_port=0, client_tokens=("client-a", "client-b"),
                           admin_token="admin-secret")
    try:
        status, body, headers = _post(f"{running.http_url}/completions", {"model": "llama", "prompt": "hi"})
        assert status == 401 and _is_openai_error(body) and headers["www-authenticate"] == "Bearer"
        assert body["error"]["type"] == "authentication_error"
        with openai.OpenAI(base_url=running.http_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        prompt = list(range(3, 43))  # 40 tokens: 5 full blocks of 8

        def hits(token: str) -> int:
            with openai.OpenAI(base_url=running.http_url, api_key=token, max_retries=0) as client:
                before = running.service.stats().prefix_cache_hit_tokens
                done = client.completions.create(model="llama", prompt=prompt, max_tokens=2, temperature=0.0)
                assert done.usage.completion_tokens == 2 and [m.id for m in client.models.list().data] == ["llama"]
                return running.service.stats().prefix_cache_hit_tokens - before

        assert hits("client-a") == 0 and hits("client-a") > 0  # cached within a token's scope
        assert hits("client-b") == 0 and hits("admin-secret") == 0  # not across tokens (the admin token has its own)
    finally:
        running.stop()


def test_tls_with_the_grpc_certificate(model_path, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    running = start_server(model_path, tmp_path, http_port=0, tls_cert=cert, tls_key=key)
    url = f"https://127.0.0.1:{running.server.http_port}/v1"
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=trusted)) as client:
            assert client.completions.create(model="llama", prompt="hi", max_tokens=3, temperature=0.0,
                                             extra_body={"ignore_eos": True}).usage.completion_tokens == 3
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served
            _get(f"http://127.0.0.1:{running.server.http_port}/v1/models")
        status, _, _ = _post(f"{url}/completions", {"model": "llama", "prompt": "hi", "max_tokens": 1},
                             context=trusted)
        assert status == 200
    finally:
        running.stop()


def test_bad_requests_are_400_and_an_unknown_model_404(served, oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="org/not-a-name", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    bad = [
        ({"temperature": 5}, "temperature"),
        ({"extra_body": {"best_of": 2}}, "best_of"),  # not implemented: refused, not ignored
        ({"extra_body": {"min_tokens": 50}, "max_tokens": 4}, None),  # the engine's check, its message
        ({"n": 17}, None),
        ({"extra_body": {"cache_scope": "x" * 300}}, None),
    ]
    for fields, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model="llama", prompt="hi", **{"max_tokens": 2, **fields})
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
        assert e.value.body["param"] == param, fields
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert "logprobs" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="llama", messages=[])
    status, body, _ = _post(f"{served.http_url}/completions", b"{not json")
    assert status == 400 and _is_openai_error(body)
    status, body = _get(f"{served.http_url}/nothing-here")
    assert status == 404 and _is_openai_error(body)


def test_the_prompt_limit_applies(model_path, tmp_path):
    running = start_server(model_path, tmp_path, http_port=0, max_prompt_bytes=64)
    try:
        with openai.OpenAI(base_url=running.http_url, api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model="llama", prompt="x" * 65, max_tokens=2)
            assert "--max-prompt-bytes" in e.value.body["message"]
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "y" * 65}])
    finally:
        running.stop()


def test_503_while_loading_and_while_draining(model_path, tmp_path):
    loading = RunningServer(ServerConfig(store_dir=tmp_path / "store", port=0, metrics_port=None, http_port=0))
    try:
        status, body = _get(f"{loading.http_url}/models")
        assert status == 503 and body["error"]["type"] == "server_error"
        status, body, _ = _post(f"{loading.http_url}/completions", {"model": "llama", "prompt": "hi"})
        assert status == 503 and _is_openai_error(body)
    finally:
        loading.stop()
    running = start_server(model_path, tmp_path / "second", http_port=0)
    try:
        running.server.state.drain()
        status, body, _ = _post(f"{running.http_url}/completions", {"model": "llama", "prompt": "hi"})
        assert status == 503 and "shutting down" in body["error"]["message"]
    finally:
        running.stop()


def test_errors_map_as_grpc_codes():
    assert status_of(InvalidArgument("x")) == (400, "invalid_request_error")
    assert status_of(Unauthenticated("x"))[0] == 401 and status_of(PermissionDenied("x"))[0] == 403
    assert status_of(NotFound("x"))[0] == 404 and status_of(ResourceExhausted("x")) == (429, "rate_limit_error")
    assert status_of(FailedPrecondition("x"))[0] == 400 and status_of(Unavailable("x"))[0] == 503
    assert status_of(RuntimeError("a bug")) == (500, "server_error")


def _cancelled_line(caplog, timeout: float = 10) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = [r.getMessage() for r in caplog.records if r.name == "quiver.access" and "status=CANCELLED" in r.getMessage()]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError("no generation was cancelled")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_goes_away_aborts_its_generation(served, caplog, stream, monkeypatch):
    pace_steps(monkeypatch, served.service)  # 480 tokens take >= 2.4 s: the client leaves after 0.3 s
    caplog.set_level(logging.INFO, logger="quiver.access")
    body = json.dumps({"model": "llama", "prompt": [3, 4], "max_tokens": 480, "ignore_eos": True, "stream": stream})
    connection = http.client.HTTPConnection("127.0.0.1", served.server.http_port, timeout=0.3)
    connection.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    try:
        if stream:
            response = connection.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")
        else:
            with pytest.raises(socket.timeout):
                connection.getresponse()
    finally:
        connection.close()
    line = _cancelled_line(caplog)
    assert int(line.split("output_tokens=")[1].split()[0]) < 480
    end = time.monotonic() + 10
    while served.service.engine.blocks.num_used and time.monotonic() < end:
        time.sleep(0.02)
    assert served.service.engine.blocks.num_used == 0
