"""The discovery gRPC service: teacher leases, student streams, and the reconcile loop.

Lifecycle of a change (a teacher registers, expires or changes health; a student arrives or leaves):

1. the change is written to the store; the store notifies every discovery server on it (and this
   server marks the service dirty itself, so it does not wait for the round trip);
2. the reconcile loop, at most once per ``COALESCE_S`` (a burst of arrivals is one reconcile, not
   one per arrival), reads the service's state from the store, computes
   ``balance(healthy teachers, students, previous assignment)`` and, if the result differs, writes
   what changed with compare-and-swap (a server that loses the race re-reads and finds the same
   answer, since balance is deterministic);
3. each student streaming to this server whose teacher set changed gets one message; no other
   stream is woken.

Every server also resyncs all services every second, so a lost notification costs at most that.
Student leases are kept in bulk: the students streaming to a server are members of the server's
*group* in the store, kept with one store operation per keep-alive interval. A stream that ends
leaves the group at once; if the server dies, its group lapses after the TTL and its students with
it (reconnecting elsewhere with the same instance id, a student takes its record over). A student
whose record lapsed while its stream is open (the server stalled, the store lost it) is joined
again as soon as a keep or a reconcile notices, and gets its new set.

Teacher leases end when their holder went silent, not when this server was too busy to take its
keep-alives. The server keeps each teacher lease in the store with ``ttl + lag_cap`` (a bound for
when the server itself is gone) and ends it itself when, by its own clock, the teacher was silent
for longer than ``ttl`` plus the time this server was *behind* meanwhile (at most ``lag_cap``, 2 ×
TTL by default). The server is behind while its event loop wakes late (a probe every 50 ms that
records how late it woke) or while most of the teachers kept here are overdue at once (their
keep-alives wait in this server's queue: it is the server, not every teacher, that is late). The
price: a teacher that really dies while the server is behind is removed later, within
``ttl + lag_cap`` of its last keep-alive (6 s by default) instead of ``ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import types
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from distill_reader.discovery.balance import balance
from distill_reader.discovery.fleet import REPORT_SECONDS, Fleet
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.stores.base import (
    ServiceState,
    Store,
    cancel_until_done,
    check_hostport,
)
from distill_reader.errors import AlreadyRegistered, DiscoveryError, StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 2.0
DEFAULT_KEEPALIVE_S = 0.5
RESYNC_S = 1.0
# Reconciles run at most this often: the events of a burst are coalesced into one.
COALESCE_S = 0.05
# The reconcile loop waits this many times as long as its last round took (see _reconcile_loop).
_RECONCILE_SHARE = 4.0
# ... and, while events keep coming (a join burst), for a pause in them, up to this many times.
_BURST_SHARE = 12.0
# The resync waits at least this many times as long as the last round of reconciles took.
_RESYNC_SHARE = 10.0
_EXPIRY_CHECK_S = 0.05
# The expiry check waking this much late means the event loop is behind.
_LAG_S = 0.1
# Most teachers overdue at once (at least this many) means this server is behind, not they.
_MASS_MIN = 4
_DROP_WAIT_S = 2.0  # longest stop() waits for the students whose streams ended to leave
#: Keep-alives per second a server asks its teachers for at most, by default (see DiscoveryService.pace).
DEFAULT_KEEPALIVE_BUDGET = 1000.0
# The keep-alive interval and the TTL are stretched by at most this factor (an etcd lease's TTL is
# fixed when granted, at ttl + lag_cap = 3 × TTL: the interval stays well within it).
_MAX_STRETCH = 4.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_ID = re.compile(r"^[A-Za-z0-9._:@\-]{1,128}$")
_MAX_REQUIRE = 1024
_MAX_BATCH = 1024  # keep-alives in one KeepAliveBatch
_MAX_WEIGHT = 1e6


class _Refused(Exception):
    """A request refused with a gRPC status (ends its call, or is its result in a batch)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _stamp(into: list[float]) -> None:
    into.append(time.perf_counter())


@types.coroutine
def _time_spent(coro):
    """Await ``coro``; returns ``(its result, the seconds it cost)``: the time it ran, plus the time it
    waited for its answers (its store's), less the time it waited for this loop to come back to it.
    That last wait is measured at each await by a callback queued then: how long the loop took to
    reach it. (In a burst a round of reconciles spends most of its wall time in the loop's queue,
    which is not its cost; its store's time is: etcd, answering 10,000-key reads slowly, falls
    behind if the rounds come more often.)"""
    loop = asyncio.get_running_loop()
    spent = 0.0
    value: object = None
    error: BaseException | None = None
    while True:
        started = time.perf_counter()
        try:
            awaited = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as done:
            return done.value, spent + time.perf_counter() - started
        finally:
            error = None
        paused = time.perf_counter()
        spent += paused - started
        reached: list[float] = []
        loop.call_soon(_stamp, reached)
        try:
            value = yield awaited
        except BaseException as exc:  # noqa: BLE001 - cancellation too: thrown into coro
            value, error = None, exc
        if reached:  # the loop reached the callback: what came after was waiting for the answer
            spent += max(0.0, time.perf_counter() - reached[0])


