"""Moved to tests/support/adapter_zoo.py. This re-export stays only until tests/adapters/test_config_fuzz.py and
tests/trainer/test_trainer_export.py import from tests.support.adapter_zoo."""

from tests.support.adapter_zoo import ALL, greedy_reference, reference_model, save_zoo

__all__ = ["ALL", "greedy_reference", "reference_model", "save_zoo"]
