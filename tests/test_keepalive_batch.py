"""A host's teachers kept by one keeper: their keep-alives in one KeepAliveBatch message per interval
(``keep_all_registered``, ``distill teacher register`` with several ``--endpoint``), a bad member
beside good ones, and the server's answer per keep-alive."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
import pytest
from click.testing import CliRunner
from test_discovery_support import OipTeacher, Watch, free_port, register_process

from distill_reader.bench.discovery import SERVICE, Simulator
from distill_reader.discovery.client import TeacherRegistration, keep_all_registered
from distill_reader.discovery.commands import register
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.server import DiscoveryServer
from distill_reader.errors import DiscoveryError

pytestmark = pytest.mark.timeout(120)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def count_batches(server: DiscoveryServer) -> list[int]:
    """Wrap the server's KeepAliveBatchStream (before ``start``, which builds the handler from it):
    the size of every batch it is sent, in order."""
    sizes: list[int] = []
    handler = server.service.KeepAliveBatchStream

    async def counted(batches, context):
        async def seen():
            async for batch in batches:
                sizes.append(len(batch.keep_alives))
                yield batch

        async for response in handler(seen(), context):
            yield response

    server.service.KeepAliveBatchStream = counted
    return sizes


def leases(server: DiscoveryServer, endpoints: list[str]) -> dict[str, str | None]:
    return {e: getattr(server.service._kept.get(("svc", e)), "lease", None) for e in endpoints}


def test_a_hosts_teachers_keep_alive_in_one_message_and_a_bad_one_disturbs_none():
    """Three ready teachers and one not answering (not ready) on one keeper: the three are assigned,
    the fourth registered but unhealthy; every interval one message keeps all four, on one stream.
    A lease lost behind one teacher's back is registered again for that teacher only (the others
    keep theirs); the bad one is assigned once it answers; stopping deregisters all, and a keeper
    started again brings them all back."""

    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory", ttl=1.0, keepalive=0.1)
        sizes = count_batches(server)
        await server.start()
        good = [await OipTeacher("m").start() for _ in range(3)]
        bad_port = free_port()
        bad = f"127.0.0.1:{bad_port}"
        endpoints = [t.address for t in good] + [bad]
        teachers = [TeacherRegistration(e, "m") for e in endpoints]
        w = Watch(server.address, "svc", 4)
        stop = asyncio.Event()
        keeper = asyncio.create_task(keep_all_registered(server.address, "svc", teachers, stop=stop))
        revived = None
        try:
            await w.wait_for(lambda s: s == sorted(endpoints[:3]), timeout=20)
            first = leases(server, endpoints)
            assert all(first.values()), first  # the bad one is registered too (not ready)
            n0 = len(sizes)
            await asyncio.sleep(1.0)
            assert len(sizes) - n0 >= 4, f"{len(sizes) - n0} batches in 1 s at a 0.1 s interval"
            assert set(sizes[n0:]) == {4}, f"batch sizes {sizes[n0:]}: every keep-alive should go together"
            assert server.service.registry.get_sample_value("distill_discovery_keepalive_streams") == 1

            # One lease ends behind its teacher's back: that teacher alone registers again.
            await server.store.drop("teacher", "svc", endpoints[0], first[endpoints[0]])
            server.service.mark_dirty("svc")
            deadline = time.monotonic() + 10
            while leases(server, endpoints)[endpoints[0]] in (None, first[endpoints[0]]):
                assert time.monotonic() < deadline, "the teacher whose lease ended did not register again"
                await asyncio.sleep(0.02)
            now = leases(server, endpoints)
            assert {e: now[e] for e in endpoints[1:]} == {e: first[e] for e in endpoints[1:]}
            await w.wait_for(lambda s: s == sorted(endpoints[:3]), timeout=10)

            revived = await OipTeacher("m").start(bad_port)  # the bad one comes up
            await w.wait_for(lambda s: s == sorted(endpoints), timeout=10)
        finally:
            stop.set()
            await asyncio.wait_for(keeper, 10)
        await w.wait_for(lambda s: s == [], timeout=10)  # all deregistered on stop

        # The next run of the keeper: the same teachers, all back.
        stop = asyncio.Event()
        keeper = asyncio.create_task(keep_all_registered(server.address, "svc", teachers, stop=stop))
        await w.wait_for(lambda s: s == sorted(endpoints), timeout=20)
        stop.set()
        await asyncio.wait_for(keeper, 10)
        await w.close()
        for t in [*good, revived]:
            await t.stop()
        await server.stop()

    run(main())


def test_a_batch_answers_each_keep_alive_and_refuses_one_too_large():
    """The server answers each keep-alive of a batch: a malformed one INVALID_ARGUMENT, an unknown
    lease NOT_FOUND, the good one OK, and the stream goes on; a batch over 1,024 ends the stream
    with INVALID_ARGUMENT naming the limit."""

    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.DiscoveryStub(channel)
                reg = await stub.RegisterTeacher(pb.RegisterTeacherRequest(service_name="svc", endpoint="10.0.0.1:1"))
                call = stub.KeepAliveBatchStream()
                batch = pb.KeepAliveBatch(
                    keep_alives=[
                        pb.KeepAliveRequest(service_name="svc", endpoint="no port", lease_id="x"),
                        pb.KeepAliveRequest(service_name="svc", endpoint="10.0.0.2:1", lease_id="unknown"),
                        pb.KeepAliveRequest(service_name="svc", endpoint="10.0.0.1:1", lease_id=reg.lease_id),
                    ]
                )
                for _ in range(2):  # the stream goes on after refusals
                    await call.write(batch)
                    answer = await call.read()
                    codes = [grpc.StatusCode.OK.value[0] if r.code == 0 else r.code for r in answer.results]
                    assert codes == [
                        grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        grpc.StatusCode.NOT_FOUND.value[0],
                        grpc.StatusCode.OK.value[0],
                    ]
                    assert "teacher endpoint" in answer.results[0].details
                    assert "register again" in answer.results[1].details
                    assert answer.ttl_seconds > 0 and answer.keepalive_seconds > 0
                too_many = pb.KeepAliveBatch(keep_alives=[batch.keep_alives[2]] * 1025)
                await call.write(too_many)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call.read()
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "at most 1024" in refused.value.details()
        finally:
            await server.stop()

    run(main())


def test_a_teacher_named_twice_or_none_is_refused():
    async def main():
        with pytest.raises(DiscoveryError, match="named twice: 10.0.0.1:1"):
            await keep_all_registered(
                "127.0.0.1:1", "svc", [TeacherRegistration("10.0.0.1:1"), TeacherRegistration("10.0.0.1:1")]
            )
        with pytest.raises(DiscoveryError, match="no teacher"):
            await keep_all_registered("127.0.0.1:1", "svc", [])
        too_many = [TeacherRegistration(f"10.0.{i // 250}.{i % 250}:1") for i in range(1025)]
        with pytest.raises(DiscoveryError, match="1025 teachers for one keeper: at most 1024"):
            await keep_all_registered("127.0.0.1:1", "svc", too_many)

    run(main())
    result = CliRunner().invoke(
        register, ["--discovery", "127.0.0.1:1", "--service-name", "svc", "--endpoint", "10.0.0.1:1,10.0.0.1:1"]
    )
    assert result.exit_code != 0 and "named twice: 10.0.0.1:1" in result.output, result.output


def test_distill_teacher_register_keeps_several_endpoints_and_deregisters_them_on_sigterm():
    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory")
        await server.start()
        endpoints = sorted(f"127.0.0.1:{free_port()}" for _ in range(3))
        proc = register_process(
            server.address, "svc", endpoints[0], "--endpoint", ",".join(endpoints[1:]), "--no-readiness-check"
        )
        w = Watch(server.address, "svc", 3)
        try:
            await w.wait_for(lambda s: s == endpoints, timeout=20)
            proc.send_signal(signal.SIGTERM)
            await w.wait_for(lambda s: s == [], timeout=10)
            assert proc.wait(10) == 0
            deregistered = {"method": "DeregisterTeacher", "code": "OK"}
            assert server.service.registry.get_sample_value("distill_discovery_rpcs_total", deregistered) == 3
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            await w.close()
            await server.stop()

    run(main())


def test_the_benchmarks_hosts_keep_their_teachers_in_one_message_and_one_dies_alone():
    """``distill bench discovery --keepalive-rpc batch``'s simulated hosts: 3 hosts of 4 teachers keep
    every lease through several TTLs with one message per host per interval; a teacher that dies
    (its keep-alives stop) leaves alone, its host's other teachers keep theirs."""

    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory", ttl=1.0, keepalive=0.1)
        sizes = count_batches(server)
        await server.start()
        try:
            async with Simulator(server.address, keepalive="batch") as sim:
                for h in range(3):
                    for p in range(4):
                        await sim.add_teacher(f"10.0.0.{h}:{8001 + p}")
                await asyncio.sleep(3 * server.service.ttl)
                assert (await sim.teacher_stats())[0] == 0, "a lease lapsed"
                assert len(sizes) >= 3 * 10 and set(sizes[-6:]) == {4}, sizes
                await sim.kill_teacher("10.0.0.0:8001")
                deadline = time.monotonic() + 10
                while (SERVICE, "10.0.0.0:8001") in server.service._kept:
                    assert time.monotonic() < deadline, "the dead teacher's lease did not end"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2 * server.service.ttl)
                assert (await sim.teacher_stats())[0] == 0, "a live teacher's lease lapsed"
                kept = sorted(endpoint for _, endpoint in server.service._kept)
                assert kept == sorted(f"10.0.0.{h}:{8001 + p}" for h in range(3) for p in range(4))[1:]
                assert set(sizes[-6:]) <= {3, 4}
        finally:
            await server.stop()

    run(main())


