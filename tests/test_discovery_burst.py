"""A busy discovery server expires no healthy teacher lease (issue 23).

The server runs in a thread of its own (``ServerThread``); the simulated teachers keep alive from the
test's event loop, on time, while the server is made busy in one of two ways, each for longer than
the TTL: its event loop held by a callback (as a long reconcile holds it), or its KeepAlive calls
held back while the loop runs on (as when they wait in gRPC's queue behind a burst of thousands of
student streams). No teacher lease may lapse (the teachers' KeepAlives are never answered
NOT_FOUND, the server counts no lapse), and a teacher that really stopped keeping alive is still
removed, within ``ttl + lag_cap`` of its last keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import redis
from test_discovery_stores import start_store

from distill_reader.bench.discovery import Simulator
from distill_reader.discovery.server import GC_THRESHOLDS, ServerThread
from distill_reader.discovery.service import DEFAULT_TTL_S, DiscoveryService, _time_spent
from distill_reader.discovery.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(120)

SERVICE = "burst"
TTL = DEFAULT_TTL_S
LAG_CAP = 2 * TTL  # the service's default


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc = start_store("redis", tmp_path_factory)
    yield proc.url
    proc.stop()


# KeepAlive calls that arrive before this time (time.monotonic()) wait until then: held in a queue.
_held_until = [0.0]


@pytest.fixture(params=["memory", "redis"])
def server(request, monkeypatch):
    url = "memory" if request.param == "memory" else request.getfixturevalue("redis_url")
    keep_alive = DiscoveryService.KeepAlive

    async def queued(self, request, context):
        while time.monotonic() < _held_until[0]:
            await asyncio.sleep(0.01)
        return await keep_alive(self, request, context)

    monkeypatch.setattr(DiscoveryService, "KeepAlive", queued)
    if url != "memory":
        # Each test starts from an empty store, as on the memory store: the teachers of the last
        # test hold their leases for up to TTL + lag cap after its server stopped, and the next
        # test's teachers, the same endpoints, would be refused as already registered.
        redis.Redis.from_url(url).flushdb()
    thread = ServerThread(store=url).start()
    try:
        yield thread
    finally:
        thread.stop()


def stall(thread: ServerThread, seconds: float) -> None:
    """Hold the server's event loop for ``seconds`` (a slow reconcile), from another thread."""
    thread._thread.loop.call_soon_threadsafe(time.sleep, seconds)


