"""Redis store: one hash per teacher lease with a PEXPIRE TTL, students in groups, pub/sub plus
keyspace events for changes.

Keys (``{s}`` a service, ``{g}`` a group: one per discovery server)::

    distill:services                  set of service names
    distill:{s}:teachers              set of teacher endpoints (an index; expired ids are pruned on read)
    distill:{s}:teacher:{id}          hash {lease, instance, data (JSON)}, expires after the TTL
    distill:_group:{g}                the group's lease id, expires after the TTL unless kept
    distill:{s}:grouped               hash student id -> JSON {g, gl (group lease), i (instance),
                                      l (lease), d (data)}; alive while key distill:_group:{g} holds gl
    distill:{s}:assign                hash student id -> "endpoint,endpoint" (the assignment)
    distill:{s}:assign:v              the assignment's version, incremented by every write
    distill:changes                   pub/sub channel: a service name per explicit change

(``distill:{s}:students`` and ``distill:{s}:student:{id}``, per-student leases, are what
:meth:`register` writes for a student; the service joins students to groups instead.)

Reading a service is one Lua script that returns the whole live state as one JSON reply (and prunes
what expired), and a write sends only the students whose set changed: a redis-py reply costs tens
of microseconds of Python each, so one reply instead of thousands is what keeps a reconcile of
10,000 students within tens of milliseconds. Keeping a discovery server's students is one PEXPIRE.

Expiry is noticed through keyspace notifications (``notify-keyspace-events Ex``, which this store
turns on); where CONFIG is refused (managed Redis) it falls back to polling every 0.25 s.

At most ``MAX_CONNECTIONS`` connections are open (the pool's bound); commands beyond that wait
for a free one (a semaphore: redis-py's bounded pool would fail them instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthenticationError as RedisAuthError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from distill_reader.discovery.stores.base import (
    Kind,
    NativeGroupStore,
    ServiceState,
    StoreSecurity,
    StoreURL,
    auth_failed,
    cancel_until_done,
    new_join_id,
    permission_denied,
    tls_failed,
    unreachable_hint,
)
from distill_reader.errors import AlreadyRegistered, DiscoveryError, StoreRefused, StoreUnavailable

log = logging.getLogger(__name__)

_PREFIX = "distill"
_CHANNEL = f"{_PREFIX}:changes"
_POLL_S = 0.25
_JOIN_BATCH = 500  # students joined by one script (Redis runs nothing else meanwhile)
# How long the joins of a burst gather before a script takes them. In a burst they reach the server a
# few per loop iteration: one iteration's worth made 5,785 scripts of 10,000 joins (mostly one or two
# each), each about 0.1 ms of the server's time in redis-py; a few milliseconds more per join is
# nothing beside the reconcile that follows it.
_JOIN_GATHER_S = 0.005
_KEEP_BATCH = 500  # leases kept by one script
_PUBLISH_S = 0.02  # student arrivals and departures are announced at most this often per service
_GROUP = f"{_PREFIX}:_group:"  # service names start with a letter or digit: no clash
#: The connection pool's bound; two are kept for the pub/sub listener and the script loader.
MAX_CONNECTIONS = 32

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
# Keeps a batch of leases (the keep-alives that arrived meanwhile): KEYS the members' keys, ARGV per
# key its lease, ttl ms and data (JSON, or '' for none). Returns per key 0: no such lease; 1:
# extended; 2: extended and the data changed; -1: its record could not be read (an error for it).
_KEEP = """
local function keep(key, lease, ttl, data)
  if redis.call('HGET', key, 'lease') ~= lease then return 0 end
  redis.call('PEXPIRE', key, ttl)
  if data == '' then return 1 end
  local d = cjson.decode(redis.call('HGET', key, 'data'))
  local changed = 0
  for k, v in pairs(cjson.decode(data)) do
    if d[k] ~= v then d[k] = v; changed = 1 end
  end
  if changed == 0 then return 1 end
  redis.call('HSET', key, 'data', cjson.encode(d))
  return 2
end
local out = {}
for i, key in ipairs(KEYS) do
  -- One member's bad record (not a hash, unreadable data) fails its keep-alive only, not the batch.
  local ok, result = pcall(keep, key, ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i])
  out[i] = ok and result or -1
end
return out
"""
# Ends a lease not kept for a while: ARGV lease, ttl ms, silence ms. Returns -1: no such lease;
# 0: kept within the silence (its remaining time is above ttl - silence); 1: ended.
_EXPIRE_SILENT = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return -1 end
if redis.call('PTTL', KEYS[1]) > tonumber(ARGV[2]) - tonumber(ARGV[3]) then return 0 end
return redis.call('DEL', KEYS[1])
"""
_DROP = """
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Joins a batch of students to a group. KEYS: group key, services set. ARGV: group lease, ttl ms,
# create ('1': the group may be (re)created with this lease), then per student: service, id,
# instance, record (JSON). Returns -1 if the group lapsed (join again with a new lease), else per
# student 1 (joined) or 0 (held by another live instance).
_JOIN = (
    """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then
  if ARGV[3] ~= '1' then return -1 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
