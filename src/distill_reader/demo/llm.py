"""``distill demo llm``: a small GPT-2 distilled through two ``hf:`` teachers with transformers' ``Trainer``.

The setting is the text demo's (``distill demo text``), where distillation is known to pay: the
teacher (a GPT-2 with a byte-level BPE tokenizer, both trained here on the Python standard
library's source, nothing downloaded) has the whole text; the students, much smaller GPT-2s,
have only its first ``--student-chars`` characters and train on random windows of them, many
times over. The teacher is saved with ``save_pretrained`` and served by two
``distill teacher serve --model hf:DIR --topk K`` processes; each student is trained by
:class:`~distill_reader.hf.DistillTrainer` on :class:`~distill_reader.hf.DistillRows` of a
DistillReader:

- **same tokenizer**: rows of the teacher's tokens, ``(1 - alpha) * CE + alpha * T^2 * KL`` on
  the teacher's top-k at every position;
- **another tokenizer** (a second byte-level BPE with a smaller vocabulary, trained here on other
  text): each row is a piece of text tokenized on both sides by the reader's sample generator
  (:func:`distill_reader.alignment.align_text`: the student's tokens, the teacher's tokens sent to
  the teacher, their alignment), and ``loss="uld"``: ``(1 - uld_alpha) * CE + uld_alpha * ULD``
  (Universal Logit Distillation at aligned positions).

The baseline of each is the same student (same seed, same rows in the same order, same steps,
same optimizer) trained by the same Trainer on the cross-entropy alone. All four are scored in
bits per character on other stdlib modules (held out): the summed negative log-likelihood of the
held-out text's tokens, in bits, over the characters they cover, so the two tokenizers compare.
The teacher is trained once per run; each seed draws new student initialisations and new windows.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from distill_reader.demo.text import HELD_OUT_MODULES, MIN_LENGTH, TRAIN_MODULES, load_source, random_windows

EXTRA = "llm"
MODEL_NAME = "gpt2"
TEACHER_SEED = 0
EOS = "<|endoftext|>"
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")
# The other tokenizer learns its merges from other text than the teacher's (other vocabularies,
# other merges): the held-out modules stay out of both.
OTHER_TOKENIZER_MODULES = ("collections/__init__", "json/decoder", "json/encoder", "logging/__init__", "email/utils")


def missing_packages() -> list[str]:
    """The packages ``distill demo llm`` needs that are not installed."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` tokens (``EOS`` among them) trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tokenizer.train_from_iterator(("".join(lines[i : i + 64]) for i in range(0, len(lines), 64)), trainer=trainer)
    return tokenizer


def encode(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int64 [N], character offsets int64 [N, 2])`` of ``text``, no special tokens."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, dtype=np.int64), np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)


def gpt2(vocab_size: int, eos_id: int, positions: int, width: int, layers: int, heads: int, seed: int) -> Any:
    """A GPT-2 of random weights (seeded), without dropout: the same seed gives the same student."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def train_teacher(model: Any, ids: np.ndarray, steps: int, batch_size: int, max_length: int) -> Any:
    """Next-token training of ``model`` on random windows of ``ids`` (AdamW, one step per batch)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(TEACHER_SEED)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - max_length + 1, batch_size)
        batch = torch.from_numpy(np.stack([ids[s : s + max_length] for s in starts]))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def bits_per_char(model: Any, ids: np.ndarray, offsets: np.ndarray, window: int, batch: int = 32) -> float:
    """Bits per character of ``model`` on a tokenized text: windows of ``window + 1`` tokens
    overlapping by one, each predicting its ``window`` next tokens from a fresh context; the summed
    negative log-likelihood (bits) of every predicted token over the characters those tokens cover
    (the text after its first token; byte-level tokens spell the text exactly)."""
    import torch
    import torch.nn.functional as F

    n = (len(ids) - 1) // window
    inputs = torch.from_numpy(ids[: n * window]).view(n, window)
    targets = torch.from_numpy(ids[1 : n * window + 1]).view(n, window)
    total = 0.0
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch):
            logits = model(input_ids=inputs[start : start + batch]).logits.double()
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets[start : start + batch].reshape(-1), reduction="sum"
                )
            )
    chars = int(offsets[n * window, 1] - offsets[0, 1])
    return total / chars / math.log(2)


