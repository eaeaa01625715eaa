"""Proto messages ↔ engine objects."""

from quiver.engine.request import FinishReason, SamplingParams
from quiver.engine.service import AdapterInfo
from quiver.v1 import adapters_pb2, inference_pb2

DEFAULT_MAX_NEW_TOKENS = 256  # when StoppingCriteria.max_new_tokens is 0

FINISH_REASONS = {FinishReason.STOP: inference_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH}
LOCATIONS = {
    "device": adapters_pb2.ADAPTER_LOCATION_DEVICE,
    "host": adapters_pb2.ADAPTER_LOCATION_HOST,
    "disk": adapters_pb2.ADAPTER_LOCATION_DISK,
}


def sampling_params(sampling: inference_pb2.SamplingParams, stopping: inference_pb2.StoppingCriteria) -> SamplingParams:
    """Raises InvalidArgument (from SamplingParams) for out-of-range values."""
    return SamplingParams(
        max_new_tokens=stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=tuple(stopping.stop_token_ids),
        stop_strings=tuple(stopping.stop_strings),
        ignore_eos=stopping.ignore_eos,
    )


def adapter_message(info: AdapterInfo, *, stored: bool) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(
        adapter_id=info.adapter_id,
        kind=adapters_pb2.AdapterKind.Value(info.kind.proto_name),
        rank=info.rank,
        num_virtual_tokens=info.num_virtual_tokens,
        num_params=info.num_params,
        num_bytes=info.nbytes,
        location=LOCATIONS[info.location],
        requests_served=info.requests_served,
        summary=info.summary,
        stored=stored,
    )
