"""Clients of the discovery service: students (``StudentSession``, ``StudentReporter``) and teachers
(``keep_registered``).

Neither raises for connectivity: both try the given discovery endpoints in turn and retry forever
with backoff (capped at 2 s). They raise :class:`DiscoveryError` only for bad arguments, a
request the server rejects as invalid, or a missing or wrong token (``UNAUTHENTICATED``), which
retrying cannot fix. ``security`` (a :class:`~distill_reader.security.ClientSecurity`) adds the
token and TLS to every discovery call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.service import check_id, check_require_num, check_service_name, check_weight
from distill_reader.discovery.stores.base import check_hostport
from distill_reader.errors import DiscoveryError
from distill_reader.security import NO_SECURITY, ClientSecurity, explain_unavailable

log = logging.getLogger(__name__)

# Ping the server every second so that a discovery server that vanishes without closing its
# connections (host down, network cut) is noticed within ~2 s, not after TCP's minutes.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 2.0
_RPC_TIMEOUT_S = 2.0
# A registered teacher's readiness is checked at least this often (keep-alives may be further apart).
_READINESS_S = 0.5
# Errors that retrying cannot fix: the request itself is wrong, or we may not make it.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


@dataclass(frozen=True)
class TeacherEndpoint:
    """One assigned teacher: its address, the model name to ask for, its registration (new each
    time the teacher starts a lease) and the protocol it speaks (empty: the student's)."""

    endpoint: str
    model_name: str
    registration: str = ""
    protocol: str = ""


def parse_endpoints(value: str | Sequence[str]) -> list[str]:
    """``host:port`` list from ``"h1:p1,h2:p2"`` or a list of such strings; DiscoveryError if bad."""
    items = [value] if isinstance(value, str) else list(value)
    out = [e.strip() for item in items for e in str(item).split(",") if e.strip()]
    if not out:
        raise DiscoveryError("no discovery endpoint given (expected HOST:PORT[,HOST:PORT…])")
    return [check_hostport(e, "discovery endpoint") for e in out]


def default_student_id() -> str:
    """``host-pid-random``: unique per process, readable in ``distill discovery status``."""
    host = re.sub(r"[^A-Za-z0-9.\-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class StudentSession:
    """A student's registration: ``async for teachers in session.assignments(): …``.

    The first set comes as soon as a discovery server answers (possibly empty: no teacher yet),
    then one per change, pushed by the server. While no server is reachable nothing is yielded,
    so the consumer keeps its last set; reconnecting is silent. ``close()`` deregisters at once.
    """

    def __init__(
        self,
        endpoints: list[str] | str,
        service_name: str,
        require_num: int,
        student_id: str | None = None,
        *,
        security: ClientSecurity | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.security = security or NO_SECURITY
        self.service_name = check_service_name(service_name)
        self.require_num = check_require_num(require_num)
        self.student_id = check_id(student_id, "student_id") if student_id else default_student_id()
        # Same instance id on every reconnect: a server still holding our old lease hands it over.
        self._instance = uuid.uuid4().hex
        self._closed = asyncio.Event()
        self._call: grpc.aio.UnaryStreamCall | None = None
        self.connected_to: str | None = None
        #: the last error of each discovery endpoint since one last answered
        self.last_errors: dict[str, str] = {}

    async def assignments(self) -> AsyncIterator[list[TeacherEndpoint]]:
        """Yields the current teacher set on every change until ``close()``."""
        request = pb.WatchAssignmentRequest(
            service_name=self.service_name,
            require_num=self.require_num,
            student_id=self.student_id,
            instance_id=self._instance,
        )
        last: list[TeacherEndpoint] | None = None
        backoff = _BACKOFF_START_S
        failures = 0
        duplicate_since: float | None = None
        i = 0
        while not self._closed.is_set():
            endpoint = self.endpoints[i % len(self.endpoints)]
            i += 1
            got = False
            try:
                async with self.security.channel(endpoint, CHANNEL_OPTIONS) as channel:
                    call = pb_grpc.DiscoveryStub(channel).WatchAssignment(request, metadata=self.security.metadata)
                    self._call = call
                    if self._closed.is_set():
                        call.cancel()
                    async for msg in call:
                        got, failures, backoff, duplicate_since = True, 0, _BACKOFF_START_S, None
                        self.connected_to = endpoint
                        self.last_errors.clear()
                        teachers = [
                            TeacherEndpoint(t.endpoint, t.model_name or "teacher", t.registration, t.protocol)
                            for t in msg.teachers
                        ]
                        if teachers != last:
                            last = teachers
                            yield list(teachers)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self.last_errors[endpoint] = f"{code.name}: {explain_unavailable(exc, self.security)}"
                if code in _FATAL:
                    raise DiscoveryError(f"discovery server {endpoint} rejected the student: {exc.details()}") from None
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    # Another process uses this student id. Its lease may just be expiring (a
                    # restarted student), so give it a few TTLs before calling it a conflict.
                    duplicate_since = duplicate_since or time.monotonic()
                    if time.monotonic() - duplicate_since > 6.0:
                        raise DiscoveryError(f"{exc.details()} (student ids must be unique)") from None
                elif code != grpc.StatusCode.CANCELLED or not self._closed.is_set():
                    details = explain_unavailable(exc, self.security)
                    log.info("discovery %s: %s %s; trying the next endpoint", endpoint, code.name, details)
            finally:
                self._call = None
                self.connected_to = None
            if self._closed.is_set():
                return
            failures = 0 if got else failures + 1
            if failures and failures % len(self.endpoints) == 0:
                # Every endpoint failed once in a row: wait before the next round.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def describe(self) -> str:
        """Where the teachers should come from and what is wrong with it, for "no teacher" messages."""
        service = f"service {self.service_name!r} (require_num={self.require_num})"
        if self.connected_to is not None:
            return f"discovery server {self.connected_to} assigned no teacher to {service}"
        if not self.last_errors:
            return f"connecting to discovery server(s) {', '.join(self.endpoints)} for {service}"
        errors = "; ".join(f"{ep}: {self.last_errors.get(ep, 'not tried yet')}" for ep in self.endpoints)
        return f"no discovery server answered for {service}: {errors}"

    async def close(self) -> None:
        """Deregister now (the open stream is cancelled, which the server sees at once)."""
        self._closed.set()
        if self._call is not None:
            self._call.cancel()
        # Let the cancellation reach the wire before the caller's loop may stop.
        await asyncio.sleep(0)


async def _oip_ready(stub, model_name: str, timeout: float) -> bool:
    from tritonclient.grpc import service_pb2

    try:
        server = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)
        if not server.ready:
            return False
        model = await stub.ModelReady(service_pb2.ModelReadyRequest(name=model_name), timeout=timeout)
        return bool(model.ready)
    except grpc.aio.AioRpcError:
        return False


async def _openai_ready(client, timeout: float) -> bool:
    """An OpenAI-compatible server is ready when ``GET /health`` answers 200 (vLLM, SGLang); one
    without that route when ``GET /v1/models`` answers (200, or 401/403 behind an API key)."""
    import httpx

    try:
        health = await client.get("/health", timeout=timeout)
        if health.status_code != 404:
            return health.status_code == 200
        models = await client.get("/v1/models", timeout=timeout)
        return models.status_code in (200, 401, 403)
    except httpx.HTTPError:
        return False


class _Rotating:
    """Discovery endpoints tried in turn; keeps one channel open to the current one."""

    def __init__(self, endpoints: list[str], security: ClientSecurity = NO_SECURITY) -> None:
        self.endpoints = endpoints
        self.security = security
        self.i = 0
        self.channel: grpc.aio.Channel | None = None

    def stub(self) -> pb_grpc.DiscoveryStub:
        if self.channel is None:
            self.channel = self.security.channel(self.endpoints[self.i], CHANNEL_OPTIONS)
        return pb_grpc.DiscoveryStub(self.channel)

    async def next(self) -> None:
        await self.close()
        self.i = (self.i + 1) % len(self.endpoints)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def call(self, method: str, request):
        """The RPC on the current endpoint, moving on to the others while they are unreachable."""
        last: grpc.aio.AioRpcError | None = None
        for _ in range(len(self.endpoints)):
            try:
                return await getattr(self.stub(), method)(
                    request, timeout=_RPC_TIMEOUT_S, metadata=self.security.metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                last = exc
                await self.next()
        assert last is not None
        raise last


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _KeepAlives:
    """The keep-alives of a keeper's teachers, on one stream to the current discovery endpoint (never
    queued behind a burst of new calls): one ``KeepAliveBatch`` message for all of them on a
    ``KeepAliveBatchStream`` (cheaper for the server than a message each), or for a lone teacher
    a message on a ``KeepAliveStream``. A server without the batch stream (UNIMPLEMENTED, an older
    one) gets a message each on a ``KeepAliveStream``, and one without that a ``KeepAlive`` call each."""

    def __init__(self, rot: _Rotating, batches: bool = True) -> None:
        self.rot = rot
        # "batch" (then "stream", then "unary", as servers answer UNIMPLEMENTED); a lone teacher's
        # keeper starts at "stream": a batch of one costs the server more than a message.
        self.mode = "batch" if batches else "stream"
        self._call: grpc.aio.StreamStreamCall | None = None
        self._channel: grpc.aio.Channel | None = None  # the channel self._call is on

    def close(self) -> None:
        """End the stream (the leases are kept by the next keep-alive, on a new one)."""
        if self._call is not None:
            self._call.cancel()
        self._call = self._channel = None

    async def send(self, requests: list[pb.KeepAliveRequest]) -> tuple[float, list[tuple[grpc.StatusCode, str]]]:
        """The keep-alives, answered: the interval the server asks for (0: unchanged) and each one's
        status and details, in order. Moves on to the next endpoint while one is unreachable or does
        not answer within the RPC timeout; raises the error that is not a single lease's."""
        if self.mode == "batch":
            batch = pb.KeepAliveBatch(keep_alives=requests)
            response = await self._on_stream("KeepAliveBatchStream", batch)
            if response is not None:
                if len(response.results) != len(requests):
                    raise _rpc_error(
                        grpc.StatusCode.UNKNOWN,
                        f"the server answered {len(response.results)} results for {len(requests)} keep-alives",
                    )
                # A code this grpc does not know (a newer server's) is UNKNOWN: kept again after a backoff.
                results = [(_STATUS.get(r.code, grpc.StatusCode.UNKNOWN), r.details) for r in response.results]
                return response.keepalive_seconds, results
        interval, results = 0.0, []
        for request in requests:  # an older server: one at a time
            try:
                interval = (await self._one(request)).keepalive_seconds or interval
                results.append((grpc.StatusCode.OK, ""))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    results.append((exc.code(), exc.details() or ""))
                    continue
                raise
        return interval, results

    async def _one(self, request: pb.KeepAliveRequest) -> pb.KeepAliveResponse:
        if self.mode == "stream":
            response = await self._on_stream("KeepAliveStream", request)
            if response is not None:
                return response
        return await self.rot.call("KeepAlive", request)

    async def _on_stream(self, method: str, message):
        """``message`` on the ``method`` stream, answered; None if the server has no such stream
        (UNIMPLEMENTED: an older one), and from then on the next mode is used."""
        try:
            return await self._exchange(method, message)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        fallback, lacking, instead = _FALLBACKS[self.mode]
        log.info("discovery %s has no %s: keeping alive with %s", self.rot.endpoints[self.rot.i], lacking, instead)
        self.mode = fallback
        return None

    @staticmethod
    async def _write_read(call: grpc.aio.StreamStreamCall, message):
        await call.write(message)
        return await call.read()

    async def _exchange(self, method: str, message):
        """One message on the ``method`` stream, answered (the stream opened or re-opened as needed)."""
        last: grpc.aio.AioRpcError | None = None
        for _ in range(len(self.rot.endpoints)):
            stub = self.rot.stub()
            if self._call is None or self._channel is not self.rot.channel:
                self.close()
                self._call = getattr(stub, method)(metadata=self.rot.security.metadata)
                self._channel = self.rot.channel
            call = self._call
            try:
                # The write bounded too: it waits for the connection, for 20 s on an endpoint that
                # accepts TCP but never answers (a unary call gives up after the RPC timeout).
                response = await asyncio.wait_for(self._write_read(call, message), _RPC_TIMEOUT_S)
                if response is grpc.aio.EOF:  # the server ended the stream without a status
                    raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "keep-alive stream ended")
                return response
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, asyncio.InvalidStateError) as error:
                self.close()
                if isinstance(error, asyncio.TimeoutError):
                    exc = _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {_RPC_TIMEOUT_S:g} s")
                elif isinstance(error, asyncio.InvalidStateError):  # the stream ended since the last one
                    exc = _rpc_error(await call.code(), await call.details())
                else:
                    exc = error
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise exc from None
                last = exc
                await self.rot.next()
        assert last is not None
        raise last


#: Teachers one keeper keeps (their keep-alives go in one KeepAliveBatch, which holds at most this many).
MAX_TEACHERS_PER_KEEPER = 1024
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
# A keeper's mode -> the mode it falls back to when a server lacks its stream, and what to log.
_FALLBACKS = {
    "batch": ("stream", "keep-alive batches", "a message each"),
    "stream": ("unary", "keep-alive stream", "a call each"),
}


@dataclass(frozen=True)
class TeacherRegistration:
    """A teacher to keep registered: its address, the model students ask for, its capacity weight
    and what students speak to it (``oip``, or ``openai``: ``endpoint`` is its HTTP API)."""

    endpoint: str
    model_name: str = "teacher"
    weight: float = 1.0
    protocol: str = "oip"


class _KeptTeacher:
    """One teacher of a keeper: its lease, its readiness and when to try registering again."""

    def __init__(self, spec: TeacherRegistration, security: ClientSecurity, check: bool, check_timeout: float):
        self.spec = spec
        self.lease: str | None = None
        self.ready = self.sent_ready = True  # now, and as the server was last told
        self.kept_at = -math.inf  # when its lease was last taken or kept
        self.retry_at = -math.inf  # after a failed registration: not before
        self.backoff = _BACKOFF_START_S
        self._security, self._check, self._timeout = security, check, check_timeout
        self._channel: grpc.aio.Channel | None = None
        self._http = None
        if check and spec.protocol == "openai":
            from distill_reader.teacher.openai import http_client_for

            self._http = http_client_for(spec.endpoint, security, check_timeout)

    async def check_ready(self) -> None:
        """Ask the teacher whether it is ready (OIP ServerReady and ModelReady; openai GET /health)."""
        if self._http is not None:
            self.ready = await _openai_ready(self._http, self._timeout)
        elif self._check:
            from tritonclient.grpc import service_pb2_grpc

            if self._channel is None:
                self._channel = self._security.channel(self.spec.endpoint, CHANNEL_OPTIONS)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
            self.ready = await _oip_ready(stub, self.spec.model_name, self._timeout)
            if not self.ready:
                # A fresh channel next time: an old one may sit in reconnect backoff.
                await self._channel.close()
                self._channel = None

    @property
    def health(self) -> int:
        return pb.HEALTH_READY if self.ready else pb.HEALTH_NOT_READY

    def failed(self, code: grpc.StatusCode, details: str, security: ClientSecurity) -> None:
        """A registration the server refused or a keep-alive answered NOT_FOUND (the lease is gone):
        register again now (NOT_FOUND) or after a backoff; DiscoveryError for what retrying
        cannot fix."""
        endpoint = self.spec.endpoint
        if code in _FATAL:
            raise DiscoveryError(f"discovery rejected teacher {endpoint}: {details}")
        if code == grpc.StatusCode.NOT_FOUND:  # lease lost (expired, store restarted): register again now
            self.lease, self.retry_at = None, -math.inf
            return
        # Unreachable, or ALREADY_EXISTS while an old lease of this endpoint expires.
        log.info(
            "teacher %s: discovery %s: %s",
            endpoint,
            code.name,
            explain_unavailable(_rpc_error(code, details), security),
        )
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, _BACKOFF_MAX_S)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._http is not None:
            await self._http.aclose()