def check_service_name(name: str) -> str:
    """``name`` if it is a valid service name, else DiscoveryError."""
    if not _NAME.match(name or ""):
        raise DiscoveryError(f"service name must be 1-128 characters of letters, digits, '.', '_' or '-', got {name!r}")
    return name


def check_require_num(n: int) -> int:
    """``n`` if it is a valid require_num (1..1024), else DiscoveryError."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= _MAX_REQUIRE:
        raise DiscoveryError(f"require_num must be an integer in 1..{_MAX_REQUIRE}, got {n!r}")
    return n


def check_weight(w: float) -> float:
    """``w`` if it is a valid capacity weight, else DiscoveryError."""
    if not isinstance(w, int | float) or not math.isfinite(w) or not 0 < w <= _MAX_WEIGHT:
        raise DiscoveryError(f"weight must be a number in (0, {_MAX_WEIGHT:g}], got {w!r}")
    return float(w)


def check_id(value: str, what: str) -> str:
    """``value`` if it is a valid student or instance id, else DiscoveryError."""
    if not _ID.match(value or ""):
        raise DiscoveryError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_', ':', '@' or '-', got {value!r}"
        )
    return value


@dataclass
class _Kept:
    """A teacher lease kept through this server: when, by this server's clocks, and at what pace."""

    lease: str
    at: float  # time.monotonic() of the last keep-alive (or the registration)
    behind: float  # the server's behind-clock then (see DiscoveryService._expiries)
    ttl: float  # the TTL the teacher was told last (see DiscoveryService.pace)
    interval: float  # the keep-alive interval it was told last
    # The TTL it was told at registration: a teacher that keeps alive with unary calls may be an
    # older one, which keeps the interval it registered with; its TTL never falls below this.
    registered_ttl: float


@dataclass
class _Watcher:
    service: str
    student: str
    instance: str
    require_num: int
    lease: str
    joined: float = 0.0  # monotonic time the store had it (reads started before may lack it)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    replaced: bool = False
    rejoining: bool = False
    error: tuple[grpc.StatusCode, str] | None = None
    sent: tuple[str, ...] | None = None  # endpoints of the last set sent (None: nothing sent yet)
    # (endpoint, model, registration, protocol) last sent
    last: tuple[tuple[str, str, str, str], ...] | None = None
    pending: tuple[tuple[str, str, str, str], ...] | None = None  # to send


