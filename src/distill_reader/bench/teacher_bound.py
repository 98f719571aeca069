"""Scenarios 1 and 2: teacher-bound throughput, without and with network latency.

N simulated GPU teachers (:func:`distill_reader.bench.teachers.simulated_gpu`, ``a + b·n`` ms per
batch, one batch at a time, the server's default ``--max-batch 64`` and ``--max-delay-ms 2``).
Their combined capacity is exact: ``N · 64 / (a + 64·b)`` rows/s. The figure is the rows/s the
consumer of :class:`~distill_reader.DistillReader` receives, divided by that capacity.

Two reader setups, both with every keyword option at its default (``max_in_flight=4`` ...):

* ``guide``: the seed guide's sizes, ``DistillReader(conf, 32, 4, capacity=4, occupied_capacity=2)``:
  what a user who copies the guide gets;
* ``sized``: ``DistillReader(conf, 128, 32, capacity=16, occupied_capacity=2)``: d_batches of half
  the teacher's max batch, so the default 4 requests in flight per teacher hold two teacher
  batches (one running, one queued), and a pool that holds what is in flight for 8 teachers.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill_reader.bench.harness import Progress, Row, Sizes, TeacherSpec, measure_reader, teacher_processes

#: The simulated GPU: a = 50 ms, b = 0.5 ms/row: one teacher serves 64 rows in 82 ms = 780 rows/s;
#: 8 teachers 6,244 rows/s, about 200 requests/s of 32 rows: little CPU for a 2-core machine.
GPU = TeacherSpec(model="simulated_gpu", a_ms=50.0, b_ms=0.5, max_batch=64)
LATENCY_MS = 20.0
TARGET = 0.95


@dataclass(frozen=True)
class Setup:
    name: str
    batch_size: int
    d_batch_size: int
    capacity: int
    occupied_capacity: int

    def describe(self) -> str:
        return f"{self.batch_size}/{self.d_batch_size}, pool {self.capacity}/{self.occupied_capacity}"


GUIDE = Setup("guide", 32, 4, 4, 2)
SIZED = Setup("sized", 128, 32, 16, 2)
SETUPS = (SIZED, GUIDE)


def _run(scenario: str, spec: TeacherSpec, sizes: Sizes, progress: Progress) -> list[Row]:
    counts = sizes.teacher_counts
    rows: list[Row] = []
    progress(f"{scenario}: starting {max(counts)} simulated teachers")
    with teacher_processes(spec, max(counts)) as servers:
        for setup in SETUPS:
            for n in counts:
                progress(f"{scenario}: {n} teacher(s), {setup.name} sizes ({setup.describe()})")
                rate = measure_reader(
                    servers[:n],
                    setup.batch_size,
                    setup.d_batch_size,
                    sizes,
                    capacity=setup.capacity,
                    occupied_capacity=setup.occupied_capacity,
                )
                limit = n * spec.capacity
                rows.append(
                    Row(
                        scenario,
                        f"N={n}, {setup.name} ({setup.describe()})",
                        rate.rows_per_s,
                        limit,
                        "samples/s",
                        rate.rows_per_s / limit,
                        TARGET,
                        limit_label="teachers' capacity",
                        details={
                            "teachers": n,
                            "setup": setup.name,
                            "batch_size": setup.batch_size,
                            "d_batch_size": setup.d_batch_size,
                            "capacity": setup.capacity,
                            "occupied_capacity": setup.occupied_capacity,
                            "a_ms": spec.a_ms,
                            "b_ms": spec.b_ms,
                            "max_batch": spec.max_batch,
                            "latency_ms": spec.latency_ms,
                            "seconds": rate.seconds,
                        },
                    )
                )
    return rows


def teacher_bound(sizes: Sizes, progress: Progress) -> list[Row]:
    """Scenario 1: rows/s delivered ÷ the N teachers' combined capacity, N = 1, 2, 4, 8."""
    return _run("teacher-bound", GPU, sizes, progress)


def latency(sizes: Sizes, progress: Progress) -> list[Row]:
    """Scenario 2: the same with 20 ms of network latency added to every request."""
    spec = TeacherSpec(model=GPU.model, a_ms=GPU.a_ms, b_ms=GPU.b_ms, max_batch=GPU.max_batch, latency_ms=LATENCY_MS)
    return _run("latency", spec, sizes, progress)
