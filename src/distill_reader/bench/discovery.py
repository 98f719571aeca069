"""``distill bench discovery``: many simulated students and teachers against a real discovery server.

A real ``distill discovery serve`` runs as its own process (memory store, or Redis/etcd that the
benchmark starts itself in a temporary directory); the simulated clients live in this process, on
one asyncio loop, sharing a few gRPC channels: a student is one ``WatchAssignment`` stream, a
teacher one ``RegisterTeacher`` and a keep-alive every keep-alive interval (``--keepalive-rpc``: a
message on its ``KeepAliveStream``, a ``KeepAlive`` call, or with ``batch`` one ``KeepAliveBatch``
message for the ``--teachers-per-host`` teachers of a host; no OIP server behind it: readiness is
not the point; the teachers run in a process of their own). For each size (students / teachers, ``require_num`` 2):

1. the teachers register, then all the students connect in one burst: the time until every
   student has its full set (``min(require_num, teachers)`` teachers), and until the assignment
   settles: the teacher leases lost meanwhile (KeepAlives answered NOT_FOUND; the server's lapse
   counter), the KeepAlive p99, the time the server was behind, and the reconcile time p99;
2. a steady state (``--steady-s``, 60 s by default): assignment messages received (should be 0),
   spurious expiries (students joined again after a lapse, teachers told NOT_FOUND), the server's
   CPU and its memory per student;
3. teachers die (their keep-alives stop; the clock starts when the lease ends, i.e. the last
   answered keep-alive plus the TTL) and deregister: each affected student's latency to its new
   set (p50, p99), and how many unaffected students got a message (should be 0);
4. a teacher joins: the time until it holds its fair share (``floor(links / teachers)``), and
   the links moved against the links that fairness requires;
5. the server's reconcile-time histogram (``/metrics``).

The same :class:`Simulator` drives the fast behaviour tests (``tests/test_discovery_scale.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import random
import re
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from distill_reader.bench.harness import Progress, Row, Sizes
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc

SERVICE = "bench"
REQUIRE_NUM = 2
STUDENTS_PER_CHANNEL = 250
TEACHERS_PER_CHANNEL = 100
# Each channel its own connection (grpc would otherwise share one subchannel between them).
_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.keepalive_time_ms", 10_000)]
_RPC_TIMEOUT_S = 5.0
#: how simulated teachers keep alive: a message each on a KeepAliveStream, a KeepAlive call each, or
#: the teachers of one host (the endpoint's host) in one KeepAliveBatch message (a host agent's)
KEEPALIVE_RPCS = ("stream", "unary", "batch")


@dataclass(eq=False)
class SimStudent:
    """One simulated student: its stream and every set it was sent, with the time it arrived."""

    id: str
    sets: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    call: Any = None
    error: str | None = None  # the last error that ended its stream
    reopened: int = 0  # streams that ended without being asked to (the student re-opened one)
    closed: bool = False

    @property
    def current(self) -> frozenset[str] | None:
        return self.sets[-1][1] if self.sets else None

    def since(self, t: float) -> list[tuple[float, frozenset[str]]]:
        """The sets that arrived at or after ``t``."""
        return [(at, s) for at, s in self.sets if at >= t]


@dataclass(eq=False)
class SimTeacher:
    """One simulated teacher: a lease kept alive until it dies or deregisters."""

    endpoint: str
    lease: str = ""
    keepalive_s: float = 0.5  # the interval the server asked for last
    ttl: float = 2.0  # the TTL the server told last
    last_kept: float = 0.0  # when the last KeepAlive (or the registration) was answered
    not_found: int = 0  # KeepAlives answered NOT_FOUND: the lease had lapsed
    latencies: list[float] = field(default_factory=list)
    task: asyncio.Task | None = None  # its keep-alives (batch: its host's)
    register: Any = None  # its RegisterTeacherRequest (sent again when the lease lapsed)

    @property
    def host(self) -> str:
        return self.endpoint.rsplit(":", 1)[0]


class Simulator:
    """Students and teachers over shared channels to discovery servers (use ``async with``): with
    several endpoints (``"h:p,h:p"``), the channels go to them in turn, so students and teachers
    are spread evenly over the servers."""

    def __init__(
        self,
        endpoint: str,
        service: str = SERVICE,
        require_num: int = REQUIRE_NUM,
        fleet: TeacherFleet | None = None,
        keepalive: str = "unary",
    ) -> None:
        if keepalive not in KEEPALIVE_RPCS:
            raise ValueError(f"keepalive must be one of {', '.join(KEEPALIVE_RPCS)}, got {keepalive!r}")
        self.keepalive = keepalive  # how the teachers of this process keep alive
        self.endpoints = [e.strip() for e in endpoint.split(",") if e.strip()]
        self.fleet = fleet  # teachers kept in that process instead of this one
        self.service = service
        self.require_num = require_num
        self.students: list[SimStudent] = []
        self.teachers: dict[str, SimTeacher] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._student_stubs: list[pb_grpc.DiscoveryStub] = []
        self._teacher_stubs: list[pb_grpc.DiscoveryStub] = []
        self._tasks: list[asyncio.Task] = []
        self._hosts: dict[str, dict[str, SimTeacher]] = {}  # batch: each host's teachers
        self.ttl = 2.0

    async def __aenter__(self) -> Simulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stub(self, stubs: list[pb_grpc.DiscoveryStub], index: int, per: int) -> pb_grpc.DiscoveryStub:
        while len(stubs) <= index // per:
            target = self.endpoints[len(stubs) % len(self.endpoints)]
            channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            self._channels.append(channel)
            stubs.append(pb_grpc.DiscoveryStub(channel))
        return stubs[index // per]

    # -- teachers ---------------------------------------------------------------------------------

    async def add_teacher(self, endpoint: str, weight: float = 1.0) -> SimTeacher:
        """Register a teacher (returns once registered) and keep its lease in a task."""
        t = SimTeacher(endpoint)
        if self.fleet is not None:
            self.ttl = await self.fleet.call("add", endpoint, weight)
            self.teachers[endpoint] = t
            return t
        stub = self._stub(self._teacher_stubs, len(self.teachers), TEACHERS_PER_CHANNEL)
        t.register = pb.RegisterTeacherRequest(service_name=self.service, endpoint=endpoint, weight=weight)
        resp = await stub.RegisterTeacher(t.register, timeout=_RPC_TIMEOUT_S)
        t.lease, t.keepalive_s, t.last_kept = resp.lease_id, resp.keepalive_seconds, time.monotonic()
        self.ttl = t.ttl = resp.ttl_seconds
        self.teachers[endpoint] = t
        if self.keepalive != "batch":
            t.task = asyncio.create_task(self._keep(stub, t))
        elif t.host in self._hosts:
            self._hosts[t.host][endpoint] = t
            t.task = next(iter(self._hosts[t.host].values())).task
        else:
            self._hosts[t.host] = {endpoint: t}
            t.task = asyncio.create_task(self._keep_host(stub, self._hosts[t.host]))
        return t

    async def _keep(self, stub: pb_grpc.DiscoveryStub, t: SimTeacher) -> None:
        """Keep ``t``'s lease: a KeepAlive call each interval, or (``keepalive="stream"``, as
        ``distill teacher register`` with one endpoint does) a message each on one KeepAliveStream."""
        await asyncio.sleep(random.random() * t.keepalive_s)  # spread the keep-alives
        call: Any = None
        while True:
            sent = time.monotonic()
            request = pb.KeepAliveRequest(service_name=self.service, endpoint=t.endpoint, lease_id=t.lease)
            try:
                if self.keepalive == "unary":
                    resp = await stub.KeepAlive(request, timeout=_RPC_TIMEOUT_S)
                else:
                    if call is None:
                        call = stub.KeepAliveStream()
                    resp = await self._exchange(call, request)
                self._kept(t, resp, sent)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, RuntimeError) as exc:
                if call is not None:
                    call.cancel()
                    call = None
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND:
                    await self._register_again(stub, t)
            await asyncio.sleep(max(0.0, t.keepalive_s - (time.monotonic() - sent)))

    async def _keep_host(self, stub: pb_grpc.DiscoveryStub, teachers: dict[str, SimTeacher]) -> None:
        """Keep the leases of one host's ``teachers`` (``keepalive="batch"``, as ``distill discovery
        register`` with several endpoints does): one KeepAliveBatch message each interval."""
        await asyncio.sleep(random.random() * self.ttl / 4)  # spread the hosts
        call: Any = None
        interval = 0.5
        while True:
            sent = time.monotonic()
            batch = list(teachers.values())
            request = pb.KeepAliveBatch(
                keep_alives=[
                    pb.KeepAliveRequest(service_name=self.service, endpoint=t.endpoint, lease_id=t.lease) for t in batch
                ]
            )
            try:
                if call is None:
                    call = stub.KeepAliveBatchStream()
                resp = await self._exchange(call, request)
                interval = resp.keepalive_seconds or interval
                for t, result in zip(batch, resp.results):
                    if result.code == grpc.StatusCode.NOT_FOUND.value[0]:
                        await self._register_again(stub, t)
                    elif result.code == grpc.StatusCode.OK.value[0]:
                        self._kept(t, resp, sent)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, RuntimeError):
                if call is not None:
                    call.cancel()
                    call = None
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - sent)))

    @staticmethod
    async def _exchange(call: Any, request: Any) -> Any:
        await call.write(request)
        resp = await asyncio.wait_for(call.read(), _RPC_TIMEOUT_S)
        if resp is grpc.aio.EOF:
            raise RuntimeError("keep-alive stream ended")
        return resp

    @staticmethod
    def _kept(t: SimTeacher, resp: Any, sent: float) -> None:
        # The pace the server asks for (longer intervals and TTL for a large fleet).
        t.keepalive_s, t.ttl = resp.keepalive_seconds or t.keepalive_s, resp.ttl_seconds or t.ttl
        t.last_kept = time.monotonic()
        t.latencies.append(t.last_kept - sent)

    @staticmethod
    async def _register_again(stub: pb_grpc.DiscoveryStub, t: SimTeacher) -> None:
        """The lease lapsed (the keep-alive was answered NOT_FOUND): count it and register again."""
        t.not_found += 1
        with contextlib.suppress(grpc.aio.AioRpcError):
            t.lease = (await stub.RegisterTeacher(t.register, timeout=_RPC_TIMEOUT_S)).lease_id

    async def _stop_keeping(self, t: SimTeacher) -> None:
        """End ``t``'s keep-alives (batch: take it out of its host's batch; the host's task ends
        with its last teacher)."""
        host = self._hosts.get(t.host)
        if host is not None:
            del host[t.endpoint]
            if host:
                return
            del self._hosts[t.host]
        assert t.task is not None
        t.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t.task

    async def kill_teacher(self, endpoint: str) -> float:
        """Stop a teacher's keep-alives (it dies); returns when its lease ends."""
        t = self.teachers.pop(endpoint)
        if self.fleet is not None:
            return await self.fleet.call("kill", endpoint)
        await self._stop_keeping(t)
        return t.last_kept + t.ttl

    async def deregister_teacher(self, endpoint: str) -> float:
        """Deregister a teacher; returns when the request was sent."""
        t = self.teachers.pop(endpoint)
        if self.fleet is not None:
            return await self.fleet.call("deregister", endpoint)
        await self._stop_keeping(t)
        sent = time.monotonic()
        await self._teacher_stubs[0].DeregisterTeacher(
            pb.DeregisterTeacherRequest(service_name=self.service, endpoint=endpoint, lease_id=t.lease),
            timeout=_RPC_TIMEOUT_S,
        )
        return sent

    async def teacher_stats(self, reset: bool = False) -> tuple[int, list[float]]:
        """KeepAlives answered NOT_FOUND so far, and the KeepAlive latencies (since the last reset)."""
        if self.fleet is not None:
            return await self.fleet.call("stats", reset)
        lapses = sum(t.not_found for t in self.teachers.values())
        latencies = [x for t in self.teachers.values() for x in t.latencies]
        if reset:
            for t in self.teachers.values():
                t.latencies.clear()
        return lapses, latencies

    # -- students ---------------------------------------------------------------------------------

    def add_students(self, n: int, prefix: str = "student") -> list[SimStudent]:
        """Open ``n`` student streams at once (they run in tasks)."""
        new = [SimStudent(f"{prefix}-{len(self.students) + i:06d}") for i in range(n)]
        for s in new:
            stub = self._stub(self._student_stubs, len(self.students), STUDENTS_PER_CHANNEL)
            self.students.append(s)
            self._tasks.append(asyncio.create_task(self._watch(stub, s)))
        return new

    async def _watch(self, stub: pb_grpc.DiscoveryStub, s: SimStudent) -> None:
        """Keep a stream open, as a StudentSession does: one that ends unasked is re-opened after a
        backoff (0.1 s doubling to 2 s; under a burst the server's gRPC can cancel a new stream)."""
        req = pb.WatchAssignmentRequest(service_name=self.service, require_num=self.require_num, student_id=s.id)
        backoff = 0.1
        while not s.closed:
            s.call = stub.WatchAssignment(req)
            try:
                async for msg in s.call:
                    s.sets.append((time.monotonic(), frozenset(t.endpoint for t in msg.teachers)))
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                if s.closed:
                    return
                s.error = f"{exc.code().name}: {exc.details()}"
            s.reopened += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def end_student(self, s: SimStudent) -> None:
        """Cancel a student's stream (it leaves)."""
        s.closed = True
        if s.call is not None:
            s.call.cancel()

    # -- waiting and figures ----------------------------------------------------------------------

    def full(self, s: SimStudent) -> bool:
        cur = s.current
        if cur is None or len(cur) != min(self.require_num, len(self.teachers)):
            return False
        return all(t in self.teachers for t in cur)

    async def wait(self, pred, timeout: float, what: str, poll: float = 0.02) -> None:
        """Poll ``pred()`` until true; TimeoutError naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached within {timeout:g} s")
            await asyncio.sleep(poll)

    async def wait_quiet(self, quiet: float = 1.0, timeout: float = 30.0) -> None:
        """Wait until no student got a message for ``quiet`` seconds."""

        def last() -> float:
            return max((s.sets[-1][0] for s in self.students if s.sets), default=0.0)

        deadline = time.monotonic() + timeout
        while time.monotonic() - last() < quiet:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the assignment did not settle within {timeout:g} s")
            await asyncio.sleep(0.1)

    def messages_since(self, t: float) -> int:
        return sum(len(s.since(t)) for s in self.students)

    def loads(self) -> dict[str, int]:
        counts = dict.fromkeys(self.teachers, 0)
        for s in self.students:
            for t in s.current or ():
                if t in counts:
                    counts[t] += 1
        return counts

    async def close(self) -> None:
        for s in self.students:
            self.end_student(s)
        for t in self.teachers.values():
            if t.task:
                t.task.cancel()
        tasks = self._tasks + [t.task for t in self.teachers.values() if t.task]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for channel in self._channels:
            await channel.close()


class TeacherFleet:
    """Simulated teachers in a process of their own, driven through a pipe: their keep-alives do
    not wait behind the students' streams in the simulator's event loop (on a real fleet they come
    from other machines). Times are ``time.monotonic()``, the same clock in both processes."""

    def __init__(self, endpoint: str, service: str = SERVICE, keepalive: str = "stream") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_fleet_main, args=(child, endpoint, service, keepalive), daemon=True)
        self._process.start()
        self._lock = asyncio.Lock()

    async def call(self, *message: Any) -> Any:
        """Send one command and wait (at most 60 s) for its answer; re-raises the fleet's error."""
        async with self._lock:
            self._conn.send(message)
            if not await asyncio.to_thread(self._conn.poll, 60):
                raise TimeoutError(f"the teacher fleet did not answer {message[0]!r} within 60 s")
            reply = self._conn.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("stop",))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


