"""Adapters: parse and validate adapter directories (formats), their typed weights, and where they live."""
