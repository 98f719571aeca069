"""Scenario 4 (transport ceiling) and 7 (scaling with d_batch_size): one zero-cost teacher.

The teacher answers at once, so what limits the rate is the transport: the user's reader, the
pool, gRPC, the server. The ceiling is a bare asyncio OIP client hammering the same server in the
same run with pre-built requests of the same rows: the best of 4 and of 16 requests in flight.
Samples are MNIST-sized (1×28×28 float32 in, 10 float32 out) and the user's reader yields lists
of 64 samples. DistillReader: batch_size 256, capacity 4, occupied_capacity 2, default options.

The reader is measured over both transports (``[conf] shared_memory = off``: tensors in the gRPC
messages; ``on``: the teacher maps the pool, requests carry offsets), with the CPU each side spends
per sample: the reader (training process + pipeline process) and the teacher process.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill_reader.bench.harness import (
    Progress,
    Row,
    Sizes,
    TeacherSpec,
    bare_client_rate,
    measure_reader,
    teacher_processes,
)

ZERO = TeacherSpec(model="zero_cost", max_batch=64)
BATCH_SIZE = 256
D_BATCH_SIZE = 64
BARE_CONCURRENCY = (4, 16)
TARGET = 0.9


def ceiling(endpoint: str, rows: int, sizes: Sizes) -> tuple[float, dict[str, float]]:
    """The bare client's best rows/s over :data:`BARE_CONCURRENCY`, and each one's."""
    rates = {
        str(c): bare_client_rate(endpoint, rows, c, min(sizes.warmup_s, 0.5), sizes.measure_s).rows_per_s
        for c in BARE_CONCURRENCY
    }
    return max(rates.values()), rates


SHM_TARGET = 1.0
TRANSPORTS = {"gRPC": "shared_memory = off", "shared memory": "shared_memory = on"}
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(marker: str) -> list[int]:
    """This process's children whose command line contains ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if ppid == os.getpid() and marker.encode() in fh.read():
                    pids.append(int(entry))
    return pids


class CpuMeter:
    """CPU µs per sample of the reader's side (this process and its pipeline process) and of the
    teacher process, between the first and the last batch after ``warmup_s`` (a ``step`` callback)."""

    def __init__(self, warmup_s: float) -> None:
        self._start = time.perf_counter()
        self._warmup_s = warmup_s
        self._first: tuple[float, float] | None = None
        self._last: tuple[float, float] | None = None
        self._rows = 0
        self._pipeline: list[int] = []
        self._teachers: list[int] = []

    def _sample(self) -> tuple[float, float]:
        reader = time.process_time() + sum(_cpu_seconds(p) for p in self._pipeline)
        return reader, sum(_cpu_seconds(p) for p in self._teachers)

    def __call__(self, batch: Sequence[np.ndarray]) -> None:
        if time.perf_counter() - self._start < self._warmup_s:
            return
        if self._first is None:  # the processes are looked up once: scanning /proc costs
            self._pipeline = _children("distill_reader.reader")
            self._teachers = _children("bench.teachers")
            self._first = self._sample()
            return
        self._rows += len(batch[0])
        self._last = self._sample()

    def us_per_sample(self) -> dict[str, float]:
        if self._first is None or self._last is None or not self._rows:
            return {}
        return {
            side: round((last - first) / self._rows * 1e6, 1)
            for side, first, last in zip(("reader", "teacher"), self._first, self._last)
        }


def bare_cpu(endpoint: str, rows: int, sizes: Sizes) -> tuple[float, dict[str, float]]:
    """The bare client's rate at 16 in flight, and CPU µs per sample of it and of the teacher."""
    teachers = _children("bench.teachers")
    before = time.process_time(), sum(_cpu_seconds(p) for p in teachers)
    warmup = min(sizes.warmup_s, 0.5)
    rate = bare_client_rate(endpoint, rows, BARE_CONCURRENCY[-1], warmup, sizes.measure_s)
    after = time.process_time(), sum(_cpu_seconds(p) for p in teachers)
    total_rows = rate.rows * (warmup + sizes.measure_s) / sizes.measure_s  # the warm-up ran at the same rate
    cpu = {side: round((b - a) / total_rows * 1e6, 1) for side, a, b in zip(("client", "teacher"), before, after)}
    return rate.rows_per_s, cpu


