"""Scenario 5: the naive loop users write today — one synchronous teacher call per batch, in the loop.

Measured on scenario 1 (simulated GPU teachers, the naive loop taking them in turn, whole training
batches per call) and on scenario 4 (one zero-cost teacher). The figure is our speedup.
"""

from __future__ import annotations

from distill_reader.bench import teacher_bound, transport
from distill_reader.bench.harness import Progress, Row, Sizes, measure_reader, naive_rate, teacher_processes


def naive_loop(sizes: Sizes, progress: Progress) -> list[Row]:
    """DistillReader's samples/s ÷ the naive loop's on the same teachers."""
    rows: list[Row] = []
    n = 2 if sizes.quick else 4
    setup = teacher_bound.SIZED
    progress(f"naive-loop: starting {n} simulated teachers")
    with teacher_processes(teacher_bound.GPU, n) as servers:
        progress("naive-loop: naive loop on the simulated teachers")
        naive = naive_rate(servers, setup.batch_size, sizes)
        progress("naive-loop: DistillReader on the simulated teachers")
        ours = measure_reader(
            servers,
            setup.batch_size,
            setup.d_batch_size,
            sizes,
            capacity=setup.capacity,
            occupied_capacity=setup.occupied_capacity,
        )
    rows.append(
        Row(
            "naive-loop",
            f"scenario 1, N={n}, batch_size {setup.batch_size}",
            ours.rows_per_s,
            naive.rows_per_s,
            "samples/s",
            ours.rows_per_s / naive.rows_per_s,
            None,
            limit_label="naive loop",
            details={
                "teachers": n,
                "capacity_rows_per_s": n * teacher_bound.GPU.capacity,
                "batch_size": setup.batch_size,
                "d_batch_size": setup.d_batch_size,
            },
        )
    )
    progress("naive-loop: starting a zero-cost teacher")
    with teacher_processes(transport.ZERO, 1) as servers:
        progress("naive-loop: naive loop on the zero-cost teacher")
        naive = naive_rate(servers, transport.BATCH_SIZE, sizes)
        progress("naive-loop: DistillReader on the zero-cost teacher")
        ours = measure_reader(
            servers, transport.BATCH_SIZE, transport.D_BATCH_SIZE, sizes, capacity=4, occupied_capacity=2
        )
    rows.append(
        Row(
            "naive-loop",
            f"scenario 4, batch_size {transport.BATCH_SIZE}",
            ours.rows_per_s,
            naive.rows_per_s,
            "samples/s",
            ours.rows_per_s / naive.rows_per_s,
            None,
            limit_label="naive loop",
            details={"teachers": 1, "batch_size": transport.BATCH_SIZE, "d_batch_size": transport.D_BATCH_SIZE},
        )
    )
    return rows
