"""Fleet robustness: no bad teacher, missing discovery server or fixed-then-broken teacher can break
a student while a good teacher is there, and no error outlives its epoch.

Every epoch is checked in full (every sample once, in order, with the teacher output of that very
sample). Where an error must come "at once", ``teacher_timeout`` is far above the test's timeout,
so waiting for it would fail the test instead of passing slowly.
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SEED_CONFIG, TeacherProcesses, settled_stats, wait_for
from fault_injectors import WrongTeacher
from test_reader import check_epoch, sample_list_reader

from distill_reader import (
    DistillReader,
    NoTeacherError,
    TeacherAuthError,
    TeacherError,
    TeacherMismatchError,
    TeacherOutputError,
)
from distill_reader.discovery.server import running_discovery
from distill_reader.teacher.local import free_port

pytestmark = pytest.mark.timeout(90)

N = 320  # samples per epoch: 20 batches of 16
NEVER = 3600.0  # a teacher_timeout no test waits for


def reader(config: Path, **options) -> DistillReader:
    options.setdefault("teacher_timeout", NEVER)
    dr = DistillReader(config, 16, 4, capacity=4, occupied_capacity=1, copy=True, **options)
    dr.set_sample_list_generator(sample_list_reader(N, 8))
    return dr


def run_epoch(dr: DistillReader) -> None:
    check_epoch(list(dr.distill_reader()()), N, 16)


@pytest.fixture
def closers() -> Iterator[list[Callable[[], None]]]:
    """Things a test started that are not teacher processes: closed at its end."""
    things: list[Callable[[], None]] = []
    try:
        yield things
    finally:
        for close in things:
            close()


def http_server(closers: list[Callable[[], None]]) -> str:
    """An HTTP/1 server (not gRPC at all), such as a teacher's HTTP port given by mistake."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closers.append(server.shutdown)
    return f"127.0.0.1:{server.server_address[1]}"


def discovery_server(closers: list[Callable[[], None]]) -> str:
    """A gRPC server that is not an OIP server: distill's own discovery service."""
    context = running_discovery()
    endpoint = context.__enter__()
    closers.append(lambda: context.__exit__(None, None, None))
    return endpoint


def wrong_teacher(mode: str, closers: list[Callable[[], None]]) -> str:
    teacher = WrongTeacher(mode).start()
    closers.append(teacher.close)
    return teacher.endpoint


def token_teacher(teachers: TeacherProcesses, tmp_path: Path) -> str:
    token = tmp_path / "teacher.token"
    token.write_text("s3cret-token\n")
    return teachers.start("reader_models:tag", "--token-file", str(token))


# kind -> (start it, the exception it is quarantined with, words of the message)
BAD_TEACHERS = {
    "wrong names": (
        lambda t, c, p: t.start("reader_models:tag_paddle_names"),
        TeacherMismatchError,
        "[feed] var 'img': teacher",
    ),
    "refuses the token": (lambda t, c, p: token_teacher(t, p), TeacherAuthError, "refused the reader (UNAUTHENTICATED"),
    "not an OIP server": (lambda t, c, p: discovery_server(c), TeacherMismatchError, "not an Open Inference Protocol"),
    "not gRPC": (lambda t, c, p: http_server(c), TeacherMismatchError, "is not a gRPC server"),
    "wrong answers": (lambda t, c, p: wrong_teacher("shape", c), TeacherMismatchError, "returned FP32[4, 9]"),
    "NaN answers": (lambda t, c, p: wrong_teacher("nan", c), TeacherOutputError, "answered NaN or inf in fetch var"),
    "undeclared, wrong answers": (
        lambda t, c, p: wrong_teacher("undeclared-shape", c),
        TeacherMismatchError,
        "returned FP32[4, 9]",
    ),
}


def quarantine_warnings(caplog: pytest.LogCaptureFixture, endpoint: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "quarantined" in r.getMessage() and endpoint in r.getMessage()
    ]


