"""Fixtures of the gRPC tests: a tiny model with a tokenizer, and adapters of all six kinds for it."""

import pytest

from tests.adapter_zoo import save_zoo
from tests.api.harness import start_server
from tests.api.tiny_tokenizer import save_tokenizer
from tests.models import save_tiny


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    path = save_tiny("llama", tmp_path_factory.mktemp("api-model"))
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def zoo(model_path, tmp_path_factory):
    return save_zoo(model_path, tmp_path_factory.mktemp("api-zoo"))


@pytest.fixture
def running(model_path, tmp_path):
    """A plain server: no auth, no TLS, no adapter roots."""
    s = start_server(model_path, tmp_path)
    yield s
    s.stop()
