"""Discovery on real Redis and etcd servers that the tests start on free ports in tmp dirs."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import time
import uuid

import grpc
import pytest
from test_discovery_support import (
    OipTeacher,
    ServiceProcess,
    Watch,
    free_port,
    have,
    register_process,
    serve_command,
)

from distill_reader.discovery.client import fetch_status, keep_registered
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.server import DiscoveryServer
from distill_reader.discovery.service import DEFAULT_TTL_S, status_dict
from distill_reader.discovery.stores import AlreadyRegistered, open_discovery_store

pytestmark = pytest.mark.timeout(90)

BINARIES = {"redis": "redis-server", "etcd": "etcd"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 80))


def start_store(kind: str, tmp_path_factory) -> ServiceProcess:
    if not have(BINARIES[kind]):
        pytest.skip(f"{BINARIES[kind]} is not installed (scripts/install-services.sh installs it)")
    proc = ServiceProcess(kind, tmp_path_factory.mktemp(kind))
    proc.start()
    return proc


@pytest.fixture(scope="session")
def redis_store(tmp_path_factory):
    proc = start_store("redis", tmp_path_factory)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def etcd_store(tmp_path_factory):
    proc = start_store("etcd", tmp_path_factory)
    yield proc
    proc.stop()


@pytest.fixture(params=["redis", "etcd"])
def store(request) -> ServiceProcess:
    return request.getfixturevalue(f"{request.param}_store")


def service_name() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


async def started(url: str, port: int = 0) -> DiscoveryServer:
    server = DiscoveryServer(f"127.0.0.1:{port}", url)
    await server.start()
    return server


def rpcs(server: DiscoveryServer, method: str, code: str = "OK") -> float:
    """How many ``method`` calls ``server`` answered with ``code`` (its ``distill_discovery_rpcs`` metric)."""
    labels = {"method": method, "code": code}
    return server.service.registry.get_sample_value("distill_discovery_rpcs_total", labels) or 0.0


async def until(condition, timeout: float, what) -> None:
    """Wait until ``condition()``; after ``timeout`` seconds, fail with ``what()`` (what it waited
    for and what it saw)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what()}: not within {timeout} s")
        await asyncio.sleep(0.05)