def _fleet_main(conn: Any, endpoint: str, service: str, keepalive: str) -> None:
    """The teacher fleet process: a Simulator with teachers only, answering the pipe's commands."""

    async def main() -> None:
        async with Simulator(endpoint, service, keepalive=keepalive) as sim:
            while True:
                message = await asyncio.to_thread(conn.recv)
                try:
                    if message[0] == "stop":
                        break
                    if message[0] == "add":
                        await sim.add_teacher(message[1], message[2])
                        reply: Any = sim.ttl
                    elif message[0] == "kill":
                        reply = await sim.kill_teacher(message[1])
                    elif message[0] == "deregister":
                        reply = await sim.deregister_teacher(message[1])
                    else:
                        reply = await sim.teacher_stats(message[1])
                except grpc.aio.AioRpcError as exc:
                    reply = RuntimeError(f"{message[0]}: {exc.code().name}: {exc.details()}")
                except Exception as exc:
                    reply = RuntimeError(f"{message[0]}: {exc!r}")
                conn.send(reply)

    asyncio.run(main())


async def teacher_loss(sim: Simulator, endpoint: str, how: str) -> dict[str, Any]:
    """A teacher dies (``how="die"``) or deregisters: its students' latencies to their new sets, and
    the students messaged that did not hold it."""
    affected = [s for s in sim.students if s.current and endpoint in s.current]
    t_mark = time.monotonic()
    t0 = await (sim.kill_teacher(endpoint) if how == "die" else sim.deregister_teacher(endpoint))
    await sim.wait(
        lambda: all(s.current is not None and endpoint not in s.current and sim.full(s) for s in affected),
        sim.ttl + 10,
        f"students of the {'dead' if how == 'die' else 'deregistered'} teacher {endpoint} get new sets",
    )
    latencies = [next(at for at, cur in s.sets if at >= t_mark and endpoint not in cur) - t0 for s in affected]
    await asyncio.sleep(1.0)  # anything else that was going to be sent
    others = [s for s in sim.students if s not in affected and s.since(t_mark)]
    return {"affected": len(affected), "latencies": latencies, "unaffected_messaged": len(others)}


