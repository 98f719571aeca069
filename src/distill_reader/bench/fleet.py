"""The benchmarks' fleet: real processes on loopback that ``distill bench chaos`` and
``distill bench discovery`` start, break and audit, and that the tests reuse as fixtures.

- the chaos teacher models (:func:`tag`: an exact model whose label encodes the sample's number;
  :func:`hang`, :func:`broken`, :func:`renamed`) and the samples they are checked against;
- :class:`Fleet` (``distill teacher serve`` processes), :class:`DiscoveryProcess`,
  :class:`StoreProcess` (``redis-server``/``etcd``), :class:`NetNamespace` (a teacher behind a
  link that can go down), :class:`WrongTeacher` and :class:`SilentListener` (teachers that are wrong
  in one precise way).

Internal, not public API.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill_reader.rpc import LoopThread
from distill_reader.serving.backends.python import teacher_model
from distill_reader.teacher.local import free_port, start_teacher, wait_until_ready

IMG_SHAPE = (1, 4, 4)
N_OUT = 10
DELAY_ENV = "DISTILL_CHAOS_DELAY_S"
MODULE = "distill_reader.bench.fleet"
SERVICE = "chaos"


# -- the exact model ---------------------------------------------------------------------------


def tag_rows(img: np.ndarray) -> np.ndarray:
    """The reference output: per row, 10 partial sums of the flattened image (exact in float32)."""
    x = img.reshape(len(img), -1).astype(np.float64)
    return np.stack([x[:, i::N_OUT].sum(axis=1) for i in range(N_OUT)], axis=1).astype(np.float32)


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (N_OUT,))])
def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`tag_rows`, after sleeping ``$DISTILL_CHAOS_DELAY_S`` (default 0.01) like a GPU."""
    time.sleep(float(os.environ.get(DELAY_ENV, "0.01")))
    return {"prediction": tag_rows(batch["img"])}


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (N_OUT,))])
def hang(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accepts the request and never answers."""
    time.sleep(10**6)
    raise AssertionError("unreachable")


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (N_OUT,))])
def broken(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Answers every request with an error."""
    raise RuntimeError("the chaos teacher is broken")


@teacher_model(inputs=[("image", "float32", IMG_SHAPE)], outputs=[("logits", "float32", (N_OUT,))])
def renamed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`tag` under other tensor names: a teacher deployed with the wrong model."""
    return {"logits": tag_rows(batch["image"])}


def make_sample(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``i``: pixels that encode ``i``, label ``i``."""
    img = (np.arange(16, dtype=np.float32).reshape(IMG_SHAPE) + i * 16) % 1000 + i
    return img, np.array([i], dtype=np.int64)


CONFIG = """\
[conf]
{conf}

[feed]
feed_vars = ['img', 'label']
feed_types = ['float32', 'int64']
feed_shapes = [(1, 4, 4), (1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['prediction']
fetch_types = ['float32']
fetch_shapes = [(10,)]
"""


def write_config(
    directory: str | os.PathLike[str], servers: Sequence[str] = (), discovery: str = "", require_num: int = 2
) -> Path:
    """A reader config: fixed ``servers``, or discover mode on ``discovery`` (service ``chaos``)."""
    if discovery:
        conf = f"mode = discover\nhost = {discovery}\nservice_name = {SERVICE}\nrequire_num = {require_num}"
    else:
        conf = f"mode = fixed\nservers = {list(servers)!r}"
    path = Path(directory) / f"chaos-{time.monotonic_ns()}.conf"
    path.write_text(CONFIG.format(conf=conf))
    return path


def sample_reader(n: int, start_delay_s: float = 0.0) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """Samples ``0 … n-1``; the first after ``start_delay_s`` (every teacher's workers are then idle)."""
    samples = [make_sample(i) for i in range(n)]

    def reader() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if start_delay_s:
            time.sleep(start_delay_s)
        yield from samples

    return reader


# -- processes and fault injectors -------------------------------------------------------------


def _python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **(extra or {})}


