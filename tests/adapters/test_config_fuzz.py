"""Fuzzed adapter configs: `EngineService.load_adapter` either serves the adapter or raises InvalidArgument.

Each example takes one of the zoo's adapters (all six kinds) and sets one to three of its config keys to
random JSON values (any type, huge and non-finite numbers, nesting, patterns); the weights are the zoo's.
"""

import itertools
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quiver.adapters import patterns
from quiver.adapters.formats import CONFIG_FILE, WEIGHTS_FILE
from quiver.errors import InvalidArgument
from tests.support.adapter_zoo import ALL
from tests.support.harness import make_service

KEYS = [
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "init_lora_weights", "bias",
    "use_dora", "bottleneck_size", "non_linearity", "target_sites", "scaling", "num_virtual_tokens", "token_dim",
    "num_layers", "num_attention_heads", "prefix_projection", "num_transformer_submodules", "modules_to_save",
    "encoder_hidden_size", "some_future_option",
]
WORDS = ["LORA", "BOTTLENECK", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "CAUSAL_LM", "all-linear", "q_proj",
         "v_proj", "down_proj", "gelu", "relu", "attn", "mlp", "layers", r".*\.(q|v)_proj", "(.*.*)*!", "(", "none"]
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats() | st.text(max_size=12) | st.sampled_from(WORDS)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(WORDS), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def service(model_path):
    service = make_service(model_path)
    yield service
    service.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzed"), itertools.count()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(ALL), changes=st.dictionaries(st.sampled_from(KEYS), JSON, min_size=1, max_size=3))
def test_a_fuzzed_config_is_served_or_refused_with_invalid_argument(service, zoo, workdir, monkeypatch, kind, changes):
    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 0.5)
    root, numbers = workdir
    adapter = root / str(next(numbers))
    adapter.mkdir()
    os.link(zoo[kind] / WEIGHTS_FILE, adapter / WEIGHTS_FILE)
    config = json.loads((zoo[kind] / CONFIG_FILE).read_text())
    (adapter / CONFIG_FILE).write_text(json.dumps(config | changes))
    try:
        service.load_adapter("fuzzed", adapter, replace=True)
    except InvalidArgument as e:
        assert str(root) not in str(e)
    finally:
        shutil.rmtree(adapter)