def _reader_row(
    scenario: str, name: str, servers: list[str], d: int, sizes: Sizes, best: float, rates: dict, target: float | None
) -> Row:
    meter = CpuMeter(sizes.warmup_s)
    rate = measure_reader(
        servers, BATCH_SIZE, d, sizes, capacity=4, occupied_capacity=2, step=meter, conf=TRANSPORTS[name]
    )
    return Row(
        scenario,
        f"DistillReader over {name}, d_batch_size {d}",
        rate.rows_per_s,
        best,
        "samples/s",
        rate.rows_per_s / best,
        target,
        limit_label="bare async client",
        details={
            "batch_size": BATCH_SIZE,
            "d_batch_size": d,
            "transport": name,
            "bare_by_concurrency": rates,
            "cpu_us_per_sample": meter.us_per_sample(),
        },
    )


def transport(sizes: Sizes, progress: Progress) -> list[Row]:
    """DistillReader's samples/s ÷ the bare client's, d_batch_size 64, over gRPC and over shared
    memory, with CPU µs per sample on each side."""
    progress("transport: starting a zero-cost teacher")
    with teacher_processes(ZERO, 1) as servers:
        progress("transport: bare asyncio OIP client")
        best, rates = ceiling(servers[0], D_BATCH_SIZE, sizes)
        _, bare = bare_cpu(servers[0], D_BATCH_SIZE, sizes)
        rows = []
        for name, target in (("gRPC", TARGET), ("shared memory", SHM_TARGET)):
            progress(f"transport: DistillReader over {name}")
            rows.append(_reader_row("transport", name, servers, D_BATCH_SIZE, sizes, best, rates, target))
    for row in rows:
        row.details["bare_cpu_us_per_sample"] = bare
    return rows


def dbatch_scaling(sizes: Sizes, progress: Progress, plot: str | Path | None = None) -> list[Row]:
    """Scenario 4 for d_batch_size 1 … 256; writes a PNG to ``plot`` when given (needs matplotlib)."""
    rows: list[Row] = []
    progress("dbatch-scaling: starting a zero-cost teacher")
    with teacher_processes(ZERO, 1) as servers:
        for d in sizes.d_batch_sizes:
            progress(f"dbatch-scaling: d_batch_size {d}: bare client")
            best, rates = ceiling(servers[0], d, sizes)
            for name in TRANSPORTS:
                progress(f"dbatch-scaling: d_batch_size {d}: DistillReader over {name}")
                rows.append(_reader_row("dbatch-scaling", name, servers, d, sizes, best, rates, None))
    if plot is not None:
        with contextlib.suppress(ImportError):
            write_plot(rows, plot)
            progress(f"dbatch-scaling: plot written to {plot}")
    return rows


def write_plot(rows: list[Row], path: str | Path) -> None:
    """Samples/s of DistillReader and of the bare client against d_batch_size, and their ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the d_batch_size plot needs matplotlib: pip install matplotlib") from exc
    grpc_rows = [r for r in rows if r.details.get("transport", "gRPC") == "gRPC"]
    shm_rows = [r for r in rows if r.details.get("transport") == "shared memory"]
    d = [r.details["d_batch_size"] for r in grpc_rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(d, [r.measured for r in grpc_rows], "o-", label="DistillReader over gRPC")
    if shm_rows:
        top.plot(d, [r.measured for r in shm_rows], "^-", label="DistillReader over shared memory")
    top.plot(d, [r.limit for r in grpc_rows], "s--", label="bare async OIP client (best of 4, 16 in flight)")
    top.set_yscale("log")
    top.set_ylabel("samples/s")
    top.set_title("Zero-cost teacher, MNIST-sized samples, batch_size 256")
    top.legend()
    top.grid(True, which="both", alpha=0.3)
    bottom.plot(d, [r.ratio for r in grpc_rows], "o-", color="tab:green", label="gRPC")
    if shm_rows:
        bottom.plot(d, [r.ratio for r in shm_rows], "^-", color="tab:purple", label="shared memory")
    bottom.axhline(TARGET, color="grey", linestyle=":", label=f"target {TARGET}")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(d)
    bottom.set_xticklabels([str(x) for x in d])
    bottom.set_xlabel("d_batch_size (rows per request)")
    bottom.set_ylabel("ratio")
    bottom.legend()
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