CONFIG_TEMPLATE = """\
[conf]
mode = fixed
servers = {servers!r}
model_name = '{model}'
max_length = {max_length}

[feed]
feed_vars = {feeds!r}
feed_types = {types!r}
feed_shapes = {shapes}
predict_feed_ids = [{predict}]

[fetch]
fetch_vars = ['logits_topk_values', 'logits_topk_indices']
fetch_types = ['float32', 'int32']
fetch_shapes = [(-1, {k}), (-1, {k})]
"""


def write_reader_config(path: Path, servers: list[str], max_length: int, k: int, other_tokenizer: bool) -> Path:
    """The reader config for the ``hf:`` teacher served as ``gpt2`` with ``--topk k``: the teacher's
    tokens alone, or (``other_tokenizer``) the student's tokens, the teacher's and the alignment."""
    feeds = ["student_tokens", "tokens", "alignment"] if other_tokenizer else ["tokens"]
    path.write_text(
        CONFIG_TEMPLATE.format(
            servers=servers,
            model=MODEL_NAME,
            max_length=max_length,
            feeds=feeds,
            types=["int64"] * len(feeds),
            shapes="[" + ", ".join(["(-1,)"] * len(feeds)) + "]",
            predict=feeds.index("tokens"),
            k=k,
        )
    )
    return path


@dataclass(frozen=True)
class Arm:
    """Held-out bits per character of one student trained with and without the teacher."""

    with_teacher: float
    without_teacher: float
    teacher_tokens: int  # teacher positions streamed through the reader
    aligned: int  # student positions with a teacher counterpart (another tokenizer; else all)
    student_tokens: int
    seconds: float  # reader + training, with the teacher

    @property
    def gain(self) -> float:
        """Bits per character saved by the teacher (positive: the distilled student is better)."""
        return self.without_teacher - self.with_teacher


@dataclass(frozen=True)
class Student:
    """A student's shape and training: what both of its arms share."""

    width: int
    layers: int
    heads: int
    steps: int
    batch_size: int
    d_batch_size: int
    learning_rate: float
    max_length: int


def ordered_rows(rows: list[np.ndarray]) -> Any:
    """An ``IterableDataset`` of fixed rows, in order: the baseline's (the distilled student's rows)."""
    import torch
    from torch.utils.data import IterableDataset

    class _Rows(IterableDataset):
        def __iter__(self) -> Iterator[dict[str, Any]]:
            for row in rows:
                yield {"input_ids": torch.from_numpy(row)}

    return _Rows()


class CheckedCollator:
    """:class:`~distill_reader.hf.DistillCollator` that checks the reader's rows are the samples, in
    order (the baseline trains on the samples themselves)."""

    def __init__(self, rows: list[tuple[np.ndarray, ...]]) -> None:
        from distill_reader.hf import DistillCollator

        self.collator = DistillCollator()
        self.rows = rows
        self.seen = 0

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        for row in batch:
            sample = self.rows[self.seen] if self.seen < len(self.rows) else None
            same = sample is not None and np.array_equal(row["input_ids"].numpy(), sample[0])
            if same and "alignment" in row:
                same = np.array_equal(row["alignment"].numpy(), sample[2]) and len(row["teacher_topk_values"]) == len(
                    sample[1]
                )
            if not same:
                raise click.ClickException(f"the reader's row {self.seen} differs from the sample it was given")
            self.seen += 1
        return self.collator(batch)


def train_student(
    model: Any,
    dataset: Any,
    student: Student,
    seed: int,
    workdir: Path,
    **trainer_options: Any,
) -> Any:
    """``student.steps`` steps of :class:`DistillTrainer` on ``dataset`` (constant learning rate, no checkpoints)."""
    from transformers import PrinterCallback, TrainingArguments

    from distill_reader.hf import DistillTrainer

    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=student.batch_size,
        max_steps=student.steps,
        learning_rate=student.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,  # the reader runs its own pipeline process
    )
    trainer = DistillTrainer(model=model, args=args, train_dataset=dataset, **trainer_options)
    trainer.remove_callback(PrinterCallback)  # the demo prints its own lines
    trainer.train()
    return trainer.model


