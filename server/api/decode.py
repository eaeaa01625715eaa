"""A request message that does not parse ends its call with INVALID_ARGUMENT, not gRPC's UNKNOWN.

gRPC parses each request before any handler runs; a parse failure (corrupt bytes, a string field that is
not UTF-8) would end the call with UNKNOWN and log a server traceback, though the client is at fault.
`DecodeInterceptor`, the innermost interceptor, gives every method a deserializer that returns an
`Undecodable` marker instead of raising; the marker raises InvalidArgument where the method would read
that message, inside the outer interceptors, so auth is checked first and the error mapping reports it.
"""

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from quiver.api.intercept import FACTORIES
from quiver.errors import InvalidArgument


@dataclass(frozen=True)
class Undecodable:
    """Stands for a request message that did not parse."""

    reason: str  # e.g. "Error parsing message with type 'quiver.v1.GenerateRequest': String field had bad UTF-8"

    def refuse(self) -> InvalidArgument:
        return InvalidArgument(f"the request message is malformed ({self.reason}); send a valid quiver.v1 message")


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        for kind, factory in FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return factory(
                    _checked(behavior, streaming_in=handler.request_streaming, streaming_out=handler.response_streaming),
                    request_deserializer=_lenient(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
        raise AssertionError(f"a method handler without behaviour: {handler!r}")


def _lenient(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as e:
            return Undecodable(str(e))

    return parse


def _checked(behavior, *, streaming_in: bool, streaming_out: bool):
    async def request_or_refuse(request):
        if isinstance(request, Undecodable):
            raise request.refuse()
        return request

    async def messages(requests: AsyncIterator) -> AsyncIterator:
        async for request in requests:
            yield await request_or_refuse(request)

    async def unary(request, context):
        if streaming_in:
            return await behavior(messages(request), context)
        return await behavior(await request_or_refuse(request), context)

    async def stream(request, context):
        request = messages(request) if streaming_in else await request_or_refuse(request)
        async for response in behavior(request, context):
            yield response

    return stream if streaming_out else unary
