"""The shared-memory transport: the reader's pool mapped by a co-located teacher (OIP system
shared-memory extension), the built-in server's side of it, and that no name is left in /dev/shm."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as tshm
from conftest import settled_stats, shm_files, wait_for
from reader_models import IMG_SHAPE, make_sample, seq_tag, slow_tag, tag, tag_rows
from test_reader import check_epoch, sample_list_reader
from test_sequences import check_sequences, seq_config, sequence_reader
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader import DistillReader
from distill_reader.config import load_config
from distill_reader.errors import ConfigError, TeacherMismatchError
from distill_reader.reader.pool import NAME_PREFIX, SharedBuffer, sweep_stale_names
from distill_reader.security import Secret
from distill_reader.serving import shared_memory, teacher_model
from distill_reader.serving.backends.python import PythonBackend
from distill_reader.serving.server import TeacherServer, running_server

pytestmark = pytest.mark.timeout(60)


def regions(endpoint: str) -> dict[str, int]:
    """The shared memory regions the teacher has registered: name -> byte size."""
    with grpc.insecure_channel(endpoint) as channel:
        status = service_pb2_grpc.GRPCInferenceServiceStub(channel).SystemSharedMemoryStatus(
            service_pb2.SystemSharedMemoryStatusRequest(), timeout=5
        )
    return {name: region.byte_size for name, region in status.regions.items()}


def test_reader_over_shared_memory_exactly_once_and_no_name_left(write_config, tag_teachers):
    """``shared_memory = on``: both teachers map the pool (a teacher that cannot would be
    quarantined and the epoch fail); every sample once, in order, with its own teacher output; the
    pool has no name in /dev/shm while registered; closing the reader unregisters it."""
    before = shm_files()
    # The shared teachers may still hold regions of readers that earlier tests killed (forgotten
    # once idle): only this reader's count.
    others = {endpoint: set(regions(endpoint)) for endpoint in tag_teachers}
    dr = DistillReader(write_config(tag_teachers, "shared_memory = on"), 16, 4, capacity=4, occupied_capacity=2)
    dr.set_sample_list_generator(sample_list_reader(300, 8))
    with dr:
        batches = [[a.copy() for a in batch] for batch in dr.distill_reader()()]
        check_epoch(batches, 300, 16)
        pool_bytes = dr._holder.pipeline.layout.nbytes
        for endpoint in tag_teachers:  # the pool, and the transport's output ring
            # Registered when the reader checks the teacher, whether or not it got work: on a
            # loaded machine the other teacher may have served the whole epoch first.
            def mine(e: str = endpoint) -> dict[str, int] | None:
                found = {n: size for n, size in regions(e).items() if n not in others[e]}
                return found if len(found) >= 2 else None

            assert pool_bytes in wait_for(mine, 20, f"{endpoint} has this reader's regions").values()
            assert len(mine()) == 2
        assert shm_files() == before
    assert all(set(regions(endpoint)) <= others[endpoint] for endpoint in tag_teachers)


def test_teacher_killed_mid_request_with_a_region_registered_then_restarted(write_config, teachers, caplog):
    """One of two slow teachers is SIGKILLed in the middle of an epoch while it holds the pool
    mapped and requests are in flight, then started again on its address: nothing is lost or
    repeated, no region is left behind, and the restarted teacher (registering after the pool's
    naming window) maps a fresh mirror of the pool."""
    caplog.set_level(logging.INFO, logger="distill_reader")
    with running_server(PythonBackend(slow_tag)) as survivor:
        endpoints = [teachers.start("reader_models:slow_tag"), survivor]
        _stream_through_a_teacher_killed_and_restarted(write_config, teachers, endpoints)
    mirrored = [r.getMessage() for r in caplog.records if "a mirror of the batch pool" in r.getMessage()]
    assert len(mirrored) == 1 and endpoints[0] in mirrored[0]
    done = [r.getMessage() for r in caplog.records if "requests through shared memory" in r.getMessage()]
    assert len(done) == 2 and all(" 0 over gRPC" in line for line in done)


def answered(dr: DistillReader, endpoint: str) -> int:
    (stats,) = [t for t in settled_stats(dr).teachers if t.endpoint == endpoint]
    return stats.requests - stats.failures - stats.in_flight


def _stream_through_a_teacher_killed_and_restarted(write_config, teachers, endpoints: list[str]) -> None:
    before = shm_files()
    dr = DistillReader(write_config(endpoints, "shared_memory = on"), 16, 4, capacity=6, occupied_capacity=1, copy=True)
    dr.set_sample_list_generator(sample_list_reader(240, 8))
    with dr:
        batches = []
        for step, batch in enumerate(dr.distill_reader()()):
            batches.append(batch)
            if step == 3:
                wait_for(lambda: regions(endpoints[0]), 20, f"{endpoints[0]} maps the pool")
                teachers.kill(endpoints[0])
                teachers.start("reader_models:slow_tag", endpoint=endpoints[0])
        check_epoch(batches, 240, 16)
        assert shm_files() == before
        answered_before = answered(dr, endpoints[0])
        # Epochs until the reader checks the restarted teacher again (its back-off) and it answers
        # (on a loaded machine the other teacher may take a whole epoch).
        for _ in range(10):
            check_epoch(list(dr.distill_reader()()), 240, 16)
            if regions(endpoints[0]) and answered(dr, endpoints[0]) > answered_before:
                break
        assert len(regions(endpoints[0])) == 2  # a mirror of the pool, and an output ring
    assert shm_files() == before and not regions(endpoints[0]) and not regions(endpoints[1])


def test_shared_memory_option_is_checked(write_config):
    assert load_config(write_config(["127.0.0.1:1"])).shared_memory == "auto"
    assert load_config(write_config(["127.0.0.1:1"], "shared_memory = off")).shared_memory == "off"
    with pytest.raises(ConfigError, match=r"\[conf\] shared_memory: 'yes' is not one of auto, on, off"):
        load_config(write_config(["127.0.0.1:1"], "shared_memory = yes"))


# -- the built-in teacher server, asked by NVIDIA's own client ------------------------------------
@contextlib.contextmanager
def triton_region(nbytes: int):
    """A region made by ``tritonclient.utils.shared_memory`` (a name in /dev/shm until closed)."""
    key = f"/distill-reader-test-{os.getpid()}-{secrets.token_hex(4)}"
    handle = tshm.create_shared_memory_region(key[1:], key, nbytes)
    try:
        yield key, handle
    finally:
        tshm.destroy_shared_memory_region(handle)


def _inputs(img: np.ndarray, offset: int = 0, size: int | None = None, region: str = "in") -> list[tc.InferInput]:
    inp = tc.InferInput("img", list(img.shape), "FP32")
    inp.set_shared_memory(region, img.nbytes if size is None else size, offset)
    return [inp]


def _outputs(rows: int, offset: int, region: str = "out") -> list[tc.InferRequestedOutput]:
    out = tc.InferRequestedOutput("prediction")
    out.set_shared_memory(region, rows * 40, offset)
    return [out]


def test_server_reads_and_writes_registered_regions_and_checks_every_range():
    rows = 5
    img = np.stack([make_sample(i)[0] for i in range(rows)]).astype(np.float32)
    assert img.shape[1:] == IMG_SHAPE
    with running_server(PythonBackend(tag)) as endpoint, triton_region(4096) as (key, handle):
        client = tc.InferenceServerClient(endpoint)
        assert "system_shared_memory" in client.get_server_metadata().extensions
        tshm.set_shared_memory_region(handle, [img])
        client.register_system_shared_memory("in", key, img.nbytes)
        client.register_system_shared_memory("out", key, 4096 - 1024, offset=1024)
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert {r["name"]: int(r["byte_size"]) for r in status.values()} == {"in": img.nbytes, "out": 3072}

        result = client.infer("teacher", _inputs(img), outputs=_outputs(rows, 8))
        assert result.get_output("prediction").shape == [rows, 10]
        written = tshm.get_contents_as_numpy(handle, np.float32, [rows * 10 + 258])[258:].reshape(rows, 10)
        np.testing.assert_array_equal(written, tag_rows(img))  # byte 1024 + 8 = float 258

        bad = [
            (lambda: client.infer("teacher", _inputs(img, offset=4)), "outside shared memory region 'in'"),
            (lambda: client.infer("teacher", _inputs(img, size=img.nbytes - 4)), "but the tensor has"),
            (lambda: client.infer("teacher", _inputs(img, region="nope")), "unknown shared memory region 'nope'"),
            (lambda: client.infer("teacher", _inputs(img), outputs=_outputs(rows, 3072 - 8)), "outside"),
            (lambda: client.infer("teacher", _inputs(img), outputs=_outputs(1, 0)), "more than the byte_size"),
            (lambda: client.register_system_shared_memory("x", "/../../etc/passwd", 8), "is not the name of a file"),
            (lambda: client.register_system_shared_memory("x", key, 8192), "past the end"),
            (lambda: client.register_system_shared_memory("x", "/no-such-key", 8), "cannot open"),
        ]
        for call, message in bad:
            with pytest.raises(tc.InferenceServerException, match=message) as info:
                call()
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(tc.InferenceServerException, match="already registered"):
            client.register_system_shared_memory("in", key, 8)

        client.unregister_system_shared_memory("in")
        with pytest.raises(tc.InferenceServerException, match="unknown shared memory region 'in'"):
            client.infer("teacher", _inputs(img))
        client.unregister_system_shared_memory()
        assert not client.get_system_shared_memory_status(as_json=True).get("regions")
        # Still serving after all of it.
        np.testing.assert_array_equal(
            client.infer("teacher", [_set(tc.InferInput("img", list(img.shape), "FP32"), img)]).as_numpy("prediction"),
            tag_rows(img),
        )


def _set(inp: tc.InferInput, array: np.ndarray) -> tc.InferInput:
    inp.set_data_from_numpy(array)
    return inp


def test_shared_memory_calls_need_the_token():
    with running_server(PythonBackend(tag), token=Secret("s3cret")) as endpoint, triton_region(64) as (key, _):
        client = tc.InferenceServerClient(endpoint)
        for call in (
            lambda headers: client.register_system_shared_memory("r", key, 64, headers=headers),
            lambda headers: client.get_system_shared_memory_status(headers=headers),
            lambda headers: client.unregister_system_shared_memory(headers=headers),
        ):
            with pytest.raises(tc.InferenceServerException) as info:
                call(None)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            call({"authorization": "Bearer s3cret"})


def test_variable_rows_use_the_pool_when_they_can_and_grpc_when_not(write_config, caplog):
    """Sequences in input order (d_batches of 4 rows of 1-24 tokens): a d_batch whose longest row is
    ``max_length`` goes through the pool, the others (padded to a shorter longest row) over gRPC;
    every position of every row exact either way."""
    caplog.set_level(logging.INFO, logger="distill_reader")
    with running_server(PythonBackend(seq_tag)) as endpoint:
        config = seq_config(write_config, [endpoint], extra="shared_memory = on")
        dr = DistillReader(config, 8, 4, capacity=4, occupied_capacity=1, copy=True, group_by_length=False)
        dr.set_sample_generator(sequence_reader("sample", 96))
        with dr:
            check_sequences(list(dr.distill_reader()()), 96, 8)
    (line,) = [r.getMessage() for r in caplog.records if "requests through shared memory" in r.getMessage()]
    in_place, fallbacks = (int(n) for n in re.findall(r"(\d+) requests through shared memory, (\d+) over", line)[0])
    assert in_place > 0 and fallbacks > 0 and in_place + fallbacks == 96 // 4


def test_the_pool_is_named_for_one_registration_window_only():
    """The name exists from the first registration until every expected one was made, then never
    again (a later teacher gets gRPC); a name left by a killed reader is swept."""
    pool = SharedBuffer.create(4096)
    pool.expect_registration()
    pool.expect_registration()
    key = pool.key()
    path = Path("/dev/shm") / key[1:]
    assert path.stat().st_mode & 0o777 == 0o600 and pool.key() == key
    pool.registration_done()
    assert path.exists()
    pool.registration_done()
    assert not path.exists()
    pool.expect_registration()
    with pytest.raises(OSError, match="name was unlinked after the first teachers registered"):
        pool.key()
    pool.registration_done()

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path("/dev/shm") / f"{NAME_PREFIX}{dead.pid}-0123456789ab"
    stale.touch()
    assert sweep_stale_names() == [stale.name] and not stale.exists()


def test_a_teacher_without_shared_memory_is_used_over_grpc_or_refused_when_required(write_config):
    """``distill teacher serve --no-shared-memory``: not announced, registrations refused; ``auto``
    streams over gRPC, ``on`` fails the epoch naming the key and the reason."""
    with running_server(PythonBackend(tag), shared_memory=False) as endpoint, triton_region(64) as (key, _):
        client = tc.InferenceServerClient(endpoint)
        assert "system_shared_memory" not in client.get_server_metadata().extensions
        with pytest.raises(tc.InferenceServerException, match="--no-shared-memory") as info:
            client.register_system_shared_memory("r", key, 64)
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"

        dr = DistillReader(write_config([endpoint]), 8, 4, capacity=3, occupied_capacity=1, copy=True)
        dr.set_sample_list_generator(sample_list_reader(40, 8))
        with dr:
            check_epoch(list(dr.distill_reader()()), 40, 8)
        dr = DistillReader(write_config([endpoint], "shared_memory = on"), 8, 4, capacity=3, occupied_capacity=1)
        dr.set_sample_list_generator(sample_list_reader(40, 8))
        message = r"\[conf\] shared_memory is 'on' but its server metadata does not announce the system_shared_memory"
        with dr, pytest.raises(TeacherMismatchError, match=message):
            list(dr.distill_reader()())


# -- a teacher that answers after the reader gave up ------------------------------------------------
async def _infer_to_the_end(self: TeacherServer, request, context, *, late: list[float]):
    """``TeacherServer.ModelInfer`` as Triton behaves: a request whose client gave up (its deadline
    passed) is computed to the end and its outputs written into the region it named. (The built-in
    server's own handler is cancelled with the call, before it writes anything.)"""
    answer = asyncio.ensure_future(self._answer(request))
    try:
        return await asyncio.shield(answer)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await answer  # the outputs are written into shared memory now
            late.append(time.monotonic())
        raise


def test_answers_after_the_request_timed_out_never_land_in_the_pool(write_config, monkeypatch, caplog):
    """A teacher slower than ``request_timeout`` on some calls (their rows go to a fast teacher) goes
    on computing and writes its late answers (-1 everywhere) where the requests told it to, after
    their slots may have been reused: two epochs exact, every sample once with its own output; the
    late writes happened, into output entries retired for good (the ring is replaced once they use
    it up, or registered anew with the teacher when it comes back from a time-out), never into the
    pool."""
    caplog.set_level(logging.INFO, logger="distill_reader")
    late: list[float] = []  # when a late answer was written (its client had given up)
    calls, slowed = [0], []
    monkeypatch.setattr(TeacherServer, "ModelInfer", functools.partialmethod(_infer_to_the_end, late=late))
    timeout, slow_calls = 0.3, 4  # each times out the 1-2 requests in flight: their entries are retired

    @teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
    def sometimes_slow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls[0] += 1
        if len(slowed) < slow_calls and calls[0] % 2:  # past the deadline, done before its back-off ends
            slowed.append(calls[0])
            time.sleep(1.5 * timeout)
            return {"prediction": np.full((len(batch["img"]), 10), -1, np.float32)}
        return {"prediction": tag_rows(batch["img"])}

    # The other teacher takes 20 ms a call (slow_tag), so that the first one gets its share of the rows.
    with running_server(PythonBackend(sometimes_slow)) as slow, running_server(PythonBackend(slow_tag)) as fast:
        config = write_config([slow, fast], "shared_memory = on")
        dr = DistillReader(
            config, 16, 4, capacity=3, occupied_capacity=1, copy=True, max_in_flight=2, request_timeout=timeout
        )
        dr.set_sample_list_generator(sample_list_reader(480, 8))
        replaced: list[str] = []
        registered: list[str] = []
        with dr:
            # Two epochs at least; more (6 at most) while the slow teacher has not asked for an
            # entry since its ring ran out: under load, back-offs after its time-outs can keep it
            # idle until the end of the second epoch, and the ring is replaced when it next asks.
            for epoch in range(6):
                check_epoch(list(dr.distill_reader()()), 480, 16)
                messages = [r.getMessage() for r in caplog.records]
                replaced = [m for m in messages if "replaced by" in m]
                registered = [m for m in messages if "registered:" in m and slow in m]
                if epoch >= 1 and (replaced or len(registered) > 1):
                    break
    assert len(slowed) == slow_calls and len(late) >= slow_calls  # each slow call answered late
    # The retired entries were left behind with their ring: replaced once they used it up, or (under
    # load, when the time-outs had the slow teacher set aside and taken back) with the registration
    # made anew on its return, which comes with a fresh ring.
    assert (replaced or len(registered) > 1) and all(slow in line for line in replaced), registered


class _Clock:
    """``time`` for a module under test: ``monotonic()`` runs ``ahead`` seconds ahead of the real one."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


def test_a_killed_readers_regions_are_forgotten_and_a_live_reader_registers_again(write_config, monkeypatch):
    """A reader killed without unregistering leaves its regions on the teacher; once idle they are
    forgotten at the next registration (they would fill the teacher's table for good), and a live
    reader whose regions were forgotten that way registers again and loses nothing. (The server's
    clock is moved past the idle limit, as sleeping would, and only between epochs: a live reader's
    regions are never idle by accident on a loaded machine.)"""
    clock = _Clock()
    monkeypatch.setattr(shared_memory, "time", clock)
    idle = shared_memory.REGION_IDLE_S + 1.0
    with running_server(PythonBackend(tag)) as endpoint:
        conf = write_config([endpoint], "shared_memory = on")
        killed = DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True)
        killed.set_sample_list_generator(sample_list_reader(64, 8))
        check_epoch(list(killed.distill_reader()()), 64, 16)
        stale = set(regions(endpoint))
        assert len(stale) == 2  # the pool and the output ring
        os.kill(killed._holder.pipeline._process.pid, signal.SIGKILL)  # no unregistering
        killed.close()
        clock.ahead += idle
        dr = DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True)
        dr.set_sample_list_generator(sample_list_reader(64, 8))
        with dr:
            check_epoch(list(dr.distill_reader()()), 64, 16)
            mine = set(regions(endpoint))
            assert len(mine) == 2 and not mine & stale
            clock.ahead += idle  # this reader's regions are idle now: another registration forgets them
            with triton_region(4096) as (key, _handle):
                tc.InferenceServerClient(endpoint).register_system_shared_memory("other", key, 4096)
                assert set(regions(endpoint)) == {"other"}
                for _ in range(2):
                    check_epoch(list(dr.distill_reader()()), 64, 16)
                assert len(set(regions(endpoint)) - {"other"} - mine) == 2  # registered again
