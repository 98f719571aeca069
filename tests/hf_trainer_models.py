"""An exact next-token teacher for the Trainer tests (tests/test_hf_trainer.py), served by the built-in server.

``count_next`` is a "language model" over ``VOCAB`` tokens in numpy: at position ``t`` it strongly
predicts ``(x_t + 1) % VOCAB`` (the rows of :func:`count_row` count up, so it is right), with
logits depending on ``x_t`` and ``t`` only: causal, so padding changes no real position, and each
row's answer can be recomputed exactly (:func:`expected_topk`). With ``HF_TRAINER_ROWS_LOG`` set,
the server appends every real row it computes (its tokens, space-separated) to that file: the rows
the teacher saw.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from distill_reader import DistillReader
from distill_reader.serving import teacher_model
from distill_reader.serving.topk import topk

VOCAB = 32
MAX_LENGTH = 16
_lock = threading.Lock()


def count_row(i: int) -> np.ndarray:
    """Row ``i``: ``8 + i % 9`` tokens counting up from ``7 i % VOCAB``; rows 0..287 all differ."""
    return ((7 * i + np.arange(8 + i % 9)) % VOCAB).astype(np.int64)


def next_logits(tokens: np.ndarray) -> np.ndarray:
    """FP32 ``[n, L, VOCAB]`` logits of token rows INT64 ``[n, L]``."""
    t = np.arange(tokens.shape[1])[None, :, None]
    v = np.arange(VOCAB)[None, None, :]
    logits = ((tokens[:, :, None] * 5 + t * 3 + v * 7) % 13 - 6) / 8
    logits = logits + 4.0 * (v == (tokens[:, :, None] + 1) % VOCAB)
    return logits.astype(np.float32)


def expected_topk(tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``distill teacher serve --model hf_trainer_models:count_next --topk k`` answers for one row."""
    values, indices = topk(next_logits(tokens[None, :]), k)
    return values[0], indices[0]


@teacher_model(
    inputs=[("tokens", "int64", (-1,)), ("tokens_length", "int64", ())],
    outputs=[("logits", "float32", (-1, VOCAB))],
)
def count_next(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens, lengths = batch["tokens"], batch["tokens_length"]
    path = os.environ.get("HF_TRAINER_ROWS_LOG")
    if path:
        lines = "".join(" ".join(map(str, row[:n].tolist())) + "\n" for row, n in zip(tokens, lengths))
        with _lock, open(path, "a") as fh:
            fh.write(lines)
    return {"logits": next_logits(tokens)}


def student_config():  # -> transformers.GPT2Config
    """The Trainer tests' student: no dropout, so ranks and runs compute the same thing."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_LENGTH,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def arguments(output_dir: Path | str, **kwargs):  # -> transformers.TrainingArguments
    """The Trainer tests' arguments (CPU, constant learning rate, no checkpoints, no reports), ``kwargs`` over them."""
    from transformers import TrainingArguments

    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    options.update(kwargs)
    return TrainingArguments(**options)


# --- the reader side ---------------------------------------------------------------------------------

CONFIG = """\
[conf]
mode = fixed
servers = {servers!r}
max_length = {max_length}

[feed]
feed_vars = ['tokens']
feed_types = ['int64']
feed_shapes = [(-1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['logits_topk_values', 'logits_topk_indices']
fetch_types = ['float32', 'int32']
fetch_shapes = [(-1, {k}), (-1, {k})]
"""


@contextlib.contextmanager
def count_teacher(folder: Path, k: int) -> Iterator[tuple[str, Path]]:
    """A ``count_next`` teacher process with ``--topk k``: (its address, the file of the rows it computed)."""
    from conftest import TeacherProcesses

    log = folder / "rows.log"
    fleet = TeacherProcesses()
    try:
        yield fleet.start("hf_trainer_models:count_next", "--topk", str(k), env={"HF_TRAINER_ROWS_LOG": str(log)}), log
    finally:
        fleet.stop_all()


def seen_rows(log: Path) -> list[tuple[int, ...]]:
    """The rows the teacher computed (in the order it computed them)."""
    if not log.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in log.read_text().splitlines()]


def make_reader(folder: Path, endpoint: str, k: int, rows: int = 96, kind: str = "sample", batch_size: int = 16):
    """A DistillReader of rows ``count_row(0 .. rows - 1)`` from a reader function of ``kind``
    (``sample``; ``sample_list`` and ``batch``: 5 rows at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "reader.conf"
    conf.write_text(CONFIG.format(servers=[endpoint], max_length=MAX_LENGTH, k=k))
    reader = DistillReader(conf, batch_size, 8, capacity=4, occupied_capacity=1)
    samples = [count_row(i) for i in range(rows)]
    if kind == "sample":
        reader.set_sample_generator(lambda: ((s,) for s in samples))
    elif kind == "sample_list":
        reader.set_sample_list_generator(lambda: ([(s,) for s in samples[i : i + 5]] for i in range(0, rows, 5)))
    else:
        # a variable var as a list of per-row arrays
        reader.set_batch_generator(lambda: ([samples[i : i + 5]] for i in range(0, rows, 5)))
    return reader