def test_a_slow_server_answering_registrations_lets_no_registered_lease_lapse():
    """Eight teachers register one at a time through a server that takes 0.25 s a registration
    (2 s for all, twice the TTL): the keeper keeps the leases it already holds meanwhile, so none
    lapses, and all eight end up assigned."""

    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory", ttl=1.0, keepalive=0.1)
        register_teacher = server.service.RegisterTeacher

        async def slow_register(request, context):
            await asyncio.sleep(0.25)
            return await register_teacher(request, context)

        server.service.RegisterTeacher = slow_register  # the handler is built from it at start
        await server.start()
        endpoints = sorted(f"127.0.0.1:{9001 + i}" for i in range(8))
        teachers = [TeacherRegistration(e) for e in endpoints]
        stop = asyncio.Event()
        keeper = asyncio.create_task(keep_all_registered(server.address, "svc", teachers, False, stop))
        w = Watch(server.address, "svc", 8)
        try:
            await w.wait_for(lambda s: s == endpoints, timeout=20)
            await asyncio.sleep(2 * server.service.ttl)  # leases that outlive two TTLs more
            lapsed = server.service.registry.get_sample_value(
                "distill_discovery_teacher_lapses_total", {"service": "svc"}
            )
            not_found = server.service.registry.get_sample_value(
                "distill_discovery_rpcs_total", {"method": "KeepAlive", "code": "NOT_FOUND"}
            )
            assert (lapsed or 0) == 0 and (not_found or 0) == 0, (lapsed, not_found)
        finally:
            stop.set()
            await asyncio.wait_for(keeper, 10)
            await w.close()
            await server.stop()

    run(main())


