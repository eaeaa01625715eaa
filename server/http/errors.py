"""Errors of the HTTP endpoint in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

The typed errors of quiver.errors map to HTTP statuses through the gRPC code server/api/errors.py gives them
(`status_code`), and their messages reach the client through the same `client_message` (the server's
directories cut out):

    InvalidArgument, a request body that does not validate   400 invalid_request_error
    Unauthenticated                                           401 authentication_error
    PermissionDenied                                          403 permission_error
    NotFound (the `model`: no adapter of that id)             404 invalid_request_error, code model_not_found
    AlreadyExists                                             409 invalid_request_error
    ResourceExhausted (the waiting queue is full)             429 rate_limit_error
    FailedPrecondition (e.g. no chat template)                400 invalid_request_error
    Unavailable (draining), the model still loading           503 server_error
    anything else: a bug, logged with its traceback           500 server_error
"""

import logging
from pathlib import Path

import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from quiver.api.errors import client_message, status_code
from quiver.errors import NotFound, QuiverError, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

_STATUSES: dict[grpc.StatusCode, tuple[int, str]] = {  # by the gRPC code of the error
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
}


class ModelNotFound(NotFound):
    """The request's `model` names neither the base model nor a loaded adapter."""


class Loading(Unavailable):
    """The model is still loading: no generation can run yet."""


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of `error` (500 server_error for a bug: gRPC's INTERNAL)."""
    return _STATUSES.get(status_code(error), (500, "server_error"))


def quiver_error_body(error: QuiverError, *, server_dirs: tuple[Path, ...]) -> tuple[int, dict]:
    status, type_ = status_of(error)
    param, code = ("model", "model_not_found") if isinstance(error, ModelNotFound) else (None, None)
    if isinstance(error, Unauthenticated):
        code = "invalid_api_key"
    return status, error_body(client_message(error, server_dirs=server_dirs), type_, param=param, code=code)


def internal_error_body(where: str) -> tuple[int, dict]:
    return 500, error_body(f"internal error in {where}; see the server log", "server_error")


def quiver_error_response(error: QuiverError, *, server_dirs: tuple[Path, ...]) -> JSONResponse:
    status, body = quiver_error_body(error, server_dirs=server_dirs)
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error_response(error: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, or does not fit the request's schema: 400 naming the first field at fault."""
    first = error.errors()[0] if error.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "the request body is not valid")
    return JSONResponse(
        error_body(f"{param}: {message}" if param else message, "invalid_request_error", param=param), status_code=400
    )
