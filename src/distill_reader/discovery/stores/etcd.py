"""etcd store on etcd's v3 gRPC API, natively asyncio: real etcd leases and a prefix watch.

Keys (``{s}`` a service, ``{k}`` ``teacher`` or ``student``)::

    /distill/{s}/{k}/{id}        JSON {lease, instance, data}, attached to an etcd lease
                                 (a grouped student also has ``member``: the id :meth:`leave` checks)
    /distill/{s}/assignment      JSON of the assignment, written with a compare-and-swap txn

The lease id handed to teachers is the etcd lease id, so any discovery server can keep it alive.
A discovery server's students share one etcd lease, its *group*'s (:meth:`EtcdStore.join`): keeping
them all is one keep-alive per interval, and when the server stops keeping it etcd deletes all their
keys at once. The assignment stays one JSON key written whole: ~70 bytes per student fits about
20,000 students under etcd's default 1.5 MiB request limit (``--max-request-bytes``).
etcd TTLs are whole seconds (at least 2 with default etcd settings) and etcd checks for expired
leases every 0.5 s.

The calls go through aetcd's generated etcd stubs (``aetcd.rpc``) on a ``grpc.aio`` channel of
our own rather than through ``aetcd.Client``: the client has no TLS and authenticates once, while
etcd forgets its simple auth tokens when it restarts (or after ``--auth-token-ttl`` idle), so this
store re-authenticates and retries once when etcd answers "invalid auth token".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aetcd import rpc

from distill_reader.discovery.stores.base import (
    Kind,
    NativeGroupStore,
    ServiceState,
    StoreSecurity,
    StoreURL,
    auth_failed,
    encode_assignment,
    new_join_id,
    permission_denied,
    tls_failed,
    unreachable_hint,
)
from distill_reader.errors import AlreadyRegistered, DiscoveryError, StoreRefused, StoreUnavailable

log = logging.getLogger(__name__)

_PREFIX = b"/distill/"
_TIMEOUT_S = 2.0
# A dead etcd behind a silent network is noticed by keepalive pings (etcd refuses pings more
# often than every 5 s by default: --grpc-keepalive-min-time).
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
_AUTH_DETAILS = ("authentication failed", "user name is empty", "invalid user", "invalid auth token")
# How grpc reports a failed handshake (a rejected client certificate shows as TSI_DATA_CORRUPTED).
_TLS_DETAILS = ("ssl", "handshake", "certificate", "tls", "tsi_")


def _range_end(prefix: bytes) -> bytes:
    """The end of etcd's key range for ``prefix`` (its last byte plus one)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class _Stubs:
    """The etcd services on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.auth = rpc.AuthStub(channel)


class _KeepAliveStream:
    """One long-lived LeaseKeepAlive stream shared by every keep (a stream per keep costs twice as much).

    etcd answers each request with the lease's id and new TTL; waiters are matched by id, in order.
    """

    def __init__(self, stubs: _Stubs, metadata: Any) -> None:
        self.metadata = metadata
        self.broken = False
        self._requests: asyncio.Queue[rpc.LeaseKeepAliveRequest | None] = asyncio.Queue()
        self._waiting: dict[int, deque[asyncio.Future[int]]] = {}
        self._call = stubs.lease.LeaseKeepAlive(self._send(), metadata=metadata)
        self._reader = asyncio.ensure_future(self._read())

    async def _send(self) -> AsyncIterator[rpc.LeaseKeepAliveRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        error: BaseException = grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "keep-alive stream ended"
        )
        try:
            async for reply in self._call:
                waiters = self._waiting.get(reply.ID)
                if waiters:
                    future = waiters.popleft()
                    if not future.done():
                        future.set_result(reply.TTL)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            pass  # closed: the keeps still waiting get "stream ended" (UNAVAILABLE), not a cancellation
        self.broken = True
        for waiters in self._waiting.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(error)
        self._waiting.clear()

    async def refresh(self, lease: int) -> int:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(lease, deque()).append(future)
        self._requests.put_nowait(rpc.LeaseKeepAliveRequest(ID=lease))
        try:
            return await asyncio.wait_for(asyncio.shield(future), _TIMEOUT_S)
        except asyncio.TimeoutError:
            future.cancel()  # its answer, if it ever comes, is dropped
            self.close()  # a stream that stopped answering: the next keep opens another
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "keep-alive timed out"
            ) from None

    def close(self) -> None:
        self.broken = True
        self._requests.put_nowait(None)
        self._call.cancel()


class EtcdStore(NativeGroupStore):
    """State in etcd; any number of discovery servers may share it."""

    def __init__(self, host: str, port: int, *, tls: bool = False, security: StoreSecurity | None = None) -> None:
        self._security = security or StoreSecurity()
        self.url = str(StoreURL("etcd", host, port, 0, self._security.username, tls))
        self._target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._credentials = self._security.tls_files().channel_credentials() if tls else None
        if self._security.password is not None and not self._security.username:
            raise DiscoveryError(f"store {self.url}: an etcd password needs a user (etcd://USER@HOST:PORT)")
        self._channel: grpc.aio.Channel | None = None
        self._stubs: _Stubs | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._auth_lock: asyncio.Lock | None = None
        self._closed = asyncio.Event()
        self._keepalive: _KeepAliveStream | None = None
        super().__init__()  # self._groups: each group's etcd lease, the students joined to it
        self._grant_locks: dict[str, asyncio.Lock] = {}

    # -- connection, authentication, errors ------------------------------------------------------

    def _connect(self) -> _Stubs:
        """The stubs, on a channel opened on first use (grpc.aio channels belong to a running loop)."""
        if self._stubs is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self._target, self._credentials, options=_CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
            self._stubs = _Stubs(self._channel)
            self._auth_lock = asyncio.Lock()
        return self._stubs

    async def _token(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata: etcd's auth token, fetched with the user's password when there is none."""
        if self._security.password is None:
            return None
        stubs = self._connect()
        assert self._auth_lock is not None
        async with self._auth_lock:
            if self._metadata is None:
                request = rpc.AuthenticateRequest(
                    name=self._security.username, password=self._security.password.reveal()
                )
                try:
                    reply = await stubs.auth.Authenticate(request, timeout=_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in (exc.details() or ""):
                        # A password for an etcd without auth: it works, but anyone can write.
                        log.warning("store %s: etcd has authentication disabled; no token needed", self.url)
                        self._metadata = ()
                        return None
                    raise self._error(exc) from None
                self._metadata = (("token", reply.token),)
            return self._metadata or None

    def _error(self, exc: grpc.aio.AioRpcError) -> StoreUnavailable:
        """The store error for a failed etcd call (never the password: etcd does not echo it)."""
        code, details = exc.code(), exc.details() or ""
        text = f"{code.name}: {details}"
        low = details.lower()
        if code == grpc.StatusCode.UNAUTHENTICATED or any(d in low for d in _AUTH_DETAILS):
            return StoreRefused(str(auth_failed(self.url, text, self._security.password is not None)))
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return StoreRefused(str(permission_denied(self.url, text)))
        if code == grpc.StatusCode.UNAVAILABLE and any(d in low for d in _TLS_DETAILS):
            return StoreRefused(str(tls_failed(self.url, text)))
        return StoreUnavailable(f"{self.url}: {text}")

    async def _call(self, fn: Callable[[_Stubs, Any], Awaitable[Any]]) -> Any:
        """``fn(stubs, metadata)``; once more with a fresh token if etcd forgot ours (it restarted)."""
        stubs = self._connect()
        for attempt in (0, 1):
            metadata = await self._token()
            try:
                return await fn(stubs, metadata)
            except grpc.aio.AioRpcError as exc:
                if attempt == 0 and metadata and "invalid auth token" in (exc.details() or ""):
                    self._metadata = None
                    continue
                raise self._error(exc) from None
        raise AssertionError("unreachable")

    async def start(self) -> None:
        """Check the credentials now: a wrong password, CA or role is a DiscoveryError, not a retry loop.

        An unreachable etcd is only logged: the store may come up after this server.
        """
        try:
            await self._range(_PREFIX, prefix=True, limit=1, keys_only=True)
        except StoreRefused as exc:
            raise DiscoveryError(str(exc)) from None
        except StoreUnavailable as exc:
            log.warning("store %s unreachable for now (retrying): %s%s", self.url, exc, unreachable_hint(self.url, exc))

    async def close(self) -> None:
        self._closed.set()
        if self._keepalive is not None:
            self._keepalive.close()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()

    # -- etcd operations -----------------------------------------------------------------------

    async def _range(self, key: bytes, *, prefix: bool = False, limit: int = 0, keys_only: bool = False):
        request = rpc.RangeRequest(
            key=key, range_end=_range_end(key) if prefix else b"", limit=limit, keys_only=keys_only
        )
        reply = await self._call(lambda s, md: s.kv.Range(request, timeout=_TIMEOUT_S, metadata=md))
        return reply.kvs

    async def _get(self, key: bytes) -> tuple[dict, int] | None:
        """The JSON record at ``key`` and its mod revision, or None."""
        kvs = await self._range(key)
        return (json.loads(kvs[0].value), kvs[0].mod_revision) if kvs else None

    async def _put_if(self, key: bytes, value: str, lease: int, mod_revision: int) -> bool:
        """Put ``value`` if ``key`` is still at ``mod_revision`` (0: absent)."""
        compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=mod_revision)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value.encode(), lease=lease))
        request = rpc.TxnRequest(compare=[compare], success=[put])
        reply = await self._call(lambda s, md: s.kv.Txn(request, timeout=_TIMEOUT_S, metadata=md))
        return reply.succeeded

    async def _grant(self, ttl: float) -> int:
        """A new etcd lease of ``ttl`` seconds (whole seconds, at least 2)."""
        grant = rpc.LeaseGrantRequest(TTL=max(2, math.ceil(ttl)))
        return (await self._call(lambda s, md: s.lease.LeaseGrant(grant, timeout=_TIMEOUT_S, metadata=md))).ID

    async def _txn(self, request: rpc.TxnRequest) -> Any:
        return await self._call(lambda s, md: s.kv.Txn(request, timeout=_TIMEOUT_S, metadata=md))

    async def _revoke(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self._call(lambda s, md: s.lease.LeaseRevoke(request, timeout=_TIMEOUT_S, metadata=md))
        except StoreUnavailable as exc:
            if "lease not found" not in str(exc):  # expired meanwhile: nothing to end
                raise

    async def _refresh(self, lease: int) -> int:
        """Keep ``lease`` alive once; its new TTL (<= 0: it is gone)."""

        async def once(s: _Stubs, md: Any) -> int:
            if self._keepalive is None or self._keepalive.metadata != md or self._keepalive.broken:
                if self._keepalive is not None:
                    self._keepalive.close()
                self._keepalive = _KeepAliveStream(s, md)
            return await self._keepalive.refresh(lease)

        return await self._call(once)

    @staticmethod
    def _key(service: str, kind: str, member: str) -> bytes:
        return _PREFIX + f"{service}/{kind}/{member}".encode()

    async def register(self, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float) -> str:
        key = self._key(service, kind, member)
        for _ in range(5):  # the compare-and-put loses only to a concurrent registration of this member
            old = await self._get(key)
            if old and old[0]["instance"] != instance:
                raise AlreadyRegistered(member)
            lease = await self._grant(ttl)
            value = json.dumps({"lease": str(lease), "instance": instance, "data": data})
            if await self._put_if(key, value, lease, old[1] if old else 0):
                if old:  # a takeover: the old lease holds nothing now; end it rather than let it linger
                    await self._revoke(int(old[0]["lease"]))
                return str(lease)
            await self._revoke(lease)
        raise StoreUnavailable(f"{self.url}: registering {member!r} kept racing with another registration")

    async def keep(
        self, kind: Kind, service: str, member: str, lease: str, ttl: float, data: dict | None = None
    ) -> bool:
        key = self._key(service, kind, member)
        old = await self._get(key)
        if not old or old[0]["lease"] != lease:
            return False
        if await self._refresh(int(lease)) <= 0:
            return False
        record = old[0]
        if data and any(record["data"].get(k) != v for k, v in data.items()):
            record["data"].update(data)
            await self._put_if(key, json.dumps(record), int(lease), old[1])
        return True

    async def expire_silent(self, kind: Kind, service: str, member: str, lease: str, ttl: float, silence: float) -> str:
        old = await self._get(self._key(service, kind, member))
        if not old or old[0]["lease"] != lease:
            return "gone"
        request = rpc.LeaseTimeToLiveRequest(ID=int(lease))
        reply = await self._call(lambda s, md: s.lease.LeaseTimeToLive(request, timeout=_TIMEOUT_S, metadata=md))
        if reply.TTL <= 0:
            return "gone"
        # etcd answers in whole seconds: count a second less of silence (never end a lease early).
        if reply.grantedTTL - reply.TTL - 1 < silence:
            return "kept"
        await self._revoke(int(lease))
        return "ended"

    async def drop(self, kind: Kind, service: str, member: str, lease: str) -> None:
        old = await self._get(self._key(service, kind, member))
        if old and old[0]["lease"] == lease:
            await self._revoke(int(lease))  # deletes the key with it

    # -- groups: a discovery server's students share one etcd lease ---------------------------

    async def _group_lease(self, group: str, ttl: float) -> int:
        """The group's lease, granted on first use (one grant however many joins wait for it)."""
        lock = self._grant_locks.setdefault(group, asyncio.Lock())
        async with lock:
            if group not in self._groups.leases:
                self._groups.leases[group] = await self._grant(ttl)
            return int(self._groups.leases[group])

    async def join(
        self, group: str, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float
    ) -> str:
        """Put the student's key on the group's lease (a txn: only if absent, or held by ``instance``)."""
        if kind != "student":  # teachers keep their own leases (their keep-alives carry readiness)
            return await super().join(group, kind, service, member, instance, data, ttl)
        key = self._key(service, kind, member)
        uid = new_join_id()
        for attempt in (0, 1):
            glease = await self._group_lease(group, ttl)
            value = json.dumps({"lease": str(glease), "instance": instance, "member": uid, "data": data}).encode()
            put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=glease))
            try:
                # A key of another instance exists only while its lease lives (etcd deletes it with
                # the lease), so "absent" is the whole liveness check: one round trip per join.
                absent = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=0)
                read = rpc.RequestOp(request_range=rpc.RangeRequest(key=key))
                reply = await self._txn(rpc.TxnRequest(compare=[absent], success=[put], failure=[read]))
                if not reply.succeeded:
                    kvs = reply.responses[0].response_range.kvs
                    old: dict | None = None
                    if kvs:
                        old = json.loads(kvs[0].value)
                        if old["instance"] != instance:
                            raise AlreadyRegistered(member)
                        # A takeover by the same instance (a stream re-opened, here or elsewhere).
                        same = rpc.Compare(
                            result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=kvs[0].mod_revision
                        )
                    else:  # deleted meanwhile
                        same = absent
                    if not (await self._txn(rpc.TxnRequest(compare=[same], success=[put]))).succeeded:
                        raise StoreUnavailable(f"{self.url}: joining {member!r} raced with another registration")
                    if old and "member" not in old and int(old["lease"]) != glease:
                        await self._revoke(int(old["lease"]))  # its own lease (register()): holds nothing now
            except StoreUnavailable as exc:
                if "lease not found" not in str(exc) or attempt:
                    raise
                self._groups.lose(group, glease)  # lapsed (this server stalled): start the group again
                continue
            self._groups.joined(group, (kind, service, member), uid, glease)
            return uid
        raise AssertionError("unreachable")

    async def _keep_group_lease(self, group: str, lease: object, ttl: float) -> bool:
        """One keep-alive of the group's etcd lease, on the shared stream."""
        return await self._refresh(int(lease)) > 0

    async def leave(self, group: str, kind: Kind, service: str, member: str, lease: str) -> None:
        """Delete the student's key if it is still this join's (never the group's lease: others hold it)."""
        if kind != "student":
            return await super().leave(group, kind, service, member, lease)
        self._groups.left(group, (kind, service, member), lease)
        key = self._key(service, kind, member)
        old = await self._get(key)
        if old and old[0].get("member") == lease:
            same = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=old[1])
            delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
            await self._txn(rpc.TxnRequest(compare=[same], success=[delete]))

    async def services(self) -> list[str]:
        kvs = await self._range(_PREFIX, prefix=True, keys_only=True)
        return sorted({kv.key[len(_PREFIX) :].decode().split("/", 1)[0] for kv in kvs})

    async def read(self, service: str) -> ServiceState:
        prefix = _PREFIX + f"{service}/".encode()
        state = ServiceState()
        for kv in await self._range(prefix, prefix=True):
            rest = kv.key[len(prefix) :].decode()
            if rest == "assignment":
                state.version = kv.value.decode()
                state.assignment = json.loads(kv.value)
                continue
            kind, _, member = rest.partition("/")
            record = json.loads(kv.value)["data"]
            if kind == "teacher":
                state.teachers[member] = record
            elif kind == "student":
                state.students[member] = record
        return state

    async def write_assignment(self, service: str, version: str | None, assignment: dict) -> bool:
        key = _PREFIX + f"{service}/assignment".encode()
        if version is None:  # only if there is none yet
            compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=0)
        else:
            compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=key, value=version.encode())
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=encode_assignment(assignment).encode()))
        request = rpc.TxnRequest(compare=[compare], success=[put])
        reply = await self._call(lambda s, md: s.kv.Txn(request, timeout=_TIMEOUT_S, metadata=md))
        return reply.succeeded

    async def changes(self) -> AsyncIterator[str | None]:
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=_PREFIX, range_end=_range_end(_PREFIX)))

        async def requests() -> AsyncIterator[rpc.WatchRequest]:
            yield create
            await self._closed.wait()  # keep the request side open while watching

        stubs = self._connect()
        metadata = await self._token()
        call = stubs.watch.Watch(requests(), metadata=metadata)
        try:
            async for reply in call:
                if reply.canceled:  # e.g. a permission the user lost, or a compaction
                    raise StoreUnavailable(f"{self.url}: watch canceled: {reply.cancel_reason}")
                if reply.created:
                    yield None  # (re)connected: anything may have changed meanwhile
                for event in reply.events:
                    yield event.kv.key[len(_PREFIX) :].decode().split("/", 1)[0]
        except grpc.aio.AioRpcError as exc:
            if "invalid auth token" in (exc.details() or ""):
                self._metadata = None  # the service watches again, with a fresh token
            raise self._error(exc) from None
        finally:
            call.cancel()
        if not self._closed.is_set():
            raise StoreUnavailable(f"{self.url}: watch ended")
