"""What every scenario shares: results, sizes, teacher processes, configs, and the measuring loops.

Every figure is a ratio of two rates measured in the same run (the machine is small and noisy).
A rate is measured after a warm-up (process start, channel connect, the pool filling): the rows
of the batches that arrive in the measuring window, divided by the time between the first and
the last of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill_reader.bench.processes import TeacherProcesses
from distill_reader.bench.teachers import A_ENV, B_ENV, IMG_SHAPE, N_CLASSES

Progress = Callable[[str], None]


@dataclass
class Row:
    """One figure: ``measured`` against ``limit`` (the exact limit or the baseline), as ``ratio``."""

    scenario: str
    label: str
    measured: float
    limit: float
    unit: str
    ratio: float
    target: float | None = None  # None: reported, no target
    at_most: bool = False  # the target is an upper bound (memory growth)
    limit_label: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio <= self.target if self.at_most else self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


@dataclass(frozen=True)
class Sizes:
    """How long and how big; ``quick`` is the test suite's smoke run (all scenarios < ~60 s)."""

    quick: bool = False

    @property
    def warmup_s(self) -> float:
        return 0.3 if self.quick else 2.0

    @property
    def measure_s(self) -> float:
        return 0.5 if self.quick else 6.0

    @property
    def teacher_counts(self) -> tuple[int, ...]:
        return (1, 2) if self.quick else (1, 2, 4, 8)

    @property
    def memory_epochs(self) -> int:
        return 10 if self.quick else 300

    @property
    def d_batch_sizes(self) -> tuple[int, ...]:
        return (4, 64) if self.quick else (1, 2, 4, 8, 16, 32, 64, 128, 256)


# -- the reader's data: MNIST-sized samples ----------------------------------------------------

CONFIG = """\
[conf]
mode = fixed
servers = {servers!r}

[feed]
feed_vars = ['img', 'label']
feed_types = ['float32', 'int64']
feed_shapes = [{img_shape!r}, (1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['prediction']
fetch_types = ['float32']
fetch_shapes = [({n_classes},)]
"""

SAMPLE_BYTES = int(np.prod(IMG_SHAPE)) * 4 + 8  # img float32 + label int64
OUTPUT_BYTES = N_CLASSES * 4


def batch_bytes(batch_size: int) -> int:
    """Bytes of one batch of the bench config: every feed and fetch var of ``batch_size`` rows."""
    return batch_size * (SAMPLE_BYTES + OUTPUT_BYTES)


def write_config(directory: str | os.PathLike[str], servers: Sequence[str], conf: str = "") -> Path:
    """A reader config for MNIST-sized samples and the bench teachers; ``conf``: more [conf] lines."""
    path = Path(directory) / f"bench-{len(servers)}-{time.monotonic_ns()}.conf"
    text = CONFIG.format(servers=list(servers), img_shape=IMG_SHAPE, n_classes=N_CLASSES)
    path.write_text(text.replace("\n\n[feed]", f"\n{conf}\n\n[feed]") if conf else text)
    return path


def make_samples(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.random(IMG_SHAPE, dtype=np.float32), np.array([i % N_CLASSES], dtype=np.int64)) for i in range(count)]


def sample_list_reader(list_size: int = 64, lists: int | None = None) -> Callable[[], Iterator[list]]:
    """A user's reader yielding lists of samples, ``lists`` times (forever when None)."""
    samples = make_samples(list_size)

    def reader() -> Iterator[list]:
        n = 0
        while lists is None or n < lists:
            yield samples
            n += 1

    return reader


def plain_batches(batch_size: int, list_size: int = 64) -> Iterator[list[np.ndarray]]:
    """The plain reader: the same samples collated into batches in the training loop, forever."""
    source = sample_list_reader(list_size)()
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for samples in source:
        pending.extend(samples)
        while len(pending) >= batch_size:
            rows, pending = pending[:batch_size], pending[batch_size:]
            yield [np.stack([s[0] for s in rows]), np.stack([s[1] for s in rows])]


# -- teacher processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSpec:
    """How to run one bench teacher."""

    model: str = "simulated_gpu"  # a function of distill_reader.bench.teachers
    a_ms: float = 0.0
    b_ms: float = 0.0
    max_batch: int = 64  # the server's default
    latency_ms: float = 0.0

    @property
    def capacity(self) -> float:
        """Rows per second at full batches (inf for a zero-cost teacher)."""
        cost = self.a_ms + self.b_ms * self.max_batch
        return float("inf") if cost <= 0 else self.max_batch / (cost / 1000.0)


@contextlib.contextmanager
def teacher_processes(spec: TeacherSpec, count: int) -> Iterator[list[str]]:
    """``count`` teachers as processes (``distill teacher serve``, one batch at a time); their addresses."""
    model = f"distill_reader.bench.teachers:{spec.model}"
    env = {A_ENV: repr(spec.a_ms), B_ENV: repr(spec.b_ms)}
    # The latency teacher is the same command line under a prefix that delays each request.
    prefix = [sys.executable, "-m", "distill_reader.bench.teachers", "--latency-ms", repr(spec.latency_ms), "--"]
    with TeacherProcesses(model, env) as teachers:
        for _ in range(count):
            teachers.start(
                None,
                "--max-batch",
                str(spec.max_batch),
                "--instances",
                "1",
                prefix=prefix if spec.latency_ms > 0 else (),
                wait=False,
            )
        teachers.wait_ready()
        yield list(teachers.processes)


