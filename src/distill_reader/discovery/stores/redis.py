"""Redis store: one hash per lease with a PEXPIRE TTL, pub/sub plus keyspace events for changes.

Keys (``{s}`` a service, ``{k}`` ``teacher`` or ``student``)::

    distill:services                  set of service names
    distill:{s}:{k}s                  set of member ids (an index; expired ids are pruned on read)
    distill:{s}:{k}:{id}              hash {lease, instance, data (JSON)}, expires after the TTL
    distill:{s}:assignment            JSON of the assignment, written with WATCH/MULTI
    distill:changes                   pub/sub channel: a service name per explicit change

Expiry is noticed through keyspace notifications (``notify-keyspace-events Ex``, which this store
turns on); where CONFIG is refused (managed Redis) it falls back to polling every 0.25 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthenticationError as RedisAuthError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from distill_reader.discovery.stores.base import (
    AlreadyRegistered,
    Kind,
    ServiceState,
    Store,
    StoreRefused,
    StoreSecurity,
    StoreUnavailable,
    StoreURL,
    auth_failed,
    encode_assignment,
    permission_denied,
    tls_failed,
    unreachable_hint,
)
from distill_reader.errors import DiscoveryError

log = logging.getLogger(__name__)

_PREFIX = "distill"
_CHANNEL = f"{_PREFIX}:changes"
_POLL_S = 0.25

_REGISTER = """
local inst = redis.call('HGET', KEYS[1], 'instance')
if inst and inst ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'lease', ARGV[2], 'instance', ARGV[1], 'data', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
redis.call('SADD', KEYS[3], ARGV[6])
return 1
"""
# Returns 0: no such lease; 1: extended; 2: extended and the data changed.
_KEEP = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then
  local d = cjson.decode(redis.call('HGET', KEYS[1], 'data'))
  local changed = 0
  for k, v in pairs(cjson.decode(ARGV[3])) do
    if d[k] ~= v then d[k] = v; changed = 1 end
  end
  if changed == 1 then
    redis.call('HSET', KEYS[1], 'data', cjson.encode(d))
    return 2
  end
end
return 1
"""
_DROP = """
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _connection_kwargs(tls: bool, security: StoreSecurity) -> dict:
    """redis-py's AUTH and TLS arguments (the TLS files read once here so that a bad one fails now)."""
    kwargs: dict = {}
    if security.password is not None:  # no username: the default user (``requirepass``)
        kwargs.update(username=security.username, password=security.password.reveal())
    elif security.username:
        kwargs["username"] = security.username
    if tls:
        files = security.tls_files()
        kwargs.update(
            ssl=True,
            ssl_ca_data=files.ca.decode() if files.ca else None,
            ssl_certfile=security.cert,
            ssl_keyfile=security.key,
        )
    return kwargs


