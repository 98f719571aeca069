"""The built-in teacher server against clients that misuse the shared-memory extension: a region
whose file shrank after it was registered (which faults, SIGBUS, wherever a server touches a mapping
of it past the new end), a file replaced under its name, and keys that do not name a plain file
in /dev/shm. One bad client must never take the teacher away from the good ones."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from reader_models import make_sample, tag, tag_rows
from test_reader import check_epoch, sample_list_reader

from distill_reader import DistillReader
from distill_reader.serving.backends.python import PythonBackend
from distill_reader.serving.server import running_server

pytestmark = pytest.mark.timeout(180)

SHM = Path("/dev/shm")
ROWS = 5
OUT_NBYTES = ROWS * 10 * 4  # 5 rows of 10 float32


@contextlib.contextmanager
def shm_file(nbytes: int) -> Iterator[Path]:
    """A file of ``nbytes`` zero bytes in /dev/shm (its key: ``"/" + path.name``), removed after."""
    path = SHM / f"distill-test-faults-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def key(path: Path) -> str:
    return "/" + path.name


def images(start: int = 0) -> np.ndarray:
    return np.stack([make_sample(i)[0] for i in range(start, start + ROWS)])


def by_region(img: np.ndarray, region: str, offset: int = 0) -> list[tc.InferInput]:
    inp = tc.InferInput("img", list(img.shape), "FP32")
    inp.set_shared_memory(region, img.nbytes, offset)
    return [inp]


def by_value(img: np.ndarray) -> list[tc.InferInput]:
    inp = tc.InferInput("img", list(img.shape), "FP32")
    inp.set_data_from_numpy(img)
    return [inp]


def into_region(region: str, offset: int = 0) -> list[tc.InferRequestedOutput]:
    out = tc.InferRequestedOutput("prediction")
    out.set_shared_memory(region, OUT_NBYTES, offset)
    return [out]


def refused(call, match: str) -> str:
    """``call()`` fails with INVALID_ARGUMENT matching ``match`` (not UNAVAILABLE: the server is up)."""
    with pytest.raises(tc.InferenceServerException, match=match) as info:
        call()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    return str(info.value)


def test_a_region_that_shrank_is_an_error_and_the_teacher_serves_on(teachers, write_config):
    """A client registers regions of its /dev/shm files, truncates them, and sends requests that
    read an input from one and write an output into the other: each is refused naming its region
    (before the fix the teacher process died of SIGBUS and its students lost it). The teacher answers
    on, and a reader over shared memory beside a client that keeps truncating and restoring its
    files under its requests gets every sample with its exact output, epoch after epoch."""
    endpoint = teachers.start()
    process = teachers.processes[endpoint]
    client = tc.InferenceServerClient(endpoint)
    img = images()
    with shm_file(8192) as inp, shm_file(8192) as out:
        with open(inp, "r+b") as fh:
            fh.write(img.tobytes())
        client.register_system_shared_memory("bad-in", key(inp), 8192)
        client.register_system_shared_memory("bad-out", key(out), 8192)
        np.testing.assert_array_equal(
            client.infer("teacher", by_region(img, "bad-in")).as_numpy("prediction"), tag_rows(img)
        )

        os.truncate(inp, 0)  # the input's bytes are gone
        message = refused(lambda: client.infer("teacher", by_region(img, "bad-in")), "region 'bad-in'")
        assert "input 'img'" in message and "shrank" in message
        # An output past the file's new end (a page the shrink took away) is refused the same way,
        # and the file is not grown back.
        os.truncate(out, 300)
        message = refused(
            lambda: client.infer("teacher", by_value(img), outputs=into_region("bad-out", 4096)), "region 'bad-out'"
        )
        assert "output 'prediction'" in message and "shrank" in message
        assert out.stat().st_size == 300
        # What still lies inside the shrunken file is used as before.
        client.infer("teacher", by_value(img), outputs=into_region("bad-out", 0))
        written = np.frombuffer(out.read_bytes()[:OUT_NBYTES], np.float32).reshape(ROWS, 10)
        np.testing.assert_array_equal(written, tag_rows(img))

        assert process.poll() is None
        np.testing.assert_array_equal(client.infer("teacher", by_value(img)).as_numpy("prediction"), tag_rows(img))

    # A bad client beside a good one: it flips its file between empty and full size under requests
    # that read from and write into it, while a reader streams two epochs over shared memory.
    stop = threading.Event()
    outcomes: dict[str, int] = {}

    def bad_client() -> None:
        with shm_file(16384) as path:
            client.register_system_shared_memory("flip", key(path), 16384)
            fd = os.open(path, os.O_RDWR)

            def flip() -> None:
                while not stop.is_set():
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, 16384)

            flipper = threading.Thread(target=flip, daemon=True)
            flipper.start()
            try:
                while not stop.is_set():
                    try:
                        client.infer("teacher", by_region(img, "flip", 0), outputs=into_region("flip", 8192))
                        outcome = "ok"
                    except tc.InferenceServerException as exc:
                        assert exc.status() == "StatusCode.INVALID_ARGUMENT" and "region 'flip'" in str(exc), exc
                        outcome = "refused"
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
            finally:
                stop.set()
                flipper.join()
                os.close(fd)
                client.unregister_system_shared_memory("flip")

    bad = threading.Thread(target=bad_client, daemon=True)
    bad.start()
    try:
        # (A teacher that checks the file's size and then touches a mapping of it dies in this race:
        # teacher_timeout makes the epoch fail sooner than its default 120 s.)
        config = write_config([endpoint], "shared_memory = on")
        dr = DistillReader(config, 16, 4, capacity=4, occupied_capacity=1, teacher_timeout=30)
        dr.set_sample_list_generator(sample_list_reader(320, 8))
        with dr:
            for _ in range(2):
                check_epoch([[a.copy() for a in batch] for batch in dr.distill_reader()()], 320, 16)
            assert not stop.is_set()  # the bad client was at it the whole time
    finally:
        stop.set()
        bad.join(30)
    assert not bad.is_alive() and outcomes.get("refused", 0) > 0, outcomes
    assert process.poll() is None


def test_a_file_replaced_under_its_name_is_never_touched():
    """The region is the file that was registered, not its name: after the name is unlinked and a
    new file created under it, requests still read from and write into the registered file (which
    the server keeps open), and the new file is neither read nor written."""
    old_img, new_img = images(0), images(100)
    with running_server(PythonBackend(tag)) as endpoint, shm_file(8192) as path:
        client = tc.InferenceServerClient(endpoint)
        old = os.open(path, os.O_RDWR)  # to look at the registered file once its name is gone
        try:
            os.pwrite(old, old_img.tobytes(), 0)
            client.register_system_shared_memory("in", key(path), 4096)
            client.register_system_shared_memory("out", key(path), 4096, offset=4096)
            path.unlink()
            with open(path, "xb") as fh:
                fh.write(new_img.tobytes() + bytes(8192 - new_img.nbytes))
            client.infer("teacher", by_region(old_img, "in"), outputs=into_region("out"))
            written = np.frombuffer(os.pread(old, OUT_NBYTES, 4096), np.float32).reshape(ROWS, 10)
            np.testing.assert_array_equal(written, tag_rows(old_img))
            assert path.read_bytes() == new_img.tobytes() + bytes(8192 - new_img.nbytes)
        finally:
            os.close(old)


def test_a_key_names_a_regular_file_directly_in_dev_shm_or_nothing(tmp_path):
    """What a client can make the server open: a regular file directly in /dev/shm, by a name with
    no ``/`` or ``..``, not through a symlink; anything else is refused at registration."""
    with running_server(PythonBackend(tag)) as endpoint, shm_file(4096) as path:
        client = tc.InferenceServerClient(endpoint)
        link = SHM / f"{path.name}-link"
        link.symlink_to(path)
        folder = SHM / f"{path.name}-dir"
        folder.mkdir()
        fifo = SHM / f"{path.name}-fifo"
        os.mkfifo(fifo, 0o600)
        outside = tmp_path / "secret"
        outside.write_bytes(bytes(4096))
        try:
            for bad, why in [
                (key(link), "cannot open"),  # a symlink, even to a file in /dev/shm
                (key(folder), "cannot open"),
                (key(fifo), "not a regular file"),
                (f"/{folder.name}/x", "is not the name of a file"),
                (str(outside), "is not the name of a file"),
                ("/..", "is not the name of a file"),
                (f"/../{outside}", "is not the name of a file"),
            ]:
                with pytest.raises(tc.InferenceServerException, match=why):
                    client.register_system_shared_memory("x", bad, 8)
            assert not client.get_system_shared_memory_status(as_json=True).get("regions")
        finally:
            link.unlink()
            fifo.unlink()
            folder.rmdir()
