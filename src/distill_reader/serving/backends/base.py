"""The backend interface of the teacher server, and :func:`load_backend` that picks one from a SPEC.

A backend runs one model on a whole batch: every input and output array has a leading batch
dimension. ``inputs`` / ``outputs`` describe the per-sample shapes (``-1`` = any size).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np

from distill_reader.oip import TensorSpec


class Backend(ABC):
    """One model the teacher server can run. ``infer`` may be called from a worker thread."""

    #: Per-sample specs of the model's inputs and outputs, in the model's order.
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: The OIP ``platform`` string reported in model metadata.
    platform: str = "unknown"
    #: The Triton backend that runs this kind of model, reported as ``ModelConfig.backend``.
    triton_backend: str = ""

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch: one array per input name -> one array per output name."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the backend holds (sessions, threads). Default: nothing."""

    def describe(self) -> str:
        """One line naming the inputs and outputs, e.g. ``x FP32[-1,4] -> y FP32[-1,3]``."""

        def fmt(specs: list[TensorSpec]) -> str:
            return ", ".join(f"{s.name} {s.datatype}[{','.join(map(str, (-1, *s.shape)))}]" for s in specs)

        return f"inputs: {fmt(self.inputs)}; outputs: {fmt(self.outputs)}"


def load_backend(spec: str, *, threads: int | None = None) -> Backend:
    """The backend for SPEC: ``path/to/model.onnx`` (an existing file), a saved Paddle inference
    model (``PATH.json``/``PATH.pdmodel``, the prefix ``PATH`` or a directory holding one; see
    :mod:`~distill_reader.serving.backends.paddle`) or ``module:function``.

    ``module`` may also be a path to a ``.py`` file. ``threads`` sets ONNX Runtime's or Paddle's
    intra-op threads (ignored by Python backends). Raises ``ValueError`` naming the spec when it is unusable.
    """
    if spec.endswith(".onnx"):
        if not os.path.isfile(spec):
            raise ValueError(f"model file {spec!r} does not exist")
        from distill_reader.serving.backends.onnx import OnnxBackend

        return OnnxBackend(spec, threads=threads)
    from distill_reader.serving.backends.paddle import PaddleBackend, find_paddle_model

    if paddle_files := find_paddle_model(spec):
        return PaddleBackend(*paddle_files, threads=threads)
    module, sep, attr = spec.rpartition(":")
    if sep and module and attr and attr.isidentifier():
        from distill_reader.serving.backends.python import PythonBackend

        return PythonBackend.from_spec(spec)
    raise ValueError(
        f"model spec {spec!r} is neither an ONNX file (path ending in .onnx), a saved Paddle model "
        "(PATH.json or PATH.pdmodel beside PATH.pdiparams) nor a Python callable (module:function)"
    )