class RedisStore(Store):
    """State in one Redis database; any number of discovery servers may share it."""

    def __init__(
        self, host: str, port: int, db: int = 0, *, tls: bool = False, security: StoreSecurity | None = None
    ) -> None:
        security = security or StoreSecurity()
        self.url = str(StoreURL("redis", host, port, db, security.username, tls))
        self.db = db
        self._has_password = security.password is not None
        self._r = aioredis.Redis(
            host=host,
            port=port,
            db=db,
            decode_responses=True,
            socket_timeout=2.0,
            socket_connect_timeout=1.0,
            # Absorb a blip, then let the service's own retries take over: redis-py's default retries
            # back off for seconds (longer than a lease's TTL), and retry refused passwords as well.
            retry=Retry(EqualJitterBackoff(cap=0.2, base=0.02), 3),
            **_connection_kwargs(tls, security),
        )
        self._register = self._r.register_script(_REGISTER)
        self._keep = self._r.register_script(_KEEP)
        self._drop = self._r.register_script(_DROP)

    async def start(self) -> None:
        """Check the credentials now: a wrong password, CA or ACL is a DiscoveryError, not a retry loop.

        An unreachable Redis is only logged: the store may come up after this server.
        """
        try:
            await self._call(self._r.exists(f"{_PREFIX}:services"))
        except StoreRefused as exc:
            raise DiscoveryError(str(exc)) from None
        except StoreUnavailable as exc:
            log.warning("store %s unreachable for now (retrying): %s%s", self.url, exc, unreachable_hint(self.url, exc))

    async def close(self) -> None:
        await self._r.aclose()

    def _key(self, service: str, kind: str, member: str | None = None) -> str:
        return f"{_PREFIX}:{service}:{kind}s" if member is None else f"{_PREFIX}:{service}:{kind}:{member}"

    def _error(self, exc: Exception) -> StoreUnavailable:
        """The store error for a failed Redis command (redis-py never puts the password in messages)."""
        if isinstance(exc, RedisAuthError):
            return StoreRefused(str(auth_failed(self.url, exc, self._has_password)))
        if isinstance(exc, NoPermissionError):
            return StoreRefused(str(permission_denied(self.url, exc)))
        if isinstance(exc, ssl.SSLError) or "SSL" in str(exc) or "certificate" in str(exc):
            return StoreRefused(str(tls_failed(self.url, exc)))
        return StoreUnavailable(f"{self.url}: {exc}")

    async def _call(self, coro):
        try:
            return await coro
        except (RedisConnectionError, RedisTimeoutError, NoPermissionError, OSError) as exc:
            raise self._error(exc) from exc

    async def _publish(self, service: str) -> None:
        await self._call(self._r.publish(_CHANNEL, service))

    async def register(self, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float) -> str:
        lease = uuid.uuid4().hex
        keys = [self._key(service, kind, member), self._key(service, kind), f"{_PREFIX}:services"]
        args = [instance, lease, json.dumps(data), int(ttl * 1000), member, service]
        if not await self._call(self._register(keys=keys, args=args)):
            raise AlreadyRegistered(member)
        await self._publish(service)
        return lease

    async def keep(
        self, kind: Kind, service: str, member: str, lease: str, ttl: float, data: dict | None = None
    ) -> bool:
        args = [lease, int(ttl * 1000), json.dumps(data) if data else ""]
        result = await self._call(self._keep(keys=[self._key(service, kind, member)], args=args))
        if result == 2:
            await self._publish(service)
        return bool(result)

    async def drop(self, kind: Kind, service: str, member: str, lease: str) -> None:
        if await self._call(self._drop(keys=[self._key(service, kind, member)], args=[lease])):
            await self._publish(service)

    async def services(self) -> list[str]:
        return sorted(await self._call(self._r.smembers(f"{_PREFIX}:services")))

    async def _members(self, service: str, kind: str) -> dict[str, dict]:
        ids = sorted(await self._call(self._r.smembers(self._key(service, kind))))
        if not ids:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for m in ids:
            pipe.hget(self._key(service, kind, m), "data")
        values = await self._call(pipe.execute())
        gone = [m for m, v in zip(ids, values) if v is None]
        if gone:  # expired: prune the index (a re-registration re-adds it)
            await self._call(self._r.srem(self._key(service, kind), *gone))
        return {m: json.loads(v) for m, v in zip(ids, values) if v is not None}

    async def read(self, service: str) -> ServiceState:
        teachers = await self._members(service, "teacher")
        students = await self._members(service, "student")
        raw = await self._call(self._r.get(f"{_PREFIX}:{service}:assignment"))
        return ServiceState(teachers, students, json.loads(raw) if raw else {}, raw)

    async def write_assignment(self, service: str, version: str | None, assignment: dict) -> bool:
        key = f"{_PREFIX}:{service}:assignment"
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                if await pipe.get(key) != version:
                    return False
                pipe.multi()
                pipe.set(key, encode_assignment(assignment))
                pipe.sadd(f"{_PREFIX}:services", service)
                await pipe.execute()
        except WatchError:
            return False
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise self._error(exc) from exc
        await self._publish(service)
        return True

    async def _enable_expiry_events(self) -> bool:
        try:
            flags = (await self._r.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
            if not ("E" in flags and ("x" in flags or "A" in flags)):
                await self._r.config_set("notify-keyspace-events", "".join(sorted(set(flags + "Ex"))))
            return True
        except ResponseError as exc:  # CONFIG disabled (managed Redis)
            log.warning("cannot enable Redis keyspace events (%s); polling every %.2f s", exc, _POLL_S)
            return False

    async def changes(self) -> AsyncIterator[str | None]:
        expired = f"__keyevent@{self.db}__:expired"
        try:
            events = await self._enable_expiry_events()
            pubsub = self._r.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(_CHANNEL, expired)
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        yield None  # (re)connected: anything may have changed meanwhile
        try:
            while True:
                try:
                    msg = await pubsub.get_message(timeout=1.0 if events else _POLL_S)
                except (RedisError, OSError) as exc:
                    raise self._error(exc) from exc
                if msg is None:
                    if not events:
                        yield None
                    continue
                if msg["channel"] == _CHANNEL:
                    yield msg["data"]
                elif msg["data"].startswith(f"{_PREFIX}:"):
                    yield msg["data"].split(":")[1]
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await asyncio.wait_for(pubsub.aclose(), 1.0)
