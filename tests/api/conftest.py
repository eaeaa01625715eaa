"""Fixtures of the gRPC tests (the tiny model and its adapters, `model_path` and `zoo`, are in tests/conftest.py)."""

import pytest

from tests.support.harness import start_server


@pytest.fixture
def running(model_path, tmp_path):
    """A plain server: no auth, no TLS, no adapter roots."""
    s = start_server(model_path, tmp_path)
    yield s
    s.stop()
