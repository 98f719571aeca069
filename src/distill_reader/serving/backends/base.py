"""The backend interface of the teacher server, and :func:`load_backend` that picks one from a SPEC.

A backend runs one model on a whole batch: every input and output array has a leading batch
dimension. ``inputs`` / ``outputs`` describe the per-sample shapes (``-1`` = any size).
"""

from __future__ import annotations

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