#: what a teacher may register as its protocol (empty: the student's ``[conf] protocol``)
TEACHER_PROTOCOLS = ("", "oip", "openai")


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.teachers = Gauge(
            "distill_discovery_teachers", "Registered teachers", ["service", "healthy"], registry=registry
        )
        self.students = Gauge("distill_discovery_students", "Registered students", ["service"], registry=registry)
        self.streams = Gauge("distill_discovery_streams", "Open student streams on this server", registry=registry)
        self.changes = Counter(
            "distill_discovery_assignment_changes", "Assignments written", ["service"], registry=registry
        )
        self.pushes = Counter("distill_discovery_pushes", "Assignment messages sent to students", registry=registry)
        self.lapses = Counter(
            "distill_discovery_student_lapses",
            "Students whose lease lapsed while their stream was open (joined again)",
            registry=registry,
        )
        self.teacher_lapses = Counter(
            "distill_discovery_teacher_lapses",
            "Teacher leases kept through this server that ended without a keep-alive or a deregistration",
            ["service"],
            registry=registry,
        )
        self.rpcs = Counter("distill_discovery_rpcs", "RPCs handled", ["method", "code"], registry=registry)
        self.reconcile = Histogram(
            "distill_discovery_reconcile_seconds",
            "Time to read, balance and write one service",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.lag = Gauge(
            "distill_discovery_loop_lag_seconds",
            "How late this server's event loop woke its expiry check, the largest in the last second",
            registry=registry,
        )
        self.keepalive_streams = Gauge(
            "distill_discovery_keepalive_streams",
            "Open teacher keep-alive streams (KeepAliveStream) on this server",
            registry=registry,
        )
        self.behind = Counter(
            "distill_discovery_behind_seconds",
            "Time this server was behind (its loop late, or most teachers' keep-alives overdue at once): "
            "teacher leases get it as grace, up to the lag cap",
            registry=registry,
        )


class DiscoveryService(pb_grpc.DiscoveryServicer):
    """The gRPC servicer plus its background tasks (``start``/``stop``)."""

    def __init__(
        self,
        store: Store,
        *,
        ttl: float = DEFAULT_TTL_S,
        keepalive: float = DEFAULT_KEEPALIVE_S,
        server_id: str | None = None,
        registry: CollectorRegistry | None = None,
        coalesce: float = COALESCE_S,
        lag_cap: float | None = None,
        keepalive_budget: float = DEFAULT_KEEPALIVE_BUDGET,
    ) -> None:
        self.store = store
        self.ttl = ttl
        #: keep-alives per second this server asks its teachers for at most (0: no limit)
        self.keepalive_budget = keepalive_budget
        #: The most grace a teacher lease gets for this server's lag; the store's TTL is its TTL + this.
        self.lag_cap = 2 * ttl if lag_cap is None else lag_cap
        #: The TTL of this server's student group: its students outlive a stall of this server up to
        #: the lag cap too (a dead server's students, who reconnect elsewhere at once, are taken over
        #: there; only those that died with it linger, for ttl + lag_cap).
        self.group_ttl = ttl + self.lag_cap
        self.keepalive = keepalive
        #: how often students are asked to report their figures
        self.report_seconds = max(REPORT_SECONDS, keepalive)
        self.coalesce = coalesce
        self.server_id = server_id or uuid.uuid4().hex[:8]
        self.registry = registry or CollectorRegistry()
        self.metrics = _Metrics(self.registry)
        #: the students' last reports (Report), for the status page and metrics
        self.fleet = Fleet(self.registry)
        self._watchers: dict[str, dict[str, _Watcher]] = {}
        self._states: dict[str, ServiceState] = {}
        self._dirty: set[str | None] = set()
        self._last_dirty = -math.inf  # when mark_dirty was last called (time.monotonic())
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._rejoins: set[asyncio.Task] = set()
        # Students leaving as their streams end: awaited by stop(), not left pending at loop close.
        self._drops: set[asyncio.Task] = set()
        # (service, endpoint) -> the teacher leases kept through this server: this server ends them
        # when their holder went silent (see _expiries).
        self._kept: dict[tuple[str, str], _Kept] = {}
        # Seconds this server was behind, in all (a clock that only runs while it is behind).
        self._behind = 0.0
        self._lag_max = 0.0
        self._stalled = 0.0  # seconds the loop was held up in all (the lag probe's lateness past _LAG_S)
        self._round_cost = 0.0  # what the last round of reconciles cost (see _time_spent), seconds

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background tasks (reconcile, store notifications, student leases, resync)."""
        for coro in (self._reconcile_loop(), self._listen(), self._keep_students(), self._resync(), self._expiries()):
            self._tasks.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        """Stop the background tasks, after the gRPC server stopped (which ended the open streams):
        the students of those streams leave the store first (2 s at most), so that other servers
        sharing it do not balance for them until their group's TTL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DROP_WAIT_S
        # A cancelled stream's handler ends, and starts its student's leave, a turn of the loop later.
        while any(self._watchers.values()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._drops:
            await asyncio.wait(set(self._drops), timeout=max(0.01, deadline - loop.time()))
        await cancel_until_done(set(self._tasks) | self._rejoins | self._drops)
        self._tasks.clear()

    @property
    def states(self) -> dict[str, ServiceState]:
        """Each service's state as this server last reconciled it (a resync old at most)."""
        return self._states

    def mark_dirty(self, service: str | None) -> None:
        """Ask the reconcile loop to recompute ``service`` (None: every service)."""
        self._dirty.add(service)
        self._last_dirty = time.monotonic()
        self._wake.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for service in self.store.changes():
                    backoff = 0.1
                    self.mark_dirty(service)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store reconnects; keep listening
                log.warning("store notifications interrupted: %s", exc)
                self.mark_dirty(None)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _resync(self) -> None:
        # Every second, or less often where a round of reconciles is long (a resync is a backstop for
        # a lost notification; at 10,000 students on Redis a round takes a few hundred ms).
        while True:
            await asyncio.sleep(max(RESYNC_S, _RESYNC_SHARE * self._round_cost))
            self.mark_dirty(None)

    async def _expiries(self) -> None:
        """End the teacher leases kept here whose holder went silent, and measure this server's lag.

        A lease ends when its teacher was silent for longer than the TTL plus the time this server
        was behind since its last keep-alive (at most ``lag_cap``). The check itself is the lag
        probe: it wakes every 50 ms, and waking late means the loop is behind (the keep-alives that
        came meanwhile wait unread). Most of the teachers kept here overdue at once is the other
        sign: their keep-alives wait in this server's queue behind a burst of other calls.
        """
        last = window = time.monotonic()
        while True:
            await asyncio.sleep(_EXPIRY_CHECK_S)
            now = time.monotonic()
            elapsed, last = now - last, now
            late = elapsed - _EXPIRY_CHECK_S
            self._lag_max = max(self._lag_max, late)
            if now - window >= 1.0:  # the gauge: the largest lag of the last second
                self.metrics.lag.set(self._lag_max)
                self._lag_max, window = 0.0, now
            # One walk over the leases (1,000 teachers, 20 times a second): the overdue count, and
            # the leases silent past their TTL, of which those past their grace too are ended below.
            overdue, past_ttl = 0, []
            for key, k in self._kept.items():
                silence = now - k.at
                if silence > 2 * k.interval + _LAG_S:
                    overdue += 1
                if silence > k.ttl:
                    past_ttl.append((key, k))
            if late > _LAG_S:
                self._stalled += late
            if late > _LAG_S or (overdue >= _MASS_MIN and 2 * overdue > len(self._kept)):
                self._behind += elapsed
                self.metrics.behind.inc(elapsed)
            for key, k in past_ttl:
                if now - k.at > k.ttl + min(self.lag_cap, self._behind - k.behind):
                    await self._expire(key, k, now - k.at)

    async def _expire(self, key: tuple[str, str], k: _Kept, silence: float) -> None:
        """End a silent teacher's lease (unless it was kept meanwhile, here or through another server)."""
        service, endpoint = key
        try:
            # The store checks the silence by its own clock, less what this server's lag explains.
            outcome = await self.store.expire_silent(
                "teacher", service, endpoint, k.lease, k.ttl + self.lag_cap, min(silence, k.ttl)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store's TTL still bounds the lease; try again next time
            log.warning("ending the lease of teacher %s in %s failed: %s", endpoint, service, exc)
            return
        if self._kept.get(key) is not k:
            return  # kept or registered again meanwhile
        if outcome == "kept":
            # Kept within the silence by the store's clock (through another server, or the store gave
            # it time back after a stall of its own): look again a TTL from now.
            self._kept[key] = _Kept(k.lease, time.monotonic(), self._behind, k.ttl, k.interval, k.registered_ttl)
            return
        del self._kept[key]
        self.metrics.teacher_lapses.labels(service).inc()
        log.info("teacher %s in %s: silent for %.1f s, lease ended (%s)", endpoint, service, silence, outcome)
        self.mark_dirty(service)

    def pace(self) -> tuple[float, float]:
        """The TTL and keep-alive interval to tell a teacher now: the configured ones, stretched
        (both by the same factor, at most 4) so that the teachers kept through this server keep
        alive at most ``keepalive_budget`` times a second. The price of a stretch: a teacher whose
        keep-alives stop (its keeper died with it) leaves its students after the stretched TTL."""
        n = len(self._kept)
        if not self.keepalive_budget or n <= self.keepalive_budget * self.keepalive:
            return self.ttl, self.keepalive
        stretch = min(n / (self.keepalive_budget * self.keepalive), _MAX_STRETCH)
        return self.ttl * stretch, self.keepalive * stretch

    async def _reconcile_loop(self) -> None:
        last, took, stalled = -math.inf, 0.0, 0.0

        def starts_at() -> float:
            # A stall of the loop (a long callback) while the last round awaited its store looks like
            # the store's time to _time_spent: it is not the round's cost. The lag probe counts it
            # in _stalled (within 50 ms of its end, so the window is looked at again that often).
            cost = max(0.0, took - (self._stalled - stalled))
            earliest = last + max(self.coalesce, _RECONCILE_SHARE * cost)
            latest = last + max(self.coalesce, _BURST_SHARE * cost)
            return max(earliest, min(latest, self._last_dirty + self.coalesce))

        while True:
            await self._wake.wait()
            # Coalesce: what arrives before the round starts joins it. A round starts once (1) the
            # window since the last one has passed: at least _RECONCILE_SHARE times as long as that
            # round ran, so that reconciles (each linear in the service's students: 20-100 ms at
            # 10,000) take at most a quarter of the loop; "ran": its steps and its store's answers,
            # not its waits for the loop (see _time_spent; in a burst a round's wall time is 2-6
            # times that); and (2) the events have paused for ``coalesce``, or the window has grown
            # to _BURST_SHARE times that cost. In a join burst the events do not pause until its
            # last student: the rounds then take a twelfth of the loop, and the streams the rest,
            # and the last students get their sets one pause after they joined. A lone event, long
            # after the last round, starts one at once.
            while (wait := starts_at() - time.monotonic()) > 0:
                await asyncio.sleep(min(wait, _EXPIRY_CHECK_S))
            self._wake.clear()
            last, stalled = time.monotonic(), self._stalled
            dirty, self._dirty = self._dirty, set()
            try:
                if None in dirty:
                    names = set(await self.store.services()) | set(self._watchers) | set(self._states)
                else:
                    names = {s for s in dirty if s is not None}
                took = 0.0
                for service in sorted(names):
                    took += (await _time_spent(self._reconcile(service)))[1]
                self._round_cost = took
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconcile failed (retrying): %s", exc)
                self._dirty |= dirty
                await asyncio.sleep(0.2)
                self._wake.set()

    async def _reconcile(self, service: str) -> None:
        t0 = time.perf_counter()
        for _ in range(10):
            read_at = time.monotonic()
            state = await self.store.read(service)
            healthy = {ep: float(t.get("weight", 1.0)) for ep, t in state.teachers.items() if t.get("healthy", True)}
            wants = {s: int(v["require_num"]) for s, v in state.students.items()}
            new = balance(healthy, wants, state.assignment)
            old = state.assignment
            changed = {s: list(ts) for s, ts in new.items() if tuple(old.get(s, ())) != ts}
            removed = [s for s in old if s not in new]
            if not changed and not removed:
                break
            if await self.store.update_assignment(service, state.version, new, changed, removed):
                self.metrics.changes.labels(service).inc()
                break
            # Another server wrote first: read its result and check it against ours.
        state.assignment = new
        previous = self._states.get(service)
        self._states[service] = state
        self.metrics.reconcile.observe(time.perf_counter() - t0)
        n_healthy = len(healthy)
        self.metrics.teachers.labels(service, "true").set(n_healthy)
        self.metrics.teachers.labels(service, "false").set(len(state.teachers) - n_healthy)
        self.metrics.students.labels(service).set(len(state.students))
        self._push(service, previous, state, read_at)

    def _push(self, service: str, previous: ServiceState | None, state: ServiceState, read_at: float) -> None:
        """Hand each local student whose set changed its new set (and wake only its stream); join
        again the local students that the store lost."""
        local = self._watchers.get(service)
        if not local:
            return
        teachers = state.teachers
        before = previous.teachers if previous else {}
        # Teachers whose model or registration changed: their students are told even if their
        # endpoints did not change (a re-registered teacher is checked again).
        renewed = {
            ep
            for ep, d in teachers.items()
            if (d.get("model_name"), d.get("registration"))
            != (before.get(ep, {}).get("model_name"), before.get(ep, {}).get("registration"))
        }
        assignment = state.assignment
        for student, w in local.items():
            ts = assignment.get(student)
            if ts is None:
                if student not in state.students and w.joined < read_at and not w.rejoining:
                    self._rejoin(w)  # its lease lapsed behind its back
                continue
            if w.sent == ts and not (renewed and any(t in renewed for t in ts)):
                continue
            w.sent = ts
            info = tuple(
                (
                    ep,
                    str(teachers.get(ep, {}).get("model_name", "teacher")),
                    str(teachers.get(ep, {}).get("registration", "")),
                    str(teachers.get(ep, {}).get("protocol", "")),
                )
                for ep in ts
            )
            if info != w.last:
                w.last = w.pending = info
                w.wake.set()

    def _rejoin(self, w: _Watcher) -> None:
        """Join ``w``'s student again (its lease lapsed while its stream is open)."""
        w.rejoining = True

        async def rejoin() -> None:
            try:
                if self._watchers.get(w.service, {}).get(w.student) is not w:
                    return  # the stream ended meanwhile
                w.lease = await self.store.join(
                    self.server_id,
                    "student",
                    w.service,
                    w.student,
                    w.instance,
                    {"require_num": w.require_num},
                    self.group_ttl,
                )
                w.joined = time.monotonic()
                self.metrics.lapses.inc()
                log.info("student %s in %s: lease lapsed, joined again", w.student, w.service)
                self.mark_dirty(w.service)
            except AlreadyRegistered:
                w.error = (grpc.StatusCode.ALREADY_EXISTS, f"student {w.student!r} was taken over")
                w.wake.set()
            except Exception as exc:  # store trouble: the next keep or reconcile tries again
                log.warning("joining student %s again failed: %s", w.student, exc)
            finally:
                w.rejoining = False

        task = asyncio.create_task(rejoin())
        self._rejoins.add(task)
        task.add_done_callback(self._rejoins.discard)

    async def _keep_students(self) -> None:
        """Keep this server's students: one store operation per interval, however many there are."""
        while True:
            await asyncio.sleep(self.keepalive)
            try:
                lapsed = await self.store.keep_group(self.server_id, self.group_ttl)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("keeping this server's students failed: %s", exc)
                continue
            for _, service, student in lapsed:
                w = self._watchers.get(service, {}).get(student)
                if w is not None and not w.rejoining:
                    self._rejoin(w)

    # --- RPCs -----------------------------------------------------------------------------------

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, msg: str):
        self.metrics.rpcs.labels(method, code.name).inc()
        await context.abort(code, msg)

    async def RegisterTeacher(self, request: pb.RegisterTeacherRequest, context) -> pb.RegisterTeacherResponse:
        m = "RegisterTeacher"
        try:
            service = check_service_name(request.service_name)
            endpoint = check_hostport(request.endpoint, "teacher endpoint")
            model = request.model_name or "teacher"
            if len(model) > 256:
                raise DiscoveryError("model_name is longer than 256 characters")
            weight = check_weight(request.weight or 1.0)
            protocol = request.protocol
            if protocol not in TEACHER_PROTOCOLS:
                raise DiscoveryError(f"protocol {protocol!r} is not one of oip, openai (or empty)")
            instance = check_id(request.instance_id, "instance_id") if request.instance_id else uuid.uuid4().hex
        except DiscoveryError as exc:
            await self._fail(context, m, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        data = {
            "model_name": model,
            "weight": weight,
            "protocol": protocol,
            "healthy": request.health != pb.HEALTH_NOT_READY,
            # Tells students that this teacher (re)started a lease: they check it again.
            "registration": uuid.uuid4().hex[:12],
        }
        try:
            ttl, interval = self.pace()
            lease = await self.store.register("teacher", service, endpoint, instance, data, ttl + self.lag_cap)
        except AlreadyRegistered:
            await self._fail(
                context,
                m,
                grpc.StatusCode.ALREADY_EXISTS,
                f"teacher {endpoint} is already registered in service {service!r} by another instance; "
                f"its lease ends {ttl:g} s after its last keep-alive "
                f"({ttl + self.lag_cap:g} s at most while the discovery server is behind)",
            )
        except StoreUnavailable as exc:
            await self._fail(context, m, grpc.StatusCode.UNAVAILABLE, f"store unavailable: {exc}")
        self._kept[(service, endpoint)] = _Kept(lease, time.monotonic(), self._behind, ttl, interval, ttl)
        self.mark_dirty(service)
        self.metrics.rpcs.labels(m, "OK").inc()
        log.info("teacher %s registered in %s (weight %g)", endpoint, service, weight)
        return pb.RegisterTeacherResponse(lease_id=lease, ttl_seconds=ttl, keepalive_seconds=interval)

    async def KeepAliveStream(
        self, requests: AsyncIterator[pb.KeepAliveRequest], context
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        """KeepAlive's messages on one stream: no call to set up and queue per keep-alive (a message
        waits in no gRPC queue behind a burst of new calls, and costs the server less than a call);
        a lease that is gone ends the stream with NOT_FOUND. Each message counts as a KeepAlive in
        ``distill_discovery_rpcs_total``."""
        self.metrics.keepalive_streams.inc()
        try:
            async for request in requests:
                yield await self._keep_alive(request, context, streamed=True)
        finally:
            self.metrics.keepalive_streams.dec()

    async def KeepAliveBatchStream(
        self, batches: AsyncIterator[pb.KeepAliveBatch], context
    ) -> AsyncIterator[pb.KeepAliveBatchResponse]:
        """Several teachers' keep-alives in one message (a host agent's): one answer per batch with a
        result per keep-alive; a lease that is gone is NOT_FOUND in its result and the stream goes
        on. Each keep-alive counts as a KeepAlive in ``distill_discovery_rpcs_total``."""
        self.metrics.keepalive_streams.inc()
        try:
            async for batch in batches:
                if len(batch.keep_alives) > _MAX_BATCH:
                    await self._fail(
                        context,
                        "KeepAlive",
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"a keep-alive batch holds at most {_MAX_BATCH} keep-alives, got {len(batch.keep_alives)}",
                    )
                # Concurrently: a store batches the keep-alives that arrive together (one Redis script).
                results = await asyncio.gather(*(self._keep_result(r) for r in batch.keep_alives))
                ttl, interval = self.pace()
                yield pb.KeepAliveBatchResponse(ttl_seconds=ttl, keepalive_seconds=interval, results=results)
        finally:
            self.metrics.keepalive_streams.dec()

    async def KeepAlive(self, request: pb.KeepAliveRequest, context) -> pb.KeepAliveResponse:
        return await self._keep_alive(request, context, streamed=False)

    async def _keep_alive(self, request: pb.KeepAliveRequest, context, *, streamed: bool) -> pb.KeepAliveResponse:
        """One keep-alive answered on its own (a call, or a KeepAliveStream message); a refusal ends it."""
        try:
            ttl, interval = await self._keep(request, streamed=streamed)
        except _Refused as refused:
            await self._fail(context, "KeepAlive", refused.code, refused.details)
        return pb.KeepAliveResponse(ttl_seconds=ttl, keepalive_seconds=interval)

    async def _keep_result(self, request: pb.KeepAliveRequest) -> pb.KeepAliveResult:
        """One keep-alive of a batch: its result, a refusal included."""
        try:
            await self._keep(request, streamed=True)
        except _Refused as refused:
            self.metrics.rpcs.labels("KeepAlive", refused.code.name).inc()
            return pb.KeepAliveResult(code=refused.code.value[0], details=refused.details)
        return pb.KeepAliveResult()

    async def _keep(self, request: pb.KeepAliveRequest, *, streamed: bool) -> tuple[float, float]:
        """Keep one lease; returns the TTL and interval to tell its teacher. ``streamed``: from a
        teacher that follows the pace it is told in every answer (a stream), else a unary call
        (maybe an older teacher, which keeps the pace it registered with). Raises _Refused."""
        try:
            service = check_service_name(request.service_name)
            endpoint = check_hostport(request.endpoint, "teacher endpoint")
            if not request.lease_id or len(request.lease_id) > 128:
                raise DiscoveryError("lease_id is missing or too long")
        except DiscoveryError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        data = None
        if request.health != pb.HEALTH_UNSPECIFIED:
            data = {"healthy": request.health == pb.HEALTH_READY}
        ttl, interval = self.pace()
        kept = self._kept.get((service, endpoint))
        if kept is not None and kept.lease == request.lease_id:
            registered_ttl = kept.registered_ttl
        else:  # registered through another server (or before this one started), at a pace unknown here
            registered_ttl = self.ttl * (_MAX_STRETCH if self.keepalive_budget else 1.0)
        if not streamed:
            ttl = max(ttl, registered_ttl)
        try:
            ok = await self.store.keep("teacher", service, endpoint, request.lease_id, ttl + self.lag_cap, data)
        except StoreUnavailable as exc:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"store unavailable: {exc}") from None
        if not ok:
            kept = self._kept.get((service, endpoint))  # again: it may have changed meanwhile
            if kept is not None and kept.lease == request.lease_id:  # the store's TTL ended it
                del self._kept[(service, endpoint)]
                self.metrics.teacher_lapses.labels(service).inc()
            raise _Refused(
                grpc.StatusCode.NOT_FOUND,
                f"no lease {request.lease_id!r} for teacher {endpoint} in service {service!r} "
                "(expired, or the store lost it): register again",
            )
        self._kept[(service, endpoint)] = _Kept(
            request.lease_id, time.monotonic(), self._behind, ttl, interval, registered_ttl
        )
        if data is not None:
            state = self._states.get(service)
            old = state.teachers.get(endpoint, {}).get("healthy") if state else None
            if old is not None and old != data["healthy"]:
                self.mark_dirty(service)
        self.metrics.rpcs.labels("KeepAlive", "OK").inc()
        return ttl, interval

    async def DeregisterTeacher(self, request: pb.DeregisterTeacherRequest, context) -> pb.DeregisterTeacherResponse:
        m = "DeregisterTeacher"
        try:
            service = check_service_name(request.service_name)
            endpoint = check_hostport(request.endpoint, "teacher endpoint")
        except DiscoveryError as exc:
            await self._fail(context, m, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            await self.store.drop("teacher", service, endpoint, request.lease_id)
        except StoreUnavailable as exc:
            await self._fail(context, m, grpc.StatusCode.UNAVAILABLE, f"store unavailable: {exc}")
        self._kept.pop((service, endpoint), None)
        self.mark_dirty(service)
        self.metrics.rpcs.labels(m, "OK").inc()
        return pb.DeregisterTeacherResponse()

    async def WatchAssignment(self, request: pb.WatchAssignmentRequest, context) -> AsyncIterator[pb.Assignment]:
        m = "WatchAssignment"
        try:
            service = check_service_name(request.service_name)
            require_num = check_require_num(request.require_num)
            student = check_id(request.student_id, "student_id") if request.student_id else uuid.uuid4().hex
            instance = check_id(request.instance_id, "instance_id") if request.instance_id else uuid.uuid4().hex
        except DiscoveryError as exc:
            await self._fail(context, m, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            lease = await self.store.join(
                self.server_id, "student", service, student, instance, {"require_num": require_num}, self.group_ttl
            )
        except AlreadyRegistered:
            await self._fail(
                context,
                m,
                grpc.StatusCode.ALREADY_EXISTS,
                f"student {student!r} is already registered in service {service!r} by another instance",
            )
        except StoreUnavailable as exc:
            await self._fail(context, m, grpc.StatusCode.UNAVAILABLE, f"store unavailable: {exc}")
        w = _Watcher(service, student, instance, require_num, lease, joined=time.monotonic())
        local = self._watchers.setdefault(service, {})
        if student in local:  # the same student reconnected to this server: the old stream ends
            local[student].replaced = True
            local[student].wake.set()
        local[student] = w
        self.metrics.streams.inc()
        self.metrics.rpcs.labels(m, "OK").inc()
        self.mark_dirty(service)
        log.debug("student %s joined %s wanting %d", student, service, require_num)
        try:
            while True:
                await w.wake.wait()
                w.wake.clear()
                if w.replaced:
                    return
                if w.error:
                    await context.abort(*w.error)
                teachers, w.pending = w.pending, None
                if teachers is None:
                    continue
                self.metrics.pushes.inc()
                yield pb.Assignment(
                    student_id=student,
                    teachers=[
                        pb.TeacherEndpoint(endpoint=e, model_name=n, registration=r, protocol=p)
                        for e, n, r, p in teachers
                    ],
                )
        finally:
            self.metrics.streams.dec()
            if local.get(student) is w:
                del local[student]
            if not w.replaced:
                # Shielded: the stream is usually being cancelled, but the student must leave now.
                drop = asyncio.ensure_future(self._drop_student(w))
                self._drops.add(drop)
                drop.add_done_callback(self._drops.discard)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(drop)

    async def _drop_student(self, w: _Watcher) -> None:
        try:
            await self.store.leave(self.server_id, "student", w.service, w.student, w.lease)
        except Exception as exc:  # its group's lease ends it if this server goes; else the next join
            log.warning("dropping student %s failed: %s", w.student, exc)
        self.mark_dirty(w.service)
        log.debug("student %s left %s", w.student, w.service)

    async def Report(self, request: pb.StudentReport, context) -> pb.ReportResponse:
        m = "Report"
        try:
            if request.service_name or not request.fixed:
                check_service_name(request.service_name)
            check_id(request.student_id, "student_id")
            if request.instance_id:
                check_id(request.instance_id, "instance_id")
            if len(request.teachers) > _MAX_REQUIRE:
                raise DiscoveryError(f"a report names at most {_MAX_REQUIRE} teachers")
            for t in request.teachers:
                check_hostport(t.endpoint, "teacher endpoint")
        except DiscoveryError as exc:
            await self._fail(context, m, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.fleet.report(request)
        self.metrics.rpcs.labels(m, "OK").inc()
        return pb.ReportResponse(report_seconds=self.report_seconds)

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        m = "Status"
        try:
            names = await self.store.services()
            if request.service_name:
                if request.service_name not in names:
                    await self._fail(context, m, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service_name!r}")
                names = [request.service_name]
            services = [(n, await self.store.read(n)) for n in names]
        except StoreUnavailable as exc:
            await self._fail(context, m, grpc.StatusCode.UNAVAILABLE, f"store unavailable: {exc}")
        self.metrics.rpcs.labels(m, "OK").inc()
        return status_message(services, self.server_id, self.store.url)


def status_message(services: list[tuple[str, ServiceState]], server_id: str, store: str) -> pb.StatusResponse:
    """The Status RPC's answer for some services' states."""
    out = pb.StatusResponse(server_id=server_id, store=store)
    for name, state in services:
        if not state.teachers and not state.students:
            continue
        by_teacher: dict[str, list[str]] = {}
        for s, ts in sorted(state.assignment.items()):
            if s in state.students:
                for t in ts:
                    by_teacher.setdefault(t, []).append(s)
        svc = out.services.add(name=name)
        for ep, t in sorted(state.teachers.items()):
            svc.teachers.add(
                endpoint=ep,
                model_name=str(t.get("model_name", "teacher")),
                protocol=str(t.get("protocol", "")),
                weight=float(t.get("weight", 1.0)),
                healthy=bool(t.get("healthy", True)),
                students=by_teacher.get(ep, []),
            )
        for s, v in sorted(state.students.items()):
            svc.students.add(id=s, require_num=int(v["require_num"]), teachers=state.assignment.get(s, []))
    return out


def status_dict(msg: pb.StatusResponse) -> dict:
    """The ``distill discovery status --json`` shape of a Status answer."""

    def num(x: float) -> float | int:
        return int(x) if float(x).is_integer() else x

    return {
        "server_id": msg.server_id,
        "store": msg.store,
        "services": {
            svc.name: {
                "teachers": [
                    {
                        "endpoint": t.endpoint,
                        "model_name": t.model_name,
                        "protocol": t.protocol,
                        "weight": num(t.weight),
                        "healthy": t.healthy,
                        "students": list(t.students),
                    }
                    for t in svc.teachers
                ],
                "students": [
                    {"id": s.id, "require_num": s.require_num, "teachers": list(s.teachers)} for s in svc.students
                ],
            }
            for svc in msg.services
        },
    }
