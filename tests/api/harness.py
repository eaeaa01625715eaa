"""Moved to tests/support/harness.py. This re-export stays only until tests/adapters/test_config_fuzz.py,
tests/adapters/test_patterns.py, tests/api/test_api_adapters.py, tests/api/test_api_uploads.py,
tests/api/test_api_cli.py and tests/test_ray_serve.py import from tests.support.harness."""

from tests.support.harness import SMALL_ENGINE, RunningServer, health, make_service, start_server

__all__ = ["SMALL_ENGINE", "RunningServer", "health", "make_service", "start_server"]