async def teacher_join(sim: Simulator, endpoint: str) -> dict[str, Any]:
    """A teacher joins: the time until it holds its fair share, and links moved ÷ links needed."""
    links = sum(min(sim.require_num, len(sim.teachers) + 1) for _ in sim.students)
    fair = links // (len(sim.teachers) + 1)
    before = {s.id: s.current for s in sim.students}
    t0 = time.monotonic()
    await sim.add_teacher(endpoint)
    await sim.wait(lambda: sim.loads().get(endpoint, 0) >= fair, 10, f"the new teacher gets its fair share ({fair})")
    reached = max(
        (next(at for at, cur in s.sets if at >= t0 and endpoint in cur) for s in sim.students if endpoint in s.current),
        default=t0,
    )
    await sim.wait_quiet(0.5, 10)
    moved = sum(len(s.current - before[s.id]) for s in sim.students if before[s.id] is not None)
    return {"fair_share": fair, "seconds": reached - t0, "moved": moved, "needed": sim.loads()[endpoint]}


# -- the server process and its figures -----------------------------------------------------------


def _cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds the servers have used, together."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pids: Sequence[int]) -> int:
    """The servers' resident memory, together."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def scrape(http: str) -> dict[str, float]:
    """The servers' Prometheus metrics as ``{"name{labels}": value}``, summed over the servers
    (``http``: their ``host:port`` status addresses, comma-separated)."""
    out: dict[str, float] = {}
    for address in http.split(","):
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = out.get(name, 0.0) + float(value)
    return out


def metric(metrics: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def reconcile_histogram(metrics: dict[str, float]) -> dict[str, int]:
    """Reconciles per time bucket (not cumulative): ``{"≤ 5 ms": n, …}``."""
    buckets = []
    for k, v in metrics.items():
        m = re.fullmatch(r'distill_discovery_reconcile_seconds_bucket\{le="([^"]+)"\}', k)
        if m:
            buckets.append((math.inf if m.group(1) == "+Inf" else float(m.group(1)), int(v)))
    buckets.sort()
    out, below, top = {}, 0, 0.0
    for le, n in buckets:
        out[f"> {top:g} s" if math.isinf(le) else f"≤ {le * 1000:g} ms"] = n - below
        below, top = n, top if math.isinf(le) else le
    return out


def _hist_diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Reconciles per bucket between two scrapes."""
    return {k: n - before.get(k, 0) for k, n in after.items()}


