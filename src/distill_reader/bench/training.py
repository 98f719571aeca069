"""Scenario 3: the training loop's overhead — steps/s with DistillReader ÷ steps/s with a plain reader.

The training step is simulated: it reads the batch (as a host-to-device copy would) and then waits
until a fixed :data:`STEP_MS` has passed since it began (a GPU-bound step costs the host little CPU).
The plain reader collates the same samples into batches in the loop, as ``paddle.batch`` or a
DataLoader with no workers would. Two teachers with spare capacity (2.4 × what training needs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from distill_reader.bench.harness import (
    Progress,
    Row,
    Sizes,
    TeacherSpec,
    measure_batches,
    measure_reader,
    plain_batches,
    teacher_processes,
)

STEP_MS = 40.0
BATCH_SIZE = 128
D_BATCH_SIZE = 32
TEACHERS = 2
#: a = 10 ms, b = 0.1 ms/row: 3,902 rows/s per teacher; two of them 7,805 rows/s against the
#: 3,200 rows/s that 128-row steps of 40 ms take.
FAST_GPU = TeacherSpec(model="simulated_gpu", a_ms=10.0, b_ms=0.1, max_batch=64)
TARGET = 0.97


def training_step(batch: Sequence[np.ndarray]) -> None:
    """Touch every array of the batch, then wait out the rest of :data:`STEP_MS`."""
    deadline = time.perf_counter() + STEP_MS / 1000.0
    for array in batch:
        float(array.sum())
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


def training_overhead(sizes: Sizes, progress: Progress) -> list[Row]:
    """Steps/s with DistillReader ÷ steps/s with the plain reader, same step, same samples."""
    progress("training-overhead: starting 2 simulated teachers")
    with teacher_processes(FAST_GPU, TEACHERS) as servers:
        progress("training-overhead: plain reader")
        plain = measure_batches(plain_batches(BATCH_SIZE), sizes.warmup_s, sizes.measure_s, training_step)
        progress("training-overhead: DistillReader")
        distill = measure_reader(
            servers, BATCH_SIZE, D_BATCH_SIZE, sizes, capacity=4, occupied_capacity=2, step=training_step
        )
    return [
        Row(
            "training-overhead",
            f"{STEP_MS:g} ms steps of {BATCH_SIZE} rows, {TEACHERS} teachers with spare capacity",
            distill.steps_per_s,
            plain.steps_per_s,
            "steps/s",
            distill.steps_per_s / plain.steps_per_s,
            TARGET,
            limit_label="plain reader",
            details={
                "step_ms": STEP_MS,
                "batch_size": BATCH_SIZE,
                "d_batch_size": D_BATCH_SIZE,
                "capacity": 4,
                "occupied_capacity": 2,
                "teachers": TEACHERS,
                "teacher_capacity": TEACHERS * FAST_GPU.capacity,
                "ideal_steps_per_s": 1000.0 / STEP_MS,
            },
        )
    ]