def test_lease_expiry(store):
    """A teacher that registers and never keeps its lease leaves after the TTL (2 s)."""

    async def main():
        svc = service_name()
        server = await started(store.url)
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.DiscoveryStub(ch)
            w = Watch(server.address, svc, 1)
            await w.wait_for(lambda s: s == [])
            resp = await stub.RegisterTeacher(pb.RegisterTeacherRequest(service_name=svc, endpoint="127.0.0.1:9000"))
            t0 = time.monotonic()
            assert resp.ttl_seconds == 2.0
            await w.wait_for(lambda s: s == ["127.0.0.1:9000"])
            t1 = await w.wait_for(lambda s: s == [], timeout=8)
            print(f"[{store.kind}] lease of {resp.ttl_seconds:g} s expired and was pushed after {t1 - t0:.2f} s")
            assert t1 - t0 >= 1.9
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.KeepAlive(
                    pb.KeepAliveRequest(service_name=svc, endpoint="127.0.0.1:9000", lease_id=resp.lease_id)
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            await w.close()
        await server.stop()

    run(main())


def test_group_join_leave_and_lapse(store):
    """The store's group contract: a student joined to a group is live while the group is kept; a
    second instance is refused, the same instance takes over; a stale leave is a no-op; when the group
    is not kept for the TTL every member goes, keep_group reports them, and they can join again."""

    async def main():
        svc, ttl = service_name(), 2.0
        a, b = open_discovery_store(store.url), open_discovery_store(store.url)
        await a.start()
        await b.start()
        try:
            first = await a.join("ga", "student", svc, "s1", "i1", {"require_num": 1}, ttl)
            await a.join("ga", "student", svc, "s2", "i2", {"require_num": 2}, ttl)
            with pytest.raises(AlreadyRegistered):
                await b.join("gb", "student", svc, "s1", "other", {"require_num": 1}, ttl)
            again = await b.join("gb", "student", svc, "s1", "i1", {"require_num": 3}, ttl)  # a re-opened stream
            await a.leave("ga", "student", svc, "s1", first)  # stale: s1 is gb's now
            assert (await a.read(svc)).students == {"s1": {"require_num": 3}, "s2": {"require_num": 2}}
            await b.leave("gb", "student", svc, "s1", again)
            assert (await a.read(svc)).students == {"s2": {"require_num": 2}}
            for _ in range(5):  # kept past the TTL: still there
                assert await a.keep_group("ga", ttl) == []
                await asyncio.sleep(0.5)
            assert set((await b.read(svc)).students) == {"s2"}
            deadline = time.monotonic() + ttl + 3  # not kept: the members go within the TTL
            while (await b.read(svc)).students and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert (await b.read(svc)).students == {}
            assert await a.keep_group("ga", ttl) == [("student", svc, "s2")]
            await a.join("ga", "student", svc, "s2", "i2", {"require_num": 2}, ttl)
            assert set((await b.read(svc)).students) == {"s2"}
        finally:
            await a.close()
            await b.close()

    run(main())


def test_two_servers_one_killed_mid_run(store):
    """Two discovery servers on one store; SIGKILL the one everybody talks to: nothing is lost."""

    async def main():
        svc = service_name()
        port_b = free_port()
        b = subprocess.Popen(
            serve_command("--listen", f"127.0.0.1:{port_b}", "--store", store.url),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert "listening" in b.stderr.readline()
            a = await started(store.url)
            endpoints = [f"127.0.0.1:{port_b}", a.address]  # everybody tries b first
            stop = asyncio.Event()
            teachers = [f"127.0.0.1:{9100 + i}" for i in range(3)]
            keepers = [
                asyncio.create_task(keep_registered(endpoints, svc, t, readiness_check=False, stop=stop))
                for t in teachers
            ]
            students = [Watch(endpoints, svc, 2, f"s{i}") for i in range(3)]
            for w in students:
                await w.wait_for(lambda s: len(s) == 2)
            for _ in range(200):  # settled: loads 2, 2, 2
                st = status_dict(await fetch_status(a.address, svc))["services"][svc]
                if sorted(len(t["students"]) for t in st["teachers"]) == [2, 2, 2]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the assignment did not settle at loads 2, 2, 2 within 10 s: {st}")
            settled = {s["id"]: s["teachers"] for s in st["students"]}
            for w in students:  # the pushes of the settled assignment may still be on their way
                await w.wait_for(lambda s, w=w: s == settled[w.session.student_id])
            before = {w.session.student_id: w.current for w in students}
            assert all(w.session.connected_to == endpoints[0] for w in students)
            seen = [len(w.sets) for w in students]
            kept_before = rpcs(a, "KeepAlive")
            b.send_signal(signal.SIGKILL)
            b.wait()
            killed = time.monotonic()
            for w in students:
                for _ in range(200):
                    if w.session.connected_to == a.address:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"{w.session.student_id} did not move to the surviving server within 10 s")
            # Longer than a TTL since the kill, and the leases kept through a meanwhile (each keeper
            # every keep-alive interval, a TTL's worth each): any lease not kept would have expired.
            ttl, keeps = a.service.ttl, len(teachers) * math.ceil(a.service.ttl / a.service.keepalive)
            await until(
                lambda: time.monotonic() - killed > ttl + 0.5 and rpcs(a, "KeepAlive") - kept_before >= keeps,
                20,
                lambda: (
                    f"{keeps} keep-alives through the surviving server ({rpcs(a, 'KeepAlive') - kept_before:g} seen)"
                ),
            )
            st = status_dict(await fetch_status(a.address, svc))["services"][svc]
            assert sorted(t["endpoint"] for t in st["teachers"]) == teachers
            assert {s["id"]: s["teachers"] for s in st["students"]} == before
            assert {w.session.student_id: w.current for w in students} == before
            # Since the kill: never an empty or short set (before it, teachers were still arriving).
            assert all(len(s) == 2 for w, n in zip(students, seen) for _, s in w.sets[n:])
            stop.set()
            await asyncio.gather(*keepers)
            for w in students:
                await w.close()
            await a.stop()
        finally:
            b.kill()
            b.wait()

    run(main())


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_store_restarted(kind, tmp_path_factory, caplog):
    """The store is killed and restarted (Redis without persistence loses everything): the
    students keep their teachers meanwhile, and registrations come back by themselves (with Redis
    a student may see an empty set for a moment while they do)."""
    store = start_store(kind, tmp_path_factory)
    try:

        async def main():
            svc = service_name()
            server = await started(store.url)
            stop = asyncio.Event()
            keeper = asyncio.create_task(
                keep_registered(server.address, svc, "127.0.0.1:9200", readiness_check=False, stop=stop)
            )
            w = Watch(server.address, svc, 1)
            await w.wait_for(lambda s: s == ["127.0.0.1:9200"])
            at_kill = len(w.sets)
            refused = rpcs(server, "KeepAlive", "UNAVAILABLE")
            caplog.clear()
            store.kill()
            # The server has found the store down, both keeping the teacher's lease and reconciling
            # (which is when a wrong set would be pushed): nothing was pushed meanwhile.
            await until(
                lambda: (
                    rpcs(server, "KeepAlive", "UNAVAILABLE") > refused
                    and any(m.startswith("reconcile failed") for m in caplog.messages)
                ),
                15,
                lambda: f"a keep-alive refused and a reconcile failed while the store is down ({caplog.messages})",
            )
            assert len(w.sets) == at_kill, w.sets[at_kill:]
            await asyncio.to_thread(store.start)
            t0 = time.monotonic()
            for _ in range(200):
                try:
                    st = status_dict(await fetch_status(server.address, svc))["services"].get(svc)
                except Exception:
                    st = None
                if st and st["students"] and st["students"][0]["teachers"] == ["127.0.0.1:9200"]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("registrations did not come back")
            print(f"[{kind}] state rebuilt {time.monotonic() - t0:.2f} s after the store came back")
            await w.wait_for(lambda s: s == ["127.0.0.1:9200"])
            pushed = [s for _, s in w.sets[at_kill:]]
            if kind == "etcd":  # it keeps its data: the assignment never changed, so nothing is pushed
                assert pushed == []
            else:
                # Redis lost everything. If the student's lease is taken back before the teacher's,
                # the student is assigned the empty set until the teacher registers again. The
                # teacher's new registration is pushed too (students check such a teacher again).
                assert pushed in ([], [["127.0.0.1:9200"]], [[], ["127.0.0.1:9200"]])
            stop.set()
            await keeper
            await w.close()
            await server.stop()

        run(main())
    finally:
        store.stop()


def test_teacher_killed_while_students_stream(store):
    """Teachers kept registered by readiness checks, students streaming; one teacher dies
    (stops answering), one keeper process is SIGKILLed: every affected student gets a new set."""

    async def main():
        svc = service_name()
        server = await started(store.url)
        oips = [await OipTeacher().start() for _ in range(3)]
        stop = asyncio.Event()
        keepers = [asyncio.create_task(keep_registered(server.address, svc, t.address, stop=stop)) for t in oips]
        lone = f"127.0.0.1:{free_port()}"
        proc = register_process(server.address, svc, lone, "--no-readiness-check")
        try:
            students = [Watch(server.address, svc, 2, f"s{i}") for i in range(4)]
            everyone = sorted([t.address for t in oips] + [lone])
            for w in students:
                await w.wait_for(lambda s: len(s) == 2, timeout=20)
            for _ in range(200):
                if sorted({t for w in students for t in w.current}) == everyone:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the students did not spread over all teachers within 10 s: {students[0].sets}")
            # 1. A teacher server dies (its keeper sees it not answering).
            dead = oips[0].address
            hit = [w for w in students if dead in w.current]
            await oips[0].stop()
            t0 = time.monotonic()
            times = [await w.wait_for(lambda s: dead not in s and len(s) == 2) for w in hit]
            print(
                f"[{store.kind}] teacher stopped answering: students' new sets after "
                f"{max(times) - t0:.2f} s (readiness check every 0.5 s)"
            )
            # 2. A teacher and its keeper are SIGKILLed: the lease expires.
            hit = [w for w in students if lone in w.current]
            assert hit
            proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            times = [await w.wait_for(lambda s: lone not in s and len(s) == 2) for w in hit]
            # Bounded by wait_for (10 s); how long the lease took is a figure, not an assertion.
            print(f"[{store.kind}] keeper SIGKILLed: students' new sets after {max(times) - t0:.2f} s")
            for w in students:
                assert len(w.current) == 2 and not set(w.current) & {dead, lone}
            stop.set()
            await asyncio.gather(*keepers)
            for w in students:
                await w.close()
        finally:
            proc.kill()
            proc.wait()
            for t in oips:
                await t.stop()
            await server.stop()

    run(main())


def test_redis_command_cancelled_while_waiting_for_a_connection_leaves_no_unawaited_coroutine():
    """A Redis command cancelled while it waits for a free connection (the service's tasks being
    stopped) is closed, not left for the garbage collector to warn about ("never awaited")."""
    import gc
    import warnings

    from distill_reader.discovery.stores.redis import RedisStore

    async def main():
        store = RedisStore("127.0.0.1", free_port())  # never connected: the command waits for a slot
        store._slots = asyncio.Semaphore(0)
        task = asyncio.create_task(store.services())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]