@contextlib.contextmanager
def config_for(servers: Sequence[str], conf: str = "") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as directory:
        yield write_config(directory, servers, conf)


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Rate:
    """Rows and steps counted over ``seconds`` of the measuring window."""

    rows: int
    steps: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def measure_batches(
    batches: Iterator[Sequence[np.ndarray]],
    warmup_s: float,
    measure_s: float,
    step: Callable[[Sequence[np.ndarray]], None] | None = None,
) -> Rate:
    """Consume ``batches`` (running ``step`` on each) for ``warmup_s + measure_s``; the window's rate."""
    start = time.perf_counter()
    t0: float | None = None
    rows = steps = 0
    now = start
    for batch in batches:
        if step is not None:
            step(batch)
        now = time.perf_counter()
        if t0 is None:
            if now - start >= warmup_s:
                t0 = now
            continue
        rows += len(batch[0])
        steps += 1
        if now - t0 >= measure_s:
            break
    if t0 is None:
        raise RuntimeError("the batches ended before the measuring window began")
    return Rate(rows, steps, now - t0)


def measure_reader(
    servers: Sequence[str],
    batch_size: int,
    d_batch_size: int,
    sizes: Sizes,
    *,
    capacity: int = 4,
    occupied_capacity: int = 2,
    step: Callable[[Sequence[np.ndarray]], None] | None = None,
    list_size: int = 64,
    conf: str = "",
    **options: Any,
) -> Rate:
    """DistillReader's rate over ``servers`` on an endless epoch of MNIST-sized sample lists
    (``conf``: more ``[conf]`` lines, e.g. ``shared_memory = on``)."""
    from distill_reader import DistillReader

    with config_for(servers, conf) as path:
        reader = DistillReader(path, batch_size, d_batch_size, capacity, occupied_capacity, **options)
        try:
            reader.set_sample_list_generator(sample_list_reader(list_size))
            epoch = reader.distill_reader()()
            try:
                return measure_batches(epoch, sizes.warmup_s, sizes.measure_s, step)
            finally:
                epoch.close()
        finally:
            reader.close()


def _infer_request(rows: int, model_name: str = "teacher") -> Any:
    from tritonclient.grpc import service_pb2

    img = np.zeros((rows, *IMG_SHAPE), dtype=np.float32)
    return service_pb2.ModelInferRequest(
        model_name=model_name,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="img", datatype="FP32", shape=img.shape)],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="prediction")],
        raw_input_contents=[img.tobytes()],
    )


def bare_client_rate(endpoint: str, rows: int, concurrency: int, warmup_s: float, measure_s: float) -> Rate:
    """A bare asyncio OIP client: ``concurrency`` loops sending ``rows``-row requests back to back."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from distill_reader.teacher.client import CHANNEL_OPTIONS

    async def run() -> Rate:
        request = _infer_request(rows)
        counted = [0]
        state = {"t0": None, "end": None}

        async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def loop() -> None:
                while state["end"] is None or time.perf_counter() < state["end"]:
                    response = await stub.ModelInfer(request)
                    np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
                    if state["t0"] is not None and time.perf_counter() < state["end"]:
                        counted[0] += rows

            async def clock() -> None:
                await asyncio.sleep(warmup_s)
                t0 = time.perf_counter()
                state["t0"], state["end"] = t0, t0 + measure_s

            await asyncio.gather(clock(), *(loop() for _ in range(concurrency)))
        return Rate(counted[0], 0, measure_s)

    return asyncio.run(run())


def naive_rate(servers: Sequence[str], batch_size: int, sizes: Sizes) -> Rate:
    """What users write today: one synchronous teacher call per batch, in the training loop."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channels = [grpc.insecure_channel(s) for s in servers]
    stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
    requested = [service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="prediction")]

    def with_teacher(batches: Iterator[list[np.ndarray]]) -> Iterator[list[np.ndarray]]:
        for i, (img, label) in enumerate(batches):
            request = service_pb2.ModelInferRequest(
                model_name="teacher",
                inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="img", datatype="FP32", shape=img.shape)],
                outputs=requested,
                raw_input_contents=[img.tobytes()],
            )
            response = stubs[i % len(stubs)].ModelInfer(request, timeout=30)
            prediction = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(len(img), -1)
            yield [img, label, prediction]

    try:
        return measure_batches(with_teacher(plain_batches(batch_size)), sizes.warmup_s, sizes.measure_s)
    finally:
        for channel in channels:
            channel.close()


def describe_machine() -> dict[str, Any]:
    """CPU count and model, memory, Python: printed with the results."""
    import platform

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
