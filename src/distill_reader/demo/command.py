"""``distill demo``: two local teachers, DistillReader, a student trained with and without them."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np

from distill_reader.teacher.local import free_port, wait_until_ready

TEACHERS = 2


@contextlib.contextmanager
def local_teachers(model_path: Path, count: int, model_name: str) -> Iterator[list[str]]:
    """Start ``count`` built-in teacher servers as child processes; stop them on exit."""
    processes: list[subprocess.Popen] = []
    endpoints: list[str] = []
    try:
        for _ in range(count):
            endpoint = f"127.0.0.1:{free_port()}"
            command = [
                sys.executable,
                "-m",
                "distill_reader",
                "teacher",
                "serve",
                "--model",
                str(model_path),
                "--listen",
                endpoint,
                "--name",
                model_name,
            ]
            processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True))
            endpoints.append(endpoint)
        for endpoint, process in zip(endpoints, processes):
            try:
                wait_until_ready(endpoint, process)
            except (RuntimeError, TimeoutError) as exc:
                raise click.ClickException(str(exc)) from None
        yield endpoints
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@click.command()
@click.option("--epochs", default=2, show_default=True, help="Passes over the training set.")
@click.option("--batch-size", default=64, show_default=True, help="Rows of each training batch.")
@click.option("--d-batch-size", default=16, show_default=True, help="Rows of each request to a teacher.")
def demo(epochs: int, batch_size: int, d_batch_size: int) -> None:
    """Run everything locally: train a teacher on scikit-learn's digits, serve it from two built-in
    teacher servers, stream the training set through DistillReader and train a student on the soft
    labels; then compare with the same student trained without a teacher."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from distill_reader import DistillReader
    from distill_reader.demo.digits import load_digits_split, train_teacher, write_onnx, write_reader_config
    from distill_reader.demo.student import Student

    console = Console()
    with console.status("training the teacher (an MLP on scikit-learn's digits)..."):
        data = load_digits_split()
        weights = train_teacher(data)
    teacher_accuracy = float((weights.logits(data.x_test).argmax(axis=1) == data.y_test).mean())
    console.print(f"teacher trained: test accuracy {teacher_accuracy:.3f}")

    def training_samples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in zip(data.x_train, data.y_train):
            yield x, np.array([y], dtype=np.int64)

    with tempfile.TemporaryDirectory(prefix="distill-demo-") as tmp:
        model_path = write_onnx(weights, Path(tmp) / "digits.onnx")
        console.print(f"starting {TEACHERS} teacher servers...")
        with local_teachers(model_path, TEACHERS, "digits") as endpoints:
            console.print(f"teachers serving on {', '.join(endpoints)}")
            config = write_reader_config(Path(tmp) / "reader.conf", endpoints)
            distilled = Student(data.x_train.shape[1], 10)
            samples, streaming_seconds = 0, 0.0
            with DistillReader(config, batch_size, d_batch_size, capacity=8, occupied_capacity=1) as reader:
                reader.set_sample_generator(training_samples)
                epoch_reader = reader.distill_reader()
                progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(),
                    console=console,
                )
                with progress:
                    task = progress.add_task("distilling", total=epochs * len(data.x_train), rate="")
                    for epoch in range(epochs):
                        progress.update(task, description=f"epoch {epoch + 1}/{epochs}")
                        start = time.perf_counter()
                        for x, y, teacher_logits in epoch_reader():
                            distilled.step(x, y[:, 0], teacher_logits)
                            samples += len(x)
                            progress.update(
                                task,
                                advance=len(x),
                                rate=f"{samples / (streaming_seconds + time.perf_counter() - start):,.0f} samples/s",
                            )
                        streaming_seconds += time.perf_counter() - start

    baseline = Student(data.x_train.shape[1], 10)
    for _ in range(epochs):
        for i in range(0, len(data.x_train), batch_size):
            baseline.step(data.x_train[i : i + batch_size], data.y_train[i : i + batch_size])

    table = Table(title=f"distill demo: digits, {epochs} epochs, {TEACHERS} local teachers")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("samples streamed through DistillReader", f"{samples:,}")
    table.add_row("samples/s (reader + student training)", f"{samples / streaming_seconds:,.0f}")
    table.add_row("teacher test accuracy", f"{teacher_accuracy:.3f}")
    table.add_row(
        "student test accuracy, trained with the teacher", f"{distilled.accuracy(data.x_test, data.y_test):.3f}"
    )
    table.add_row(
        "student test accuracy, trained without a teacher", f"{baseline.accuracy(data.x_test, data.y_test):.3f}"
    )
    console.print(table)