def test_serve_processes_share_a_port_and_survive_one_dying(redis_store):
    """``distill discovery serve --processes 2`` on one Redis: both processes take a share of the
    clients' connections on the one port; every student gets its full set; the process that holds
    the teachers' keep-alives SIGKILLed, its students and teachers move to the other without a short
    set or a lost lease, and it is started again."""
    import re
    import threading
    import urllib.request

    from distill_reader.bench.discovery import Simulator

    port, http = free_port(), free_port()
    proc = subprocess.Popen(
        serve_command(
            "--processes",
            "2",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            redis_store.url,
            "--http",
            f"127.0.0.1:{http}",
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()

    def pids() -> dict[int, int]:
        """The last pid each process announced."""
        out = {}
        for line in lines:
            m = re.match(r"discovery process (\d+) \(pid (\d+)\) listening", line)
            if m:
                out[int(m.group(1))] = int(m.group(2))
        return out

    def metric(i: int, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http + i}/metrics", timeout=5).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    async def main():
        svc, address = service_name(), f"127.0.0.1:{port}"
        await until(lambda: len(pids()) == 2, 30, lambda: f"two processes listening; stderr: {lines}")
        stop = asyncio.Event()
        teachers = [f"127.0.0.1:{9200 + i}" for i in range(4)]
        keepers = [
            asyncio.create_task(keep_registered(address, svc, t, readiness_check=False, stop=stop)) for t in teachers
        ]
        # A connection per student (as students in processes of their own have): the kernel spreads
        # connections, not calls, over the processes.
        sims = [Simulator(address, svc) for _ in range(16)]
        students = [sim.add_students(1, f"s{i}")[0] for i, sim in enumerate(sims)]
        full = lambda: all(s.current is not None and len(s.current) == 2 for s in students)  # noqa: E731
        try:
            await until(full, 20, lambda: f"every student has 2 teachers: {[s.current for s in students]}")
            shares = [metric(i, "distill_discovery_streams") for i in range(2)]
            assert shares[0] > 0 and shares[1] > 0 and sum(shares) == 16, shares

            def keepalive_streams() -> list[float]:
                return [metric(i, "distill_discovery_keepalive_streams") for i in range(2)]

            await until(
                lambda: sum(keepalive_streams()) == 4, 10, lambda: f"4 keep-alive streams: {keepalive_streams()}"
            )
            keeping = keepalive_streams()
            assert sorted(keeping) == [0, 4], keeping  # the keepers share one connection
            victim = keeping.index(4)
            seen = [len(s.sets) for s in students]
            first = pids()
            os.kill(first[victim], signal.SIGKILL)
            killed = time.monotonic()
            await until(
                lambda: pids().get(victim) != first[victim], 30, lambda: f"the process started again; stderr: {lines}"
            )
            await until(lambda: time.monotonic() - killed > 2 * DEFAULT_TTL_S, 10, lambda: "two TTLs")
            await until(full, 10, lambda: f"every student has 2 teachers again: {[s.current for s in students]}")
            # Since the kill: never an empty or short set, and every teacher still registered.
            assert all(len(cur) == 2 for s, n in zip(students, seen) for _, cur in s.sets[n:])
            st = status_dict(await fetch_status(address, svc))["services"][svc]
            assert sorted(t["endpoint"] for t in st["teachers"]) == teachers
            assert len(st["students"]) == 16 and all(len(s["teachers"]) == 2 for s in st["students"])
        finally:
            stop.set()
            await asyncio.gather(*keepers)
            for sim in sims:
                await sim.close()

    try:
        run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        for pid in pids().values():  # the processes ended with the parent
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        proc.kill()
        proc.wait()


def test_processes_need_a_shared_store():
    """``--processes 2`` on the memory store is refused, naming the flag."""
    result = subprocess.run(
        serve_command("--processes", "2", "--listen", "127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--processes above 1 needs a shared store" in result.stderr


def test_processes_http_ports_past_65535_are_refused():
    """Process i serves HTTP on the --http port + i: a range past 65535 is refused on the command
    line, naming the flag and the port, instead of a child failing on an invalid port."""
    result = subprocess.run(
        serve_command(
            "--processes", "3", "--listen", "127.0.0.1:0", "--store", "redis://127.0.0.1:1", "--http", "127.0.0.1:65534"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--http 127.0.0.1:65534: process 2 would serve HTTP on port 65536, past 65535" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening" not in result.stderr, result.stderr


def test_a_process_that_fails_to_start_names_its_error_on_the_command_line():
    """A child that cannot start (its --http port taken) fails the command with the child's own
    error, not only an exit code, and no traceback. The store need not answer for a process to start."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            serve_command(
                "--processes",
                "2",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "redis://127.0.0.1:1",
                "--http",
                f"127.0.0.1:{port}",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.stderr
    assert error[0].startswith(f"Error: discovery process 0 failed to start: cannot serve HTTP on 127.0.0.1:{port}: ")
    assert error[0].endswith("address already in use"), error
    assert "Traceback" not in result.stderr, result.stderr


def test_a_stopped_servers_streaming_students_leave_the_store_at_once(store):
    """A server stopped while students stream: they leave the shared store as it stops (not a
    group TTL later, a stale student other servers would still balance for), and no leave is left
    pending when its loop ends."""

    async def main():
        svc = service_name()
        server = await started(store.url)
        other = open_discovery_store(store.url)
        await other.start()
        students = [Watch(server.address, svc, 1, f"s{i}") for i in range(3)]
        try:
            for w in students:
                await w.wait_for(lambda s: s == [])
            deadline = time.monotonic() + 10
            while len((await other.read(svc)).students) < 3:
                assert time.monotonic() < deadline, "the 3 students never reached the store"
                await asyncio.sleep(0.05)
            await server.stop()
            assert (await other.read(svc)).students == {}
        finally:
            for w in students:
                w.task.cancel()
            await asyncio.gather(*(w.task for w in students), return_exceptions=True)
            await other.close()

    run(main())


def test_redis_keeps_the_keep_alives_of_a_loop_iteration_in_one_script(redis_store):
    """Keep-alives arriving together (a busy server's loop iteration) go to Redis as one script
    call, and each gets its own answer: a right lease kept, a wrong one refused, a changed
    ``healthy`` written and seen by a reader of the store."""

    async def main():
        svc = service_name()
        store = open_discovery_store(redis_store.url)
        await store.start()
        try:
            leases = [
                await store.register("teacher", svc, f"127.0.0.1:{9000 + i}", f"i{i}", {"healthy": True}, 5.0)
                for i in range(3)
            ]
            calls = []
            script = store._keep  # redis-py's registered script: counts the calls that reach Redis

            def counted(*args, **kwargs):
                calls.append(len(kwargs["keys"]))
                return script(*args, **kwargs)

            store._keep = counted
            kept = await asyncio.gather(
                store.keep("teacher", svc, "127.0.0.1:9001", "not-its-lease", 5.0),
                store.keep("teacher", svc, "127.0.0.1:9000", leases[0], 5.0),
                store.keep("teacher", svc, "127.0.0.1:9002", leases[2], 5.0, {"healthy": False}),
            )
            assert kept == [False, True, True]
            assert calls == [3]
            teachers = (await store.read(svc)).teachers
            assert teachers["127.0.0.1:9002"]["healthy"] is False
            assert teachers["127.0.0.1:9001"]["healthy"] is True
        finally:
            await store.close()

    run(main())


def test_redis_joins_of_a_burst_gather_into_few_scripts(redis_store):
    """Students joining one per loop iteration of a busy loop (a burst reaches the server a few at a time) are
    joined by a few script calls, not by one each (a script costs the server about 0.1 ms of
    redis-py's time: 10,000 joins were 5,785 scripts), and each join gets its own answer: a lease,
    or AlreadyRegistered for a student that another instance holds."""

    async def main():
        svc = service_name()
        store, other = open_discovery_store(redis_store.url), open_discovery_store(redis_store.url)
        await store.start()
        await other.start()
        try:
            await other.join("gb", "student", svc, "taken", "its-instance", {"require_num": 1}, 5.0)
            sizes = []
            script = store._join  # redis-py's registered script: counts the calls that reach Redis

            def counted(*args, **kwargs):
                sizes.append((len(kwargs["args"]) - 3) // 4)  # 3 arguments, then 4 per student
                return script(*args, **kwargs)

            store._join = counted

            def join(student: str):
                return asyncio.create_task(store.join("ga", "student", svc, student, "i", {"require_num": 1}, 5.0))

            joins = []
            for i in range(40):
                joins.append(join(f"s{i}"))
                time.sleep(0.001)  # a busy server: the loop's other callbacks take a millisecond
                await asyncio.sleep(0)  # the next one a loop iteration later
            joins.append(join("taken"))
            answers = await asyncio.gather(*joins, return_exceptions=True)
            assert all(isinstance(a, str) for a in answers[:40]), answers
            assert isinstance(answers[40], AlreadyRegistered)
            assert sum(sizes) == 41 and len(sizes) <= 9, f"41 joins in {len(sizes)} scripts: {sizes}"
            assert set((await other.read(svc)).students) == {f"s{i}" for i in range(40)} | {"taken"}
        finally:
            await store.close()
            await other.close()

    run(main())


def test_one_unreadable_record_fails_its_own_keep_alive_not_the_batch(redis_store):
    """A teacher whose record in Redis cannot be read (its data not JSON) beside healthy ones, their
    keep-alives in one batch: its keep-alive fails, naming the record; the others are kept."""
    from distill_reader.errors import StoreUnavailable

    async def main():
        svc = service_name()
        store = open_discovery_store(redis_store.url)
        await store.start()
        try:
            endpoints = [f"127.0.0.1:{9100 + i}" for i in range(3)]
            leases = [
                await store.register("teacher", svc, e, f"i{i}", {"healthy": True}, 5.0)
                for i, e in enumerate(endpoints)
            ]
            bad = store._key(svc, "teacher", endpoints[1])
            await store._r.hset(bad, "data", "{not json")
            kept = await asyncio.gather(
                *(store.keep("teacher", svc, e, lease, 5.0, {"healthy": False}) for e, lease in zip(endpoints, leases)),
                return_exceptions=True,
            )
            assert kept[0] is True and kept[2] is True, kept
            assert isinstance(kept[1], StoreUnavailable) and bad in str(kept[1]), kept
        finally:
            await store.close()

    run(main())


def test_join_ids_are_unique_in_a_process_and_across_a_fork():
    """The id of a student's join (what its leave names, so that a stale leave is a no-op) is a
    per-process prefix and a counter: distinct within a process, and a forked process (a server
    started by a forking supervisor) draws a prefix of its own instead of repeating its parent's."""
    from distill_reader.discovery.stores.base import new_join_id

    ours = [new_join_id() for _ in range(1000)]
    assert len(set(ours)) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, to the parent
        try:
            os.write(write, " ".join(new_join_id() for _ in range(1000)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split()
    os.waitpid(pid, 0)
    assert len(theirs) == 1000 and not set(theirs) & set(ours + [new_join_id() for _ in range(1000)])