def _quantile_bound(hist: dict[str, int], q: float) -> float:
    """The upper bound in ms of the bucket holding the ``q`` quantile (inf: over 1 s)."""
    total, seen = sum(hist.values()), 0
    for label, n in hist.items():
        seen += n
        if total and seen >= q * total:
            return math.inf if label.startswith(">") else float(label.split()[1])
    return math.nan


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass
class SizeResult:
    """Everything measured at one size on one store."""

    store: str
    students: int
    teachers: int
    servers: int = 1  # discovery servers sharing the store (students and teachers spread over them)
    keepalive: str = "stream"  # how the teachers keep alive (KEEPALIVE_RPCS)
    teachers_per_host: int = 1  # teachers sharing a host (endpoint host): batch keeps them in one message
    full_s: float = math.nan
    first_s: float = math.nan
    burst_cpu_s: float = math.nan
    burst_teacher_lapses: int = 0  # KeepAlives answered NOT_FOUND from the burst until it settled
    burst_server_lapses: int = 0  # teacher leases the server counted as lapsed meanwhile
    burst_keepalive_p99_s: float = math.nan
    burst_reconciles: dict[str, int] = field(default_factory=dict)
    burst_behind_s: float = math.nan  # time the server judged itself behind (lease grace), burst to settled
    steady_s: float = 0.0
    steady_messages: int = 0
    steady_changes: int = 0
    student_lapses: int = 0
    teacher_lapses: int = 0
    cpu_percent: float = math.nan
    rss_per_student: float = math.nan
    rss_bytes: int = 0
    keepalive_p99_s: float = math.nan
    die: list[float] = field(default_factory=list)
    deregister: list[float] = field(default_factory=list)
    unaffected_messaged: int = 0
    join_s: float = math.nan
    join_moved: int = 0
    join_needed: int = 0
    reconciles: dict[str, int] = field(default_factory=dict)
    connected: int = 0  # students that got a first set
    server_streams: int = 0  # WatchAssignment streams the server was handling after the burst
    reopened: int = 0  # student streams that ended unasked during the burst and were re-opened
    load_avg: float = math.nan  # the machine's 1-minute load average after the steady state
    error: str = ""


