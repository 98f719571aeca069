"""``distill demo``: two local teachers, DistillReader, a student trained with and without them.

The setting is one where distillation is known to pay: the student has the labels of only a few
of its training samples (10% by default) but the teacher's soft labels on all of them; the same
student trained on those few labels alone, for as many SGD steps, is the baseline. Each seed is a
fresh train/test split, teacher, labelled subset and student initialisation, and the table gives
the mean ± std over seeds, so no single lucky split makes the claim.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from distill_reader.teacher.local import free_port, start_teacher, stop_processes, wait_until_ready

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

TEACHERS = 2


@contextlib.contextmanager
def local_teachers(
    model_path: Path | str,
    count: int,
    model_name: str,
    serve_args: Sequence[str] = (),
    log_path: Path | None = None,
) -> Iterator[list[str]]:
    """Start ``count`` built-in teacher servers as child processes; stop them on exit.

    ``model_path``: the ``--model`` of ``distill teacher serve`` (a file, or ``hf:DIR``);
    ``serve_args``: more of its options (e.g. ``--topk 8``).

    Their output goes to ``log_path`` (default: a log file next to the model), shown only if one
    fails to start.
    """
    processes: list[subprocess.Popen] = []
    endpoints: list[str] = []
    if log_path is None:
        log_path = Path(model_path).with_suffix(".log")
    try:
        with log_path.open("ab") as log:
            for _ in range(count):
                endpoint = f"127.0.0.1:{free_port()}"
                processes.append(
                    start_teacher(str(model_path), endpoint, "--name", model_name, *serve_args, output=log, wait=False)
                )
                endpoints.append(endpoint)
        for endpoint, process in zip(endpoints, processes):
            try:
                wait_until_ready(endpoint, process)
            except (RuntimeError, TimeoutError) as exc:
                output = log_path.read_text(errors="replace").strip()
                raise click.ClickException(f"{exc}; the teachers' output:\n{output}") from None
        yield endpoints
    finally:
        stop_processes(processes)


@dataclass(frozen=True)
class SeedResult:
    """Test accuracies of one seed's teacher and students, and the streaming it took."""

    teacher: float
    with_teacher: float
    without_teacher: float
    samples: int
    seconds: float

    @property
    def gain_points(self) -> float:
        return 100 * (self.with_teacher - self.without_teacher)


def mean_std(values: list[float], digits: int, sign: str = "") -> str:
    """``mean ± std`` (sample std) of ``values``; just the value when there is one."""
    mean = f"{np.mean(values):{sign}.{digits}f}"
    if len(values) < 2:
        return mean
    return f"{mean} ± {np.std(values, ddof=1):.{digits}f}"


def run_seed(
    seed: int,
    epochs: int,
    batch_size: int,
    d_batch_size: int,
    labelled_fraction: float,
    temperature: float,
    workdir: Path,
    progress: Progress,
    task: TaskID,
) -> SeedResult:
    """One seed of the demo: split, teacher, two teacher servers, the distilled and baseline students."""
    from distill_reader import DistillReader
    from distill_reader.demo.digits import (
        N_CLASSES,
        labelled_subset,
        load_digits_split,
        train_teacher,
        write_onnx,
        write_reader_config,
    )
    from distill_reader.demo.student import UNLABELLED, Student, train_without_teacher

    data = load_digits_split(seed)
    weights = train_teacher(data, seed=seed)
    teacher_accuracy = float((weights.logits(data.x_test).argmax(axis=1) == data.y_test).mean())
    labelled = labelled_subset(len(data.x_train), labelled_fraction, seed)
    labels = np.where(labelled, data.y_train, UNLABELLED)

    def training_samples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in zip(data.x_train, labels):
            yield x, np.array([y], dtype=np.int64)

    model_path = write_onnx(weights, workdir / f"digits-{seed}.onnx")
    distilled = Student(data.x_train.shape[1], N_CLASSES, temperature=temperature, seed=seed)
    samples, steps, seconds = 0, 0, 0.0
    with local_teachers(model_path, TEACHERS, "digits") as endpoints:
        config = write_reader_config(workdir / f"reader-{seed}.conf", endpoints)
        with DistillReader(config, batch_size, d_batch_size, capacity=8, occupied_capacity=1) as reader:
            reader.set_sample_generator(training_samples)
            epoch_reader = reader.distill_reader()
            for epoch in range(epochs):
                progress.update(task, description=f"seed {seed}, epoch {epoch + 1}/{epochs}")
                start = time.perf_counter()
                for x, y, teacher_logits in epoch_reader():
                    distilled.step(x, y[:, 0], teacher_logits)
                    samples += len(x)
                    steps += 1
                    progress.update(task, advance=len(x))
                seconds += time.perf_counter() - start

    baseline = train_without_teacher(
        data.x_train[labelled], data.y_train[labelled], N_CLASSES, steps, batch_size, seed=seed
    )
    return SeedResult(
        teacher_accuracy,
        distilled.accuracy(data.x_test, data.y_test),
        baseline.accuracy(data.x_test, data.y_test),
        samples,
        seconds,
    )


