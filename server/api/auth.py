"""Bearer-token auth: `authorization: Bearer <token>` metadata, compared in constant time.

Each method needs a role. ADMIN methods (loading, uploading, unloading adapters) need the admin token
when one is configured; CLIENT methods (generation, listing, server info) need one of the client tokens or
the admin token when client tokens are configured; OPEN methods (health, reflection) need nothing. With only
client tokens, one is needed for every method; with no token, every method is open. Several client tokens
make several clients, e.g. each with its own prefix-cache scope (server/api/cache_scope.py).
"""

import contextlib
import enum
import hmac

import grpc

from quiver.api.intercept import wrap_handler
from quiver.errors import PermissionDenied, Unauthenticated


class Role(enum.Enum):
    OPEN = "open"
    CLIENT = "client"
    ADMIN = "admin"


ADMIN_METHODS = frozenset({
    "/quiver.v1.AdapterService/LoadAdapter",
    "/quiver.v1.AdapterService/UploadAdapter",
    "/quiver.v1.AdapterService/UnloadAdapter",
})
_QUIVER_PREFIX = "/quiver.v1."


def role_for(method: str) -> Role:
    if method in ADMIN_METHODS:
        return Role.ADMIN
    return Role.CLIENT if method.startswith(_QUIVER_PREFIX) else Role.OPEN


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, admin_token: str | None, client_tokens: tuple[str, ...]) -> None:
        self._admin = admin_token.encode() if admin_token else None
        self._clients = tuple(t.encode() for t in client_tokens)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        role = role_for(handler_call_details.method)
        metadata = handler_call_details.invocation_metadata or ()

        @contextlib.asynccontextmanager
        async def checked(_context: grpc.aio.ServicerContext):
            self._check(role, metadata)
            yield

        return wrap_handler(handler, around=checked)

    def authorize(self, method: str, metadata) -> None:
        """Check one call outside a gRPC server (e.g. behind Ray Serve's proxy); raises as the interceptor does."""
        self._check(role_for(method), metadata)

    def _check(self, role: Role, metadata) -> None:
        if role is Role.OPEN:
            return
        needed = (self._admin,) if role is Role.ADMIN and self._admin is not None else self._clients
        if not needed:
            return
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("this method needs a bearer token: send 'authorization: Bearer <token>' metadata")
        if _one_of(token, needed) or (role is Role.CLIENT and self._admin is not None and _equal(token, self._admin)):
            return
        if role is Role.ADMIN and _one_of(token, self._clients):
            raise PermissionDenied("a client token does not allow managing adapters; use the admin token")
        raise Unauthenticated("the bearer token is not valid for this server")


def bearer_token(metadata) -> bytes | None:
    """The token of a call's `authorization: Bearer <token>` metadata, if it has one."""
    for key, value in metadata:
        if key == "authorization":
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _one_of(token: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Compared with every token, in constant time each: the time taken does not say which one matched."""
    return any([_equal(token, t) for t in tokens])
