"""Per-adapter Prometheus series are capped: with 5,000 adapters registered, a scrape holds as many series as with
a hundred; the adapters with the most requests get their own, the rest are summed into adapter="other", and the
requests add up to what was submitted."""

from collections import Counter

import pytest
import torch

from quiver.adapters.weights import LoraModule, LoraWeights
from quiver.engine.request import SamplingParams
from quiver.metrics import OTHER, TIERS, Metrics
from tests.support.harness import make_service

SERIES = 10  # adapter ids with a series of their own


def _tiny_lora(service) -> LoraWeights:
    """A rank-1 LoRA on one projection: a few hundred parameters, cheap to register thousands of times."""
    h = service.engine.runner.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    return LoraWeights(modules={"model.layers.0.self_attn.q_proj": LoraModule(
        a=torch.randn(1, h, generator=g) * 0.1, b=torch.randn(h, 1, generator=g) * 0.1, scale=1.0)})


def _samples(metrics: Metrics) -> dict[str, list]:
    """Each metric family's samples, by family name."""
    return {family.name: family.samples for family in metrics.registry.collect()}


@pytest.fixture
def served(model_path):
    service = make_service(model_path, adapter_slots=4, max_lora_rank=8)
    metrics = Metrics(max_adapter_series=SERIES)
    metrics.watch(service)
    yield service, metrics
    service.shutdown(timeout=30)


def test_series_stay_bounded_with_5000_adapters(served):
    service, metrics = served
    weights = _tiny_lora(service)
    for i in range(100):
        service.register_adapter(f"a{i:04d}", weights)
    # 30 adapters with 1..6 requests each (more requests than slots: they evict each other), one named "other"
    wanted = {f"a{i:04d}": 1 + i % 6 for i in range(29)} | {OTHER: 7}
    service.register_adapter(OTHER, weights)
    ids = [a for a, n in wanted.items() for _ in range(n)]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    done = service.generate([[5, 9, 14]] * len(ids), params, adapter_ids=ids)
    assert len(done) == len(ids)
    few = _samples(metrics)
    for i in range(100, 5000):
        service.register_adapter(f"a{i:04d}", weights)
    many = _samples(metrics)

    assert sum(map(len, many.values())) == sum(map(len, few.values())) < 200, {k: len(v) for k, v in many.items()}
    tiers = many["quiver_adapter_tier"]
    counted = Counter(s.labels["adapter"] for s in tiers)
    assert len(counted) == SERIES + 1 and set(counted.values()) == {len(TIERS)}
    per_tier = Counter()
    for s in tiers:
        per_tier[s.labels["tier"]] += s.value
    assert sum(per_tier.values()) == 5001  # every adapter in exactly one tier
    assert per_tier["device"] <= 4  # the slots

    requests = {s.labels["adapter"]: s.value for s in many["quiver_adapter_requests"] if s.name.endswith("_total")}
    assert len(requests) == SERIES + 1 and sum(requests.values()) == len(ids)
    # the ten with the most requests (ties by id) have series; "other" holds the rest, the adapter "other" included
    top = sorted((a for a in wanted if a != OTHER), key=lambda a: (-wanted[a], a))[:SERIES]
    assert {a: requests[a] for a in top} == {a: wanted[a] for a in top}
    assert requests[OTHER] == len(ids) - sum(wanted[a] for a in top)

    placements = {s.labels["result"]: s.value for s in many["quiver_adapter_placements"] if s.name.endswith("_total")}
    assert placements["hit"] + placements["write"] == len(ids) and placements["write"] >= len(wanted)
    loads = {s.labels["source"]: s.value for s in many["quiver_adapter_load_seconds"] if s.name.endswith("_count")}
    assert loads == {"host_cache": placements["write"]}  # in-memory weights: every write from host memory
