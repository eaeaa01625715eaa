"""Our top-level `kernels` package shares its name with Hugging Face's `kernels` hub package, which
transformers probes for at import. transformers must never take ours for it."""

import subprocess
import sys
from pathlib import Path

import pytest

import kernels

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, kernels
from transformers.utils import import_utils
assert importlib.util.find_spec("kernels").origin == kernels.__file__
print(import_utils.is_kernels_available())
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1))
print("loaded")
"""


def test_ours_is_the_kernels_on_the_path():
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "tests"])
def test_transformers_does_not_mistake_ours_for_hub_kernels(cwd):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "loaded"]
