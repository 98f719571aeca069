"""Scenario 6: memory — bounded by the pool and flat across epochs.

The seed guide's example runs as its own training process (``python -m distill_reader.bench.memory``):
lists of 8 MNIST-sized samples, 24 times and then 2 (194 samples an epoch),
``DistillReader(conf, 32, 4, capacity=4, occupied_capacity=2)``, 300 epochs, against one
zero-cost teacher. It reads, from ``/proc``, the resident set (``VmRSS``) and its peak (``VmHWM``)
of itself and of its pipeline process, and the shared memory both map (the pool's file, nameless
but mapped: ``/dev/shm/#INODE (deleted)`` for an ``O_TMPFILE`` pool, ``/dev/shm/distill-reader-*
(deleted)`` where the system has none, in ``/proc/PID/maps``).

Figures: shared memory in use ÷ ``capacity × batch bytes``; total RSS and total peak RSS after
the last epoch ÷ the same after a warm-up of a tenth of the epochs (target: < 2 % growth).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from distill_reader.bench.harness import (
    Progress,
    Row,
    Sizes,
    TeacherSpec,
    batch_bytes,
    config_for,
    make_samples,
    teacher_processes,
)

BATCH_SIZE, D_BATCH_SIZE, CAPACITY, OCCUPIED = 32, 4, 4, 2
GROWTH_TARGET = 1.02


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssShmem of ``pid`` in bytes (missing fields are 0)."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssShmem"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _pool_mapped(pid: int) -> int:
    """Bytes of the reader's shared-memory pool mapped by ``pid``."""
    total = 0
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if "distill-reader-" in line or "/dev/shm/#" in line:
            start, end = line.split()[0].split("-")
            total += int(end, 16) - int(start, 16)
    return total


def snapshot() -> dict[str, int]:
    """This process and its children: RSS, peak RSS and the pool's mapped bytes (per process, max)."""
    pids = [os.getpid(), *_children(os.getpid())]
    stats = [_status(p) for p in pids]
    return {
        "processes": len(pids),
        "rss": sum(s.get("VmRSS", 0) for s in stats),
        "peak_rss": sum(s.get("VmHWM", 0) for s in stats),
        "rss_shmem": sum(s.get("RssShmem", 0) for s in stats),
        "pool_mapped": max((_pool_mapped(p) for p in pids), default=0),
    }


def student_main(argv: list[str] | None = None) -> int:
    """The training process: the seed guide's example; prints one JSON line with the snapshots."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--conf", required=True)
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args(argv)
    from distill_reader import DistillReader

    samples = make_samples(8)

    def _reader():
        for _ in range(24):
            yield samples
        yield samples[:2]

    warm_epoch = max(1, args.epochs // 10)
    dr = DistillReader(args.conf, BATCH_SIZE, D_BATCH_SIZE, capacity=CAPACITY, occupied_capacity=OCCUPIED)
    dr.set_sample_list_generator(_reader)
    distill_reader = dr.distill_reader()
    snapshots: dict[str, dict[str, int]] = {}
    seen = 0
    for epoch in range(1, args.epochs + 1):
        for img, _label, prediction in distill_reader():
            seen += len(img)
            float(np.asarray(prediction).sum())
        if epoch in (1, warm_epoch, args.epochs):
            snapshots[str(epoch)] = snapshot()
    dr.close()
    print(json.dumps({"warm_epoch": warm_epoch, "epochs": args.epochs, "samples": seen, "snapshots": snapshots}))
    return 0


def memory(sizes: Sizes, progress: Progress) -> list[Row]:
    """Pool size against capacity × batch bytes; RSS growth over the epochs."""
    epochs = sizes.memory_epochs
    progress("memory: starting a zero-cost teacher")
    with teacher_processes(TeacherSpec(model="zero_cost"), 1) as servers, config_for(servers) as conf:
        progress(f"memory: the seed guide's example, {epochs} epochs, in its own process")
        done = subprocess.run(
            [sys.executable, "-m", "distill_reader.bench.memory", "--conf", str(conf), "--epochs", str(epochs)],
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the memory scenario's training process failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    warm = result["snapshots"][str(result["warm_epoch"])]
    end = result["snapshots"][str(result["epochs"])]
    bound = CAPACITY * batch_bytes(BATCH_SIZE)
    details = {**result, "capacity": CAPACITY, "batch_size": BATCH_SIZE, "batch_bytes": batch_bytes(BATCH_SIZE)}
    span = f"epoch {result['warm_epoch']} -> {result['epochs']}"
    return [
        Row(
            "memory",
            "shared memory in use (the pool)",
            end["pool_mapped"],
            bound,
            "bytes",
            end["pool_mapped"] / bound,
            1.05,
            at_most=True,
            limit_label="capacity × batch bytes",
            details=details,
        ),
        Row(
            "memory",
            f"RSS, student + pipeline, {span}",
            end["rss"],
            warm["rss"],
            "bytes",
            end["rss"] / warm["rss"],
            GROWTH_TARGET,
            at_most=True,
            limit_label="after warm-up",
        ),
        Row(
            "memory",
            f"peak RSS, student + pipeline, {span}",
            end["peak_rss"],
            warm["peak_rss"],
            "bytes",
            end["peak_rss"] / warm["peak_rss"],
            GROWTH_TARGET,
            at_most=True,
            limit_label="after warm-up",
        ),
    ]


if __name__ == "__main__":
    sys.exit(student_main())