local out = {}
for i = 4, #ARGV, 4 do
  local h = '"""
    + _PREFIX
    + """:' .. ARGV[i] .. ':grouped'
  local old = redis.call('HGET', h, ARGV[i + 1])
  local ok = 1
  if old then
    local o = cjson.decode(old)
    if o.i ~= ARGV[i + 2] and redis.call('GET', '"""
    + _PREFIX
    + """:_group:' .. o.g) == o.gl then ok = 0 end
  end
  if ok == 1 then
    redis.call('HSET', h, ARGV[i + 1], ARGV[i + 3])
    redis.call('SADD', KEYS[2], ARGV[i])
  end
  out[#out + 1] = ok
end
return out
"""
)
_KEEP_GROUP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_LEAVE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and cjson.decode(old).l == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""
# KEYS: teachers index, students index, grouped hash, assign hash, assign version. ARGV: key prefix.
# Teacher data stays a JSON string (decoded in Python: weights keep every digit).
_READ = (
    """
local out = {t = {}, s = {}, a = {}, v = redis.call('GET', KEYS[5]) or ''}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local d = redis.call('HGET', ARGV[1] .. 'teacher:' .. m, 'data')
  if d then out.t[m] = d else redis.call('SREM', KEYS[1], m) end
end
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local d = redis.call('HGET', ARGV[1] .. 'student:' .. m, 'data')
  if d then out.s[m] = cjson.decode(d) else redis.call('SREM', KEYS[2], m) end
end
local groups = {}
local kv = redis.call('HGETALL', KEYS[3])
for i = 1, #kv, 2 do
  local r = cjson.decode(kv[i + 1])
  local alive = groups[r.g]
  if alive == nil then
    alive = redis.call('GET', '"""
    + _PREFIX
    + """:_group:' .. r.g) or false
    groups[r.g] = alive
  end
  if alive == r.gl then out.s[kv[i]] = r.d else redis.call('HDEL', KEYS[3], kv[i]) end
end
local a = redis.call('HGETALL', KEYS[4])
for i = 1, #a, 2 do out.a[a[i]] = a[i + 1] end
return cjson.encode(out)
"""
)
# KEYS: assign hash, version, services set. ARGV: expected version ('' for none), service,
# replace ('1': the hash is rewritten whole), number of changed students, then student/endpoints
# pairs, then removed students.
_UPDATE = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) end
local n = tonumber(ARGV[4])
for i = 5, 4 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 5 + 2 * n, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
redis.call('INCR', KEYS[2])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""


@dataclass
class _Join:
    """A student waiting to be joined to a group by the next batch."""

    service: str
    member: str
    instance: str
    data: dict
    lease: str
    ttl: float
    done: asyncio.Future


@dataclass
class _Keep:
    """A keep-alive waiting for the next batch."""

    key: str
    service: str
    lease: str
    ttl_ms: int
    data: str  # JSON, or "" for none
    done: asyncio.Future


def _fail(jobs: list[_Join] | list[_Keep], error: Exception) -> None:
    """Fail the batched calls whose callers still wait (not those that gave up)."""
    for job in jobs:
        if not job.done.done():
            job.done.set_exception(error)


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