@click.group(invoke_without_command=True)
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(min=1), help="Runs, each on a fresh split.")
@click.option(
    "--epochs", default=10, show_default=True, type=click.IntRange(min=1), help="Passes over the training set."
)
@click.option(
    "--labelled-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Share of the training samples whose label the student has (it has the teacher on all).",
)
@click.option(
    "--temperature",
    default=4.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Softens the teacher's and the student's logits in the distillation loss.",
)
@click.option(
    "--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Rows of each training batch."
)
@click.option(
    "--d-batch-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows of each request to a teacher.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    seeds: int,
    epochs: int,
    labelled_fraction: float,
    temperature: float,
    batch_size: int,
    d_batch_size: int,
) -> None:
    """Run everything locally, on scikit-learn's digits: for each seed, train a teacher on a fresh
    split, serve it from two built-in teacher servers, stream the training set through
    DistillReader and train a student that has the labels of only a few samples but the teacher's
    soft labels on all of them; compare with the same student trained on those few labels alone.

    `distill demo text` is the sequence demo: a character-level language model, top-k teachers;
    `distill demo llm`: GPT-2 students of an hf: teacher with transformers' Trainer, one with
    another tokenizer."""
    if ctx.invoked_subcommand is not None:
        return  # `distill demo text` or `llm`: the options above are the digits demo's
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from distill_reader.demo.digits import load_digits_split

    console = Console()
    n_train = len(load_digits_split().x_train)
    results: list[SeedResult] = []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with tempfile.TemporaryDirectory(prefix="distill-demo-") as tmp, progress:
        task = progress.add_task("starting", total=seeds * epochs * n_train)
        for seed in range(seeds):
            progress.update(task, description=f"seed {seed}: training the teacher, starting {TEACHERS} servers")
            result = run_seed(
                seed, epochs, batch_size, d_batch_size, labelled_fraction, temperature, Path(tmp), progress, task
            )
            results.append(result)
            progress.console.print(
                f"seed {seed}: teacher {result.teacher:.3f}, student with the teacher {result.with_teacher:.3f}, "
                f"without {result.without_teacher:.3f} ({result.gain_points:+.1f} points)"
            )

    gains = [r.gain_points for r in results]
    samples = sum(r.samples for r in results)
    table = Table(
        title=f"distill demo: digits, {labelled_fraction:.0%} labelled, {epochs} epochs, {seeds} seeds, "
        f"{TEACHERS} local teachers"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("samples streamed through DistillReader", f"{samples:,}")
    table.add_row("samples/s (reader + student training)", f"{samples / sum(r.seconds for r in results):,.0f}")
    table.add_row("teacher test accuracy", mean_std([r.teacher for r in results], 3))
    table.add_row("student test accuracy, trained with the teacher", mean_std([r.with_teacher for r in results], 3))
    table.add_row("student test accuracy, trained without a teacher", mean_std([r.without_teacher for r in results], 3))
    over = f"{seeds} seeds" if seeds > 1 else "1 seed"
    table.add_row(f"gain from the teacher, points (mean ± std over {over})", mean_std(gains, 2, "+"))
    table.add_row("seeds where the teacher helped", f"{sum(g > 0 for g in gains)} of {seeds}")
    console.print(table)


def _add_subcommands() -> None:
    from distill_reader.demo.llm import llm
    from distill_reader.demo.text import text

    demo.add_command(text)
    demo.add_command(llm)


_add_subcommands()
