"""Typed errors, raised where the problem is found and mapped to gRPC status codes in one place (server/api).

`assert` is kept for internal invariants; anything a user or operator can cause raises one of these.
"""


class QuiverError(Exception):
    """Base of every error a client may see; the message must say what to change."""


class InvalidArgument(QuiverError):
    """The request itself is malformed or out of range."""


class NotFound(QuiverError):
    """A named thing (request, adapter) does not exist."""


class AlreadyExists(QuiverError):
    """Creating something that is already there without asking to replace it."""


class ResourceExhausted(QuiverError):
    """A bounded resource (queue, memory, slots) is full; retrying later may work."""


class FailedPrecondition(QuiverError):
    """The server is not in a state to do this (e.g. shutting down)."""


class Unauthenticated(QuiverError):
    """No or bad credentials."""


class PermissionDenied(QuiverError):
    """Valid credentials that do not allow this."""


class Unavailable(QuiverError):
    """The server cannot take this call now but another try (here after a restart, or on another replica) may
    succeed, e.g. while it drains for shutdown."""