def run_arm(
    seed: int,
    rows: list[tuple[np.ndarray, ...]],
    config: Path,
    student: Student,
    vocab_size: int,
    eos_id: int,
    held_out: tuple[np.ndarray, np.ndarray],
    workdir: Path,
    loss: str,
    alpha: float,
    temperature: float,
) -> Arm:
    """One student, with the teacher (through the reader) and without, from the same seed and rows.

    ``rows``: the reader's samples: ``(tokens,)``, or ``(student_tokens, tokens, alignment)`` for
    a student with another tokenizer (``loss="uld"``).
    """
    from distill_reader import DistillReader
    from distill_reader.demo.command import TEACHERS
    from distill_reader.hf import DistillRows

    other = loss == "uld"

    def samples() -> Iterator[tuple[np.ndarray, ...]]:
        yield from rows

    def new_model() -> Any:
        return gpt2(vocab_size, eos_id, student.max_length, student.width, student.layers, student.heads, 1000 + seed)

    options = {"student_tokens": "student_tokens", "alignment": "alignment"} if other else {}
    start = time.perf_counter()
    # A pool that keeps both teachers' request slots (8 each) filled.
    capacity = TEACHERS * 8 + 2
    with DistillReader(config, student.batch_size, student.d_batch_size, capacity, occupied_capacity=1) as reader:
        reader.set_sample_generator(samples)
        dataset = DistillRows(reader, epochs=1, **options)
        checked = CheckedCollator(rows)
        distilled = train_student(
            new_model(),
            dataset,
            student,
            seed,
            workdir,
            loss=loss,
            alpha=alpha,
            temperature=temperature,
            data_collator=checked,
        )
    seconds = time.perf_counter() - start
    if checked.seen != len(rows):
        raise click.ClickException(f"the student got {checked.seen} of its {len(rows)} rows through the reader")
    student_rows = [row[0] for row in rows]
    baseline = train_student(new_model(), ordered_rows(student_rows), student, seed, workdir)
    teacher_tokens = sum(len(row[1 if other else 0]) for row in rows)
    student_tokens = sum(len(row) for row in student_rows)
    aligned = sum(int((row[2] >= 0).sum()) for row in rows) if other else student_tokens
    return Arm(
        bits_per_char(distilled, *held_out, student.max_length),
        bits_per_char(baseline, *held_out, student.max_length),
        teacher_tokens,
        aligned,
        student_tokens,
        seconds,
    )


def same_tokenizer_rows(ids: np.ndarray, count: int, max_length: int, seed: int) -> list[tuple[np.ndarray]]:
    """``count`` random windows of the student's text in the teacher's tokens."""
    windows = random_windows(count, len(ids), max_length, np.random.default_rng(2000 + seed))
    return [(ids[s : s + n].copy(),) for s, n in windows]