@pytest.mark.parametrize("answer", ["a code grpc does not know", "too few results"])
def test_a_keeper_outlives_a_server_answering_batches_wrongly(answer, caplog):
    """A server answering a batch with a status code this grpc does not know, or with fewer results
    than keep-alives: the keeper logs it and tries again after its backoff; it does not fail."""

    async def main():
        server = DiscoveryServer("127.0.0.1:0", "memory")

        async def wrong(batches, context):
            async for batch in batches:
                if answer == "too few results":
                    yield pb.KeepAliveBatchResponse(keepalive_seconds=0.1, results=[pb.KeepAliveResult()])
                else:
                    results = [pb.KeepAliveResult(code=99, details="new") for _ in batch.keep_alives]
                    yield pb.KeepAliveBatchResponse(keepalive_seconds=0.1, results=results)

        server.service.KeepAliveBatchStream = wrong
        await server.start()
        teachers = [TeacherRegistration("10.0.0.1:1"), TeacherRegistration("10.0.0.2:1")]
        stop = asyncio.Event()
        keeper = asyncio.create_task(keep_all_registered(server.address, "svc", teachers, False, stop))
        try:
            deadline = time.monotonic() + 10
            while "discovery UNKNOWN" not in caplog.text:
                assert not keeper.done(), keeper.exception()
                assert time.monotonic() < deadline, "the wrong answer was not logged"
                await asyncio.sleep(0.02)
            assert not keeper.done()
        finally:
            stop.set()
            await asyncio.wait_for(keeper, 10)  # ends cleanly: no exception
            await server.stop()

    with caplog.at_level(logging.INFO, logger="distill_reader.discovery.client"):
        run(main())
