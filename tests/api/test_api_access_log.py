"""The access log (quiver.access): one key=value line per finished call, with the right fields for a call that
succeeds, one that is cancelled and ones refused with an error, and never the prompt's text."""

import logging
import time

import grpc
import pytest

from quiver.client import QuiverClient
from quiver.v1 import inference_pb2 as pb
from tests.support.harness import pace_steps

SECRET = "zebra quartz"
KEYS = ["request_id", "adapter", "adapter_version", "n", "prompt_tokens", "output_tokens", "finish", "status",
        "ttft_ms", "total_ms"]


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="quiver.access")
    return caplog


def _lines(caplog, count: int, timeout: float = 10) -> list[dict[str, str]]:
    """The first `count` access lines, waiting for the server to write them (a cancelled call ends after the client
    has gone)."""
    deadline = time.monotonic() + timeout
    while len(records := [r for r in caplog.records if r.name == "quiver.access"]) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(records) == count, [r.getMessage() for r in records]
    for r in records:
        assert r.levelno == logging.INFO and SECRET not in r.getMessage() and "zebra" not in r.getMessage()
    return [dict(pair.split("=", 1) for pair in r.getMessage().split()) for r in records]


def test_a_finished_call_is_logged_with_its_ids_counts_and_times(running, access):
    with QuiverClient(running.target) as client:
        out = client.generate(text=SECRET, max_new_tokens=5, ignore_eos=True)
    (line,) = _lines(access, 1)
    assert list(line) == KEYS
    assert line["request_id"] == out.request_id and (line["adapter"], line["adapter_version"]) == ("-", "0")
    assert (line["n"], line["prompt_tokens"], line["output_tokens"]) == ("1", str(out.usage.prompt_tokens), "5")
    assert (line["finish"], line["status"]) == ("length", "OK")
    assert 0 <= float(line["ttft_ms"]) <= float(line["total_ms"])


def test_samples_and_an_adapter_are_logged(running, access, zoo):
    with QuiverClient(running.target) as client:
        client.upload_adapter("tuned", zoo["lora"])
        out = client.generate(text=SECRET, max_new_tokens=4, ignore_eos=True, adapter_id="tuned", n=2, stop=("\n",))
    (line,) = _lines(access, 1)
    assert (line["adapter"], line["adapter_version"]) == ("tuned", str(out.adapter_version))
    assert line["n"] == "2" and line["status"] == "OK" and line["request_id"] == out.request_id
    assert int(line["output_tokens"]) == sum(s.usage.completion_tokens for s in out.samples)
    assert line["finish"] == ",".join("stop" if s.finish_reason == pb.FINISH_REASON_STOP else "length" for s in out.samples)


def test_a_cancelled_call_is_logged_as_cancelled(running, access, monkeypatch):
    pace_steps(monkeypatch, running.service)
    with QuiverClient(running.target) as client:
        stream = client.generate_stream(text=SECRET, max_new_tokens=400, ignore_eos=True)
        received = 0
        for message in stream:
            received += len(message.token_ids)
            if received >= 3:
                stream.cancel()
                break
    (line,) = _lines(access, 1)
    assert (line["status"], line["finish"]) == ("CANCELLED", "-")
    assert line["request_id"].startswith("req-") and int(line["output_tokens"]) >= 3 and line["ttft_ms"] != "-"


def test_refused_calls_are_logged_with_their_status(running, access):
    with QuiverClient(running.target) as client:
        for fields in ({"temperature": -1.0}, {"adapter_id": "nope"}, {"adapter_id": "a b"}):
            with pytest.raises(grpc.RpcError):
                client.generate(text=SECRET, **fields)
    invalid, missing, bad_id = _lines(access, 3)
    assert (invalid["status"], invalid["request_id"], invalid["prompt_tokens"], invalid["ttft_ms"]) == (
        "INVALID_ARGUMENT", "-", "0", "-")
    assert (missing["status"], missing["adapter"], missing["adapter_version"]) == ("NOT_FOUND", "nope", "0")
    assert (bad_id["status"], bad_id["adapter"]) == ("INVALID_ARGUMENT", "-")