@pytest.mark.parametrize("kind", sorted(BAD_TEACHERS))
def test_a_bad_teacher_beside_a_good_one_is_quarantined(kind, teachers, write_config, tmp_path, closers, caplog):
    start, _, words = BAD_TEACHERS[kind]
    good = teachers.start()
    bad = start(teachers, closers, tmp_path)
    with caplog.at_level(logging.INFO, logger="distill_reader"), reader(write_config([bad, good])) as dr:
        for _ in range(2):  # the next epoch too: nothing of the first one's trouble remains
            run_epoch(dr)
        by_endpoint = {t.endpoint: t for t in settled_stats(dr).teachers}
    assert by_endpoint[bad].quarantined is not None and words in by_endpoint[bad].quarantined
    assert by_endpoint[good].quarantined is None and by_endpoint[good].healthy
    # One WARNING naming the teacher and what is wrong, not one per request or per check.
    warnings = quarantine_warnings(caplog, bad)
    assert len(warnings) == 1, warnings
    assert words in warnings[0]


def test_wrong_answers_keep_a_teacher_quarantined_after_its_metadata_passes(write_config, teachers, closers, caplog):
    """Its metadata was never the problem, so passing its check (after the 2 s back-off, here while
    no epoch runs) does not put it back in use: only a request answered right does."""
    good = teachers.start()
    teacher = WrongTeacher("shape").start()
    closers.append(teacher.close)
    with caplog.at_level(logging.INFO, logger="distill_reader"), reader(write_config([teacher.endpoint, good])) as dr:
        run_epoch(dr)

        def passed() -> list[str]:  # a check after a back-off, logged by the pipeline process
            return [m for m in caplog.messages if "passed its metadata check" in m and teacher.endpoint in m]

        checks = len(passed())  # (a long first epoch may have seen a check, and a trial answered wrong)
        wait_for(lambda: len(passed()) > checks, 30, f"{teacher.endpoint} passed its metadata check", every=0.05)
        assert settled_stats(dr).teachers[0].quarantined is not None
        before = teacher.requests
        run_epoch(dr)
        (bad, _) = settled_stats(dr).teachers
    assert bad.endpoint == teacher.endpoint and "returned FP32[4, 9]" in (bad.quarantined or "")
    # On trial it gets one request at a time, not a round of max_in_flight.
    assert teacher.requests - before <= 2


@pytest.mark.parametrize("kind", sorted(BAD_TEACHERS))
def test_only_bad_teachers_fail_the_epoch_at_once(kind, teachers, write_config, tmp_path, closers):
    start, error_type, words = BAD_TEACHERS[kind]
    bad = start(teachers, closers, tmp_path)
    with reader(write_config([bad])) as dr, pytest.raises(error_type) as info:
        run_epoch(dr)
    assert bad in str(info.value) and words in str(info.value)


def test_the_error_names_every_bad_teacher_and_what_is_wrong(teachers, write_config, tmp_path, closers):
    names = teachers.start("reader_models:tag_paddle_names")
    token = token_teacher(teachers, tmp_path)
    with reader(write_config([names, token])) as dr, pytest.raises(TeacherError) as info:
        run_epoch(dr)
    message = str(info.value)
    assert type(info.value) is TeacherError  # two different reasons: their common class
    assert "none of the 2 teachers can serve this config" in message
    assert f"teacher {names} model 'teacher' has no input of that name" in message
    assert f"teacher {token} refused the reader (UNAUTHENTICATED" in message


def test_no_failure_outlives_its_epoch(teachers, write_config):
    """The only teacher is misconfigured: the epoch fails; once it is fixed (restarted with the right
    model on the same address) the same reader's next epoch works, without close()."""
    endpoint = teachers.start("reader_models:tag_paddle_names")
    with reader(write_config([endpoint])) as dr:
        for _ in range(2):  # failing again is the same clear error, not a stale one
            with pytest.raises(TeacherMismatchError, match="has no input of that name"):
                run_epoch(dr)
        teachers.kill(endpoint)
        teachers.start("reader_models:tag", endpoint=endpoint)
        run_epoch(dr)
        run_epoch(dr)
        (stats,) = settled_stats(dr).teachers
    assert stats.quarantined is None and stats.healthy


