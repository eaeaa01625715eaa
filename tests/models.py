"""Moved to tests/support/models.py. This re-export stays only until tests/adapters/test_formats.py,
tests/trainer/trainer_fixtures.py and benchmarks/cache_probe.py import from tests.support.models."""

from tests.support.models import eager, engine_for, run_staggered, save_tiny

__all__ = ["eager", "engine_for", "run_staggered", "save_tiny"]