class RedisStore(NativeGroupStore):
    """State in one Redis database; any number of discovery servers may share it."""

    def __init__(
        self, host: str, port: int, db: int = 0, *, tls: bool = False, security: StoreSecurity | None = None
    ) -> None:
        security = security or StoreSecurity()
        self.url = str(StoreURL("redis", host, port, db, security.username, tls))
        self.db = db
        self._has_password = security.password is not None
        # TLS without a client certificate: a store that requires one may just reset the connection
        # (TLS 1.3 checks the client's certificate after the client's side of the handshake is done).
        self._tls_without_cert = tls and not security.cert
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
        self._r.connection_pool.max_connections = MAX_CONNECTIONS
        self._register = self._r.register_script(_REGISTER)
        self._keep = self._r.register_script(_KEEP)
        self._drop = self._r.register_script(_DROP)
        self._expire_silent = self._r.register_script(_EXPIRE_SILENT)
        self._join = self._r.register_script(_JOIN)
        self._keep_group = self._r.register_script(_KEEP_GROUP)
        self._leave = self._r.register_script(_LEAVE)
        self._read = self._r.register_script(_READ)
        self._update = self._r.register_script(_UPDATE)
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS - 2)
        super().__init__()  # self._groups: each group's lease (a uuid, the group key's value), its members
        # Joins waiting for the next batch, per group; the groups whose batch is being flushed.
        self._join_queue: dict[str, list[_Join]] = {}
        self._flushing: dict[str, asyncio.Task] = {}
        # Keep-alives waiting for the next batch; the task sending them.
        self._keep_queue: list[_Keep] = []
        self._keeping: asyncio.Task | None = None
        self._to_publish: set[str] = set()
        self._publisher: asyncio.Task | None = None

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
        # Ended, not only cancelled: a join flush left pending when the loop closes is collected
        # mid-command later ("coroutine ... RedisStore.leave ... ignored").
        tasks = [*self._flushing.values(), self._keeping, self._publisher]
        await cancel_until_done({t for t in tasks if t is not None})
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
        if self._tls_without_cert and "reset by peer" in str(exc):
            return StoreRefused(str(tls_failed(self.url, f"{exc}; the store may require a client certificate")))
        return StoreUnavailable(f"{self.url}: {exc}")

    async def _call(self, coro):
        try:
            async with self._slots:
                return await coro
        except (RedisConnectionError, RedisTimeoutError, NoPermissionError, OSError) as exc:
            raise self._error(exc) from exc
        finally:
            coro.close()  # not started if cancelled while waiting for a slot ("never awaited")

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
        # Batched: one script for the keep-alives that arrive in the same loop iterations (1,000
        # teachers send 1,000 a second; a script call each was most of a busy server's time).
        job = _Keep(
            self._key(service, kind, member),
            service,
            lease,
            int(ttl * 1000),
            json.dumps(data) if data else "",
            asyncio.get_running_loop().create_future(),
        )
        self._keep_queue.append(job)
        if self._keeping is None or self._keeping.done():
            self._keeping = asyncio.create_task(self._flush_keeps())
        return await job.done

    async def _flush_keeps(self) -> None:
        batch: list[_Keep] = []
        try:
            await asyncio.sleep(0)  # let the keep-alives of this loop iteration queue up
            while self._keep_queue:
                batch, self._keep_queue = self._keep_queue[:_KEEP_BATCH], self._keep_queue[_KEEP_BATCH:]
                args = [arg for job in batch for arg in (job.lease, job.ttl_ms, job.data)]
                try:
                    results = await self._call(self._keep(keys=[job.key for job in batch], args=args))
                except Exception as exc:
                    _fail(batch, exc)
                    continue
                for job, result in zip(batch, results):
                    if result == 2:
                        self._publish_soon(job.service)
                    if job.done.done():  # its caller gave up
                        continue
                    if result == -1:
                        job.done.set_exception(StoreUnavailable(f"{self.url}: the record {job.key} cannot be read"))
                    else:
                        job.done.set_result(bool(result))
        finally:  # cancelled (the store closes): nobody waits for ever
            _fail([*batch, *self._keep_queue], StoreUnavailable(f"{self.url}: the store is closing"))
            self._keep_queue = []

    async def drop(self, kind: Kind, service: str, member: str, lease: str) -> None:
        if await self._call(self._drop(keys=[self._key(service, kind, member)], args=[lease])):
            await self._publish(service)

    async def expire_silent(self, kind: Kind, service: str, member: str, lease: str, ttl: float, silence: float) -> str:
        args = [lease, int(ttl * 1000), int(silence * 1000)]
        result = await self._call(self._expire_silent(keys=[self._key(service, kind, member)], args=args))
        if result == 1:
            await self._publish(service)
        return {-1: "gone", 0: "kept"}.get(result, "ended")

    async def services(self) -> list[str]:
        return sorted(await self._call(self._r.smembers(f"{_PREFIX}:services")))

    async def read(self, service: str) -> ServiceState:
        keys = [
            self._key(service, "teacher"),
            self._key(service, "student"),
            f"{_PREFIX}:{service}:grouped",
            f"{_PREFIX}:{service}:assign",
            f"{_PREFIX}:{service}:assign:v",
        ]
        out = json.loads(await self._call(self._read(keys=keys, args=[f"{_PREFIX}:{service}:"])))
        teachers = {m: json.loads(d) for m, d in out["t"].items()}
        assignment = {s: ts.split(",") if ts else [] for s, ts in out["a"].items()}
        return ServiceState(teachers, out["s"], assignment, out["v"] or None)

    async def write_assignment(self, service: str, version: str | None, assignment: dict) -> bool:
        return await self._write(service, version, assignment, [], replace=True)

    async def update_assignment(
        self,
        service: str,
        version: str | None,
        assignment: dict[str, list[str]],
        changed: dict[str, list[str]],
        removed: list[str],
    ) -> bool:
        return await self._write(service, version, changed, removed, replace=False)

    async def _write(self, service: str, version: str | None, changed: dict, removed: list[str], replace: bool) -> bool:
        keys = [f"{_PREFIX}:{service}:assign", f"{_PREFIX}:{service}:assign:v", f"{_PREFIX}:services"]
        args: list[str | int] = [version or "", service, "1" if replace else "0", len(changed)]
        for s, ts in changed.items():
            args += [s, ",".join(ts)]
        args += removed
        if not await self._call(self._update(keys=keys, args=args)):
            return False
        await self._publish(service)
        return True

    # --- groups: a discovery server's students, kept with one PEXPIRE ---------------------------

    async def join(
        self, group: str, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float
    ) -> str:
        if kind != "student":  # teachers keep their own leases (their keep-alives come one by one)
            return await super().join(group, kind, service, member, instance, data, ttl)
        # Batched: the joins of a burst (arriving in the same loop iterations) go in one script.
        job = _Join(service, member, instance, data, new_join_id(), ttl, asyncio.get_running_loop().create_future())
        self._join_queue.setdefault(group, []).append(job)
        if group not in self._flushing:
            self._flushing[group] = asyncio.create_task(self._flush_joins(group))
        return await job.done

    async def _flush_joins(self, group: str) -> None:
        try:
            while self._join_queue.get(group):
                if len(self._join_queue[group]) < _JOIN_BATCH:
                    await asyncio.sleep(_JOIN_GATHER_S)  # let the rest of the burst queue up
                queue = self._join_queue[group]
                batch, self._join_queue[group] = queue[:_JOIN_BATCH], queue[_JOIN_BATCH:]
                try:
                    results = await self._join_batch(group, batch)
                except Exception as exc:
                    _fail(batch, exc)
                    continue
                for job, ok in zip(batch, results):
                    if job.done.done() and ok:  # the caller gave up (its stream was cancelled): undo
                        await self.leave(group, "student", job.service, job.member, job.lease)
                    elif ok:
                        job.done.set_result(job.lease)
                    elif not job.done.done():
                        job.done.set_exception(AlreadyRegistered(job.member))
                for service in {job.service for job, ok in zip(batch, results) if ok}:
                    self._publish_soon(service)
        finally:
            del self._flushing[group]

    async def _join_batch(self, group: str, batch: list[_Join]) -> list[int]:
        keys = [f"{_GROUP}{group}", f"{_PREFIX}:services"]
        for _ in range(2):
            fresh = group not in self._groups.leases
            glease = str(self._groups.leases.setdefault(group, uuid.uuid4().hex))
            args: list[str | int] = [glease, int(batch[0].ttl * 1000), "1" if fresh else "0"]
            for job in batch:
                record = json.dumps({"g": group, "gl": glease, "i": job.instance, "l": job.lease, "d": job.data})
                args += [job.service, job.member, job.instance, record]
            result = await self._call(self._join(keys=keys, args=args))
            if result == -1:  # the group lapsed: its members are gone; start it again
                self._groups.lose(group, glease)
                continue
            for job, ok in zip(batch, result):
                if ok:
                    self._groups.joined(group, ("student", job.service, job.member), job.lease, glease)
            return result
        raise StoreUnavailable(f"{self.url}: group {group} lapsed twice while joining students")

    def _publish_soon(self, service: str) -> None:
        """Announce a change within ``_PUBLISH_S`` (one message for all the changes meanwhile)."""
        self._to_publish.add(service)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_pending())

    async def _publish_pending(self) -> None:
        await asyncio.sleep(_PUBLISH_S)
        services, self._to_publish = self._to_publish, set()
        for service in sorted(services):
            try:
                await self._publish(service)
            except StoreUnavailable as exc:  # the others resync within a second
                log.warning("announcing a change of %s failed: %s", service, exc)

    async def _keep_group_lease(self, group: str, lease: object, ttl: float) -> bool:
        return bool(await self._call(self._keep_group(keys=[f"{_GROUP}{group}"], args=[lease, int(ttl * 1000)])))

    async def leave(self, group: str, kind: Kind, service: str, member: str, lease: str) -> None:
        if kind != "student":
            return await super().leave(group, kind, service, member, lease)
        self._groups.left(group, (kind, service, member), lease)
        if await self._call(self._leave(keys=[f"{_PREFIX}:{service}:grouped"], args=[member, lease])):
            self._publish_soon(service)

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
                elif msg["data"].startswith(_GROUP):
                    yield None  # a discovery server's group lapsed: its students may be in any service
                elif msg["data"].startswith(f"{_PREFIX}:"):
                    yield msg["data"].split(":")[1]
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await asyncio.wait_for(pubsub.aclose(), 1.0)