async def _run_size(
    r: SizeResult, endpoint: str, http: str, pids: Sequence[int], events: int, progress: Progress
) -> SizeResult:
    """Measure one size into ``r`` (what was measured stays there if a step fails)."""
    label = f"{_name(r)} {r.students}/{r.teachers}"
    fleet = TeacherFleet(endpoint, keepalive=r.keepalive)
    try:
        await _measure(r, Simulator(endpoint, fleet=fleet), http, pids, events, progress, label)
    finally:
        fleet.close()
    return r


async def _measure(
    r: SizeResult, sim: Simulator, http: str, pids: Sequence[int], events: int, progress: Progress, label: str
) -> None:
    n_students, n_teachers, steady_s = r.students, r.teachers, r.steady_s
    async with sim:
        progress(f"{label}: {n_teachers} teachers register")
        per = r.teachers_per_host
        for i in range(0, n_teachers, 50):
            await asyncio.gather(
                *(
                    sim.add_teacher(f"10.{j // per // 60000}.{j // per // 250 % 240}.{j // per % 250}:{8001 + j % per}")
                    for j in range(i, min(i + 50, n_teachers))
                )
            )
        await asyncio.sleep(1.0)
        rss0 = _rss_bytes(pids)
        progress(f"{label}: {n_students} students connect at once")
        lapses0, _ = await sim.teacher_stats(reset=True)
        mb0 = scrape(http)
        cpu0, t0 = _cpu_s(pids), time.monotonic()
        sim.add_students(n_students)
        try:
            await sim.wait(lambda: all(s.sets for s in sim.students), 60, "every student gets its first set", 0.05)
        finally:
            r.connected = sum(1 for s in sim.students if s.sets)
            r.server_streams = int(metric(scrape(http), "distill_discovery_streams"))
        r.first_s = max(s.sets[0][0] for s in sim.students) - t0
        try:
            await sim.wait(lambda: all(sim.full(s) for s in sim.students), 60, "every student has its full set", 0.05)
        finally:
            r.burst_teacher_lapses = (await sim.teacher_stats())[0] - lapses0
        r.full_s = (
            max(next(at for at, cur in s.sets if len(cur) == min(REQUIRE_NUM, n_teachers)) for s in sim.students) - t0
        )
        r.burst_cpu_s = _cpu_s(pids) - cpu0
        r.reopened = sum(s.reopened for s in sim.students)
        await sim.wait_quiet(1.0, 60)
        # Leases lost during the burst: the teachers' KeepAlives answered NOT_FOUND, and the lease
        # ends the server counted (from the teachers' registration to the assignment settling).
        lapses1, latencies = await sim.teacher_stats(reset=True)
        r.burst_teacher_lapses = lapses1 - lapses0
        r.burst_keepalive_p99_s = _pct(latencies, 0.99)
        m0 = scrape(http)
        r.burst_server_lapses = int(
            metric(m0, "distill_discovery_teacher_lapses_total") - metric(mb0, "distill_discovery_teacher_lapses_total")
        )
        r.burst_reconciles = _hist_diff(reconcile_histogram(m0), reconcile_histogram(mb0))
        r.burst_behind_s = metric(m0, "distill_discovery_behind_seconds_total") - metric(
            mb0, "distill_discovery_behind_seconds_total"
        )
        progress(f"{label}: steady state for {steady_s:g} s")
        lapses0, _ = await sim.teacher_stats(reset=True)
        cpu0, t0 = _cpu_s(pids), time.monotonic()
        await asyncio.sleep(steady_s)
        elapsed = time.monotonic() - t0
        r.cpu_percent = 100 * (_cpu_s(pids) - cpu0) / elapsed
        m1 = scrape(http)
        r.rss_bytes = _rss_bytes(pids)
        r.load_avg = os.getloadavg()[0]
        r.rss_per_student = (r.rss_bytes - rss0) / max(1, n_students)
        r.steady_messages = sim.messages_since(t0)
        r.steady_changes = int(
            metric(m1, "distill_discovery_assignment_changes_total")
            - metric(m0, "distill_discovery_assignment_changes_total")
        )
        r.student_lapses = int(
            metric(m1, "distill_discovery_student_lapses_total") - metric(m0, "distill_discovery_student_lapses_total")
        )
        lapses1, latencies = await sim.teacher_stats()
        r.teacher_lapses = lapses1 - lapses0
        r.keepalive_p99_s = _pct(latencies, 0.99)
        rnd = random.Random(0)
        for i in range(events):
            for how, out in (("die", r.die), ("deregister", r.deregister)):
                victim = rnd.choice(sorted(sim.teachers))
                progress(f"{label}: teacher {how} ({i + 1}/{events})")
                loss = await teacher_loss(sim, victim, how)
                out.extend(loss["latencies"])
                r.unaffected_messaged += loss["unaffected_messaged"]
                await sim.wait_quiet(0.5, 30)
        progress(f"{label}: a teacher joins")
        join = await teacher_join(sim, "10.255.255.1:8001")
        r.join_s, r.join_moved, r.join_needed = join["seconds"], join["moved"], join["needed"]
        r.reconciles = reconcile_histogram(scrape(http))