class Fleet:
    """Teachers as ``distill teacher serve`` processes; killable and restartable on the same port."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s
        self.processes: dict[str, subprocess.Popen] = {}
        self._args: dict[str, tuple[list[str], list[str]]] = {}

    def start(
        self,
        model: str = "tag",
        *extra: str,
        endpoint: str | None = None,
        prefix: Sequence[str] = (),
        wait: bool = True,
    ) -> str:
        """Start a teacher serving ``model`` (a function of this module); returns its endpoint."""
        endpoint = endpoint or f"127.0.0.1:{free_port()}"
        self._args[endpoint] = (list(prefix), [f"{MODULE}:{model}", *extra])
        self._spawn(endpoint, wait)
        return endpoint

    def _spawn(self, endpoint: str, wait: bool = True) -> None:
        prefix, (spec, *extra) = self._args[endpoint]
        env = _python_env({DELAY_ENV: repr(self.delay_s)})
        process = start_teacher(spec, endpoint, *extra, env=env, prefix=prefix, wait=False)
        self.processes[endpoint] = process
        if wait:
            wait_until_ready(endpoint, process)

    def kill(self, endpoint: str, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` and reap; returns the moment it was sent."""
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
        return [e for e, p in self.processes.items() if p.poll() is None]

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


class SilentListener:
    """A TCP listener that accepts connections and reads everything, but never says a word."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.endpoint = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self.bytes_read = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="silent-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in selector.select(0.1):
                if key.fileobj is self._sock:
                    with contextlib.suppress(OSError):
                        conn, _ = self._sock.accept()
                        conn.setblocking(False)
                        self._conns.append(conn)
                        self.connections += 1
                        selector.register(conn, selectors.EVENT_READ)
                else:
                    conn = key.fileobj
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        self.bytes_read += len(data)
                    else:
                        selector.unregister(conn)
                        conn.close()
        selector.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in [self._sock, *self._conns]:
            with contextlib.suppress(OSError):
                conn.close()


class WrongTeacher:
    """An OIP server (grpc.aio) whose metadata matches the config but whose answers are wrong.

    ``mode``: ``"shape"`` (prediction is ``[n, 9]``), ``"bytes"`` (right shape, half the bytes),
    ``"dtype"`` (FP64), ``"missing"`` (no output), ``"nan"`` (right shape and size, all NaN: caught
    by the reader's finite check). ``"undeclared"``: metadata that lists no tensors (MLServer's
    default for a custom runtime) and right answers; ``"undeclared-shape"``: no tensors declared and
    answers of the wrong shape.
    """

    def __init__(self, mode: str = "shape") -> None:
        self.mode = mode
        self.requests = 0
        self.endpoint = ""
        self._thread = LoopThread("wrong-teacher")
        self._server: Any = None

    def start(self) -> WrongTeacher:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        outer = self

        class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
            async def ServerLive(self, request, context):  # noqa: N802, ANN001, ANN201
                return service_pb2.ServerLiveResponse(live=True)

            async def ServerReady(self, request, context):  # noqa: N802, ANN001, ANN201
                return service_pb2.ServerReadyResponse(ready=True)

            async def ModelReady(self, request, context):  # noqa: N802, ANN001, ANN201
                return service_pb2.ModelReadyResponse(ready=True)

            async def ModelMetadata(self, request, context):  # noqa: N802, ANN001, ANN201
                tensor = service_pb2.ModelMetadataResponse.TensorMetadata
                response = service_pb2.ModelMetadataResponse(name=request.name, platform="chaos", versions=["1"])
                if not outer.mode.startswith("undeclared"):
                    response.inputs.append(tensor(name="img", datatype="FP32", shape=[-1, *IMG_SHAPE]))
                    response.outputs.append(tensor(name="prediction", datatype="FP32", shape=[-1, N_OUT]))
                return response

            async def ModelInfer(self, request, context):  # noqa: N802, ANN001, ANN201
                outer.requests += 1
                n = int(request.inputs[0].shape[0])
                out = service_pb2.ModelInferResponse.InferOutputTensor
                response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                if outer.mode == "missing":
                    return response
                shape, dtype, raw = [n, N_OUT], "FP32", np.zeros((n, N_OUT), np.float32).tobytes()
                if outer.mode == "undeclared":
                    img = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(n, *IMG_SHAPE)
                    raw = tag_rows(img).tobytes()
                elif outer.mode in ("shape", "undeclared-shape"):
                    shape, raw = [n, N_OUT - 1], np.zeros((n, N_OUT - 1), np.float32).tobytes()
                elif outer.mode == "bytes":
                    raw = raw[: len(raw) // 2]
                elif outer.mode == "dtype":
                    dtype, raw = "FP64", np.zeros((n, N_OUT), np.float64).tobytes()
                elif outer.mode == "nan":
                    raw = np.full((n, N_OUT), np.nan, np.float32).tobytes()
                response.outputs.append(out(name="prediction", datatype=dtype, shape=shape))
                response.raw_output_contents.append(raw)
                return response

        async def serve() -> str:
            self._server = grpc.aio.server()
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), self._server)
            port = self._server.add_insecure_port("127.0.0.1:0")
            await self._server.start()
            return f"127.0.0.1:{port}"

        self.endpoint = self._thread.start().run(serve(), 10)
        return self

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._thread.run(self._server.stop(0), 5)
        self._thread.stop(5)


class _KillableProcess:
    """A server process that a scenario may SIGKILL (and start again)."""

    process: subprocess.Popen | None

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
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        started = time.monotonic()
        self.process = subprocess.Popen(
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
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"discovery exited with code {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(self._address(), 0.2):
                return started
            time.sleep(0.05)
        raise TimeoutError(f"discovery on {self.endpoint} did not start")

    def _address(self) -> tuple[str, int]:
        host, port = self.endpoint.rsplit(":", 1)
        return host, int(port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class StoreProcess(_KillableProcess):
    """``redis-server`` or ``etcd`` on a free port in a temporary directory (restartable, same data)."""

    BINARIES = {"redis": "redis-server", "etcd": "etcd"}

    def __init__(self, kind: str, workdir: str | os.PathLike[str], extra_args: Sequence[str] = ()) -> None:
        self.kind = kind
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args)  # e.g. --requirepass, TLS files
        self.port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen | None = None

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
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with code {self.process.returncode}")
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


class NetNamespace:
    """A network namespace joined to this one by a veth pair: ``10.254.N.1`` here, ``.2`` inside.

    ``down()`` takes the link inside the namespace down (the teacher's machine is cut off: packets
    to it vanish, nothing answers), ``up()`` brings it back. Needs root and ``ip netns``; see
    :meth:`unavailable`.
    """

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.name = f"chaos-{tag}"
        self.host_if, self.ns_if = f"chh{tag}", f"chn{tag}"
        self.subnet = self._free_subnet()
        self.host_ip, self.ns_ip = f"10.254.{self.subnet}.1", f"10.254.{self.subnet}.2"
        self.created = False

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be used here, or None."""
        if shutil.which("ip") is None:
            return "the `ip` command is not installed"
        if os.geteuid() != 0:
            return "creating network namespaces needs root"
        name = f"chaos-probe-{os.getpid()}"
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if done.returncode != 0:
            return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return None

    @staticmethod
    def _free_subnet() -> int:
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        for n in range(200, 250):
            if f"10.254.{n}." not in used:
                return n
        raise RuntimeError("no free 10.254.N.0/30 subnet")

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def create(self) -> NetNamespace:
        self._ip("netns", "add", self.name)
        self.created = True
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self._ip("-n", self.name, "link", "set", self.ns_if, "up")
        self._ip("-n", self.name, "link", "set", "lo", "up")
        return self

    @property
    def prefix(self) -> list[str]:
        """Prefix of a command line that runs it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def down(self) -> float:
        sent = time.monotonic()
        self._ip("-n", self.name, "link", "set", self.ns_if, "down")
        return sent

    def up(self) -> float:
        sent = time.monotonic()
        self._ip("-n", self.name, "link", "set", self.ns_if, "up")
        return sent

    def delete(self) -> None:
        if self.created:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.created = False


# -- auditing an epoch -------------------------------------------------------------------------
