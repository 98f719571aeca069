"""Running the discovery service: the gRPC server, the HTTP dashboard and metrics, runners.

``serve()`` is what ``distill discovery serve`` runs; ``DiscoveryServer`` is the same thing as an
object for embedding; ``ServerThread`` and ``running_discovery()`` run one in a background thread
for tests and demos (the teacher server's ``running_server()`` is the same, over the same
:class:`~distill_reader.rpc.BackgroundServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from distill_reader.discovery.fleet import HISTORY_STEP_S
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.service import (
    DEFAULT_KEEPALIVE_S,
    DEFAULT_TTL_S,
    DiscoveryService,
    cancel_until_done,
    status_dict,
    status_message,
)
from distill_reader.discovery.stores import open_discovery_store
from distill_reader.discovery.stores.base import StoreSecurity
from distill_reader.discovery.web import start_web
from distill_reader.errors import DiscoveryError
from distill_reader.rpc import MAX_DISCOVERY_REQUEST_BYTES, BackgroundServer, require_hostport, strict_handler
from distill_reader.security import Secret, TlsFiles, TokenInterceptor, add_port, is_loopback, warn_if_exposed

log = logging.getLogger(__name__)

# Clients ping every second to notice a vanished server quickly; allow that.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_DISCOVERY_REQUEST_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    # gRPC queues calls that arrive faster than the asyncio server takes them, and past 1,000
    # queued it cancels new ones at random (3,000: all): a burst of students connecting at once
    # (thousands of WatchAssignment streams) would see CANCELLED. They are cheap to queue.
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]

# The garbage collector's thresholds in a serving process (see tune_gc). Each open stream holds about
# 60 long-lived objects of gRPC's (600,000 at 10,000 students); with the interpreter's defaults
# (700, 10, 10) a burst of joins sets off a full collection each time they grow by a quarter: 13
# full collections of 0.3-0.5 s, about half the server's time in a burst of 10,000. A middle
# threshold of 0 makes every other collection a middle one: a stream's objects, alive for good, are
# looked at 1.5 times on average on their way to the oldest generation instead of twice (young
# 10,000, then middle 100,000): 0.31-0.35 s of collections in a burst of 10,000 instead of
# 0.45-0.52 s. Full collections (0.4 s at 10,000 streams) come after 500 middle ones, about as
# rarely as before: every 8 minutes at rest, against 11 (each resync round of 10,000 students sets
# off a young and a middle collection, its temporaries alive then and promoted); with 100, every 2.
GC_THRESHOLDS = (10_000, 0, 500)


def tune_gc() -> None:
    """Tune this process's garbage collector for a server of many long-lived streams: what is alive
    at start (modules, the server) is frozen out of collections, young collections run every 10,000
    allocations instead of 700, every other one a middle one, and full ones at most every 500 middle
    ones. A reference cycle that outlives the young and middle collections is freed later (minutes),
    not lost (when a stream ends, all but a few of its objects are freed by their reference counts)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class DiscoveryServer:
    """One discovery server: gRPC on ``listen``, optional HTTP on ``http``, state in ``store``.

    ``store_security``: the store's user, password and TLS files (see ``stores.base.store_security``).
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        store: str = "memory",
        *,
        http: str | None = None,
        ttl: float = DEFAULT_TTL_S,
        keepalive: float = DEFAULT_KEEPALIVE_S,
        token: Secret | None = None,
        tls: TlsFiles | None = None,
        store_security: StoreSecurity | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._listen_host, _ = require_hostport(listen, "--listen", allow_port_zero=True, error=DiscoveryError)
        self._http_hostport = (
            require_hostport(http, "--http", allow_port_zero=True, error=DiscoveryError) if http else None
        )
        if not 0.5 <= ttl <= 60 or not 0 < keepalive < ttl:
            raise DiscoveryError(f"need 0.5 <= ttl <= 60 and 0 < keepalive < ttl, got {ttl}, {keepalive}")
        self.store = open_discovery_store(store, store_security)  # raises DiscoveryError for a bad URL
        self._listen = listen
        self._token, self._tls = token, tls
        # SO_REUSEPORT: several server processes share the port (``--processes``); without it a
        # port in use is an error, not a silent second listener.
        self._reuse_port = reuse_port
        self.service = DiscoveryService(self.store, ttl=ttl, keepalive=keepalive)
        self._grpc: grpc.aio.Server | None = None
        self._http_runner = None  # aiohttp's AppRunner
        self._history_task: asyncio.Task | None = None
        self.address = ""
        self.http_address: str | None = None

    async def start(self) -> None:
        """Connect the store, start the service and bind the ports (``address`` is then set)."""
        try:
            await self.store.start()  # DiscoveryError for credentials the store refuses
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.close()
            raise
        await self.service.start()
        interceptors = []
        if self._token is not None:
            rpcs = self.service.metrics.rpcs
            interceptors.append(
                TokenInterceptor(
                    self._token,
                    "discovery",
                    on_refused=lambda method: rpcs.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc(),
                )
            )
        options = [*SERVER_OPTIONS, ("grpc.so_reuseport", int(self._reuse_port))]
        self._grpc = grpc.aio.server(options=options, interceptors=interceptors)
        service = pb.DESCRIPTOR.services_by_name["Discovery"]
        self._grpc.add_generic_rpc_handlers(
            (strict_handler(self.service, service, streams=("KeepAliveStream", "KeepAliveBatchStream")),)
        )
        try:
            port = add_port(self._grpc, self._listen, self._tls)
        except RuntimeError as exc:
            port = 0
            cause: Exception | None = exc
        else:
            cause = None
        if not port:
            await self.stop()
            raise DiscoveryError(f"cannot listen on {self._listen} (in use or not a local address)") from cause
        self.address = f"{self._listen_host}:{port}"
        warn_if_exposed(self._listen, self._token, "discovery", log)
        await self._grpc.start()
        if self._http_hostport is not None:
            h, p = self._http_hostport
            try:
                self._http_runner, port = await start_web(self, h.strip("[]"), p, self._token, self._tls)
            except OSError as exc:  # in use, or not a local address: a clear error, and nothing left running
                await self.stop()
                raise DiscoveryError(f"cannot serve HTTP on {h}:{p}: {exc.strerror or exc}") from None
            self.http_address = f"{h}:{port}"
            self._history_task = asyncio.create_task(self._sample_history())
            if not is_loopback(h) and self._token is None:
                log.warning(
                    "the discovery status page on %s has no authentication (it shows endpoints and student "
                    "ids, never tokens); keep it on 127.0.0.1 or behind a firewall, or give --token-file",
                    self.http_address,
                )
        tls = "TLS" + (" with client certificates" if self._tls and self._tls.ca else "") if self._tls else "plaintext"
        log.info(
            "discovery serving on %s (%s, token %s, store %s, http %s)",
            self.address,
            tls,
            "required" if self._token else "not required",
            self.store.url,
            self.http_address,
        )

    async def stop(self, grace: float = 0.5) -> None:
        """Stop serving: open streams end, then the background tasks and the store."""
        if self._history_task is not None:
            await cancel_until_done({self._history_task})
        if self._http_runner is not None:
            with contextlib.suppress(Exception):
                await self._http_runner.cleanup()
        if self._grpc:
            await self._grpc.stop(grace)
        await self.service.stop()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def status_with_figures(self) -> dict:
        """``/status.json``: the Status RPC's answer plus the students' reported figures."""
        states = {n: await self.store.read(n) for n in await self.store.services()}
        status = status_dict(status_message(list(states.items()), self.service.server_id, self.store.url))
        status = self.service.fleet.add_figures(status, states)
        status["history"] = self.service.fleet.history()
        status["report_seconds"] = self.service.report_seconds
        return status

    async def _sample_history(self) -> None:
        while True:
            await asyncio.sleep(HISTORY_STEP_S)
            # The states the reconcile loop last read (a resync old at most): no store round trip.
            self.service.fleet.sample(self.service.states)


async def serve(
    listen: str,
    store_url: str = "memory",
    *,
    http: str | None = None,
    ttl: float = DEFAULT_TTL_S,
    keepalive: float = DEFAULT_KEEPALIVE_S,
    stop: asyncio.Event | None = None,
    token: Secret | None = None,
    tls: TlsFiles | None = None,
    store_security: StoreSecurity | None = None,
    on_started: Callable[[DiscoveryServer], None] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled); ``on_started(server)`` once it listens.
    ``reuse_port``: share the port with other processes (SO_REUSEPORT). This is a serving process's
    main: it tunes the process's garbage collector (:func:`tune_gc`); embed a
    :class:`DiscoveryServer` to leave yours as it is."""
    server = DiscoveryServer(
        listen,
        store_url,
        http=http,
        ttl=ttl,
        keepalive=keepalive,
        token=token,
        tls=tls,
        store_security=store_security,
        reuse_port=reuse_port,
    )
    await server.start()
    tune_gc()
    try:
        if on_started is not None:
            on_started(server)
        await (stop or asyncio.Event()).wait()
    finally:
        await server.stop()


class ServerThread(BackgroundServer[DiscoveryServer]):
    """A discovery server on its own event loop in a daemon thread (``start``/``stop``)."""

    def __init__(self, listen: str = "127.0.0.1:0", store: str = "memory", **kwargs: Any) -> None:
        super().__init__("discovery server", lambda: DiscoveryServer(listen, store, **kwargs))

    @property
    def address(self) -> str:
        assert self.server
        return self.server.address

    @property
    def http_address(self) -> str | None:
        assert self.server
        return self.server.http_address


@contextlib.contextmanager
def running_discovery(listen: str = "127.0.0.1:0", store: str = "memory", **kwargs: Any) -> Iterator[str]:
    """Run a discovery server in a background thread for the ``with`` block; yields its ``host:port``.
    Takes :class:`DiscoveryServer`'s options."""
    thread = ServerThread(listen, store, **kwargs).start()
    try:
        yield thread.address
    finally:
        thread.stop()