def run_size(
    store: str,
    n_students: int,
    n_teachers: int,
    steady_s: float,
    events: int,
    progress: Progress,
    servers: int = 1,
    keepalive: str = "stream",
    teachers_per_host: int = 1,
) -> SizeResult:
    """One size on one store (``memory``, ``redis`` or ``etcd``: started here), in fresh processes;
    ``servers`` discovery servers share the store (Redis or etcd); the teachers, ``teachers_per_host``
    to a host, keep alive with ``keepalive`` (one of KEEPALIVE_RPCS)."""
    from distill_reader.bench.processes import DiscoveryProcess, StoreProcess
    from distill_reader.teacher.local import free_port

    with tempfile.TemporaryDirectory(prefix="distill-bench-discovery-") as tmp:
        backing = None
        url = "memory"
        if store != "memory":
            backing = StoreProcess(store, tmp)
            backing.start()
            url = backing.url
        https = [f"127.0.0.1:{free_port()}" for _ in range(servers)]
        running = [DiscoveryProcess(url, ["--http", http]) for http in https]
        r = SizeResult(
            store,
            n_students,
            n_teachers,
            servers=servers,
            steady_s=steady_s,
            keepalive=keepalive,
            teachers_per_host=teachers_per_host,
        )
        try:
            for server in running:
                server.start()
            pids = [server.process.pid for server in running if server.process is not None]
            endpoints = ",".join(server.endpoint for server in running)
            asyncio.run(_run_size(r, endpoints, ",".join(https), pids, events, progress))
        except (TimeoutError, RuntimeError, grpc.aio.AioRpcError) as exc:  # RuntimeError: a teacher fleet call
            rpc = isinstance(exc, grpc.aio.AioRpcError)
            r.error = f"{exc.code().name}: {exc.details()}" if rpc else str(exc).splitlines()[0]
        finally:
            for server in running:
                server.stop()
            if backing is not None:
                backing.stop()
        return r


