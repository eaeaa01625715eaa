"""Fixtures of the HTTP endpoint's tests: a real server with its OpenAI-compatible endpoint on, and an `openai` client."""

import openai
import pytest

from tests.support.harness import start_server


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    """A plain server (no tokens, no TLS) with gRPC and HTTP on; shared by a module's tests."""
    s = start_server(model_path, tmp_path_factory.mktemp("http"), http_port=0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(served):
    with openai.OpenAI(base_url=served.http_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client
