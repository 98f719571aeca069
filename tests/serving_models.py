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
