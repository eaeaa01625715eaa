"""Property: whatever the sampling parameters of the requests beside them, and however large the scale of an
in-memory LoRA some of them use, greedy victims in the same batch keep their tokens, and no request ends
with an error that is not a QuiverError (that would be INTERNAL)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quiver.engine.request import SamplingParams
from quiver.errors import FailedPrecondition
from tests.support.adapter_zoo import huge_lora
from tests.support.harness import make_service
from tests.support.idle import wait_idle
from tests.support.streams import run

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)
VICTIMS = [([5, 9, 14, 3], None), ([7, 8, 9, 10, 11, 12, 13], "lora"), ([20, 21, 22], "prefix"),
           ([44, 45, 46, 47, 48], "bottleneck")]

temperatures = st.one_of(
    st.just(0.0),
    st.floats(1e-45, 1e-30),
    st.floats(1e-30, 1e6),
    st.sampled_from([5e-324, 1e-300, 1e300]),  # a float64 subnormal; far below and far above float32's range
)
others = st.lists(
    st.tuples(
        st.lists(st.integers(3, 159), min_size=1, max_size=24),  # prompt
        st.sampled_from([None, "lora", "scaled"]),  # adapter
        temperatures,
        st.integers(0, 200),  # top_k, beyond the vocabulary (160) too
        st.floats(1e-6, 1.0),  # top_p
        st.integers(0, 2**63 - 1),  # seed
    ),
    min_size=1,
    max_size=3,
)


@pytest.fixture(scope="module")
def setup(model_path, zoo):
    service = make_service(model_path, num_kv_blocks=48)
    for name in ("lora", "prefix", "bottleneck"):
        service.load_adapter(name, zoo[name])
    victims = [(prompt, adapter, GREEDY) for prompt, adapter in VICTIMS]
    reference = run(service, victims)
    yield service, victims, reference
    service.shutdown(timeout=30)


@settings(max_examples=50, deadline=None)
@given(scale=st.integers(-3, 30).map(lambda e: 10.0**e), requests=others)
def test_no_request_disturbs_greedy_victims_or_ends_internal(setup, scale, requests):
    service, victims, reference = setup
    service.register_adapter("scaled", huge_lora(service.engine, 1.0, scale=scale), replace=True)
    mixed = [
        (prompt, adapter, SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed, max_new_tokens=6, ignore_eos=True))
        for prompt, adapter, t, k, p, seed in requests
    ]
    got = run(service, victims + mixed)
    assert got[: len(victims)] == reference
    for tokens, error in got[len(victims):]:
        assert error is None or isinstance(error, FailedPrecondition), error
        assert (len(tokens) == 6) == (error is None)
    assert wait_idle(service) == []
