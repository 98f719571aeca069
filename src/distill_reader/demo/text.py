"""``distill demo text``: a character-level language model distilled through two top-k teachers.

The text is the Python standard library's own source, so it is on every machine: the teacher (a
GRU) is trained on a fixed list of stdlib modules, exported to ONNX and served by two
``distill teacher serve --topk K`` processes; a much smaller student has only the first
``--student-chars`` characters of that text (a small in-domain set) and is trained on random
windows of it, streamed through DistillReader, with ``alpha * T^2 * topk_kl_loss + (1 - alpha) *
cross-entropy``; the same student (same seed, same rows, same steps) trained on the
cross-entropy alone is the baseline. Both are scored in exact bits per character on other stdlib
modules (held out). The teacher is trained once per run; each seed draws a new student
initialisation and new windows.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

INPUT_NAME = "tokens"
OUTPUT_NAME = "logits"
MODEL_NAME = "charlm"
VOCAB = 128  # ASCII; any other character is token 0
EXTRA = "demo-text"
TEACHER_SEED = 0
MIN_LENGTH = 16  # the shortest training row

# Modules that are single files in every Python this package supports (3.10+), in a fixed order.
TRAIN_MODULES = (
    "argparse", "ast", "calendar", "configparser", "contextlib", "csv", "dataclasses", "difflib", "enum",
    "fractions", "functools", "gettext", "heapq", "inspect", "ipaddress", "pickle", "pprint", "shutil",
    "string", "subprocess", "tarfile", "textwrap", "threading", "tokenize", "typing",
)  # fmt: skip
HELD_OUT_MODULES = ("random", "statistics", "shlex", "queue", "copy", "glob", "fnmatch", "bisect", "sched", "netrc")


def missing_packages() -> list[str]:
    """The packages ``distill demo text`` needs that are not installed."""
    return [name for name in ("torch", "onnx") if importlib.util.find_spec(name) is None]


def load_source(modules: tuple[str, ...], max_chars: int) -> str:
    """The source of ``modules`` (``name`` or ``package/module``) from this Python's standard
    library, joined by newlines, cut to ``max_chars`` characters (the text and llm demos' text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for module in modules:
        path = stdlib / f"{module}.py"
        if not path.is_file():
            raise click.ClickException(f"distill demo reads {path}, which this Python does not have")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n".join(parts)[:max_chars]


def load_text(modules: tuple[str, ...], max_chars: int) -> np.ndarray:
    """:func:`load_source` as int64 tokens (the ASCII code; 0 for any other character)."""
    codes = np.frombuffer(load_source(modules, max_chars).encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < VOCAB, codes, 0).astype(np.int64)


def random_windows(count: int, total: int, max_length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``count`` (start, length) windows of ``total`` items, lengths uniform in ``MIN_LENGTH..max_length``."""
    lengths = rng.integers(MIN_LENGTH, max_length + 1, count)
    starts = rng.integers(0, total - max_length + 1, count)
    return [(int(start), int(length)) for start, length in zip(starts, lengths)]


def random_rows(text: np.ndarray, count: int, max_length: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` windows of ``text`` at random places (:func:`random_windows`)."""
    return [text[start : start + length] for start, length in random_windows(count, len(text), max_length, rng)]


def batches(rows: list[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Consecutive groups of ``batch_size`` rows: the batches the reader yields, in the same order."""
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


CONFIG_TEMPLATE = """\
[conf]
mode = fixed
servers = {servers!r}
model_name = '{model}'
max_length = {max_length}

[feed]
feed_vars = ['{input}']
feed_types = ['int64']
feed_shapes = [(-1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['{output}_topk_values', '{output}_topk_indices']
fetch_types = ['float32', 'int32']
fetch_shapes = [(-1, {k}), (-1, {k})]
"""


def write_reader_config(path: Path, servers: list[str], max_length: int, k: int) -> Path:
    """The reader config for the character model served as ``charlm`` with ``--topk k``."""
    path.write_text(
        CONFIG_TEMPLATE.format(
            servers=servers, model=MODEL_NAME, max_length=max_length, input=INPUT_NAME, output=OUTPUT_NAME, k=k
        )
    )
    return path


@dataclass(frozen=True)
class SeedResult:
    """Held-out bits per character of one seed's two students, and the streaming it took."""

    with_teacher: float
    without_teacher: float
    rows: int
    seconds: float

    @property
    def gain(self) -> float:
        """Bits per character saved by the teacher (positive: the distilled student is better)."""
        return self.without_teacher - self.with_teacher


def run_seed(
    seed: int,
    student_text: np.ndarray,
    held_out: np.ndarray,
    config: Path,
    steps: int,
    batch_size: int,
    d_batch_size: int,
    max_length: int,
    alpha: float,
    temperature: float,
) -> SeedResult:
    """One seed: the same rows, batches and initialisation for the student with and without the teacher."""
    import torch

    from distill_reader import DistillReader
    from distill_reader.demo.charlm import StudentTrainer, bits_per_char, pad

    rows = random_rows(student_text, steps * batch_size, max_length, np.random.default_rng(1000 + seed))

    def samples() -> Iterator[tuple[np.ndarray]]:
        for row in rows:
            yield (row,)

    distilled = StudentTrainer(seed, alpha, temperature)
    start = time.perf_counter()
    with DistillReader(config, batch_size, d_batch_size, capacity=8, occupied_capacity=1) as reader:
        reader.set_sample_generator(samples)
        expected = batches(rows, batch_size)
        for tokens, values, indices, lengths in reader.distill_reader()():
            # The baseline below trains on our own batches: check they are the reader's, row for row.
            own_tokens, own_lengths = pad(next(expected))
            if not (np.array_equal(tokens, own_tokens.numpy()) and np.array_equal(lengths, own_lengths.numpy())):
                raise click.ClickException("the reader's batch differs from the rows it was given")
            distilled.step(
                torch.from_numpy(tokens),
                torch.from_numpy(lengths),
                torch.from_numpy(values),
                torch.from_numpy(indices),
            )
    seconds = time.perf_counter() - start

    baseline = StudentTrainer(seed, alpha, temperature)
    for group in batches(rows, batch_size):
        baseline.step(*pad(group))
    return SeedResult(
        bits_per_char(distilled.model, held_out, max_length),
        bits_per_char(baseline.model, held_out, max_length),
        len(rows),
        seconds,
    )


@click.command("text")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1), help="Students, each seed its own.")
@click.option(
    "--teacher-steps", default=400, show_default=True, type=click.IntRange(min=1), help="Teacher training steps."
)
@click.option(
    "--student-steps", default=400, show_default=True, type=click.IntRange(min=1), help="Student steps, per arm."
)
@click.option(
    "--teacher-chars",
    default=1_500_000,
    show_default=True,
    type=click.IntRange(min=1000),
    help="Characters of stdlib source the teacher is trained on (at most).",
)
@click.option(
    "--student-chars",
    default=20_000,
    show_default=True,
    type=click.IntRange(min=1000),
    help="Characters the student has: the start of the teacher's text.",
)
@click.option(
    "--held-out-chars",
    default=100_000,
    show_default=True,
    type=click.IntRange(min=1000),
    help="Characters of other stdlib modules the students are scored on.",
)
@click.option(
    "--topk", "k", default=8, show_default=True, type=click.IntRange(min=1), help="Teacher entries per token."
)
@click.option(
    "--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Of the top-k."
)
@click.option(
    "--alpha", default=0.9, show_default=True, type=click.FloatRange(0, 1), help="Weight of the distillation loss."
)
@click.option("--max-length", default=64, show_default=True, type=click.IntRange(min=MIN_LENGTH), help="Longest row.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Rows per student step.")
@click.option("--d-batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Rows per request.")
def text(
    seeds: int,
    teacher_steps: int,
    student_steps: int,
    teacher_chars: int,
    student_chars: int,
    held_out_chars: int,
    k: int,
    temperature: float,
    alpha: float,
    max_length: int,
    batch_size: int,
    d_batch_size: int,
) -> None:
    """A character-level language model on the Python standard library's source: train a GRU
    teacher, export it to ONNX, serve it from two top-k teacher servers, and distil a much smaller
    student that has only a little of the text; compare with the same student trained without the
    teacher, in bits per character on held-out modules."""
    missing = missing_packages()
    if missing:
        raise click.ClickException(
            f"distill demo text needs {' and '.join(missing)}: pip install 'distill-reader[{EXTRA}]'"
        )
    import torch
    from rich.console import Console
    from rich.table import Table

    from distill_reader.demo.charlm import bits_per_char, export_onnx, train_teacher
    from distill_reader.demo.command import TEACHERS, local_teachers, mean_std

    console = Console()
    teacher_text = load_text(TRAIN_MODULES, teacher_chars)
    student_text = teacher_text[:student_chars]
    held_out = load_text(HELD_OUT_MODULES, held_out_chars)

    # Two threads for the teacher's training (nothing else runs then); one for the students, whose
    # teachers are other processes that want the other core.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with console.status(f"training the teacher: {teacher_steps} steps on {len(teacher_text):,} characters"):
        rng = np.random.default_rng(TEACHER_SEED)
        teacher = train_teacher(
            (random_rows(teacher_text, batch_size, max_length, rng) for _ in range(teacher_steps)), TEACHER_SEED
        )
        teacher_bits = bits_per_char(teacher, held_out, max_length)
    console.print(f"teacher: {teacher_bits:.3f} bits per char on the held-out text")
    torch.set_num_threads(1)

    results: list[SeedResult] = []
    with tempfile.TemporaryDirectory(prefix="distill-demo-text-") as tmp:
        model_path = export_onnx(teacher, Path(tmp) / "charlm.onnx")
        serve_args = ["--topk", str(k), "--temperature", str(temperature), "--threads", "1"]
        with local_teachers(model_path, TEACHERS, MODEL_NAME, serve_args) as endpoints:
            config = write_reader_config(Path(tmp) / "reader.conf", endpoints, max_length, k)
            for seed in range(seeds):
                with console.status(f"seed {seed}: {student_steps} student steps with the teacher, then without"):
                    result = run_seed(
                        seed,
                        student_text,
                        held_out,
                        config,
                        student_steps,
                        batch_size,
                        d_batch_size,
                        max_length,
                        alpha,
                        temperature,
                    )
                results.append(result)
                console.print(
                    f"seed {seed}: student with the teacher {result.with_teacher:.3f} bits per char, "
                    f"without {result.without_teacher:.3f} (saved {result.gain:+.3f})"
                )

    gains = [r.gain for r in results]
    rows = sum(r.rows for r in results)
    over = f"{seeds} seeds" if seeds > 1 else "1 seed"
    table = Table(
        title=f"distill demo text: stdlib source, top-{k}, {student_steps} steps, {over}, {TEACHERS} local teachers"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(
        "characters: teacher's text, student's, held-out",
        f"{len(teacher_text):,}, {len(student_text):,}, {len(held_out):,}",
    )
    table.add_row("teacher bits per char", f"{teacher_bits:.3f}")
    table.add_row("student bits per char, trained with the teacher", mean_std([r.with_teacher for r in results], 3))
    table.add_row("student bits per char, trained without a teacher", mean_std([r.without_teacher for r in results], 3))
    table.add_row(f"bits per char saved by the teacher (mean ± std over {over})", mean_std(gains, 3, "+"))
    table.add_row("seeds where the teacher helped", f"{sum(g > 0 for g in gains)} of {seeds}")
    table.add_row("rows streamed through DistillReader", f"{rows:,}")
    table.add_row("samples/s (reader + student training)", f"{rows / sum(r.seconds for r in results):,.0f}")
    table.add_row("bytes per token carried (top-k)", f"{k * (4 + 4):,}")
    table.add_row("bytes per token, dense", f"{VOCAB * 4:,}")
    console.print(table)