def test_a_fixed_teacher_rejoins(teachers, write_config, caplog):
    good = teachers.start()
    bad = teachers.start("reader_models:tag_paddle_names")
    with caplog.at_level(logging.INFO, logger="distill_reader"), reader(write_config([good, bad])) as dr:
        run_epoch(dr)
        teachers.kill(bad)
        teachers.start("reader_models:tag", endpoint=bad)
        for _ in range(10):
            run_epoch(dr)
            stats = {t.endpoint: t for t in settled_stats(dr).teachers}
            if stats[bad].requests > 0:
                break
    assert stats[bad].quarantined is None and stats[bad].requests > 0, stats[bad]


def test_non_finite_check_can_be_turned_off(write_config, closers):
    nan = wrong_teacher("nan", closers)
    with reader(write_config([nan]), check_finite=False) as dr:
        batches = list(dr.distill_reader()())
    assert sum(len(b[0]) for b in batches) == N
    assert all(b[2].size and (b[2] != b[2]).all() for b in batches)  # NaN, as the teacher answered


def test_a_teacher_that_declares_no_tensors_is_checked_by_its_answers(write_config, closers, caplog):
    undeclared = wrong_teacher("undeclared", closers)
    with caplog.at_level(logging.INFO, logger="distill_reader"), reader(write_config([undeclared])) as dr:
        run_epoch(dr)
    assert any("declares no tensors" in r.getMessage() and undeclared in r.getMessage() for r in caplog.records)


# -- discover mode ---------------------------------------------------------------------------------

DISCOVER = "mode = discover\nhost = {host}\nservice_name = fleet\nrequire_num = {require_num}"


def discover_config(write_config, discovery: str, require_num: int = 2) -> Path:
    text = SEED_CONFIG.format(servers=[], extra="").replace(
        "mode = fixed\nservers = []", DISCOVER.format(host=discovery, require_num=require_num)
    )
    return write_config(text=text)


def test_no_discovery_server_is_a_no_teacher_error_then_recovers(teachers, write_config, caplog):
    """With no discovery server, teacher_timeout bounds the epoch, with warnings meanwhile and an
    error naming the addresses and their errors; once discovery and a teacher are up, the same
    reader's next epoch works."""
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    config = discover_config(write_config, ",".join(addresses))
    with caplog.at_level(logging.WARNING, logger="distill_reader"), reader(config, teacher_timeout=3) as dr:
        with pytest.raises(NoTeacherError) as info:
            run_epoch(dr)
        message = str(info.value)
        assert "no teacher answered for 3 s" in message and "no discovery server answered" in message
        assert all(f"{address}: UNAVAILABLE" in message for address in addresses), message
        assert any("no teacher answers" in r.getMessage() for r in caplog.records)
        with running_discovery(addresses[1]) as discovery:
            endpoint = teachers.start("reader_models:tag", "--register", discovery, "--service-name", "fleet")
            # The teacher registers in the background once ready, and the student reconnects to
            # discovery after a back-off: wait until it has the teacher, or the epoch races that
            # (under load) with its 3 s teacher_timeout.
            wait_for(lambda: endpoint in {t.endpoint for t in dr.stats().teachers}, 30, "the student has the teacher")
            run_epoch(dr)


def test_a_misconfigured_teacher_joining_a_service_breaks_no_student(teachers, write_config):
    with running_discovery() as discovery:
        register = ("--register", discovery, "--service-name", "fleet")
        good = teachers.start("reader_models:tag", *register)
        with reader(discover_config(write_config, discovery, require_num=2)) as dr:
            run_epoch(dr)
            bad = teachers.start("reader_models:tag_paddle_names", *register)
            for _ in range(20):  # until the student has been given the bad teacher
                run_epoch(dr)
                stats = {t.endpoint: t for t in dr.stats().teachers}
                if bad in stats and stats[bad].quarantined:
                    break
            assert stats[bad].quarantined and "has no input of that name" in stats[bad].quarantined
            # Fixed and registered again on the same address: checked again and used.
            teachers.kill(bad)
            teachers.start("reader_models:tag", *register, endpoint=bad)
            for _ in range(20):
                run_epoch(dr)
                stats = {t.endpoint: t for t in dr.stats().teachers}
                if bad in stats and stats[bad].requests > 0 and stats[bad].quarantined is None:
                    break
            assert stats[bad].quarantined is None and stats[bad].requests > 0, stats
            assert stats[good].quarantined is None
