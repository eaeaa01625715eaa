"""Moved to tests/support/tiny_tokenizer.py. This re-export stays only until benchmarks/cache_probe.py imports
from tests.support.tiny_tokenizer."""

from tests.support.tiny_tokenizer import save_tokenizer

__all__ = ["save_tokenizer"]
