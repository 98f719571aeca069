"""Discovery with the embedded memory store: real gRPC servers on loopback, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import subprocess
import time
import urllib.request

import grpc
import pytest
from click.testing import CliRunner
from test_discovery_support import OipTeacher, Watch, free_port, register_process, serve_command

from distill_reader.discovery.client import (
    StudentSession,
    TeacherRegistration,
    _KeepAlives,
    _Rotating,
    fetch_status,
    keep_all_registered,
    keep_registered,
)
from distill_reader.discovery.commands import discovery
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.server import DiscoveryServer, running_discovery
from distill_reader.discovery.service import status_dict
from distill_reader.discovery.stores.base import StoreURL, parse_store_url
from distill_reader.errors import DiscoveryError

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 50))


async def started(store: str = "memory", **kw) -> DiscoveryServer:
    server = DiscoveryServer("127.0.0.1:0", store, **kw)
    await server.start()
    return server


async def register(stub, service: str, endpoint: str, **kw) -> str:
    resp = await stub.RegisterTeacher(pb.RegisterTeacherRequest(service_name=service, endpoint=endpoint, **kw))
    return resp.lease_id


def test_issue_example_pushed_live():
    async def main():
        server = await started()
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.DiscoveryStub(ch)
            leases = {f"127.0.0.1:{9000 + i}": await register(stub, "svc", f"127.0.0.1:{9000 + i}") for i in range(4)}
            a, b = Watch(server.address, "svc", 2, "a"), Watch(server.address, "svc", 2, "b")
            await a.wait_for(lambda s: len(s) == 2)
            await b.wait_for(lambda s: len(s) == 2)
            await a.wait_for(lambda s: not set(s) & set(b.current))
            assert sorted(a.current + b.current) == sorted(leases)
            before_b = b.current
            dead = a.current[0]
            await stub.DeregisterTeacher(
                pb.DeregisterTeacherRequest(service_name="svc", endpoint=dead, lease_id=leases[dead])
            )
            await a.wait_for(lambda s: dead not in s and len(s) == 2)
            assert b.current == before_b and len(b.sets) == 1  # b lost nothing: no message at all
            st = status_dict(await stub.Status(pb.StatusRequest()))
            loads = sorted(len(t["students"]) for t in st["services"]["svc"]["teachers"])
            assert loads == [1, 1, 2]
            await a.close()
            await b.close()
        await server.stop()

    run(main())


def test_bad_input_gets_clear_errors_and_server_keeps_serving():
    async def main():
        server = await started()
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.DiscoveryStub(ch)
            good = Watch(server.address, "svc", 1, "good")
            await register(stub, "svc", "127.0.0.1:9000")
            await good.wait_for(lambda s: s == ["127.0.0.1:9000"])
            bad = [
                pb.RegisterTeacherRequest(service_name="svc", endpoint="nohostport"),
                pb.RegisterTeacherRequest(service_name="svc", endpoint="h:99999"),
                pb.RegisterTeacherRequest(service_name="", endpoint="h:1"),
                pb.RegisterTeacherRequest(service_name="svc/../x", endpoint="h:1"),
                pb.RegisterTeacherRequest(service_name="svc", endpoint="h:1", weight=-1),
                pb.RegisterTeacherRequest(service_name="svc", endpoint="h:1", weight=float("nan")),
            ]
            for req in bad:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.RegisterTeacher(req)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details()
            for n in (0, -1):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.WatchAssignment(pb.WatchAssignmentRequest(service_name="svc", require_num=n)):
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "require_num" in info.value.details()
            # Duplicate registration: another instance holds a live lease.
            await register(stub, "svc", "127.0.0.1:9001", instance_id="one")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await register(stub, "svc", "127.0.0.1:9001", instance_id="two")
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.WatchAssignment(
                    pb.WatchAssignmentRequest(service_name="svc", require_num=1, student_id="good")
                ):
                    pass
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            # Unknown service / lease.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Status(pb.StatusRequest(service_name="nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.KeepAlive(pb.KeepAliveRequest(service_name="nope", endpoint="h:1", lease_id="x"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # Oversized and malformed messages.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await register(stub, "svc", "127.0.0.1:9002", model_name="m" * 100_000)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            raw = ch.unary_unary("/distill_reader.discovery.Discovery/RegisterTeacher")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(b"\xff\xff\xff\xff garbage")
            # grpc's own answer to an undecodable request: UNKNOWN, naming the parse error.
            assert "Error parsing message" in info.value.details()
            # Everyone else was served throughout, and still is.
            await register(stub, "svc", "127.0.0.1:9003")
            assert good.current == ["127.0.0.1:9000"]
            assert (await stub.Status(pb.StatusRequest(service_name="svc"))).services[0].name == "svc"
            await good.close()
        await server.stop()

    run(main())


@pytest.mark.parametrize(("address", "named"), [({"listen": "nope"}, "--listen"), ({"http": "127.0.0.1"}, "--http")])
def test_server_names_a_bad_address(address, named):
    with pytest.raises(DiscoveryError, match=f"{named} must be HOST:PORT with a port in 0-65535"):
        DiscoveryServer(**address)


def test_client_argument_errors():
    with pytest.raises(DiscoveryError, match="require_num"):
        StudentSession(["127.0.0.1:1"], "svc", 0)
    with pytest.raises(DiscoveryError, match="HOST:PORT"):
        StudentSession(["nope"], "svc", 1)
    with pytest.raises(DiscoveryError, match="service name"):
        StudentSession("127.0.0.1:1", "", 1)
    with pytest.raises(DiscoveryError, match="weight"):
        run(keep_registered("127.0.0.1:1", "svc", "127.0.0.1:2", weight=0))
    for bad in ("redis://", "redis://h", "redis://h:1/x", "etcd://h:1/x", "mysql://h:1", "memory:", "redis://h:99999"):
        with pytest.raises(DiscoveryError, match="store"):
            parse_store_url(bad)
    assert parse_store_url("redis://h:6379/2") == StoreURL("redis", "h", 6379, 2)
    assert parse_store_url("etcd://127.0.0.1:2379") == StoreURL("etcd", "127.0.0.1", 2379, 0)


def test_readiness_registration_and_recovery():
    async def main():
        server = await started()
        teacher = await OipTeacher("resnet").start()
        stop = asyncio.Event()
        keeper = asyncio.create_task(
            keep_registered([server.address], "svc", teacher.address, model_name="resnet", stop=stop)
        )
        w = Watch(server.address, "svc", 1)
        await w.wait_for(lambda s: s == [teacher.address])
        teacher.ready = False  # stops answering ready: leaves at the next check
        t0 = time.monotonic()
        t1 = await w.wait_for(lambda s: s == [])
        print(f"not-ready teacher left after {t1 - t0:.2f} s")
        assert (await fetch_status(server.address)).services[0].teachers[0].healthy is False
        teacher.ready = True
        await w.wait_for(lambda s: s == [teacher.address])
        port = int(teacher.address.rsplit(":", 1)[1])
        await teacher.stop()  # the server goes away entirely
        t0 = time.monotonic()
        t1 = await w.wait_for(lambda s: s == [])
        print(f"stopped teacher left after {t1 - t0:.2f} s")
        teacher = await OipTeacher("resnet").start(port)  # recovers on the same address
        await w.wait_for(lambda s: s == [teacher.address])
        stop.set()
        await asyncio.wait_for(keeper, 5)
        await w.wait_for(lambda s: s == [])  # deregistered on stop
        await w.close()
        await teacher.stop()
        await server.stop()

    run(main())


async def _logged_failures(caplog, endpoint: str, n: int, timeout: float = 10.0) -> list[str]:
    """Wait until the student sessions have logged ``n`` failed attempts to reach ``endpoint``."""
    deadline = time.monotonic() + timeout
    while True:
        failed = [m for m in caplog.messages if m.startswith(f"discovery {endpoint}: ")]
        if len(failed) >= n:
            return failed
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(failed)} failed attempts to reach {endpoint} logged within {timeout} s")
        await asyncio.sleep(0.02)


def test_keeper_killed_lease_expires():
    """SIGKILL the process keeping a teacher registered: the lease expires after the TTL."""

    async def main():
        server = await started()
        endpoint = f"127.0.0.1:{free_port()}"
        proc = register_process(server.address, "svc", endpoint, "--no-readiness-check")
        try:
            w = Watch(server.address, "svc", 1)
            await w.wait_for(lambda s: s == [endpoint], timeout=20)
            # Once the lease was kept (a keep-alive answered), so that it ends a TTL after a renewal.
            labels = {"method": "KeepAlive", "code": "OK"}
            deadline = time.monotonic() + 10
            while not server.service.registry.get_sample_value("distill_discovery_rpcs_total", labels):
                assert time.monotonic() < deadline, "no keep-alive within 10 s"
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            t1 = await w.wait_for(lambda s: s == [])
            print(f"killed teacher's students had their new set after {t1 - t0:.2f} s")
            # At the TTL after the last keep-alive; generous on a loaded machine (a lease that never
            # ends fails the wait above).
            assert t1 - t0 < server.service.ttl + 3.0
            await w.close()
        finally:
            proc.kill()
            proc.wait()
        await server.stop()

    run(main())


def test_student_close_deregisters_and_no_discovery_keeps_set(caplog):
    caplog.set_level(logging.INFO, logger="distill_reader.discovery.client")

    async def main():
        port = free_port()
        server = DiscoveryServer(f"127.0.0.1:{port}", "memory")
        await server.start()
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.DiscoveryStub(ch)
            await register(stub, "svc", "127.0.0.1:9000")
            w = Watch([f"127.0.0.1:{free_port()}", server.address], "svc", 1, "s1")  # first one is down
            await w.wait_for(lambda s: s == ["127.0.0.1:9000"])
            await w.close()
            for _ in range(50):
                st = status_dict(await stub.Status(pb.StatusRequest()))
                if not st["services"]["svc"]["students"]:
                    break
                await asyncio.sleep(0.02)
            assert st["services"]["svc"]["students"] == []
        # Discovery goes away: the student keeps its set (nothing yielded), and gets a new one later.
        w = Watch(server.address, "svc", 1, "s2")
        await w.wait_for(lambda s: s == [])
        yielded = len(w.sets)
        await server.stop()
        # Two failed attempts to reach it (the stream's end, then a reconnect after the back-off),
        # each logged by the session: meanwhile nothing was yielded and it keeps trying.
        failed = await _logged_failures(caplog, server.address, 2)
        assert len(w.sets) == yielded and w.current == [] and not w.task.done(), (w.sets, failed)
        server = DiscoveryServer(f"127.0.0.1:{port}", "memory")
        await server.start()
        async with grpc.aio.insecure_channel(server.address) as ch:
            await register(pb_grpc.DiscoveryStub(ch), "svc", "127.0.0.1:9005")
        await w.wait_for(lambda s: s == ["127.0.0.1:9005"])
        await w.close()
        await server.stop()

    run(main())


def test_cli_status_json_table_and_http():
    with running_discovery(http="127.0.0.1:0") as address:

        async def setup():
            async with grpc.aio.insecure_channel(address) as ch:
                stub = pb_grpc.DiscoveryStub(ch)
                await register(stub, "svc", "127.0.0.1:9000", weight=2)
                await register(stub, "svc", "127.0.0.1:9001")

        run(setup())
        runner = CliRunner()
        result = runner.invoke(discovery, ["status", "--discovery", address, "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        teachers = data["services"]["svc"]["teachers"]
        assert teachers[0] == {
            "endpoint": "127.0.0.1:9000",
            "model_name": "teacher",
            "weight": 2,
            "healthy": True,
            "students": [],
            "protocol": "",
        }
        assert data["services"]["svc"]["students"] == []
        result = runner.invoke(discovery, ["status", "--discovery", address])
        assert result.exit_code == 0 and "127.0.0.1:9001" in result.output
        result = runner.invoke(discovery, ["status", "--discovery", f"127.0.0.1:{free_port()}"])
        assert result.exit_code != 0 and "UNAVAILABLE" in result.output
    # The HTTP page, JSON and metrics.
    from distill_reader.discovery.server import ServerThread

    thread = ServerThread(http="127.0.0.1:0").start()
    try:
        base = f"http://{thread.http_address}"
        assert b"distill discovery" in urllib.request.urlopen(base + "/", timeout=5).read()
        assert json.loads(urllib.request.urlopen(base + "/status.json", timeout=5).read())["services"] == {}
        assert b"distill_discovery_reconcile_seconds" in urllib.request.urlopen(base + "/metrics", timeout=5).read()
    finally:
        thread.stop()


def test_cli_serve_stops_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(
        serve_command("--listen", f"127.0.0.1:{port}"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        assert f"127.0.0.1:{port}" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    bad = CliRunner().invoke(discovery, ["serve", "--store", "redis://nohost"])
    assert bad.exit_code != 0 and "bad store URL" in bad.output


def _sample(server: DiscoveryServer, name: str, **labels: str) -> float:
    return server.service.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("server_has", "n_teachers"), [("batch", 1), ("batch", 2), ("stream", 1), ("stream", 2), ("unary", 1), ("unary", 2)]
)
def test_keepalives_on_a_stream_and_unary_for_an_older_server(server_has, n_teachers, caplog):
    """One teacher keeps its lease alive with messages on one KeepAliveStream, several teachers of
    one keeper with one KeepAliveBatch message for all on a KeepAliveBatchStream (the server counts
    each keep-alive as a KeepAlive). A server without the batch stream (an older one) answers it
    UNIMPLEMENTED and the keeper sends a message each on a KeepAliveStream instead, and unary calls
    where the server has neither. Either way the leases outlive many TTLs, and a lease that is gone
    (NOT_FOUND) is registered again, for its teacher alone."""
    endpoints = [f"127.0.0.1:{9001 + i}" for i in range(n_teachers)]

    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory", ttl=1.0, keepalive=0.1)
        # The handler is built from what the servicer has: an older server lacks the newer streams.
        if server_has != "batch":
            server.service.KeepAliveBatchStream = None
        if server_has == "unary":
            server.service.KeepAliveStream = None
        await server.start()
        stop = asyncio.Event()
        teachers = [TeacherRegistration(e) for e in endpoints]
        keeper = asyncio.create_task(
            keep_all_registered(server.address, "svc", teachers, readiness_check=False, stop=stop)
        )
        try:
            w = Watch(server.address, "svc", n_teachers)
            await w.wait_for(lambda s: s == endpoints, timeout=10)
            n_sets = len(w.sets)
            await asyncio.sleep(3 * server.service.ttl)
            assert len(w.sets) == n_sets, f"a lease lapsed: {w.sets}"
            keeps = _sample(server, "distill_discovery_rpcs_total", method="KeepAlive", code="OK")
            assert keeps >= 10 * n_teachers, f"only {keeps:g} keep-alives in 3 TTLs of 0.1 s intervals"
            streams = _sample(server, "distill_discovery_keepalive_streams")
            assert streams == (0 if server_has == "unary" else 1)
            # A lease ends behind its teacher's back: the next keep-alive is NOT_FOUND, and the
            # teacher registers again (a new registration id) and keeps the new lease; the other
            # teacher keeps its own.
            before = {e: server.service._kept[("svc", e)].lease for e in endpoints}
            await server.store.drop("teacher", "svc", endpoints[0], before[endpoints[0]])
            server.service.mark_dirty("svc")
            deadline = time.monotonic() + 10
            while getattr(server.service._kept.get(("svc", endpoints[0])), "lease", None) in (
                None,
                before[endpoints[0]],
            ):
                assert time.monotonic() < deadline, "the teacher did not register again"
                await asyncio.sleep(0.02)
            await w.wait_for(lambda s: s == endpoints, timeout=10)
            assert _sample(server, "distill_discovery_rpcs_total", method="KeepAlive", code="NOT_FOUND") >= 1
            assert [server.service._kept[("svc", e)].lease for e in endpoints[1:]] == [before[e] for e in endpoints[1:]]
            await w.close()
        finally:
            stop.set()
            await asyncio.wait_for(keeper, 10)
            await server.stop()

    with caplog.at_level(logging.INFO, logger="distill_reader.discovery.client"):
        run(main())
    # A keeper of several teachers tries the batch stream first, one teacher's keeper the stream.
    assert ("has no keep-alive batches" in caplog.text) == (n_teachers > 1 and server_has != "batch")
    assert ("has no keep-alive stream:" in caplog.text) == (server_has == "unary")


def test_a_streamed_keepalive_to_a_silent_endpoint_gives_up_after_the_rpc_timeout():
    """An endpoint that accepts TCP but never speaks HTTP/2: the stream's write waits for the
    connection (grpc gives up only after 20 s), so the keep-alive is bounded as a whole and fails
    with DEADLINE_EXCEEDED after the RPC timeout, as a unary call would (the teacher moves on)."""

    async def main():
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)  # never accepted: the kernel completes the handshake, nobody answers
            rot = _Rotating([f"127.0.0.1:{silent.getsockname()[1]}"])
            keep = _KeepAlives(rot)
            request = pb.KeepAliveRequest(service_name="svc", endpoint="127.0.0.1:9001", lease_id="x")
            try:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await asyncio.wait_for(keep.send([request]), 60)
            finally:
                keep.close()
                await rot.close()
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
        assert keep.mode == "batch"  # a silent server is not an older one: the stream is tried again next time

    run(main())


async def until(predicate, timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds, failing with ``what`` past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def fleet_over_budget(endpoints: list[str]):
    """(server, stop, keepers): a discovery server at TTL 1 s, keep-alives every 0.1 s, whose budget
    (20 keep-alives a second) is for 2 teachers, and one keeper per endpoint until ``stop`` is set."""
    server = DiscoveryServer("127.0.0.1:0", "memory", ttl=1.0, keepalive=0.1)
    server.service.keepalive_budget = 20.0
    await server.start()
    stop = asyncio.Event()
    keepers = [
        asyncio.create_task(keep_registered(server.address, "svc", ep, readiness_check=False, stop=stop))
        for ep in endpoints
    ]
    try:
        yield server, stop, keepers
    finally:
        stop.set()
        await asyncio.gather(*keepers)
        await server.stop()


def test_pace_stretched_for_a_large_fleet_and_followed():
    """With more teachers than its keep-alive budget allows at the configured interval, the server
    tells every teacher a longer interval and TTL (stretched by the same factor, at most 4×); the
    teachers keep alive at that pace (within the budget) and no lease lapses."""

    async def main():
        endpoints = [f"127.0.0.1:{9301 + i}" for i in range(4)]
        async with fleet_over_budget(endpoints) as (server, _, _):
            w = Watch(server.address, "svc", 4)
            await w.wait_for(lambda s: s == endpoints, timeout=10)
            assert server.service.pace() == (2.0, 0.2)  # 4 teachers / (20 / s × 0.1 s): stretch 2

            def paces() -> list[tuple[float, float]]:
                kept = [server.service._kept[("svc", ep)] for ep in endpoints]
                return [(k.ttl, k.interval) for k in kept]

            await until(lambda: paces() == [(2.0, 0.2)] * 4, 5, "not every teacher was told the pace of 4 teachers")
            n_sets = len(w.sets)
            before = _sample(server, "distill_discovery_rpcs_total", method="KeepAlive", code="OK")
            await asyncio.sleep(3.0)
            keeps = _sample(server, "distill_discovery_rpcs_total", method="KeepAlive", code="OK") - before
            # At 0.2 s: 4 × 15 = 60 in 3 s (the unstretched pace would be 120); some slack for timers.
            assert 40 <= keeps <= 80, f"{keeps:g} keep-alives in 3 s"
            assert len(w.sets) == n_sets, f"a lease lapsed: {w.sets}"
            await w.close()

    run(main())


def test_unary_keepalives_keep_the_ttl_they_registered_with():
    """A teacher that keeps alive with unary calls may be an older one, which keeps the interval it
    was told at registration: when the fleet shrinks and the pace comes back, its TTL stays the one
    it registered with (a teacher on the stream follows the pace and gets the shorter one)."""

    async def main():
        others = [f"127.0.0.1:{9401 + i}" for i in range(4)]
        async with fleet_over_budget(others) as (server, stop, keepers):
            await until(lambda: len(server.service._kept) == 4, 10, "the 4 teachers were not kept alive")
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.DiscoveryStub(channel)
                reg = await stub.RegisterTeacher(
                    pb.RegisterTeacherRequest(service_name="svc", endpoint="127.0.0.1:9400")
                )
                assert (reg.ttl_seconds, reg.keepalive_seconds) == (2.0, 0.2)  # 4 teachers kept: stretch 2
                stop.set()  # the others deregister: the pace comes back to TTL 1 s, every 0.1 s
                await asyncio.gather(*keepers)
                assert server.service.pace() == (1.0, 0.1)
                for _ in range(4):  # an older teacher: every 0.2 s, as registered
                    await asyncio.sleep(reg.keepalive_seconds)
                    resp = await stub.KeepAlive(
                        pb.KeepAliveRequest(service_name="svc", endpoint="127.0.0.1:9400", lease_id=reg.lease_id)
                    )
                assert resp.keepalive_seconds == 0.1  # told the new pace (a newer teacher follows it) ...
                assert server.service._kept[("svc", "127.0.0.1:9400")].ttl == 2.0  # ... but held to the old TTL

    run(main())


def test_memory_store_ends_the_leases_due_and_only_those():
    """The memory store's sweeper ends a lease whose deadline passed, and no other: not one kept
    since (its old deadline is still queued), not one taken again under a new lease, not a group's
    students; a stall of the process gives every lease its time back."""
    from distill_reader.discovery.stores.memory import MemoryStore

    async def main():
        store, ttl = MemoryStore(), 0.4
        await store.start()
        try:
            silent = await store.register("teacher", "svc", "silent:1", "i", {}, ttl)
            kept = await store.register("teacher", "svc", "kept:1", "i", {}, ttl)
            await store.register("teacher", "svc", "again:1", "i", {}, ttl)
            again = await store.register("teacher", "svc", "again:1", "i", {}, 3.0)  # same instance, new lease
            for i in range(200):
                await store.join("server-a", "student", "svc", f"s{i}", "i", {"require_num": 1}, ttl)
            for _ in range(8):  # 1.2 s: three TTLs
                await asyncio.sleep(0.15)
                assert await store.keep("teacher", "svc", "kept:1", kept, ttl)
                assert await store.keep_group("server-a", ttl) == []
            state = await store.read("svc")
            assert set(state.teachers) == {"kept:1", "again:1"}
            assert len(state.students) == 200
            assert not await store.keep("teacher", "svc", "silent:1", silent, ttl)
            assert await store.keep("teacher", "svc", "again:1", again, 3.0)
            # A stall of 1 s (the process did not run): the lease kept just now is not ended for it.
            assert await store.keep("teacher", "svc", "kept:1", kept, ttl)
            time.sleep(1.0)
            await asyncio.sleep(0.2)
            assert set((await store.read("svc")).teachers) == {"kept:1", "again:1"}
            deadline = time.monotonic() + 3.0  # not kept for longer than its TTL since: it ends
            while set((await store.read("svc")).teachers) != {"again:1"} and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert set((await store.read("svc")).teachers) == {"again:1"}
        finally:
            await store.close()

    run(main())