async def keep_registered(
    discovery_endpoints: list[str] | str,
    service_name: str,
    endpoint: str,
    model_name: str = "teacher",
    weight: float = 1.0,
    readiness_check: bool = True,
    stop: asyncio.Event | None = None,
    *,
    check_timeout: float = 0.5,
    security: ClientSecurity | None = None,
    teacher_security: ClientSecurity | None = None,
    protocol: str = "oip",
) -> None:
    """Keep ``endpoint`` registered in ``service_name`` until ``stop`` is set or the task is cancelled.

    ``protocol``: what students speak to it, ``oip`` or ``openai`` (``endpoint`` is then the
    server's HTTP API, whose readiness is ``GET /health``). The rest is :func:`keep_all_registered`'s.
    """
    teacher = TeacherRegistration(endpoint, model_name, weight, protocol)
    await keep_all_registered(
        discovery_endpoints,
        service_name,
        [teacher],
        readiness_check,
        stop,
        check_timeout=check_timeout,
        security=security,
        teacher_security=teacher_security,
    )


async def keep_all_registered(
    discovery_endpoints: list[str] | str,
    service_name: str,
    teachers: Sequence[TeacherRegistration],
    readiness_check: bool = True,
    stop: asyncio.Event | None = None,
    *,
    check_timeout: float = 0.5,
    security: ClientSecurity | None = None,
    teacher_security: ClientSecurity | None = None,
) -> None:
    """Keep ``teachers`` (a host's, say) registered in ``service_name`` until ``stop`` is set or
    the task is cancelled: their keep-alives go together, one message per interval.

    With ``readiness_check`` each teacher is asked OIP ``ServerReady`` and ``ModelReady(model_name)``
    (``openai``: ``GET /health``) every keep-alive interval or every 0.5 s, whichever is shorter;
    while one does not answer ready, it is reported not ready at once (a keep-alive out of turn) and
    gets no students, and it is back as soon as it answers. Keep-alives go every interval the server
    asks for (0.5 s by default, longer for a large fleet), all the teachers' in one message on one
    KeepAliveBatchStream (one teacher's on a KeepAliveStream; a message each on a KeepAliveStream,
    or KeepAlive calls, to older servers).
    A teacher whose lease is lost registers again at once; the others are not disturbed.
    On return the leases are dropped. Raises DiscoveryError for invalid arguments (a teacher named
    twice, more than MAX_TEACHERS_PER_KEEPER) or a missing or wrong token. ``security`` secures the
    discovery calls, ``teacher_security`` (TLS only: readiness is not token-protected) the readiness
    checks.
    """
    endpoints = parse_endpoints(discovery_endpoints)
    check_service_name(service_name)
    if not teachers:
        raise DiscoveryError("no teacher to keep registered")
    if len(teachers) > MAX_TEACHERS_PER_KEEPER:
        raise DiscoveryError(
            f"{len(teachers)} teachers for one keeper: at most {MAX_TEACHERS_PER_KEEPER} (a keep-alive batch's "
            "limit); split them over several"
        )
    for t in teachers:
        check_hostport(t.endpoint, "teacher endpoint")
        check_weight(t.weight)
        if t.protocol not in ("oip", "openai"):
            raise DiscoveryError(f"protocol {t.protocol!r} is not one of oip, openai")
    named = [t.endpoint for t in teachers]
    if len(set(named)) != len(named):
        twice = sorted({e for e in named if named.count(e) > 1})
        raise DiscoveryError(f"teacher endpoint named twice: {', '.join(twice)}")
    stop = stop or asyncio.Event()
    instance = uuid.uuid4().hex
    rot = _Rotating(endpoints, security or NO_SECURITY)
    keep = _KeepAlives(rot, batches=len(teachers) > 1)
    kept = [_KeptTeacher(t, teacher_security or NO_SECURITY, readiness_check, check_timeout) for t in teachers]
    interval = 0.5
    backoff = _BACKOFF_START_S  # while no discovery server answers the keep-alives

    async def register(k: _KeptTeacher) -> None:
        request = pb.RegisterTeacherRequest(
            service_name=service_name,
            endpoint=k.spec.endpoint,
            model_name=k.spec.model_name,
            weight=k.spec.weight,
            instance_id=instance,
            health=k.health,
            protocol=k.spec.protocol,
        )
        try:
            response = await rot.call("RegisterTeacher", request)
        except grpc.aio.AioRpcError as exc:
            k.failed(exc.code(), exc.details() or "", rot.security)
            return
        nonlocal interval
        k.lease, k.sent_ready, k.backoff, k.kept_at = response.lease_id, k.ready, _BACKOFF_START_S, time.monotonic()
        interval = response.keepalive_seconds or interval
        log.info("teacher %s registered in %s (ready: %s)", k.spec.endpoint, service_name, k.ready)

    def due(wait: float) -> bool:
        """A lease's keep-alive is due (within half the loop's ``wait``): then all of them go, in one message."""
        now = time.monotonic()
        return any(k.lease is not None and now - k.kept_at >= interval - wait / 2 for k in kept)

    try:
        while not stop.is_set():
            if readiness_check:
                await asyncio.gather(*(k.check_ready() for k in kept))
            wait = min(interval, _READINESS_S)
            # One at a time (they share the endpoint rotation), but not past a lease's keep-alive: a
            # server slow to answer registrations must not let the leases already held lapse.
            for k in kept:
                if k.lease is None and time.monotonic() >= k.retry_at:
                    if due(wait):
                        break
                    await register(k)
            # Every lease when one is due, else at once those whose readiness changed.
            leased = [k for k in kept if k.lease is not None]
            batch = leased if due(wait) else [k for k in leased if k.ready != k.sent_ready]
            if batch:
                requests = [
                    pb.KeepAliveRequest(
                        service_name=service_name, endpoint=k.spec.endpoint, lease_id=k.lease, health=k.health
                    )
                    for k in batch
                ]
                sent = time.monotonic()
                try:
                    asked, results = await keep.send(requests)
                except grpc.aio.AioRpcError as exc:  # no discovery server answered: all of them
                    results = [(exc.code(), exc.details() or "")] * len(batch)
                else:
                    interval = asked or interval  # the server may ask for another pace
                unanswered = False
                for k, (code, details) in zip(batch, results):
                    if code == grpc.StatusCode.OK:
                        k.sent_ready, k.kept_at = k.ready, sent
                    elif code == grpc.StatusCode.NOT_FOUND or code in _FATAL:
                        k.failed(code, details, rot.security)
                    else:  # unreachable, or its store is: still due, kept again after the backoff
                        log.info(
                            "teacher %s: discovery %s: %s",
                            k.spec.endpoint,
                            code.name,
                            explain_unavailable(_rpc_error(code, details), rot.security),
                        )
                        unanswered = True
                if unanswered:
                    wait, backoff = backoff, min(backoff * 2, _BACKOFF_MAX_S)
                else:
                    backoff = _BACKOFF_START_S
            if any(k.lease is None and k.retry_at <= time.monotonic() for k in kept):
                wait = 0  # a lease was lost: register again now
            elif any(k.lease is None for k in kept):
                wait = min(wait, max(0.0, min(k.retry_at for k in kept if k.lease is None) - time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
    finally:
        keep.close()

        leased = [k for k in kept if k.lease is not None]
        if leased:
            drops = (
                rot.call(
                    "DeregisterTeacher",
                    pb.DeregisterTeacherRequest(service_name=service_name, endpoint=k.spec.endpoint, lease_id=k.lease),
                )
                for k in leased
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*drops, return_exceptions=True), 2.0)
        await rot.close()
        for k in kept:
            await k.close()


async def fetch_status(
    discovery_endpoints: list[str] | str, service_name: str = "", *, security: ClientSecurity | None = None
) -> pb.StatusResponse:
    """One Status call, trying the endpoints in turn; raises DiscoveryError if none answers."""
    rot = _Rotating(parse_endpoints(discovery_endpoints), security or NO_SECURITY)
    try:
        return await rot.call("Status", pb.StatusRequest(service_name=service_name))
    except grpc.aio.AioRpcError as exc:
        details = explain_unavailable(exc, rot.security)
        raise DiscoveryError(f"discovery status failed: {exc.code().name}: {details}") from None
    finally:
        await rot.close()


class StudentReporter:
    """Sends a reader's figures to discovery about once a second (as often as the server asks),
    from a daemon thread of its own: never per batch, and never in the training loop's way.

    ``sample()`` returns the reader's :class:`~distill_reader.reader.stats.ReaderStats` (or None
    while there is nothing to report); the rates are the differences between two samples. A server
    without the Report RPC (UNIMPLEMENTED), or one refusing the token, ends the reporting with one
    log line; an unreachable one is tried again at the next report, as are the other endpoints.
    """

    def __init__(
        self,
        endpoints: list[str] | str,
        service_name: str | None,
        student_id: str,
        sample: Callable[[], Any],
        *,
        security: ClientSecurity | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.service_name = check_service_name(service_name) if service_name else ""
        self.student_id = check_id(student_id, "student_id")
        #: the reporting process's (a new one tells the server that the counts start again)
        self.instance_id = check_id(instance_id, "instance_id") if instance_id else uuid.uuid4().hex
        self.security = security or NO_SECURITY
        self._sample = sample
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = threading.Event()
        #: reports the server accepted (for tests and troubleshooting)
        self.sent = 0

    def start(self) -> StudentReporter:
        self._thread = threading.Thread(target=self._main, name="distill-reporter", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 1.0) -> None:
        """Stop reporting (the server forgets the student once its last report is stale): a report
        in flight is cancelled. Waits at most ``timeout`` seconds for the thread to end."""
        self._stopping.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except asyncio.CancelledError:  # close()
            pass
        except Exception as exc:  # reporting must never hurt training
            log.warning("reporting to discovery stopped: %s", exc)

    async def _run(self) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        if self._stopping.is_set():  # close() came before the task was there to cancel
            return
        rot = _Rotating(self.endpoints, self.security)
        period = 1.0
        prev: tuple[float, Any] | None = None
        try:
            while True:
                snap = await asyncio.to_thread(self._sample)
                now = time.monotonic()
                if snap is not None:
                    request = self._report(prev, (now, snap))
                    prev = (now, snap)
                    try:
                        resp = await rot.call("Report", request)
                        self.sent += 1
                        period = min(max(resp.report_seconds or period, 0.2), 60.0)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() in _FATAL:
                            log.warning(
                                "discovery %s does not take this reader's figures (%s: %s); not reporting",
                                rot.endpoints[rot.i],
                                exc.code().name,
                                exc.details(),
                            )
                            return
                        log.debug("report to discovery failed: %s", exc.code().name)
                await asyncio.sleep(period)
        finally:
            await rot.close()

    def _report(self, prev: tuple[float, Any] | None, cur: tuple[float, Any]) -> pb.StudentReport:
        """The figures of the interval between two samples of ReaderStats (rates 0 for the first)."""
        now, s = cur
        dt = now - prev[0] if prev is not None else 0.0
        p = prev[1] if prev is not None else None

        def rate(new: float, old: float | None) -> float:
            if dt <= 0 or old is None:
                return 0.0
            return max(new - old, 0.0) / dt if new >= old else new / dt

        tokens = int(getattr(s, "tokens", 0))
        teacher_wait = float(getattr(s, "teacher_wait_seconds", 0.0))
        old_teachers = {t.endpoint: t for t in p.teachers} if p is not None else {}
        report = pb.StudentReport(
            service_name=self.service_name,
            student_id=self.student_id,
            instance_id=self.instance_id,
            fixed=not self.service_name,
            interval_seconds=dt,
            rows=int(s.samples),
            tokens=tokens,
            rows_per_s=rate(s.samples, p.samples if p is not None else None),
            tokens_per_s=rate(tokens, int(getattr(p, "tokens", 0)) if p is not None else None),
            wait_fraction=min(
                rate(teacher_wait, float(getattr(p, "teacher_wait_seconds", 0.0)) if p is not None else None), 1.0
            ),
            store_hits=int(getattr(s, "store_hits", 0)),
        )
        for t in s.teachers:
            old = old_teachers.get(t.endpoint)
            rows = int(getattr(t, "rows", 0))
            report.teachers.add(
                endpoint=t.endpoint,
                rows=rows,
                rows_per_s=rate(rows, int(getattr(old, "rows", 0)) if old is not None else (0 if p else None)),
                has_latency=t.latency_ms_p50 is not None,
                latency_p50_ms=t.latency_ms_p50 or 0.0,
                latency_p99_ms=t.latency_ms_p99 or 0.0,
                in_flight=t.in_flight,
                quarantined=(t.quarantined or "")[:300],
                healthy=t.healthy,
                requests=t.requests,
                failures=t.failures,
            )
        return report