def _rows(r: SizeResult) -> list[Row]:
    name = "discovery"
    tag = f"{_name(r)} {r.students:,}/{r.teachers:,}"
    details = {k: v for k, v in r.__dict__.items() if k not in ("die", "deregister")}
    details["die_p50_s"], details["die_p99_s"] = _pct(r.die, 0.5), _pct(r.die, 0.99)
    details["deregister_p50_s"], details["deregister_p99_s"] = _pct(r.deregister, 0.5), _pct(r.deregister, 0.99)
    if r.error and math.isnan(r.full_s):
        return [Row(name, f"{tag}: failed ({r.error})", math.nan, 1, "", math.nan, details=details)]

    def row(label: str, measured: float, limit: float, unit: str, target: float | None = 1.0, **kw: Any) -> Row:
        ratio = measured / limit if limit else math.nan
        return Row(
            name, f"{tag}: {label}", measured, limit, unit, ratio, target=target, at_most=True, details=details, **kw
        )

    p99_loss = max(details["die_p99_s"], details["deregister_p99_s"])
    return [
        row("every student has its full set (s after the burst)", r.full_s, 5.0, "s"),
        row(
            "teacher leases lost during the burst",
            max(r.burst_teacher_lapses, r.burst_server_lapses),
            1,
            "",
            target=0,
        ),
        row(
            "reconcile p99 during the burst (upper bound of its histogram bucket, ms)",
            _quantile_bound(r.burst_reconciles, 0.99),
            50,
            "ms",
            target=None,
        ),
        row("teacher died/deregistered → new sets, p99 (s)", p99_loss, 1.0, "s"),
        row("unaffected students messaged", r.unaffected_messaged, 1, "", target=0),
        row("teacher joined → fair share (s)", r.join_s, 1.0, "s"),
        row("links moved ÷ needed on join", r.join_moved, max(1, r.join_needed), "links"),
        row(
            f"steady {r.steady_s:g} s: messages + spurious expiries",
            r.steady_messages + r.student_lapses + r.teacher_lapses,
            1,
            "",
            target=0,
        ),
        row("server CPU in steady state (%)", r.cpu_percent, 100, "%", target=None),
        row("server RSS per student (KiB)", r.rss_per_student / 1024, 1, "KiB", target=None, limit_label="per student"),
        row("reconcile p99 (upper bound of its histogram bucket, ms)", _quantile_bound(r.reconciles, 0.99), 50, "ms"),
    ]


