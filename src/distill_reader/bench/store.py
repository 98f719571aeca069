"""``distill bench store``: what the knowledge store ([store], docs/store.md) costs and delivers.

* **write**: rows/s from 2 simulated GPU teachers (the teacher-bound scenario's, ``sized`` reader:
  128/32, pool 16/2) with ``policy = write`` ÷ the same run without a store, alternated
  (without, with; twice in a full run). Target ≥ 0.95.
* **read**: rows/s a reader with ``policy = read`` delivers (column-wise batches of 256 rows,
  ``copy=False``, ``key_var = id``, one endless epoch over the captured samples) from a store of
  rows of 1,024 tokens (packed, fixed shapes) with their top-16 (``float16`` values, ``int32``
  indices: 98 KB per row, where reading a store is about its bytes) ÷ rows/s of reading the same
  chunk files with pyarrow's own IPC reader (``read_all`` from an OS file, the columns as numpy:
  the physical bound), both with the files in the page cache, in turns (3 × 2 s each; the
  reader paused while pyarrow reads). Target ≥ 0.8. The same for
  variable-length rows of 256-1,024 tokens (61 KB per row), reported: there the reader's feeder,
  which writes every row into the pool one by one, bounds the rate before the store does. Each
  store is captured first with a zero-cost simulated sequence teacher (not timed).
* **bytes per row**: the store's chunk bytes per row ÷ the pool's bytes per row (every var at
  ``max_length``), for both configs (reported).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from distill_reader.bench.harness import (
    CONFIG,
    Progress,
    Row,
    Sizes,
    TeacherSpec,
    measure_batches,
    sample_list_reader,
    teacher_processes,
)
from distill_reader.bench.sequence import sequence_config
from distill_reader.bench.teacher_bound import GPU, SIZED
from distill_reader.bench.teachers import IMG_SHAPE, N_CLASSES, SEQ_K
from distill_reader.knowledge.commands import summarize
from distill_reader.knowledge.layout import chunk_files

WRITE_TARGET = 0.95
READ_TARGET = 0.8
TEACHERS = 2
MIN_LENGTH, MAX_LENGTH = 256, 1024
READ_BATCH = 256
ZERO_COST_SEQUENCE = TeacherSpec(model="simulated_sequence_gpu", max_batch=64)


def _store_section(path: Path, policy: str) -> str:
    return f"\n[store]\npath = {path}\npolicy = {policy}\n"


def _pool_bytes_per_row(conf: Path) -> int:
    from distill_reader.config import load_config

    return sum(spec.sample_nbytes for spec in load_config(conf).pool_specs)


# -- write --------------------------------------------------------------------------------------


def _teacher_bound_rate(conf: Path, sizes: Sizes) -> float:
    from distill_reader import DistillReader

    reader = DistillReader(conf, SIZED.batch_size, SIZED.d_batch_size, SIZED.capacity, SIZED.occupied_capacity)
    try:
        reader.set_sample_list_generator(sample_list_reader(64))
        epoch = reader.distill_reader()()
        try:
            return measure_batches(epoch, sizes.warmup_s, sizes.measure_s).rows_per_s
        finally:
            epoch.close()
    finally:
        reader.close()


def _write_rows(directory: Path, sizes: Sizes, progress: Progress) -> list[Row]:
    progress(f"store: starting {TEACHERS} simulated GPU teachers")
    with teacher_processes(GPU, TEACHERS) as servers:
        base = CONFIG.format(servers=servers, img_shape=IMG_SHAPE, n_classes=N_CLASSES)
        plain = directory / "plain.conf"
        plain.write_text(base)
        with_store = directory / "write.conf"
        with_store.write_text(base + _store_section(directory / "mnist-store", "write"))
        without = written = 0.0
        rounds = 1 if sizes.quick else 2
        for round_ in range(rounds):
            progress(f"store: teacher-bound without a store (round {round_ + 1})")
            without += _teacher_bound_rate(plain, sizes)
            progress(f"store: teacher-bound with policy = write (round {round_ + 1})")
            written += _teacher_bound_rate(with_store, sizes)
    without, written = without / rounds, written / rounds
    summary = summarize(directory / "mnist-store")
    pool = _pool_bytes_per_row(with_store)
    details = {"teachers": TEACHERS, "a_ms": GPU.a_ms, "b_ms": GPU.b_ms, "batch_size": SIZED.batch_size}
    return [
        Row(
            "store",
            f"write: samples/s with policy = write, {TEACHERS} GPU teachers",
            written,
            without,
            "samples/s",
            written / without,
            WRITE_TARGET,
            limit_label="the same run without a store",
            details={**details, "rows_recorded": summary.rows},
        ),
        Row(
            "store",
            "bytes per row, MNIST-sized (prediction: 10 float32)",
            summary.bytes_per_row,
            pool,
            "B/row",
            summary.bytes_per_row / pool,
            limit_label="the pool's bytes per row",
            details={"store_bytes": summary.bytes, "rows": summary.rows},
        ),
    ]


# -- read ---------------------------------------------------------------------------------------


def _token_batches(count: int, packed: bool) -> list[list]:
    """Column-wise batches of ``count`` token rows and their ids: rows of :data:`MAX_LENGTH` tokens
    (``packed``) or of :data:`MIN_LENGTH`-:data:`MAX_LENGTH` tokens, uniform (a list of rows)."""
    rng = np.random.default_rng(0)
    ids = np.arange(count, dtype=np.int64).reshape(-1, 1)
    if packed:
        tokens = rng.integers(1, 1000, size=(count, MAX_LENGTH), dtype=np.int64)
        return [[tokens[i : i + READ_BATCH], ids[i : i + READ_BATCH]] for i in range(0, count, READ_BATCH)]
    rows = [rng.integers(1, 1000, size=n, dtype=np.int64) for n in rng.integers(MIN_LENGTH, MAX_LENGTH + 1, count)]
    return [[rows[i : i + READ_BATCH], ids[i : i + READ_BATCH]] for i in range(0, count, READ_BATCH)]


def _config(servers: list[str], packed: bool) -> str:
    text = sequence_config(servers, MAX_LENGTH, SEQ_K)
    if packed:  # every row MAX_LENGTH tokens: fixed shapes
        text = text.replace("(-1,)", f"({MAX_LENGTH},)").replace(f"(-1, {SEQ_K})", f"({MAX_LENGTH}, {SEQ_K})")
    return text


def _read_rates(conf: Path, path: Path, batches: list[list], sizes: Sizes) -> tuple[float, float]:
    """Rows/s of a reader over ``batches`` again and again (one endless epoch; keys: ``id``), and of
    :func:`pyarrow_read_rate` on the store's files, measured in turns (the reader paused while
    pyarrow reads): a busy machine slows both alike."""
    from distill_reader import DistillReader

    def endless() -> Iterator[list]:
        while True:
            yield from batches

    turns = 1 if sizes.quick else 3
    window = sizes.measure_s / turns
    names = ["logits_topk_values", "logits_topk_indices"]
    rows = bound_rows = 0
    seconds = bound_seconds = 0.0
    with DistillReader(conf, READ_BATCH, 16, capacity=4, occupied_capacity=1) as reader:
        reader.set_batch_generator(endless)
        epoch = reader.distill_reader()()
        try:
            measure_batches(epoch, sizes.warmup_s, 0.0)  # the pipeline process starts, the index is built
            for _ in range(turns):
                got, took = pyarrow_read_rate(path, names, window)
                bound_rows, bound_seconds = bound_rows + got, bound_seconds + took
                for _ in range(4):  # the batches the pool filled while the reader was paused
                    next(epoch)
                rate = measure_batches(epoch, 0.0, window)
                rows, seconds = rows + rate.rows, seconds + rate.seconds
        finally:
            epoch.close()
    return rows / seconds, bound_rows / bound_seconds


def pyarrow_read_rate(path: Path, fetch_names: list[str], min_seconds: float) -> tuple[int, float]:
    """Rows read, and seconds, reading every chunk of the store at ``path`` again and again for
    ``min_seconds`` with pyarrow's IPC reader from OS files into memory, each output column as
    numpy (what any tool reading the files pays)."""

    def read_all() -> int:
        rows = 0
        for file in chunk_files(path):
            with pa.OSFile(str(file), "rb") as source:
                table = pa.ipc.open_file(source).read_all()
            for name in fetch_names:
                for values in table.column(name).chunks:
                    while not pa.types.is_primitive(values.type) and not pa.types.is_floating(values.type):
                        values = values.values  # (fixed_size_)list<...>: down to the flat values
                    values.to_numpy()
            rows += table.num_rows
        return rows

    read_all()  # the page cache warm, as for the reader
    rows, started = 0, time.perf_counter()
    while True:
        rows += read_all()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return rows, elapsed


def _read_rows(directory: Path, sizes: Sizes, progress: Progress) -> list[Row]:
    from distill_reader import DistillReader

    rows: list[Row] = []
    for packed in (True, False):
        count = 256 if sizes.quick else (1024 if packed else 2048)
        what = f"rows of {MAX_LENGTH} tokens" if packed else f"rows of {MIN_LENGTH}-{MAX_LENGTH} tokens"
        batches = _token_batches(count, packed)
        path = directory / ("packed" if packed else "variable")
        progress(f"store: capturing {count} {what}, top-{SEQ_K} (zero-cost teacher)")
        keyed = _store_section(path, "write") + "key_var = id\n"
        with teacher_processes(ZERO_COST_SEQUENCE, 1) as servers:
            capture = directory / "capture.conf"
            capture.write_text(_config(servers, packed) + keyed)
            with DistillReader(capture, READ_BATCH, 16, capacity=4, occupied_capacity=1) as reader:
                reader.set_batch_generator(lambda: iter(batches))  # noqa: B023 - used at once
                for _ in reader.distill_reader()():
                    pass
        read_conf = directory / "read.conf"
        read_conf.write_text(_config(["127.0.0.1:1"], packed) + keyed.replace("policy = write", "policy = read"))
        progress(f"store: {what}: pyarrow reading the chunk files, then a reader with policy = read")
        rate, bound = _read_rates(read_conf, path, batches, sizes)
        summary = summarize(path)
        pool = _pool_bytes_per_row(read_conf)
        details = {"rows": count, "packed": packed, "k": SEQ_K, "store_bytes": summary.bytes, "batch_size": READ_BATCH}
        rows.append(
            Row(
                "store",
                f"read: {what}, top-{SEQ_K} ({summary.bytes_per_row / 1000:,.0f} KB per row)",
                rate,
                bound,
                "rows/s",
                rate / bound,
                READ_TARGET if packed else None,
                limit_label="pyarrow reading the same files",
                details=details,
            )
        )
        rows.append(
            Row(
                "store",
                f"bytes per row, {what}, top-{SEQ_K}",
                summary.bytes_per_row,
                pool,
                "B/row",
                summary.bytes_per_row / pool,
                limit_label=f"the pool's bytes per row (max_length {MAX_LENGTH})",
                details=details,
            )
        )
    return rows


def store(sizes: Sizes, progress: Progress) -> list[Row]:
    """write ÷ no store (teacher-bound), read ÷ pyarrow on the same files, bytes per row ÷ the pool's."""
    with tempfile.TemporaryDirectory(prefix="distill-bench-store-") as directory:
        return _write_rows(Path(directory), sizes, progress) + _read_rows(Path(directory), sizes, progress)
