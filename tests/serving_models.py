"""Models for the teacher-server tests: ONNX files built with onnx.helper, and Python models."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from distill_reader.serving import teacher_model

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def build_affine_onnx(path: Path, batch_dim: str | int = "batch") -> Path:
    """``y = x @ W + B`` with x: FP32[batch, 4], y: FP32[batch, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any recent ONNX Runtime
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@teacher_model(
    inputs=[("x", "float32", (4,)), ("m", "INT64", (2,))],
    outputs=[("y", np.float32, (3,)), ("s", "float64", (1,)), ("k", "int64", (2,))],
)
def affine(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two inputs, three outputs of different dtypes."""
    x = batch["x"]
    return {
        "y": x @ W + B,
        "s": x.sum(axis=1, keepdims=True, dtype=np.float64),
        "k": batch["m"] * 2,
    }


def expected_affine(x: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": x @ W + B, "s": x.sum(axis=1, keepdims=True, dtype=np.float64), "k": m * 2}


class Recorder:
    """A Python model ``y = 2 * x`` that records the batch sizes it was called with."""

    def __init__(self, fail_when_negative: bool = False) -> None:
        self.sizes: list[int] = []
        self._lock = threading.Lock()
        self.fail_when_negative = fail_when_negative

        @teacher_model(inputs=[("x", "float32", (-1,))], outputs=[("y", "float32", (-1,))])
        def model(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            x = batch["x"]
            with self._lock:
                self.sizes.append(len(x))
            if self.fail_when_negative and (x < 0).any():
                raise ValueError("negative input in this batch")
            return {"y": x * 2}

        self.model = model


@teacher_model(inputs=[("x", "float32", (2,))], outputs=[("y", "float32", (2,))])
def wrong_dtype(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": batch["x"].astype(np.float64)}


def undeclared(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


@teacher_model(inputs=[("x", "float32", (1,))], outputs=[("y", "float32", (1,))])
def slow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sleeps as many tenths of a second as the first value says (a busy GPU stand-in)."""
    time.sleep(float(batch["x"][0, 0]) / 10)
    return {"y": batch["x"] + 1}


# --- sequence models (variable-length rows) ---------------------------------------------------------

#: Vocabulary of the per-token outputs of ``seq_tag`` and ``seq_tag_lengths``.
SEQ_VOCAB = 50


def seq_logits(tokens: np.ndarray) -> np.ndarray:
    """Exact per-token logits FP32[n, L, SEQ_VOCAB] of rows of tokens INT64[n, L].

    Position t's values depend only on the row's tokens 0..t and on t (causal), so zeros padded at
    the end never change a real position. Values are multiples of 1/8 (exact in float32), distinct
    within a position (13 is prime to 97): a top-k of them has no ties.
    """
    prefix = np.cumsum(tokens, axis=1)
    t = np.arange(tokens.shape[1])
    codes = (prefix[:, :, None] * 31 + t[None, :, None] * 7 + np.arange(SEQ_VOCAB) * 13) % 97
    return ((codes - 48) / 8).astype(np.float32)


@teacher_model(inputs=[("tokens", "int64", (-1,))], outputs=[("logits", "float32", (-1, SEQ_VOCAB))])
def seq_tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-token logits of variable-length rows (see :func:`seq_logits`)."""
    return {"logits": seq_logits(batch["tokens"])}


@teacher_model(
    inputs=[("tokens", "int64", (-1,)), ("tokens_length", "int64", ())],
    outputs=[("logits", "float32", (-1, SEQ_VOCAB))],
)
def seq_tag_lengths(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``seq_tag`` that takes each row's real length and zeroes the positions past it (a mask)."""
    logits = seq_logits(batch["tokens"])
    positions = np.arange(logits.shape[1])
    logits[positions[None, :] >= batch["tokens_length"][:, None]] = 0
    return {"logits": logits}


def expected_seq_lengths(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """What ``seq_tag_lengths`` answers for rows ``tokens`` (padded) of real ``lengths``."""
    out = np.zeros((*tokens.shape, SEQ_VOCAB), np.float32)
    for i, n in enumerate(lengths):
        out[i, :n] = seq_logits(tokens[i : i + 1, :n])[0]
    return out


@teacher_model(inputs=[("tokens", "int64", (-1,))], outputs=[("shifted", "int64", (-1,))])
def seq_shift(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An output with a length of its own (L + 1: a 0 first), which padding cannot serve."""
    tokens = batch["tokens"]
    return {"shifted": np.concatenate([np.zeros((len(tokens), 1), np.int64), tokens], axis=1)}


@teacher_model(inputs=[("tokens", "int64", (-1,))], outputs=[("mean", "float64", (1,))])
def seq_mean(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A pooled output over all positions: padding would change it, and nothing says where rows end."""
    return {"mean": batch["tokens"].mean(axis=1, keepdims=True)}


#: Rows of ``build_seq_onnx``'s embedding table, and its vocabulary.
SEQ_ONNX_ROWS, SEQ_ONNX_VOCAB = 97, 1000
SEQ_TABLE = np.random.default_rng(1).standard_normal((SEQ_ONNX_ROWS, SEQ_ONNX_VOCAB)).astype(np.float32)


def build_seq_onnx(path: Path) -> Path:
    """``logits = TABLE[cumsum(tokens) % 97]``: INT64[batch, len] -> FP32[batch, len, 1000], causal."""
    graph = helper.make_graph(
        [
            helper.make_node("CumSum", ["tokens", "axis"], ["prefix"]),
            helper.make_node("Mod", ["prefix", "rows"], ["row"]),
            helper.make_node("Gather", ["table", "row"], ["logits"], axis=0),
        ],
        "seq",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "len"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "len", SEQ_ONNX_VOCAB])],
        initializer=[
            numpy_helper.from_array(SEQ_TABLE, "table"),
            numpy_helper.from_array(np.array(1, np.int64), "axis"),
            numpy_helper.from_array(np.array(SEQ_ONNX_ROWS, np.int64), "rows"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def expected_seq_onnx(tokens: np.ndarray) -> np.ndarray:
    """What ``build_seq_onnx``'s model answers for rows ``tokens``."""
    return SEQ_TABLE[np.cumsum(tokens, axis=1) % SEQ_ONNX_ROWS]


# --- top-k reference ---------------------------------------------------------------------------------


def dense_topk(x: np.ndarray, k: int, values: str = "logprobs", temperature: float = 1.0, dtype=np.float32):
    """The reference: a full stable argsort of every position (descending, ties by index)."""
    work = np.float64 if x.dtype == np.float64 else np.float32
    z = x.astype(work)
    if values == "logprobs":
        z = z / work(temperature)
    idx = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(z, idx, axis=-1)
    if values == "logprobs":
        m = z.max(axis=-1, keepdims=True)
        top = top - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))
    return top.astype(dtype), idx.astype(np.int32)


def assert_topk(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """``got`` is exactly the reference ``want``: same dtypes, indices and values."""
    values, indices = got
    assert values.dtype == want[0].dtype and indices.dtype == np.int32
    np.testing.assert_array_equal(indices, want[1])
    np.testing.assert_array_equal(values, want[0])
