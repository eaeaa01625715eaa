"""Test-wide set-up.

Triton kernels are tested on this CPU-only machine through Triton's interpreter, which must be chosen
before `triton` is first imported; on a machine with CUDA the kernels run for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A tiny random Llama with a tokenizer, saved once for the server tests (gRPC, Ray)."""
    # imported here, not at the top: they import triton, which must see TRITON_INTERPRET first
    from tests.support.tiny_tokenizer import save_tokenizer
    from tests.support.models import save_tiny

    path = save_tiny("llama", tmp_path_factory.mktemp("tiny-model"))
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def zoo(model_path, tmp_path_factory):
    """Adapters of all six kinds for `model_path`: {kind: directory}."""
    from tests.support.adapter_zoo import save_zoo

    return save_zoo(model_path, tmp_path_factory.mktemp("tiny-zoo"))