def discovery(
    sizes: Sizes,
    progress: Progress,
    *,
    students: Sequence[int] = (),
    teachers: Sequence[int] = (),
    stores: Sequence[str] = (),
    steady_s: float | None = None,
    servers: int = 1,
    keepalive: str = "stream",
    teachers_per_host: int = 1,
) -> list[Row]:
    """The ``discovery`` scenario: every (students, teachers) pair on every store, with ``servers``
    discovery servers sharing the store (Redis or etcd); teachers, ``teachers_per_host`` to a host,
    keep alive with ``keepalive``."""
    students = list(students) or ([200] if sizes.quick else [1000])
    teachers = list(teachers) or ([20] if sizes.quick else [100])
    if len(teachers) == 1:
        teachers = teachers * len(students)
    if len(students) != len(teachers):
        raise ValueError(f"--students and --teachers need the same number of values, got {students} and {teachers}")
    steady = steady_s if steady_s is not None else (5.0 if sizes.quick else 30.0)
    rows: list[Row] = []
    for store in stores or ["memory"]:
        for n_s, n_t in zip(students, teachers):
            events = 1 if sizes.quick else 3
            r = run_size(store, n_s, n_t, steady, events, progress, servers, keepalive, teachers_per_host)
            progress(summary(r))
            rows += _rows(r)
    return rows


def _name(r: SizeResult) -> str:
    """The store, the number of servers when more than one (``redis ×2``), and unary keep-alives."""
    name = r.store if r.servers == 1 else f"{r.store} ×{r.servers}"
    if r.keepalive == "unary":
        return f"{name} (unary keep-alives)"
    if r.keepalive == "batch":
        return f"{name} (keep-alives batched by host, {r.teachers_per_host} teachers each)"
    return name


def summary(r: SizeResult) -> str:
    """One line per size, as in docs/discovery.md's table."""
    hist = ", ".join(f"{k}: {v}" for k, v in r.reconciles.items() if v)
    return (
        f"{_name(r)} {r.students}/{r.teachers}: full sets {r.full_s:.2f} s (first {r.first_s:.2f} s, server CPU "
        f"{r.burst_cpu_s:.1f} s, {r.reopened} streams re-opened); burst: {r.burst_teacher_lapses} teacher leases "
        f"lost ({r.burst_server_lapses} counted by the server), keep-alive p99 "
        f"{r.burst_keepalive_p99_s * 1000:.0f} ms, server behind {r.burst_behind_s:.1f} s, reconcile p99 ≤ "
        f"{_quantile_bound(r.burst_reconciles, 0.99):g} ms; "
        f"die p50/p99 {_pct(r.die, 0.5):.2f}/{_pct(r.die, 0.99):.2f} s, deregister "
        f"{_pct(r.deregister, 0.5):.2f}/{_pct(r.deregister, 0.99):.2f} s, unaffected messaged "
        f"{r.unaffected_messaged}; join {r.join_s:.2f} s moved {r.join_moved}/{r.join_needed}; steady "
        f"{r.steady_s:g} s: {r.steady_messages} messages, {r.steady_changes} writes, {r.student_lapses}+"
        f"{r.teacher_lapses} expiries, CPU {r.cpu_percent:.0f} %, RSS {r.rss_bytes / 2**20:.0f} MiB "
        f"({r.rss_per_student / 1024:.1f} KiB/student), keep-alive p99 {r.keepalive_p99_s * 1000:.0f} ms; "
        f"reconciles {hist} (p99 ≤ {_quantile_bound(r.reconciles, 0.99):g} ms); machine load average {r.load_avg:.1f}"
        + (
            f"; {r.error} ({r.connected} of {r.students} streams got a first set, the server saw {r.server_streams})"
            if r.error
            else ""
        )
    )
