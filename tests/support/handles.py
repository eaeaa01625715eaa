"""Adapter handles for tests that need a request's adapter but no registry (the scheduler, the sampler)."""

from quiver.adapters.placement import AdapterVersion
from quiver.adapters.weights import AdapterKind


def adapter_handle(adapter_id: str, version: int = 1) -> AdapterVersion:
    """Version `version` of a LoRA adapter `adapter_id`, as a request pins it: no weights, not placed."""
    return AdapterVersion(adapter_id=adapter_id, version=version, kind=AdapterKind.LORA, source=None, weights=None,
                          nbytes=0, num_params=0, summary="")
