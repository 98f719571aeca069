"""Helpers for the discovery tests (no tests here): student watchers, a tiny OIP teacher, stores."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader.bench.processes import StoreProcess
from distill_reader.discovery.client import StudentSession


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Watch:
    """A StudentSession consumed in a task, recording every set it yields with a timestamp."""

    def __init__(self, endpoints, service: str, require_num: int, student_id: str | None = None) -> None:
        self.session = StudentSession(endpoints, service, require_num, student_id)
        self.sets: list[tuple[float, list[str]]] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for teachers in self.session.assignments():
            self.sets.append((time.monotonic(), sorted(t.endpoint for t in teachers)))
            self._changed.set()

    @property
    def current(self) -> list[str] | None:
        return self.sets[-1][1] if self.sets else None

    async def wait_for(self, pred, timeout: float = 10.0) -> float:
        """Wait until ``pred(current)``; returns the time the matching set arrived."""
        deadline = time.monotonic() + timeout
        while True:
            if self.sets and pred(self.sets[-1][1]):
                return self.sets[-1][0]
            if self.task.done():
                self.task.result()
                raise AssertionError("watch ended")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; sets so far: {self.sets}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def close(self) -> None:
        await self.session.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)


class OipTeacher(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ServerReady/ModelReady only: enough for readiness-based registration."""

    def __init__(self, model: str = "teacher") -> None:
        self.model = model
        self.ready = True
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self.ready and request.name == self.model)

    async def start(self, port: int = 0) -> OipTeacher:
        self.server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self.server)
        bound = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        self.address = f"127.0.0.1:{bound}"
        return self

    async def stop(self) -> None:
        if self.server:
            await self.server.stop(0)


def serve_command(*args: str) -> list[str]:
    """The command line of ``distill discovery serve *args`` in a child process."""
    return [
        sys.executable,
        "-c",
        "from distill_reader.discovery.commands import discovery; discovery()",
        "serve",
        *args,
    ]


def register_process(discovery: str, service: str, endpoint: str, *extra: str) -> subprocess.Popen:
    """``distill teacher register`` in a child process (to SIGKILL it)."""
    code = "from distill_reader.discovery.commands import register; register()"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "--discovery",
            discovery,
            "--service-name",
            service,
            "--endpoint",
            endpoint,
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


# redis-server or etcd on a free port in a tmp dir, restartable with the same data: the
# fault-injection benchmark's helper, shared so that both start the stores the same way.
ServiceProcess = StoreProcess


def have(binary: str) -> bool:
    return shutil.which(binary) is not None
