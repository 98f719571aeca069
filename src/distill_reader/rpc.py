"""gRPC and event-loop plumbing shared by the servers and clients (internal, not public API).

- :data:`MAX_MESSAGE_BYTES`: the one limit on OIP message sizes, for the teacher client and server
  (:data:`MAX_DISCOVERY_REQUEST_BYTES`, discovery's, is another limit for another protocol);
- :func:`run_until_signal` / :func:`stop_on_signals`: the one way a command runs until SIGINT/SIGTERM;
- :class:`LoopThread`: the one way to run an event loop in a background thread, and
  :class:`BackgroundServer` over it, the one way to run a server (teacher or discovery) in one;
- :func:`split_hostport`: the one parser of a ``host:port`` address, and :func:`require_hostport`,
  the same with an error naming the setting;
- :func:`strict_handler` serves a servicer's async methods like the generated ``add_*_to_server``
  does, except that it parses requests itself, so a request that is not a valid protobuf gets
  ``INVALID_ARGUMENT`` naming the expected message (gRPC's generated deserializer would fail before
  the servicer runs, with ``UNKNOWN``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import re
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

T = TypeVar("T")

_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def split_hostport(value: str, *, allow_port_zero: bool = False) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` address (an IPv6 host in brackets; port 1-65535, or 0 if
    allowed), or None if ``value`` is not one. Callers raise their own error, naming the setting."""
    match = _HOSTPORT.match(value or "")
    if match is None or len(value) > 262:
        return None
    port = int(match.group(2))
    return (match.group(1), port) if (0 if allow_port_zero else 1) <= port < 65536 else None


def require_hostport(
    value: str, what: str, *, allow_port_zero: bool = False, error: type[Exception] = ValueError
) -> tuple[str, int]:
    """:func:`split_hostport`, or ``error`` naming ``what`` (the flag or key) and the value."""
    parsed = split_hostport(value, allow_port_zero=allow_port_zero)
    if parsed is None:
        low = 0 if allow_port_zero else 1
        raise error(f"{what} must be HOST:PORT with a port in {low}-65535, got {value!r}")
    return parsed


#: The largest OIP message the teacher client and server accept (a d_batch of big tensors); the
#: default of ``distill teacher serve --max-message-mb``.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: The largest request the discovery server accepts. Not :data:`MAX_MESSAGE_BYTES`: discovery's
#: requests are names and addresses (well under 1 KiB), and any client that reaches the port may
#: send one before its token is checked, so the server keeps what it buffers per request small.
MAX_DISCOVERY_REQUEST_BYTES = 64 * 1024


def stop_on_signals(stop: asyncio.Event, on_signal: Callable[[signal.Signals], None] | None = None) -> None:
    """In the running loop, make SIGINT and SIGTERM call ``on_signal(sig)`` (if given) and set ``stop``."""
    loop = asyncio.get_running_loop()

    def received(sig: signal.Signals) -> None:
        if on_signal is not None:
            on_signal(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, received, sig)


def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[T]], on_signal: Callable[[signal.Signals], None] | None = None
) -> T:
    """``asyncio.run(main(stop))`` where SIGINT and SIGTERM set ``stop`` (see :func:`stop_on_signals`)."""

    async def runner() -> T:
        stop = asyncio.Event()
        stop_on_signals(stop, on_signal)
        return await main(stop)

    return asyncio.run(runner())


class LoopThread:
    """An asyncio event loop in a daemon thread; :meth:`run` runs a coroutine on it from any thread."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait (at most ``timeout`` s) for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the loop and join the thread (idempotent); False if the thread did not end in time."""
        if self._loop.is_closed():
            return True
        with contextlib.suppress(RuntimeError):  # already stopped
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._loop.close()
        return True


class AsyncServer(Protocol):
    """What :class:`BackgroundServer` runs: a server started and stopped by coroutines."""

    async def start(self) -> Any: ...

    async def stop(self) -> Any: ...


S = TypeVar("S", bound=AsyncServer)
B = TypeVar("B", bound="BackgroundServer")


class BackgroundServer(Generic[S]):
    """A server made, started and stopped on an event loop of its own (a :class:`LoopThread`): the
    one way the teacher and discovery servers run in the background, for tests, demos and embedding.

    ``make`` is called on that loop (a server may hold clients bound to the loop it was made on);
    ``server`` is what it made, once :meth:`start` returned."""

    def __init__(self, name: str, make: Callable[[], S]) -> None:
        self.name = name
        self._make = make
        self._thread = LoopThread(name)
        self.server: S | None = None

    def start(self: B, timeout: float = 10.0) -> B:
        """Make and start the server; wait up to ``timeout`` s until it is bound. Raises what its
        start raised, or TimeoutError (the start is then cancelled)."""

        async def make_and_start() -> S:
            server = self._make()
            await server.start()
            return server

        self._thread.start()
        starting = asyncio.run_coroutine_threadsafe(make_and_start(), self._thread.loop)
        try:
            self.server = starting.result(timeout)
        except concurrent.futures.TimeoutError:
            starting.cancel()
            self._thread.stop(timeout)
            raise TimeoutError(f"the {self.name} did not start within {timeout:g} s") from None
        except BaseException:
            self._thread.stop(timeout)
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, then its thread (idempotent); each waits up to ``timeout`` s."""
        if self.server is not None and self._thread.loop.is_running():
            with contextlib.suppress(Exception):  # it failed while stopping: the thread goes anyway
                self._thread.run(self.server.stop(), timeout)
        if not self._thread.stop(timeout):
            log.warning("the %s thread did not stop within %.0f s", self.name, timeout)


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


def strict_handler(
    servicer: object, service: ServiceDescriptor, streams: Collection[str] = ()
) -> grpc.GenericRpcHandler:
    """A generic handler for every unary-request method of ``service`` that ``servicer`` implements
    as a coroutine (or async generator, for server streaming), and for the bidirectional streams
    named in ``streams`` that it implements as an async generator (given an async iterator of the
    parsed requests); others answer UNIMPLEMENTED (or are left to another handler). A malformed
    request (in a stream too: the stream ends) is INVALID_ARGUMENT naming its message type."""
    handlers = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if implementation is None:
            continue
        parse = _parser(message_factory.GetMessageClass(method.input_type))
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming:
            if not (method.name in streams and method.server_streaming and inspect.isasyncgenfunction(implementation)):
                continue

            async def bidi(
                raws: AsyncIterator, context: Any, implementation=implementation, parse=parse
            ) -> AsyncIterator:
                async def requests() -> AsyncIterator:
                    async for raw in raws:
                        yield await parse(raw, context)

                async for response in implementation(requests(), context):
                    yield response

            handlers[method.name] = grpc.stream_stream_rpc_method_handler(bidi, response_serializer=serialize)
        elif method.server_streaming and inspect.isasyncgenfunction(implementation):

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
