"""InferenceService: Generate, GenerateStream and GetServerInfo over the engine service (generation.py does the
generation; this file turns its pieces into messages)."""

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

import quiver
from quiver.api.cache_scope import CacheSalts
from quiver.api.convert import FINISH_REASONS, logprob_messages, sample_count, sampling_params
from quiver.api.generation import GenerationInput, Generator, Piece
from quiver.api.state import ServingState
from quiver.engine.service import EngineService
from quiver.metrics import Metrics
from quiver.v1 import inference_pb2 as pb
from quiver.v1 import inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self, *, state: ServingState, metrics: Metrics, max_upload_bytes: int, max_prompt_bytes: int, cache_salts: CacheSalts
    ) -> None:
        """`max_prompt_bytes`: the largest prompt text tokenised (see prompts.py); `cache_salts`: each request's
        prefix-cache scope."""
        self._state = state
        self._generator = Generator(state=state, metrics=metrics, max_prompt_bytes=max_prompt_bytes)
        self._max_upload_bytes = max_upload_bytes
        self._max_prompt_bytes = max_prompt_bytes
        self._cache_salts = cache_salts

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        samples: dict[int, pb.Sample] = {}
        response = pb.GenerateResponse()
        text = functools.cache(self._generator.token_text)  # a token's text, decoded once per call
        async for piece in self._generate(request, context):
            response.request_id = piece.request_id
            _set_adapter(response, piece)
            if piece.prompt_logprobs is not None and piece.index == 0:
                response.prompt_logprobs.extend(logprob_messages(piece.prompt_logprobs, text))
            sample = samples.setdefault(piece.index, pb.Sample(index=piece.index))
            sample.text += piece.text
            sample.token_ids.extend(piece.token_ids)
            sample.logprobs.extend(logprob_messages(piece.logprobs, text))
            if piece.finish is not None:
                sample.finish_reason = FINISH_REASONS[piece.finish.reason]
                sample.usage.CopyFrom(_usage(piece))
        first = samples[0]
        response.text, response.finish_reason = first.text, first.finish_reason
        response.token_ids.extend(first.token_ids)
        response.usage.CopyFrom(first.usage)
        response.logprobs.extend(first.logprobs)
        if len(samples) > 1:
            response.samples.extend(samples[i] for i in sorted(samples))
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        text = functools.cache(self._generator.token_text)  # a token's text, decoded once per call
        async for piece in self._generate(request, context):
            message = pb.GenerateStreamResponse(
                request_id=piece.request_id, index=piece.index, text=piece.text, token_ids=piece.token_ids,
                logprobs=logprob_messages(piece.logprobs, text),
            )
            _set_adapter(message, piece)
            if piece.prompt_logprobs is not None:
                message.prompt_logprobs.extend(logprob_messages(piece.prompt_logprobs, text))
            if piece.finish is not None:
                message.finish_reason = FINISH_REASONS[piece.finish.reason]
                message.usage.CopyFrom(_usage(piece))
            yield message

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        return server_info(self._state.engine(), max_upload_bytes=self._max_upload_bytes, max_prompt_bytes=self._max_prompt_bytes)

    def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Piece]:
        """The request's pieces (generation.py): its stream is aborted in the engine if the call ends early
        (cancel, deadline), and the call is accounted for under its status."""

        def prepare() -> GenerationInput:
            return GenerationInput(
                prompt=request.prompt,
                params=sampling_params(request.sampling, request.stopping),
                n=sample_count(request.sampling),
                cache_salt=self._cache_salts.salt(request, context.invocation_metadata() or ()),
            )

        def deadline_passed() -> bool:
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        return self._generator.run(request.adapter_id, prepare, deadline_passed=deadline_passed)


def _set_adapter(message: pb.GenerateResponse | pb.GenerateStreamResponse, piece: Piece) -> None:
    if piece.adapter is not None:
        message.adapter_id, message.adapter_version = piece.adapter


def _usage(piece: Piece) -> pb.Usage:
    return pb.Usage(prompt_tokens=piece.finish.prompt_tokens, completion_tokens=piece.finish.completion_tokens)


def server_info(service: EngineService, *, max_upload_bytes: int, max_prompt_bytes: int) -> pb.GetServerInfoResponse:
    engine = service.engine
    config = engine.config
    model = engine.runner.model
    weight = next(model.parameters())
    return pb.GetServerInfoResponse(
        version=quiver.__version__,
        model=pb.ModelInfo(
            name=Path(model.config._name_or_path).name,
            model_type=model.config.model_type,
            vocab_size=engine.vocab_size,
            has_chat_template=bool(engine.tokenizer is not None and engine.tokenizer.chat_template),
        ),
        runtime=pb.RuntimeInfo(
            dtype=str(weight.dtype).removeprefix("torch."), device=str(weight.device), kernel_backend=engine.runner.ops.name
        ),
        limits=pb.ServerLimits(
            max_model_len=engine.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_queue_len=config.max_queue_len,
            kv_block_size=config.block_size,
            kv_blocks_total=engine.blocks.num_blocks,
            adapter_slots=config.adapter_slots,
            max_lora_rank=config.max_lora_rank,
            max_bottleneck_size=config.max_bottleneck_size,
            max_upload_bytes=max_upload_bytes,
            max_prompt_bytes=max_prompt_bytes,
        ),
    )
