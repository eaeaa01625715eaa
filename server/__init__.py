"""Quiver: many task adapters of six kinds served over one frozen base language model."""

__version__ = "0.1.0"
