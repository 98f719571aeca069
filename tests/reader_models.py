"""Teacher models for the reader tests, served by the built-in teacher server.

``tag`` is exact: each output row is computed from its own input row only (float64 sums of
integers-valued pixels), so "the teacher output equals the model applied to that very row" can be
checked with array equality. It also encodes the row's id, so a lost, repeated or misplaced row
cannot go unnoticed.
"""

from __future__ import annotations

import os
import time

import numpy as np

from distill_reader.serving import teacher_model

IMG_SHAPE = (1, 4, 4)
N_OUT = 10


def tag_rows(img: np.ndarray) -> np.ndarray:
    """The reference output: per row, 10 partial sums of the flattened image (exact in float32)."""
    x = img.reshape(len(img), -1).astype(np.float64)
    return np.stack([x[:, i::N_OUT].sum(axis=1) for i in range(N_OUT)], axis=1).astype(np.float32)


def make_sample(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``i``: pixels that encode ``i``, label ``i``."""
    img = (np.arange(16, dtype=np.float32).reshape(IMG_SHAPE) + i * 16) % 1000 + i
    return img, np.array([i], dtype=np.int64)


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"prediction": tag_rows(batch["img"])}


@teacher_model(inputs=[("image", "float32", IMG_SHAPE)], outputs=[("scale_0.tmp_0", "float32", (10,))])
def tag_paddle_names(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same model with Paddle-style served names (for serving_conf_file aliases)."""
    return {"scale_0.tmp_0": tag_rows(batch["image"])}


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
def slow_tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tag`` taking ``$SLOW_TAG_SECONDS`` (default 0.02) per batch, sleeping like a GPU, so an
    epoch lasts long enough to kill a teacher in the middle of it."""
    time.sleep(float(os.environ.get("SLOW_TAG_SECONDS", "0.02")))
    return {"prediction": tag_rows(batch["img"])}


def label_rows(label: np.ndarray) -> np.ndarray:
    """Another exact model, of the label: per row ``[2 l, l + 0.5, -l]`` (for teacher groups)."""
    x = label.reshape(len(label)).astype(np.float64)
    return np.stack([2 * x, x + 0.5, -x], axis=1).astype(np.float32)


@teacher_model(inputs=[("label", "int64", (1,))], outputs=[("prediction", "float32", (3,))])
def slow_label(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`label_rows` taking ``$SLOW_TAG_SECONDS`` (20 ms) per batch: a second teacher model,
    with its own input and an output of the same name as ``tag``'s."""
    time.sleep(float(os.environ.get("SLOW_TAG_SECONDS", "0.02")))
    return {"prediction": label_rows(batch["label"])}


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
def broken(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Answers every request with an error."""
    raise RuntimeError("the teacher model is broken")


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
def hang(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accepts the request and never answers."""
    time.sleep(10**6)
    raise AssertionError("unreachable")


# -- sequence models: variable-length rows, per-token top-k-shaped outputs ------------------------

K = 4  # entries per token of the sequence models' outputs


def seq_rows(tokens: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per position of each row: ``values`` = the running sum of the row's tokens (causal, so
    padding at the end changes no real position) plus ``j / 8`` (plus 1000 × the row's length when
    the lengths are given), and ``indices`` = ``(token + j) % 1000``, for ``j < K``."""
    values = np.cumsum(tokens, axis=1, dtype=np.float64)[..., None] + np.arange(K) / 8
    if lengths is not None:
        values += 1000.0 * np.asarray(lengths, dtype=np.float64)[:, None, None]
    indices = (tokens[..., None] + np.arange(K)) % 1000
    return values.astype(np.float32), indices.astype(np.int32)


SEQ_OUTPUTS = [("topk_values", "float32", (-1, K)), ("topk_indices", "int32", (-1, K))]


@teacher_model(inputs=[("tokens", "int64", (-1,))], outputs=SEQ_OUTPUTS)
def seq_tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    values, indices = seq_rows(batch["tokens"])
    return {"topk_values": values, "topk_indices": indices}


@teacher_model(inputs=[("tokens", "int64", (-1,)), ("tokens_length", "int64", ())], outputs=SEQ_OUTPUTS)
def seq_tag_lengths(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`seq_tag` that also takes each row's length (as a model with an attention mask does)."""
    values, indices = seq_rows(batch["tokens"], batch["tokens_length"])
    return {"topk_values": values, "topk_indices": indices}


def make_sequence(i: int, max_length: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``i`` of the sequence tests: tokens of a length 1..max_length that depends on ``i``,
    and the sample's number."""
    length = 1 + (i * 7919) % max_length
    tokens = (np.arange(length, dtype=np.int64) * 31 + i * 17) % 997 + 1
    return tokens, np.array([i], dtype=np.int64)
