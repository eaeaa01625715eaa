"""Which prefix-cache scope a generation request runs in: the engine's `cache_salt`.

Requests share cached KV blocks only within one scope, so a client cannot learn by timing (a first token
that comes sooner when a guessed prompt beginning is cached) what another scope's prompts held.

    request sets cache_scope S     -> the scope named S, shared by every request that gives S, whoever sends it
    else, scope per-token          -> the scope of the caller's bearer token when the server checks client
                                      tokens (the admin token, used to generate, has its own); the one
                                      global scope when it checks none (every caller is the same party)
    else, scope global             -> the one global scope (the engine's salt None)

A salt is a SHA-256 of the token or the name, never the token itself.
"""

import enum
import hashlib

from quiver.api.auth import bearer_token
from quiver.errors import InvalidArgument
from quiver.v1 import inference_pb2 as pb

MAX_SCOPE_NAME = 256


class CacheScope(enum.Enum):
    PER_TOKEN = "per-token"
    GLOBAL = "global"


class CacheSalts:
    def __init__(self, scope: CacheScope, *, tokens_checked: bool) -> None:
        """`tokens_checked`: the server refuses generation calls without a valid client (or admin) token,
        so the bearer token a call carries is one of them."""
        self._per_token = scope is CacheScope.PER_TOKEN and tokens_checked

    def salt(self, request: pb.GenerateRequest, metadata) -> str | None:
        """The cache salt of `request`, whose call carried `metadata`; InvalidArgument for a scope name over
        MAX_SCOPE_NAME bytes."""
        if request.cache_scope:
            name = request.cache_scope.encode()
            if len(name) > MAX_SCOPE_NAME:
                raise InvalidArgument(f"cache_scope is {len(name):,} bytes; at most {MAX_SCOPE_NAME} are allowed")
            return _digest(b"scope\0" + name)
        if self._per_token:
            token = bearer_token(metadata)
            return _digest(b"token\0" + token) if token is not None else None
        return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
