"""gRPC plumbing shared by the servers.

:func:`strict_handler` serves a servicer's async methods like the generated ``add_*_to_server``
does, except that it parses requests itself, so a request that is not a valid protobuf gets
``INVALID_ARGUMENT`` naming the expected message (gRPC's generated deserializer would fail before
the servicer runs, with ``UNKNOWN``).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError


def _parser(request_class: type) -> Callable[[bytes, Any], Any]:
    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return request_class.FromString(raw)
        except DecodeError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"malformed request: not a valid {request_class.DESCRIPTOR.full_name} ({exc})",
            )

    return parse


def strict_handler(servicer: object, service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """A generic handler for every unary-request method of ``service`` that ``servicer`` implements
    as a coroutine (or async generator, for server streaming); others answer UNIMPLEMENTED."""
    handlers = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if method.client_streaming or implementation is None:
            continue
        parse = _parser(message_factory.GetMessageClass(method.input_type))
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.server_streaming and inspect.isasyncgenfunction(implementation):

            async def stream(raw: bytes, context: Any, implementation=implementation, parse=parse) -> AsyncIterator:
                request = await parse(raw, context)
                async for response in implementation(request, context):
                    yield response

            handlers[method.name] = grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)
        elif not method.server_streaming and inspect.iscoroutinefunction(implementation):

            async def unary(raw: bytes, context: Any, implementation=implementation, parse=parse) -> Any:
                return await implementation(await parse(raw, context), context)

            handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
