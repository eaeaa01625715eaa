"""InferenceService: Generate, GenerateStream and GetServerInfo over the engine service."""

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc

import quiver
from quiver.adapters.store import validate_adapter_id
from quiver.api.cache_scope import CacheSalts
from quiver.api.convert import FINISH_REASONS, sampling_params
from quiver.api.detokenize import TextStream
from quiver.api.errors import status_code
from quiver.api.prompts import prompt_token_ids
from quiver.api.state import ServingState
from quiver.engine.request import FinishReason
from quiver.engine.service import EngineService
from quiver.metrics import Metrics
from quiver.v1 import inference_pb2 as pb
from quiver.v1 import inference_pb2_grpc


@dataclass(frozen=True)
class _Piece:
    """What one step of a generation adds; `final` is set on the last one."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    final: pb.GenerateStreamResponse | None = None


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self, *, state: ServingState, metrics: Metrics, max_upload_bytes: int, max_prompt_bytes: int, cache_salts: CacheSalts
    ) -> None:
        """`max_prompt_bytes`: the largest prompt text tokenised (see prompts.py); `cache_salts`: each request's
        prefix-cache scope."""
        self._state = state
        self._metrics = metrics
        self._max_upload_bytes = max_upload_bytes
        self._max_prompt_bytes = max_prompt_bytes
        self._cache_salts = cache_salts

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async for piece in self._generate(request, context):
            response.request_id = piece.request_id
            response.text += piece.text
            response.token_ids.extend(piece.token_ids)
            if piece.final is not None:
                response.finish_reason = piece.final.finish_reason
                response.usage.CopyFrom(piece.final.usage)
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for piece in self._generate(request, context):
            message = piece.final or pb.GenerateStreamResponse()
            message.request_id = piece.request_id
            message.text = piece.text
            message.token_ids.extend(piece.token_ids)
            yield message

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        return server_info(self._state.engine(), max_upload_bytes=self._max_upload_bytes, max_prompt_bytes=self._max_prompt_bytes)

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[_Piece]:
        """Run one request; its stream is aborted in the engine if the call ends early (cancel, deadline).
        The prompt is tokenised in a worker thread: the event loop serves every other call meanwhile."""
        async with self._state.admit() as service:
            timer = self._metrics.request(self._state.request_kind(request.adapter_id))
            status = grpc.StatusCode.CANCELLED  # unless it ends otherwise: the client went away
            try:
                tokenizer = service.engine.tokenizer
                adapter_id = validate_adapter_id(request.adapter_id) if request.adapter_id else None
                params = sampling_params(request.sampling, request.stopping)
                salt = self._cache_salts.salt(request, context.invocation_metadata() or ())
                ids = await asyncio.to_thread(prompt_token_ids, request.prompt, tokenizer, max_bytes=self._max_prompt_bytes,
                                              max_model_len=service.engine.max_model_len)
                stream = await service.submit_async(ids, params, adapter_id=adapter_id, cache_salt=salt)
                timer.admitted(num_prompt_tokens=len(ids))
                text = TextStream(tokenizer, stop_strings=params.stop_strings)
                try:
                    async for out in stream:
                        timer.tokens(len(out.new_token_ids))
                        delta = text.push(out.new_token_ids)
                        if not (out.finished or text.stopped):
                            if delta or out.new_token_ids:
                                yield _Piece(stream.request_id, delta, out.new_token_ids)
                            continue
                        reason = FinishReason.STOP if text.stopped else out.finish_reason
                        final = pb.GenerateStreamResponse(
                            finish_reason=FINISH_REASONS[reason],
                            usage=pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens),
                        )
                        yield _Piece(stream.request_id, delta + text.finish(), out.new_token_ids, final)
                        status = grpc.StatusCode.OK
                        return
                finally:
                    stream.abort()  # a no-op once the stream has ended
            except Exception as e:
                status = status_code(e)
                raise
            finally:
                remaining = context.time_remaining()
                if status is grpc.StatusCode.CANCELLED and remaining is not None and remaining <= 0:
                    status = grpc.StatusCode.DEADLINE_EXCEEDED
                timer.finished(status.name)


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