def other_tokenizer_rows(
    text: str,
    ids: np.ndarray,
    offsets: np.ndarray,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    count: int,
    max_length: int,
    seed: int,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` random windows of the student's text (in the student's tokens), each tokenized
    again on both sides with :func:`~distill_reader.alignment.align_text`: ``(student_tokens,
    teacher_tokens, alignment)``, what the reader's sample generator yields."""
    from distill_reader.alignment import align_text

    windows = random_windows(count, len(ids), max_length, np.random.default_rng(3000 + seed))
    rows = []
    for start, length in windows:
        piece = text[int(offsets[start, 0]) : int(offsets[start + length - 1, 1])]
        student_ids, teacher_ids, alignment = align_text(piece, student_tokenizer, teacher_tokenizer)
        student_ids, alignment = student_ids[:max_length], alignment[:max_length]
        teacher_ids = teacher_ids[:max_length]
        alignment = np.where(alignment < len(teacher_ids), alignment, -1)
        rows.append((student_ids, teacher_ids, alignment))
    return rows


@click.command("llm")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1), help="Students, each seed its own.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="Student steps, per arm.")
@click.option(
    "--teacher-steps", default=400, show_default=True, type=click.IntRange(min=1), help="Teacher training steps."
)
@click.option(
    "--teacher-chars",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(min=10_000),
    help="Characters of stdlib source the teacher (and its tokenizer) is trained on (at most).",
)
@click.option(
    "--student-chars",
    default=20_000,
    show_default=True,
    type=click.IntRange(min=2000),
    help="Characters the students have: the start of the teacher's text.",
)
@click.option(
    "--held-out-chars",
    default=60_000,
    show_default=True,
    type=click.IntRange(min=2000),
    help="Characters of other stdlib modules the students are scored on.",
)
@click.option(
    "--vocab",
    default=1024,
    show_default=True,
    type=click.IntRange(min=300, max=65536),
    help="The teacher's tokenizer's vocabulary.",
)
@click.option(
    "--other-vocab",
    default=512,
    show_default=True,
    type=click.IntRange(min=300, max=65536),
    help="The other tokenizer's vocabulary.",
)
@click.option(
    "--topk", "k", default=8, show_default=True, type=click.IntRange(1, 256), help="Teacher entries per token."
)
@click.option(
    "--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Of the top-k."
)
@click.option("--alpha", default=0.9, show_default=True, type=click.FloatRange(0, 1), help="Weight of the KL.")
@click.option(
    "--uld-alpha",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Weight of the ULD loss (the student with another tokenizer).",
)
@click.option(
    "--max-length", default=64, show_default=True, type=click.IntRange(min=MIN_LENGTH, max=1024), help="Longest row."
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Rows per student step.")
@click.option("--d-batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Rows per request.")
@click.option(
    "--quick",
    is_flag=True,
    help="Tiny sizes (2 seeds, a few steps, little text): checks the path end to end in about a minute.",
)
def llm(
    seeds: int,
    steps: int,
    teacher_steps: int,
    teacher_chars: int,
    student_chars: int,
    held_out_chars: int,
    vocab: int,
    other_vocab: int,
    k: int,
    temperature: float,
    alpha: float,
    uld_alpha: float,
    max_length: int,
    batch_size: int,
    d_batch_size: int,
    quick: bool,
) -> None:
    """A small GPT-2 on the Python standard library's source: train a teacher and its byte-level
    BPE tokenizer, serve it from two `hf:` teachers with top-k, and distil two much smaller GPT-2
    students that have only a little of the text with transformers' Trainer (DistillTrainer): one
    with the teacher's tokenizer (KL on the top-k), one with another tokenizer (ULD at aligned
    positions); compare each with the same student trained without the teacher, in bits per
    character on held-out modules."""
    missing = missing_packages()
    if missing:
        raise click.ClickException(
            f"distill demo llm needs {' and '.join(missing)}: pip install 'distill-reader[{EXTRA}]'"
        )
    if quick:
        seeds, steps, teacher_steps = 2, 6, 20
        teacher_chars, student_chars, held_out_chars = min(teacher_chars, 60_000), 4000, 4000
        vocab, other_vocab, batch_size, d_batch_size, max_length = 512, 384, 8, 4, 32
    import logging

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from distill_reader.demo.command import TEACHERS, local_teachers, mean_std

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("distill_reader").setLevel(logging.WARNING)
    console = Console()
    teacher_text = load_source(TRAIN_MODULES, teacher_chars)
    student_text = teacher_text[:student_chars]
    held_out_text = load_source(HELD_OUT_MODULES, held_out_chars)
    student = Student(32, 1, 2, steps, batch_size, d_batch_size, 3e-3, max_length)

    # One torch thread: two ran about 10 times slower on a busy 2-core machine (OpenMP's barriers
    # wait for descheduled threads), and the teachers are other processes that want the other core.
    torch.set_num_threads(1)
    with console.status("training the tokenizers"):
        teacher_tokenizer = train_tokenizer(teacher_text, vocab)
        other_tokenizer = train_tokenizer(load_source(OTHER_TOKENIZER_MODULES, teacher_chars), other_vocab)
    eos = teacher_tokenizer.token_to_id(EOS)
    student_ids, _ = encode(teacher_tokenizer, student_text)
    other_ids, other_offsets = encode(other_tokenizer, student_text)
    for name, ids in (("teacher's", student_ids), ("other", other_ids)):
        if len(ids) <= max_length:
            raise click.UsageError(
                f"--student-chars {student_chars}: the students' text is at most --max-length {max_length} "
                f"tokens of the {name} tokenizer; give them more text or shorter rows"
            )
    other_eos = other_tokenizer.token_to_id(EOS)
    teacher_ids, _ = encode(teacher_tokenizer, teacher_text)
    held_out = encode(teacher_tokenizer, held_out_text)
    other_held_out = encode(other_tokenizer, held_out_text)
    with console.status(f"training the teacher: {teacher_steps} steps on {len(teacher_ids):,} tokens"):
        teacher = gpt2(teacher_tokenizer.get_vocab_size(), eos, max_length, 128, 2, 4, TEACHER_SEED)
        teacher = train_teacher(teacher, teacher_ids, teacher_steps, 32, max_length)
        teacher_bits = bits_per_char(teacher, *held_out, max_length)
    console.print(f"teacher: {teacher_bits:.3f} bits per char on the held-out text")

    same: list[Arm] = []
    other: list[Arm] = []
    with tempfile.TemporaryDirectory(prefix="distill-demo-llm-") as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "teacher"
        teacher.save_pretrained(model_dir)
        teacher_tokenizer.save(str(model_dir / "tokenizer.json"))
        del teacher
        serve_args = ["--topk", str(k), "--temperature", str(temperature), "--threads", "1"]
        console.print(f"starting {TEACHERS} teachers: distill teacher serve --model hf:DIR {' '.join(serve_args)}")
        with local_teachers(
            f"hf:{model_dir}", TEACHERS, MODEL_NAME, serve_args, log_path=workdir / "teachers.log"
        ) as endpoints:
            same_config = write_reader_config(workdir / "same.conf", endpoints, max_length, k, other_tokenizer=False)
            other_config = write_reader_config(workdir / "other.conf", endpoints, max_length, k, other_tokenizer=True)
            for seed in range(seeds):
                with console.status(
                    f"seed {seed}: the student with the teacher's tokenizer, with the teacher and without"
                ):
                    rows = same_tokenizer_rows(student_ids, steps * batch_size, max_length, seed)
                    same.append(
                        run_arm(
                            seed, rows, same_config, student, teacher_tokenizer.get_vocab_size(), eos, held_out,
                            workdir / "out", "kl", alpha, temperature,
                        )
                    )  # fmt: skip
                with console.status(f"seed {seed}: the student with another tokenizer, with the teacher and without"):
                    rows = other_tokenizer_rows(
                        student_text, other_ids, other_offsets, other_tokenizer, teacher_tokenizer,
                        steps * batch_size, max_length, seed,
                    )  # fmt: skip
                    other.append(
                        run_arm(
                            seed, rows, other_config, student, other_tokenizer.get_vocab_size(), other_eos,
                            other_held_out, workdir / "out", "uld", uld_alpha, temperature,
                        )
                    )  # fmt: skip
                console.print(
                    f"seed {seed}: same tokenizer: with the teacher {same[-1].with_teacher:.3f} bits per char, "
                    f"without {same[-1].without_teacher:.3f} (saved {same[-1].gain:+.3f}); "
                    f"other tokenizer: with the teacher {other[-1].with_teacher:.3f}, "
                    f"without {other[-1].without_teacher:.3f} (saved {other[-1].gain:+.3f})"
                )

    over = f"{seeds} seeds" if seeds > 1 else "1 seed"
    table = Table(
        title=f"distill demo llm: GPT-2 on stdlib source, top-{k}, {steps} steps, {over}, {TEACHERS} local hf: teachers"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(
        "characters: teacher's text, students', held-out",
        f"{len(teacher_text):,}, {len(student_text):,}, {len(held_out_text):,}",
    )
    table.add_row(
        "vocabularies: teacher's tokenizer, other tokenizer",
        f"{teacher_tokenizer.get_vocab_size():,}, {other_tokenizer.get_vocab_size():,}",
    )
    table.add_row("teacher bits per char", f"{teacher_bits:.3f}")
    for arms, label, suffix in ((same, "student", ""), (other, "student with another tokenizer", " (other tokenizer)")):
        gains = [a.gain for a in arms]
        table.add_row(f"{label} bits per char, trained with the teacher", mean_std([a.with_teacher for a in arms], 3))
        table.add_row(
            f"{label} bits per char, trained without a teacher", mean_std([a.without_teacher for a in arms], 3)
        )
        table.add_row(f"bits per char saved by the teacher{suffix} (mean ± std over {over})", mean_std(gains, 3, "+"))
        table.add_row(f"seeds where the teacher helped{suffix}", f"{sum(g > 0 for g in gains)} of {seeds}")
    aligned = sum(a.aligned for a in other) / max(1, sum(a.student_tokens for a in other))
    table.add_row("student positions aligned with a teacher position (other tokenizer)", f"{aligned:.1%}")
    tokens = sum(a.teacher_tokens for a in same + other)
    table.add_row(
        "teacher tokens/s through DistillReader (reader + student training)",
        f"{tokens / sum(a.seconds for a in same + other):,.0f}",
    )
    table.add_row("bytes per token carried (top-k)", f"{k * (4 + 4):,}")
    table.add_row("bytes per token, dense", f"{teacher_tokenizer.get_vocab_size() * 4:,}")
    console.print(table)
