"""Wrap the behaviour of a gRPC method handler, whatever its cardinality, for server interceptors.

`around(context)` is an async context manager entered around the whole call: the unary response, or
the whole iteration of a response stream. Exceptions raised by the call pass through it.
"""

from collections.abc import Callable
from typing import AsyncContextManager

import grpc

Around = Callable[[grpc.aio.ServicerContext], AsyncContextManager[None]]

FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def wrap_handler(handler: grpc.RpcMethodHandler, *, around: Around) -> grpc.RpcMethodHandler:
    for kind, factory in FACTORIES.items():
        behavior = getattr(handler, kind)
        if behavior is None:
            continue
        wrapped = _wrap_stream(behavior, around) if handler.response_streaming else _wrap_unary(behavior, around)
        return factory(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    raise AssertionError(f"a method handler without behaviour: {handler!r}")


def _wrap_unary(behavior, around: Around):
    async def call(request, context):
        async with around(context):
            return await behavior(request, context)

    return call


def _wrap_stream(behavior, around: Around):
    async def call(request, context):
        async with around(context):
            async for response in behavior(request, context):
                yield response

    return call

