"""The OpenAI-compatible FastAPI app: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

Every route needs what the gRPC InferenceService needs (quiver.api.auth): one of the client tokens or the
admin token as `Authorization: Bearer <token>` when the server has client tokens. Generation runs through the
protocol-independent core (quiver.api.generation) with the gRPC server's state, metrics, prompt limit and
prefix-cache scopes; this module only maps the wire format. `model` is the base model's name (its folder's,
as GetServerInfo reports it) or a loaded adapter's id. Responses carry the request id in `id` and in the
`x-request-id` header, and the adapter version that served them in `x-quiver-adapter-version` (0 for the base
model; `x-quiver-adapter` names the adapter).
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from quiver.adapters.store import validate_adapter_id
from quiver.api.auth import AuthInterceptor
from quiver.api.cache_scope import CacheSalts
from quiver.api.generation import GenerationInput, Generator, Piece
from quiver.api.state import ServingState
from quiver.engine.service import EngineService
from quiver.errors import InvalidArgument, NotFound, QuiverError
from quiver.http.errors import (
    Loading,
    ModelNotFound,
    error_body,
    internal_error_body,
    quiver_error_body,
    quiver_error_response,
    validation_error_response,
)
from quiver.http.formats import ChatFormat, CompletionFormat, Format
from quiver.http.inputs import chat_input, completion_input
from quiver.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from quiver.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

GENERATE_METHOD = "/quiver.v1.InferenceService/Generate"  # the HTTP routes need what it needs (a CLIENT role)


def base_model_name(service: EngineService) -> str:
    """The base model's name: its folder's, as GetServerInfo's ModelInfo.name says."""
    return Path(service.engine.runner.model.config._name_or_path).name


def build_app(
    *, state: ServingState, auth: AuthInterceptor, salts: CacheSalts, generator: Generator, server_dirs: tuple[Path, ...]
) -> FastAPI:
    """`server_dirs`: directories whose location error messages do not tell (quiver.api.errors.client_message)."""
    app = FastAPI(title="Quiver, OpenAI-compatible", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(QuiverError)
    async def quiver_error(_request: Request, error: QuiverError) -> JSONResponse:
        return quiver_error_response(error, server_dirs=server_dirs)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(error.detail), type_), status_code=error.status_code, headers=error.headers)

    def authorized(request: Request) -> None:
        header = request.headers.get("authorization")
        auth.authorize(GENERATE_METHOD, [("authorization", header)] if header is not None else [])

    def engine() -> EngineService:
        if state.service is None:
            raise Loading("the server is starting and the model is still loading; retry in a moment")
        return state.service

    def adapter_for(model: str) -> str:
        """The adapter id `model` names ("" for the base model); ModelNotFound for a name no adapter can have."""
        base = base_model_name(engine())
        if model == base:
            return ""
        try:
            return validate_adapter_id(model)
        except InvalidArgument:
            raise _not_found(model, base) from None

    async def generate(request: Request, body: SamplingFields, fmt: Format,
                       make_input: Callable[..., GenerationInput]) -> Response:
        adapter_id = adapter_for(body.model)
        metadata = [("authorization", request.headers["authorization"])] if "authorization" in request.headers else []

        def prepare() -> GenerationInput:
            salt = salts.salt(pb.GenerateRequest(cache_scope=body.cache_scope or ""), metadata)
            return make_input(body, cache_salt=salt)

        pieces = generator.run(adapter_id, prepare)
        try:
            if not body.stream:
                if not await _collect(request, fmt, pieces):
                    return Response(status_code=499)  # the client went away; nobody reads this
                return JSONResponse(fmt.response(), headers=_headers(fmt.request_id, fmt.adapter))
            first = await anext(pieces)
        except NotFound:
            await pieces.aclose()
            raise _not_found(body.model, base_model_name(engine())) from None
        except BaseException:
            await pieces.aclose()
            raise
        events = _events(fmt, first, pieces, include_usage=body.include_usage, server_dirs=server_dirs)
        return StreamingResponse(events, media_type="text/event-stream", headers=_headers(first.request_id, first.adapter))

    router = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @router.post("/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        fmt = CompletionFormat(model=body.model, token_text=generator.token_text, logprobs=body.logprobs is not None)
        return await generate(request, body, fmt, completion_input)

    @router.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        fmt = ChatFormat(model=body.model, token_text=generator.token_text, logprobs=body.logprobs)
        return await generate(request, body, fmt, chat_input)

    @router.get("/models")
    async def models() -> dict:
        service = engine()
        base = base_model_name(service)
        adapters = await asyncio.to_thread(service.list_adapters)
        entries = [{"id": base, "object": "model", "created": created, "owned_by": "quiver"}]
        entries += [{"id": a.adapter_id, "object": "model", "created": created, "owned_by": "quiver", "parent": base}
                    for a in sorted(adapters, key=lambda a: a.adapter_id)]
        return {"object": "list", "data": entries}

    app.include_router(router)
    return app


def _not_found(model: str, base: str) -> ModelNotFound:
    return ModelNotFound(f"the model {model!r} does not exist: name the base model {base!r} or a loaded adapter's id "
                         "(GET /v1/models lists them)")


def _headers(request_id: str, adapter: tuple[str, int] | None) -> dict[str, str]:
    """What served the call: its request id, and the adapter version (0 and no adapter id for the base model)."""
    headers = {"x-request-id": request_id, "x-quiver-adapter-version": str(adapter[1] if adapter else 0)}
    if adapter is not None:
        headers["x-quiver-adapter"] = adapter[0]
    return headers


async def _collect(request: Request, fmt: Format, pieces: AsyncIterator[Piece]) -> bool:
    """Gather every piece into `fmt`; False if the client disconnected first (the generation is then
    cancelled, which aborts it in the engine)."""

    async def gather() -> None:
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                fmt.add(piece)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body has been read: only this comes
            pass

    task, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # a no-op once it has finished
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


def _sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _events(fmt: Format, first: Piece, pieces: AsyncIterator[Piece], *, include_usage: bool,
                  server_dirs: tuple[Path, ...]) -> AsyncIterator[str]:
    """The server-sent events of a stream: a chunk per piece, the usage if asked for, then [DONE]. An error
    after the stream began is sent as an event holding the error body (the status, 200, is already sent)."""
    async with contextlib.aclosing(pieces):
        try:
            piece: Piece | None = first
            while piece is not None:
                chunk = fmt.chunk(piece)
                if chunk is not None:
                    yield _sse(chunk)
                piece = await anext(pieces, None)
        except QuiverError as e:
            yield _sse(quiver_error_body(e, server_dirs=server_dirs)[1])
            yield _sse("[DONE]")
            return
        except Exception:
            log.exception("bug while streaming %s", fmt.request_id)
            yield _sse(internal_error_body("the stream")[1])
            yield _sse("[DONE]")
            return
    if include_usage:
        yield _sse(fmt.usage_chunk())
    yield _sse("[DONE]")
