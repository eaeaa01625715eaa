"""Proto messages ↔ engine objects."""

from collections.abc import Callable

from quiver.engine.request import MAX_SAMPLES, MAX_TOP_LOGPROBS, FinishReason, SamplingParams, TokenLogprob
from quiver.engine.service import AdapterInfo
from quiver.errors import InvalidArgument
from quiver.v1 import adapters_pb2, inference_pb2

DEFAULT_MAX_NEW_TOKENS = 256  # when StoppingCriteria.max_new_tokens is 0

FINISH_REASONS = {FinishReason.STOP: inference_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH}
LOCATIONS = {
    "device": adapters_pb2.ADAPTER_LOCATION_DEVICE,
    "host": adapters_pb2.ADAPTER_LOCATION_HOST,
    "disk": adapters_pb2.ADAPTER_LOCATION_DISK,
}


def sampling_params(sampling: inference_pb2.SamplingParams, stopping: inference_pb2.StoppingCriteria) -> SamplingParams:
    """Raises InvalidArgument (from SamplingParams, or here for top_logprobs) for out-of-range values. Unset
    optional fields take their neutral values (no penalty, no logprobs)."""
    top_logprobs = sampling.top_logprobs if sampling.HasField("top_logprobs") else None
    if top_logprobs is not None and top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
    return SamplingParams(
        max_new_tokens=stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=tuple(stopping.stop_token_ids),
        stop_strings=tuple(stopping.stop_strings),
        ignore_eos=stopping.ignore_eos,
        min_new_tokens=stopping.min_new_tokens,
        repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0,
        presence_penalty=sampling.presence_penalty if sampling.HasField("presence_penalty") else 0.0,
        frequency_penalty=sampling.frequency_penalty if sampling.HasField("frequency_penalty") else 0.0,
        logprobs=top_logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
    )


def sample_count(sampling: inference_pb2.SamplingParams) -> int:
    """SamplingParams.n, 0 meaning 1; InvalidArgument over MAX_SAMPLES."""
    if sampling.n > MAX_SAMPLES:
        raise InvalidArgument(f"n (samples) must be in [1, {MAX_SAMPLES}] (0 means 1), got {sampling.n}")
    return sampling.n or 1


def logprob_messages(
    logprobs: tuple[TokenLogprob | None, ...], text: Callable[[int], str]
) -> list[inference_pb2.TokenLogprob]:
    """Engine logprobs as messages, each token named by `text(token_id)`; None entries (a prompt's first token)
    are left out."""
    return [
        inference_pb2.TokenLogprob(
            token_id=lp.token_id, text=text(lp.token_id), logprob=lp.logprob, rank=lp.rank,
            alternatives=[inference_pb2.TokenLogprob.Alternative(token_id=t, text=text(t), logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
        if lp is not None
    ]


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
