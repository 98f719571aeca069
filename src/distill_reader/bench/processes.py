"""The server processes a benchmark runs on this machine, and that the tests reuse: teachers
(:class:`TeacherProcesses`, the one way to start several ``distill teacher serve`` and keep them),
a discovery server (:class:`DiscoveryProcess`) and its Redis or etcd store (:class:`StoreProcess`).

Internal, not public API.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from distill_reader.teacher.local import free_port, start_teacher, wait_until_ready


class TeacherProcesses:
    """``distill teacher serve`` processes: started on free ports (or a given one), killed, started
    again on the same port with the same options, stopped. Use as a context manager or call
    :meth:`stop_all`.

    ``model``: what :meth:`start` serves unless told otherwise; ``env``: variables added to this
    process's environment for every teacher (e.g. ``PYTHONPATH``, a simulated model's timings);
    ``output``: where the teachers' stdout and stderr go (None: ours; ``subprocess.PIPE``: each
    process's ``stdout``, stderr merged in).
    """

    def __init__(
        self, model: str = "", env: Mapping[str, str] | None = None, output: int | IO | None = subprocess.DEVNULL
    ) -> None:
        self.model = model
        self.env = dict(env or {})
        self.output = output
        self.processes: dict[str, subprocess.Popen] = {}
        self._commands: dict[str, tuple[str, tuple[str, ...], dict[str, str], tuple[str, ...]]] = {}

    def start(
        self,
        model: str | None = None,
        *options: str,
        endpoint: str | None = None,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        wait: bool = True,
    ) -> str:
        """Start a teacher serving ``model`` (default: the one given at construction) with more
        ``distill teacher serve`` ``options``, listening on ``endpoint`` (default: a free loopback
        port); returns its endpoint. ``env``: more variables for this one; ``prefix``: a command to
        run it under (``ip netns exec NS``). ``wait``: return once it answers ServerReady (else
        call :meth:`wait_ready` after starting several)."""
        model = model or self.model
        if not model:
            raise ValueError("TeacherProcesses.start: no model (pass one, or a default to the constructor)")
        endpoint = endpoint or f"127.0.0.1:{free_port()}"
        self._commands[endpoint] = (model, options, {**self.env, **(env or {})}, tuple(prefix))
        self._spawn(endpoint, wait)
        return endpoint

    def _spawn(self, endpoint: str, wait: bool) -> None:
        model, options, env, prefix = self._commands[endpoint]
        environ = {**os.environ, **env}
        process = start_teacher(model, endpoint, *options, env=environ, output=self.output, prefix=prefix, wait=False)
        self.processes[endpoint] = process
        if wait:
            wait_until_ready(endpoint, process)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every running teacher answers ServerReady (RuntimeError if one exits)."""
        for endpoint, process in self.processes.items():
            if process.poll() is None:
                wait_until_ready(endpoint, process, timeout)

    def kill(self, endpoint: str, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` to the teacher of ``endpoint`` and reap it; returns when it was sent
        (``time.monotonic()``)."""
        process = self.processes[endpoint]
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        process.wait(10)
        return sent

    def restart(self, endpoint: str, wait: bool = True) -> float:
        """Start the teacher of ``endpoint`` again (same port, model and options); returns when."""
        started = time.monotonic()
        self._spawn(endpoint, wait)
        return started

    def alive(self) -> list[str]:
        """The endpoints whose process is still running."""
        return [endpoint for endpoint, process in self.processes.items() if process.poll() is None]

    def stop_all(self) -> None:
        """SIGKILL every teacher still running and reap it (nothing of theirs is worth waiting for)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def __enter__(self) -> TeacherProcesses:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


class _KillableProcess:
    """A server process that a scenario may SIGKILL (and start again); its output goes to a temporary
    file, whose last lines say why it exited should it not start."""

    process: subprocess.Popen | None = None
    _log: IO[bytes] | None = None

    def _spawn(self, command: Sequence[str], **popen: Any) -> subprocess.Popen:
        self._close_log()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - held while it runs, closed by _close_log()
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, **popen
        )
        return self.process

    def _exited(self, what: str) -> RuntimeError:
        """The error for a process that exited before it served: its exit code and last output lines."""
        assert self.process is not None and self._log is not None
        self._log.seek(0)
        last = [line for line in self._log.read().decode(errors="replace").splitlines() if line.strip()][-2:]
        return RuntimeError(f"{what} exited with code {self.process.returncode}: " + " | ".join(last))

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> float:
        """SIGKILL it and wait for it; when the signal was sent (``time.monotonic()``)."""
        assert self.process is not None
        sent = time.monotonic()
        self.process.kill()
        self.process.wait(10)
        return sent


class DiscoveryProcess(_KillableProcess):
    """``distill discovery serve`` as a process on a fixed port: killable and restartable."""

    def __init__(self, store: str = "memory", args: Sequence[str] = ()) -> None:
        self.store = store
        self.args = list(args)  # more ``distill discovery serve`` options (e.g. --http)
        self.endpoint = f"127.0.0.1:{free_port()}"

    def start(self) -> float:
        """Start it and wait until its port accepts connections; returns when it was started."""
        started = time.monotonic()
        process = self._spawn(
            [
                sys.executable,
                "-m",
                "distill_reader",
                "discovery",
                "serve",
                "--listen",
                self.endpoint,
                "--store",
                self.store,
                *self.args,
            ],
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise self._exited("discovery")
            with contextlib.suppress(OSError), socket.create_connection(self._address(), 0.2):
                return started
            time.sleep(0.05)
        raise TimeoutError(f"discovery on {self.endpoint} did not start")

    def _address(self) -> tuple[str, int]:
        host, port = self.endpoint.rsplit(":", 1)
        return host, int(port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        self._close_log()


class StoreProcess(_KillableProcess):
    """``redis-server`` or ``etcd`` on a free port in a temporary directory (restartable, same data)."""

    BINARIES = {"redis": "redis-server", "etcd": "etcd"}

    def __init__(self, kind: str, workdir: str | os.PathLike[str], extra_args: Sequence[str] = ()) -> None:
        self.kind = kind
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args)  # e.g. --requirepass, TLS files
        self.port = free_port()
        self.peer_port = free_port()

    @classmethod
    def available(cls, kind: str) -> bool:
        return shutil.which(cls.BINARIES[kind]) is not None

    @property
    def url(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line (``extra_args`` last)."""
        if self.kind == "redis":
            cmd = [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ]
        else:
            peer = f"http://127.0.0.1:{self.peer_port}"
            cmd = [
                "etcd",
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{self.port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{self.port}",
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"default={peer}",
                "--log-level",
                "error",
            ]
        return cmd + self.extra_args

    def start(self) -> float:
        """Start it and wait until it answers; returns when it was started."""
        started = time.monotonic()
        process = self._spawn(self.command(), cwd=self.workdir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise self._exited(self.kind)
            if self._ready():
                return started
            time.sleep(0.05)
        raise TimeoutError(f"{self.kind} did not start on port {self.port}")

    def _ready(self) -> bool:
        try:
            if self.kind == "redis":
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, with a password
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=0.5) as reply:
                return b"true" in reply.read()
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_log()