def lapses(thread: ServerThread) -> float:
    assert thread.server
    return sum(
        s.value
        for m in thread.server.service.metrics.teacher_lapses.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


def student_lapses(thread: ServerThread) -> float:
    """Students the server joined again after their lease lapsed behind their open stream."""
    assert thread.server
    return thread.server.service.registry.get_sample_value("distill_discovery_student_lapses_total") or 0.0


def teachers_in_store(thread: ServerThread) -> set[str]:
    assert thread.server
    state = thread._thread.run(thread.server.store.read(SERVICE), 10)
    return set(state.teachers)


async def fleet(thread: ServerThread, n_teachers: int, n_students: int) -> Simulator:
    sim = Simulator(thread.address, SERVICE)
    for i in range(n_teachers):
        await sim.add_teacher(f"10.0.0.{i + 1}:8001")
    sim.add_students(n_students)
    await sim.wait(lambda: all(sim.full(s) for s in sim.students), 20, "every student has its full set")
    await sim.wait(lambda: all(t.latencies for t in sim.teachers.values()), 10, "every teacher has kept alive once")
    return sim


def test_stalled_server_expires_no_healthy_lease(server):
    """The server's loop is held for 1.5 × TTL, twice: the teachers' keep-alives wait unread, yet no
    teacher lease lapses (on Redis, where leases are TTL keys, they did before: the keep-alives
    reached the store too late), and neither does the server's own student group (kept with TTL +
    lag cap; with the TTL alone it lapsed, and every student was joined again)."""

    async def main():
        async with await fleet(server, 20, 40) as sim:
            assert (await sim.teacher_stats())[0] == 0
            for _ in range(2):
                stall(server, 1.5 * TTL)
                await asyncio.sleep(1.5 * TTL + 2.0)  # the stall, then time for the queue to drain
            not_found, _ = await sim.teacher_stats()
            assert not_found == 0, f"{not_found} KeepAlives answered NOT_FOUND: leases lapsed"
            assert lapses(server) == 0
            assert teachers_in_store(server) == set(sim.teachers)
            assert student_lapses(server) == 0, "the server's student group lapsed"

    asyncio.run(main())


def test_keepalives_queued_behind_a_burst_expire_no_lease(server):
    """The KeepAlive calls wait 1.5 × TTL in the server's queue while its loop runs on (its timers,
    reconciles and student group keep on time): every teacher is silent at once, which is the
    server being behind, not the whole fleet dying. No lease lapses and no student is sent a new set
    (before, the server or Redis expired every teacher and the students' sets churned)."""

    async def main():
        async with await fleet(server, 20, 40) as sim:
            messages = sim.messages_since(0)
            for _ in range(2):
                _held_until[0] = time.monotonic() + 1.5 * TTL
                await asyncio.sleep(1.5 * TTL + 2.0)
            not_found, _ = await sim.teacher_stats()
            assert not_found == 0, f"{not_found} KeepAlives answered NOT_FOUND: leases lapsed"
            assert lapses(server) == 0
            assert teachers_in_store(server) == set(sim.teachers)
            assert sim.messages_since(0) == messages, "students were sent new sets: teachers churned"

    asyncio.run(main())


def test_teacher_that_died_during_a_stall_is_removed_within_the_bound(server):
    """A teacher dies (its keep-alives stop) just before the server stalls: it is not kept for ever
    by the lag credit; it leaves within ``ttl + lag_cap`` of its last keep-alive, and the others stay."""

    async def main():
        async with await fleet(server, 10, 20) as sim:
            victim = sorted(sim.teachers)[0]
            lease_end = await sim.kill_teacher(victim)  # last answered keep-alive + TTL
            last_kept = lease_end - TTL
            stall(server, 1.5 * TTL)
            await asyncio.sleep(0.1)
            while victim in await asyncio.to_thread(teachers_in_store, server):
                assert time.monotonic() - last_kept < TTL + LAG_CAP + 1.0, "the dead teacher was kept too long"
                await asyncio.sleep(0.1)
            gone = time.monotonic() - last_kept
            print(f"\ndead teacher removed {gone:.2f} s after its last keep-alive (stall {1.5 * TTL:g} s)")
            assert gone > TTL
            await sim.wait(lambda: all(sim.full(s) for s in sim.students), 10, "new sets without the dead teacher")
            assert lapses(server) == 1
            assert (await sim.teacher_stats())[0] == 0
            assert teachers_in_store(server) == set(sim.teachers)

    asyncio.run(main())


def test_most_teachers_dying_at_once_are_removed_within_the_bound(server):
    """Most teachers silent at once looks like the server being behind (their keep-alives waiting in
    its queue), so they get the lag credit: still, they are removed within ``ttl + lag_cap``."""

    async def main():
        async with await fleet(server, 10, 20) as sim:
            victims = sorted(sim.teachers)[:7]
            last_kept = min([await sim.kill_teacher(v) for v in victims]) - TTL
            while set(victims) & await asyncio.to_thread(teachers_in_store, server):
                assert time.monotonic() - last_kept < TTL + LAG_CAP + 1.0, "the dead teachers were kept too long"
                await asyncio.sleep(0.1)
            print(f"\n7 of 10 teachers removed {time.monotonic() - last_kept:.2f} s after their last keep-alive")
            # The store's TTL (TTL + lag cap) and the server's own check end these leases at about the
            # same time: the server counts a lease the store ended when its check comes, just after.
            await sim.wait(lambda: lapses(server) >= 7, 2.0, "the 7 lapses counted")
            assert lapses(server) == 7
            assert teachers_in_store(server) == set(sim.teachers)

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["memory", "redis", "etcd"])
def test_store_ends_a_lease_only_after_the_silence(kind, request, tmp_path_factory):
    """``expire_silent`` checks the silence by the store's own clock: a lease kept within it stays
    (it may be kept through another server), one silent for longer ends, a lease gone is "gone"."""
    from distill_reader.discovery.stores import open_discovery_store

    url = "memory"
    proc = None
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    elif kind == "etcd":
        proc = start_store("etcd", tmp_path_factory)
        url = proc.url

    async def main():
        store = open_discovery_store(url)
        await store.start()
        try:
            lease = await store.register("teacher", SERVICE, "10.0.0.1:8001", "i1", {}, 6.0)
            assert await store.expire_silent("teacher", SERVICE, "10.0.0.1:8001", lease, 6.0, 2.0) == "kept"
            await asyncio.sleep(2.2 if kind != "etcd" else 3.2)  # etcd counts in whole seconds
            assert await store.keep("teacher", SERVICE, "10.0.0.1:8001", lease, 6.0)
            assert await store.expire_silent("teacher", SERVICE, "10.0.0.1:8001", lease, 6.0, 2.0) == "kept"
            await asyncio.sleep(2.2 if kind != "etcd" else 3.2)
            assert await store.expire_silent("teacher", SERVICE, "10.0.0.1:8001", "nope", 6.0, 2.0) == "gone"
            assert await store.expire_silent("teacher", SERVICE, "10.0.0.1:8001", lease, 6.0, 2.0) == "ended"
            assert "10.0.0.1:8001" not in (await store.read(SERVICE)).teachers
            assert await store.expire_silent("teacher", SERVICE, "10.0.0.1:8001", lease, 6.0, 2.0) == "gone"
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        if proc is not None:
            proc.stop()


