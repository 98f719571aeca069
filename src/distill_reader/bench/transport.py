"""Scenario 4 (transport ceiling) and 7 (scaling with d_batch_size): one zero-cost teacher.

The teacher answers at once, so what limits the rate is the transport: the user's reader, the
pool, gRPC, the server. The ceiling is a bare asyncio OIP client hammering the same server in the
same run with pre-built requests of the same rows: the best of 4 and of 16 requests in flight.
Samples are MNIST-sized (1×28×28 float32 in, 10 float32 out) and the user's reader yields lists
of 64 samples. DistillReader: batch_size 256, capacity 4, occupied_capacity 2, default options.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

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


def transport(sizes: Sizes, progress: Progress) -> list[Row]:
    """DistillReader's samples/s ÷ the bare client's, d_batch_size 64."""
    progress("transport: starting a zero-cost teacher")
    with teacher_processes(ZERO, 1) as servers:
        progress("transport: bare asyncio OIP client")
        best, rates = ceiling(servers[0], D_BATCH_SIZE, sizes)
        progress("transport: DistillReader")
        rate = measure_reader(servers, BATCH_SIZE, D_BATCH_SIZE, sizes, capacity=4, occupied_capacity=2)
    return [
        Row(
            "transport",
            f"zero-cost teacher, MNIST samples, d_batch_size {D_BATCH_SIZE}",
            rate.rows_per_s,
            best,
            "samples/s",
            rate.rows_per_s / best,
            TARGET,
            limit_label="bare async client",
            details={"batch_size": BATCH_SIZE, "d_batch_size": D_BATCH_SIZE, "bare_by_concurrency": rates},
        )
    ]


def dbatch_scaling(sizes: Sizes, progress: Progress, plot: str | Path | None = None) -> list[Row]:
    """Scenario 4 for d_batch_size 1 … 256; writes a PNG to ``plot`` when given (needs matplotlib)."""
    rows: list[Row] = []
    progress("dbatch-scaling: starting a zero-cost teacher")
    with teacher_processes(ZERO, 1) as servers:
        for d in sizes.d_batch_sizes:
            progress(f"dbatch-scaling: d_batch_size {d}: bare client")
            best, rates = ceiling(servers[0], d, sizes)
            progress(f"dbatch-scaling: d_batch_size {d}: DistillReader")
            rate = measure_reader(servers, BATCH_SIZE, d, sizes, capacity=4, occupied_capacity=2)
            rows.append(
                Row(
                    "dbatch-scaling",
                    f"d_batch_size {d}",
                    rate.rows_per_s,
                    best,
                    "samples/s",
                    rate.rows_per_s / best,
                    None,
                    limit_label="bare async client",
                    details={"batch_size": BATCH_SIZE, "d_batch_size": d, "bare_by_concurrency": rates},
                )
            )
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
    d = [r.details["d_batch_size"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(d, [r.measured for r in rows], "o-", label="DistillReader")
    top.plot(d, [r.limit for r in rows], "s--", label="bare async OIP client (best of 4, 16 in flight)")
    top.set_yscale("log")
    top.set_ylabel("samples/s")
    top.set_title("Zero-cost teacher, MNIST-sized samples, batch_size 256")
    top.legend()
    top.grid(True, which="both", alpha=0.3)
    bottom.plot(d, [r.ratio for r in rows], "o-", color="tab:green")
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
