"""The demo's data and teacher: scikit-learn's bundled digits (no download) and an MLP in ONNX.

The teacher is an MLP trained with scikit-learn and written as a plain ONNX graph (MatMul, Add,
Relu) whose output is the logits, so students can soften them with a temperature.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
N_FEATURES = 64
N_CLASSES = 10


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray  # float32 [n, 64], pixels scaled to [0, 1]
    y_train: np.ndarray  # int64 [n]
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.3) -> DigitsData:
    """The digits data set (1797 8x8 images shipped inside scikit-learn), split train/test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("the demo needs scikit-learn and onnx: pip install 'distill-reader[demo]'") from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsData(x[train], y[train], x[test], y[test])


def labelled_subset(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """A boolean mask over ``n`` training samples: the ``round(fraction * n)`` of them, chosen at
    random, whose labels the demo's student may use (it has the teacher's outputs on all of them)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the labelled fraction must be in (0, 1], got {fraction}")
    mask = np.zeros(n, dtype=bool)
    rng = np.random.default_rng([seed, 1])  # a stream apart from load_digits_split's for the same seed
    mask[rng.permutation(n)[: max(1, round(fraction * n))]] = True
    return mask


@dataclass(frozen=True)
class MLPWeights:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The teacher's forward pass in numpy (float32), for checking served outputs."""
        hidden = np.maximum(x @ self.w1 + self.b1, 0)
        return hidden @ self.w2 + self.b2


def train_teacher(data: DigitsData, hidden: int = 128, seed: int = 0) -> MLPWeights:
    """Train the teacher MLP with scikit-learn; about 2 s on one core."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=400, random_state=seed)
    # One BLAS thread: these matrices are small, and on a busy 2-core machine more threads made
    # training 7 times slower (84 s against 12 s for five teachers).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # 400 iterations are plenty for a teacher
        mlp.fit(data.x_train, data.y_train)
    w1, w2 = (w.astype(np.float32) for w in mlp.coefs_)
    b1, b2 = (b.astype(np.float32) for b in mlp.intercepts_)
    return MLPWeights(w1, b1, w2, b2)


def write_onnx(weights: MLPWeights, path: Path) -> Path:
    """Write the MLP as an ONNX model: ``pixels`` float32 [-1, 64] -> ``logits`` float32 [-1, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = [
        numpy_helper.from_array(weights.w1, "w1"),
        numpy_helper.from_array(weights.b1, "b1"),
        numpy_helper.from_array(weights.w2, "w2"),
        numpy_helper.from_array(weights.b2, "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", [INPUT_NAME, "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_teacher",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", N_CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime this package supports
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


CONFIG_TEMPLATE = """\
[conf]
mode = fixed
servers = {servers!r}
model_name = 'digits'

[feed]
feed_vars = ['{input}', 'label']
feed_types = ['float32', 'int64']
feed_shapes = [({features},), (1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['{output}']
fetch_types = ['float32']
fetch_shapes = [({classes},)]
"""


def write_reader_config(path: Path, servers: list[str]) -> Path:
    """The reader config for the digits teacher served as model ``digits``."""
    path.write_text(
        CONFIG_TEMPLATE.format(
            servers=servers, input=INPUT_NAME, output=OUTPUT_NAME, features=N_FEATURES, classes=N_CLASSES
        )
    )
    return path