def test_time_spent_counts_steps_and_answers_not_the_loops_queue():
    """The reconcile window is sized by what a round costs: its steps and its store's answers, not the
    time it waited in the loop's queue while other tasks ran (in a burst, most of its wall time)."""

    async def yields(n, result):  # answered at once, each time
        for _ in range(n):
            await asyncio.sleep(0)
        return result

    async def hog():  # 40 ms of work between yields: the loop's queue is slow
        for _ in range(12):
            started = time.perf_counter()
            while time.perf_counter() - started < 0.04:
                pass
            await asyncio.sleep(0)

    async def answered_late():  # a store taking 0.3 s to answer
        await asyncio.sleep(0.3)
        return "late"

    async def fails():
        await asyncio.sleep(0.01)
        raise ValueError("from the coroutine")

    finished = []

    async def cancelled():
        try:
            await asyncio.sleep(10)
        finally:
            finished.append(True)

    async def main():
        hogging = asyncio.ensure_future(hog())
        await asyncio.sleep(0)
        started = time.perf_counter()
        result, spent = await _time_spent(yields(8, "done"))
        wall = time.perf_counter() - started
        await hogging
        assert result == "done"
        assert wall > 0.2, f"the hog held the loop for only {wall:.3f} s: nothing measured"
        assert spent < 0.1, f"{spent:.3f} s of {wall:.3f} s counted: its waits in the loop's queue are not its cost"
        result, spent = await _time_spent(answered_late())
        assert result == "late" and spent >= 0.25, f"{spent:.3f} s: the 0.3 s its answer took is its cost"
        with pytest.raises(ValueError, match="from the coroutine"):
            await _time_spent(fails())
        task = asyncio.ensure_future(_time_spent(cancelled()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [True], "the cancellation reached the wrapped coroutine"

    asyncio.run(main())


class _SlowReadStore(MemoryStore):
    """A store whose reads take ``delay`` s to answer (etcd's, at 10,000 students, in a burst)."""

    def __init__(self, delay: float, stall: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.stall = stall  # the first read holds the loop this long while it waits (another callback)
        self.reads: list[float] = []

    async def read(self, service: str):
        self.reads.append(time.monotonic())
        if self.stall and len(self.reads) == 1:
            asyncio.get_running_loop().call_later(0.01, time.sleep, self.stall)
        await asyncio.sleep(self.delay)
        return await super().read(service)


@contextlib.asynccontextmanager
async def _reconciling(store: MemoryStore) -> AsyncIterator[DiscoveryService]:
    """A discovery service (its reconcile loop, no gRPC) on ``store``, stopped on the way out."""
    await store.start()
    service = DiscoveryService(store)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        await store.close()


async def _two_rounds(store: _SlowReadStore) -> float:
    """Seconds from the start of a reconcile round to the start of the next one, asked for at once."""
    async with _reconciling(store) as service:
        service.mark_dirty(SERVICE)
        deadline = time.monotonic() + 20
        while SERVICE not in service.states and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert SERVICE in service.states
        service.mark_dirty(SERVICE)
        while len(store.reads) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return store.reads[1] - store.reads[0]


def test_a_slow_store_spaces_the_reconciles_out():
    """A round of reconciles whose store took 0.3 s to answer is followed by the next one 4 × 0.3 s
    after it started at the soonest, not at once: the reconciles must not take more than a quarter
    of the store's time either (counting only the rounds' own steps, etcd fell behind in a burst of
    10,000: 950 teacher leases lapsed)."""

    gap = asyncio.run(_two_rounds(_SlowReadStore(0.3)))
    assert gap >= 1.15, f"the next round came {gap:.2f} s after the last: the store's time not counted"


def test_a_stalled_loop_does_not_space_the_reconciles_out():
    """The loop held for 1.5 s (a long callback) while a round waited for its store is not the round's
    cost: the next round comes soon after, not 4 × 1.5 s later (a teacher's death during such a stall
    would have reached its students 6 s late)."""
    gap = asyncio.run(_two_rounds(_SlowReadStore(0.05, stall=1.5)))
    assert gap < 3.0, f"the next round came {gap:.2f} s after the last: the stall was counted as its cost"


def test_while_events_keep_coming_rounds_wait_longer_and_the_last_one_comes_soon():
    """While events keep coming (a join burst: a join every 20 ms here), a round whose store took
    0.1 s is followed by the next one 12 × 0.1 s after it started, not 4 ×: the rounds take a twelfth
    of the loop and the students' streams the rest. When the events stop, the round for the last of
    them starts one pause after it (or 4 × 0.1 s after the last round), not 1.2 s after."""

    async def main() -> tuple[list[float], float]:
        store = _SlowReadStore(0.1)
        async with _reconciling(store) as service:
            service.mark_dirty(SERVICE)
            deadline = time.monotonic() + 20
            while len(store.reads) < 3 and time.monotonic() < deadline:  # a burst: an event every 20 ms
                service.mark_dirty(SERVICE)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)  # the burst's last event, 50 ms into the round that just started
            service.mark_dirty(SERVICE)
            last_event = time.monotonic()
            while len(store.reads) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return store.reads, last_event

    reads, last_event = asyncio.run(main())
    assert len(reads) == 4, reads
    burst_gap = reads[2] - reads[1]  # reads[0]: the first event, long after any round
    assert burst_gap >= 1.0, f"rounds {burst_gap:.2f} s apart while events kept coming: not 12 × their cost"
    after = reads[3] - last_event
    assert after < 0.7, f"the round for the last event started {after:.2f} s after it: it waited for the burst window"


def test_distill_discovery_serve_tunes_the_garbage_collector():
    """``serve()`` (what ``distill discovery serve`` and each of its ``--processes`` run) freezes what
    is alive at start out of collections and raises the thresholds: with the defaults, a burst of
    10,000 students spent about half the server's time in full collections."""
    code = """
import asyncio, gc
from distill_reader.discovery.server import serve

async def main():
    stop = asyncio.Event()
    await serve("127.0.0.1:0", "memory", on_started=lambda server: stop.set(), stop=stop)

before = gc.get_threshold()
asyncio.run(main())
print(before, gc.get_threshold(), gc.get_freeze_count() > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[0] == f"(700, 10, 10) {GC_THRESHOLDS} True", out.stdout + out.stderr
