"""Discovery at scale, in small: pushes only to changed students, bulk student leases, lapses.

The clients are the benchmark's simulator (``distill_reader.bench.discovery``): many students and
teachers over a few shared channels, against real discovery servers (and a real Redis). Sizes stay
small here; ``distill bench discovery`` measures the large ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest
import redis
from test_discovery_stores import start_store

from distill_reader.bench.discovery import Simulator, teacher_join, teacher_loss
from distill_reader.bench.processes import DiscoveryProcess, StoreProcess
from distill_reader.discovery.client import fetch_status
from distill_reader.discovery.server import DiscoveryServer
from distill_reader.discovery.service import DEFAULT_TTL_S, status_dict

pytestmark = pytest.mark.timeout(90)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 80))


# A server's student group lives TTL + lag cap (2 × TTL by default) after its last keep.
GROUP_TTL_S = 3 * DEFAULT_TTL_S


def teacher(i: int) -> str:
    return f"10.0.0.{i}:8001"


async def students_in(address: str, service: str) -> dict[str, list[str]]:
    """student id -> its teachers, as the discovery server at ``address`` reports them."""
    st = status_dict(await fetch_status(address, service))["services"].get(service, {"students": []})
    return {s["id"]: s["teachers"] for s in st["students"]}


async def until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc = start_store("redis", tmp_path_factory)
    yield proc.url
    proc.stop()


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory):
    proc = start_store("etcd", tmp_path_factory)
    yield proc.url
    proc.stop()


def store_calls(url: str) -> int:
    """Store operations served so far: Redis script calls, or etcd gRPC messages received (a unary
    call is one; each keep-alive on a LeaseKeepAlive stream is one), from etcd's /metrics."""
    if url.startswith("redis"):
        stats = redis.Redis.from_url(url)
        try:
            info = stats.info("commandstats")
        finally:
            stats.close()
        return sum(int(v["calls"]) for k, v in info.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    with urllib.request.urlopen(f"http://{url.split('://', 1)[1]}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return sum(
        int(float(line.rsplit(" ", 1)[1])) for line in lines if line.startswith("grpc_server_msg_received_total")
    )


def test_only_students_whose_set_changed_are_messaged():
    """150 students, 15 teachers: a teacher dies, another deregisters, one joins. Each time exactly
    the students whose set changed get one message each; nobody else hears anything."""

    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory")
        await server.start()
        async with Simulator(server.address) as sim:
            for i in range(15):
                await sim.add_teacher(teacher(i))
            sim.add_students(150)
            await sim.wait(lambda: all(sim.full(s) for s in sim.students), 20, "every student has its full set")
            await sim.wait_quiet(0.5)
            assert sorted(set(sim.loads().values())) == [20]
            for how, victim in (("die", teacher(3)), ("deregister", teacher(7))):
                before = {s.id: len(s.sets) for s in sim.students}
                loss = await teacher_loss(sim, victim, how)
                assert loss["affected"] >= 20
                assert loss["unaffected_messaged"] == 0, how
                # Each affected student got exactly one message: its new, full set.
                got = {s.id: len(s.sets) - before[s.id] for s in sim.students if len(s.sets) > before[s.id]}
                assert sorted(got.values()) == [1] * loss["affected"], (how, got)
            before = {s.id: (len(s.sets), s.current) for s in sim.students}
            join = await teacher_join(sim, teacher(99))
            messaged = [s for s in sim.students if len(s.sets) > before[s.id][0]]
            moved = [s for s in sim.students if s.current != before[s.id][1]]
            # Minimal moves: 300 links over 14 teachers is 21 or 22 each; every link the newcomer
            # takes is one student moved, and only those students are told.
            assert join["fair_share"] == 21 and join["needed"] in (21, 22)
            assert join["moved"] == join["needed"]
            assert messaged == moved and len(messaged) == join["needed"]
        await server.stop()

    run(main())


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_student_leases_kept_per_server_and_freed_when_stream_ends_or_server_dies(kind, request):
    """Students streaming to server B, observed through server A on the same store: keeping 100
    students costs the store a handful of calls per keep-alive, not one per student; a student whose
    stream ends is gone at once, and when B is SIGKILLed all of its students are gone within its
    group's TTL (TTL + lag cap: a server's students outlive its stalls too), so their teachers'
    loads are free again."""

    url = request.getfixturevalue(f"{kind}_url")

    async def main():
        service = "scale-leases"
        async with (
            servers_a_and_b(url) as (a, b),
            Simulator(a.address, service) as teachers,
            Simulator(b.endpoint, service) as students,
        ):
            for i in range(5):
                await teachers.add_teacher(teacher(i))
            students.add_students(100)
            await students.wait(
                lambda: all(s.current is not None and len(s.current) == 2 for s in students.students),
                20,
                "every student has two teachers",
            )
            await until(lambda: _count(a.address, service, 100), 10, "A sees B's 100 students")

            calls = await asyncio.to_thread(store_calls, url)
            await asyncio.sleep(2 * DEFAULT_TTL_S)  # eight keep-alive intervals
            # Per-student leases would be 100 x 8 = 800 calls (etcd: 1,600, a read and a keep-alive
            # each); a group is one per interval per server, plus the 5 teachers' keep-alives (40;
            # etcd: 80) and each server's resync reads (8).
            assert await asyncio.to_thread(store_calls, url) - calls < 200

            for s in students.students[:10]:
                students.end_student(s)
            await until(lambda: _count(a.address, service, 90), 5, "the ended streams' students leave")
            killed = time.monotonic()
            os.kill(b.process.pid, signal.SIGKILL)
            await until(lambda: _count(a.address, service, 0), GROUP_TTL_S + 3, "B's students expire")
            print(f"SIGKILLed server's students gone after {time.monotonic() - killed:.2f} s")
            st = status_dict(await fetch_status(a.address, service))["services"][service]
            assert all(t["students"] == [] for t in st["teachers"])

    run(main())


@contextlib.asynccontextmanager
async def servers_a_and_b(url: str) -> AsyncIterator[tuple[DiscoveryServer, DiscoveryProcess]]:
    """Two discovery servers on the store at ``url``: A in this process (observed), B a process of
    its own (to SIGKILL or SIGSTOP)."""
    a = DiscoveryServer("127.0.0.1:0", url)
    await a.start()
    b = DiscoveryProcess(url)
    try:
        await asyncio.to_thread(b.start)
        yield a, b
    finally:
        b.stop()
        await a.stop()


async def _count(address: str, service: str, n: int) -> bool:
    return len(await students_in(address, service)) == n


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_student_whose_lease_lapsed_is_joined_again_and_told(kind, request):
    """Server B stalls (SIGSTOP) for longer than its group's TTL: its student's lease lapses and the student
    leaves the assignment; meanwhile the student's teacher deregisters. When B resumes, it notices
    the lapse, joins the student again, and the student is sent its new set: it does not keep the
    teacher that left."""
    url = request.getfixturevalue(f"{kind}_url")

    async def main():
        service = "scale-lapse"
        async with (
            servers_a_and_b(url) as (a, b),
            Simulator(a.address, service, 1) as teachers,
            Simulator(b.endpoint, service, 1) as students,
        ):
            await teachers.add_teacher(teacher(1))
            await teachers.add_teacher(teacher(2))
            (s,) = students.add_students(1)
            await students.wait(lambda: s.current is not None and len(s.current) == 1, 10, "the student's set")
            held = next(iter(s.current))
            other = teacher(2) if held == teacher(1) else teacher(1)
            os.kill(b.process.pid, signal.SIGSTOP)
            try:
                await teachers.deregister_teacher(held)
                await until(lambda: _count(a.address, service, 0), GROUP_TTL_S + 3, "the stalled lease lapses")
                n_sets = len(s.sets)
            finally:
                os.kill(b.process.pid, signal.SIGCONT)
            await students.wait(lambda: s.current == {other}, 10, "the lapsed student is told its new set")
            assert len(s.sets) == n_sets + 1
            assert await students_in(a.address, service) == {s.id: [other]}

    run(main())


def test_a_discovery_process_that_cannot_start_names_why():
    """A discovery process that exits before serving (a bad store URL): its error names the cause,
    from the process's own log, not just an exit code."""
    process = DiscoveryProcess("bogus://x")
    try:
        with pytest.raises(RuntimeError, match=r"exited with code 2: .*bad store URL 'bogus://x'"):
            process.start()
    finally:
        process.stop()


def test_a_store_process_that_cannot_start_names_why(tmp_path):
    """The same for the Redis a benchmark or test starts: a bad option is named from Redis's log."""
    if not StoreProcess.available("redis"):
        pytest.skip("redis-server is not installed (scripts/install-services.sh)")
    process = StoreProcess("redis", tmp_path, ["--no-such-option", "x"])
    try:
        with pytest.raises(RuntimeError, match=r"redis exited with code 1: .*Bad directive"):
            process.start()
    finally:
        process.stop()
