"""The one place where typed errors become gRPC status codes.

`ErrorInterceptor` wraps every method: a `QuiverError` raised anywhere below ends the call with the code
of its class and its message, where the server's own directories (the store, the adapter roots) are cut
out of the paths it names; any other exception is a bug, logged with its traceback and reported as
INTERNAL. Cancellation and deadlines are left to gRPC, which reports CANCELLED / DEADLINE_EXCEEDED.
"""

import contextlib
import logging
import os
from pathlib import Path

import grpc

from quiver.api.intercept import wrap_handler
from quiver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuiverError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[QuiverError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: BaseException) -> grpc.StatusCode:
    """The status a call that raised `error` ends with (also used to label metrics)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def client_message(error: QuiverError, *, server_dirs: tuple[Path, ...]) -> str:
    """`error`'s message for the client: a path under one of `server_dirs` is named relative to it (an
    uploaded adapter's file as "<id>/<file>", one under an adapter root as LoadAdapter takes it)."""
    message = str(error)
    dirs = {str(d) for d in server_dirs} | {str(d.resolve()) for d in server_dirs}
    for d in sorted(dirs, key=len, reverse=True):
        message = message.replace(f"{d}{os.sep}", "").replace(d, "<server directory>")
    return message


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, server_dirs: tuple[Path, ...]) -> None:
        """`server_dirs`: directories whose location clients are not told (see `client_message`)."""
        self._server_dirs = server_dirs

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        @contextlib.asynccontextmanager
        async def mapped(context: grpc.aio.ServicerContext):
            try:
                yield
            except grpc.aio.AbortError:
                raise
            except QuiverError as e:
                await context.abort(status_code(e), client_message(e, server_dirs=self._server_dirs))
            except Exception:
                log.exception("bug in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")

        return wrap_handler(handler, around=mapped)
