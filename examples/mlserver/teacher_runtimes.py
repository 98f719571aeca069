"""Custom Seldon MLServer runtimes that serve distill-reader teachers over OIP.

``mlserver start examples/mlserver`` puts this folder on ``sys.path``, so each model's
``model-settings.json`` names its runtime as ``teacher_runtimes.OnnxTeacher`` (an ONNX file run
with onnxruntime, e.g. the digits teacher) or ``teacher_runtimes.TagTeacher`` (the tests' exact
``tag`` model, for bit-exact checks). Run with the MLServer environment (see docs/teachers.md).

What the reader needs from a runtime: inputs and outputs declared in ``model-settings.json`` with a
leading ``-1`` (batch) dimension, the same names and datatypes as the reader's config, and outputs
of exactly ``[rows, *per-sample shape]``. MLServer answers with raw tensor contents because the
reader sends raw inputs.
"""

from __future__ import annotations

import asyncio

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


def tag_rows(img: np.ndarray) -> np.ndarray:
    """Per row, 10 partial sums of the flattened image (a copy of tests/reader_models.tag_rows)."""
    x = img.reshape(len(img), -1).astype(np.float64)
    out = np.stack([x[:, i::10].sum(axis=1) for i in range(10)], axis=1)
    return out.astype(np.float32)


class _Teacher(MLModel):
    """Decodes the request's tensors by name, runs ``compute``, encodes the declared outputs."""

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {inp.name: self.decode(inp, default_codec=NumpyCodec) for inp in payload.inputs}
        # onnxruntime and numpy release the GIL: keep the event loop (gRPC, batching) free meanwhile.
        outputs = await asyncio.to_thread(self.compute, inputs)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name=name, payload=array) for name, array in outputs.items()],
        )


class OnnxTeacher(_Teacher):
    """An ONNX model run with onnxruntime on CPU; ``parameters.uri`` is the ``.onnx`` file."""

    async def load(self) -> bool:
        import onnxruntime as ort

        path = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._output_names = [out.name for out in self._session.get_outputs()]
        return True

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results))


class TagTeacher(_Teacher):
    """The exact ``tag`` model: ``img`` float32 [-1, 1, 4, 4] -> ``prediction`` float32 [-1, 10]."""

    async def load(self) -> bool:
        return True

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"prediction": tag_rows(inputs["img"])}
