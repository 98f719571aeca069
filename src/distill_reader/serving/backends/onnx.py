"""ONNX Runtime backend: names, dtypes and shapes come from the model file."""

from __future__ import annotations

import numpy as np

from distill_reader.oip import TensorSpec
from distill_reader.serving.backends.base import Backend

# ONNX Runtime's type strings for the dtypes OIP can carry.
_ORT_TYPES: dict[str, np.dtype] = {
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
}


def _dim(d: object) -> int:
    # Symbolic (str) or unknown (None) dims accept any size.
    return d if isinstance(d, int) and d >= 0 else -1


class OnnxBackend(Backend):
    """Runs an ``.onnx`` file with ONNX Runtime on the CPU.

    The first dimension of every input and output is the batch dimension. When the file fixes
    it (e.g. exported with batch 1), batches are run in chunks of that size.
    """

    platform = "onnxruntime_onnx"
    triton_backend = "onnxruntime"

    def __init__(self, path: str, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Concurrency comes from the batcher's instances, not from parallel graph branches.
        options.inter_op_num_threads = 1
        self.path = path
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [self._spec(n, "input") for n in self._session.get_inputs()]
        self.outputs = [self._spec(n, "output") for n in self._session.get_outputs()]
        self._output_names = [s.name for s in self.outputs]
        fixed = {n.shape[0] for n in self._session.get_inputs() if _dim(n.shape[0]) > 0}
        if len(fixed) > 1:
            raise ValueError(f"{path}: inputs disagree on the batch dimension {sorted(fixed)}")
        self._fixed_batch: int | None = fixed.pop() if fixed else None

    def _spec(self, node: object, kind: str) -> TensorSpec:
        name, type_, shape = node.name, node.type, node.shape  # type: ignore[attr-defined]
        if type_ not in _ORT_TYPES:
            raise ValueError(f"{self.path}: {kind} {name!r} has unsupported type {type_}")
        if not shape:
            raise ValueError(f"{self.path}: {kind} {name!r} is a scalar; it needs a batch dimension")
        return TensorSpec(name, _ORT_TYPES[type_], tuple(_dim(d) for d in shape[1:]))

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fixed = self._fixed_batch
        n = len(next(iter(inputs.values())))
        if fixed is None or n == fixed:
            results = self._session.run(self._output_names, inputs)
            return dict(zip(self._output_names, results, strict=True))
        if n % fixed:
            raise ValueError(f"{self.path} takes batches of {fixed} rows; got {n}")
        parts = [
            self._session.run(self._output_names, {k: v[i : i + fixed] for k, v in inputs.items()})
            for i in range(0, n, fixed)
        ]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self._output_names)}
