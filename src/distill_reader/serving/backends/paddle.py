"""Paddle Inference backend: serves a saved Paddle inference model (``paddle.jit.save`` output).

A saved model is a prefix ``PATH`` with two files: ``PATH.json`` (Paddle 3's default PIR program)
or ``PATH.pdmodel`` (the legacy ProgramDesc, Paddle 2 or ``FLAGS_enable_pir_api=0``), and
``PATH.pdiparams`` (the weights). :func:`find_paddle_model` accepts the model file, the prefix
(what was passed to ``paddle.jit.save``) or a directory holding one model.

Names come from the predictor (a PIR program's outputs are named ``fetch_name_0``, ...; a legacy
program's by their variables); dtypes and per-sample shapes from the program (``-1`` = any size).
The first dimension of every input and output is the batch dimension.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np

from distill_reader.oip import TensorSpec, numpy_dtype, oip_datatype
from distill_reader.serving.backends.base import Backend

_MODEL_SUFFIXES = (".json", ".pdmodel")
_PARAMS_SUFFIX = ".pdiparams"


def find_paddle_model(spec: str) -> tuple[str, str] | None:
    """``(model file, params file)`` when SPEC names a saved Paddle model, else ``None``.

    SPEC is ``PATH.json``/``PATH.pdmodel`` (with ``PATH.pdiparams`` beside it), the prefix ``PATH``,
    or a directory holding exactly one such pair. Does not import Paddle.
    """
    if os.path.isdir(spec):
        found = [
            os.path.join(spec, name)
            for name in sorted(os.listdir(spec))
            if name.endswith(_PARAMS_SUFFIX) and _model_file(os.path.join(spec, name[: -len(_PARAMS_SUFFIX)]))
        ]
        if len(found) > 1:
            raise ValueError(f"directory {spec!r} holds several Paddle models: {found}; name one of them")
        return _pair(found[0][: -len(_PARAMS_SUFFIX)]) if found else None
    if spec.endswith(_MODEL_SUFFIXES):
        prefix = os.path.splitext(spec)[0]
        if not os.path.isfile(spec):
            return None
        if not os.path.isfile(prefix + _PARAMS_SUFFIX):
            if spec.endswith(".pdmodel"):
                raise ValueError(f"Paddle model {spec!r} has no weights file {prefix + _PARAMS_SUFFIX!r} beside it")
            return None  # some other .json file
        return spec, prefix + _PARAMS_SUFFIX
    if os.path.isfile(spec + _PARAMS_SUFFIX) and _model_file(spec):
        return _pair(spec)
    return None


def _model_file(prefix: str) -> str | None:
    return next((prefix + s for s in _MODEL_SUFFIXES if os.path.isfile(prefix + s)), None)


def _pair(prefix: str) -> tuple[str, str]:
    return _model_file(prefix), prefix + _PARAMS_SUFFIX  # type: ignore[return-value]


def _spec(path: str, kind: str, name: str, dtype: str, shape: list[int]) -> TensorSpec:
    """A ``TensorSpec`` from a dtype in numpy (``float32``) or OIP (``FP32``) spelling."""
    try:
        dt = numpy_dtype(dtype) if dtype.isupper() else np.dtype(dtype)
        oip_datatype(dt)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {kind} {name!r} has a dtype OIP cannot carry: {dtype}") from None
    if not shape:
        raise ValueError(f"{path}: {kind} {name!r} is a scalar; it needs a batch dimension")
    return TensorSpec(name, dt, tuple(d if d >= 0 else -1 for d in shape[1:]))


Signature = tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]


def _pir_signature(model: str) -> Signature:
    """Input and output ``(dtype, shape)`` of a PIR (``.json``) program, read by ``paddle.jit.load``."""
    import paddle

    layer = paddle.jit.load(os.path.splitext(model)[0])
    sig = [
        [(str(s.dtype).removeprefix("paddle."), list(s.shape)) for s in specs]
        for specs in (layer._input_spec(), layer._output_spec())
    ]
    return sig[0], sig[1]


def _legacy_signature(model: str) -> Signature:
    """Input and output ``(OIP dtype, shape)`` of a legacy ``.pdmodel`` ProgramDesc, by feed/fetch column."""
    from paddle.base.proto import framework_pb2

    with open(model, "rb") as fh:
        block = framework_pb2.ProgramDesc.FromString(fh.read()).blocks[0]
    variables = {v.name: v for v in block.vars}

    def columns(op_type: str, slot: str) -> list[tuple[str, list[int]]]:
        found = []
        for op in block.ops:
            if op.type == op_type:
                col = next(a.i for a in op.attrs if a.name == "col")
                args = op.outputs if op_type == "feed" else op.inputs
                name = next(a.arguments[0] for a in args if a.parameter == slot)
                tensor = variables[name].type.dense_tensor.tensor
                found.append((col, (framework_pb2.VarType.Type.Name(tensor.data_type), list(tensor.dims))))
        return [sig for _, sig in sorted(found)]

    return columns("feed", "Out"), columns("fetch", "X")


class PaddleBackend(Backend):
    """Runs a saved Paddle inference model with ``paddle.inference`` on the CPU.

    Each model-instance thread gets its own predictor (``predictor.clone()``, sharing the weights).
    """

    platform = "paddle_inference"
    triton_backend = "paddle"

    def __init__(self, model: str, params: str, *, threads: int | None = None) -> None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import-time noise
                from paddle import inference
        except ImportError:
            raise ValueError(f"serving {model!r} needs PaddlePaddle: pip install 'distill-reader[paddle]'") from None
        self.path = model
        config = inference.Config(model, params)
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(threads or 1)
        self._predictor = inference.create_predictor(config)
        self._local = threading.local()
        self._clone_lock = threading.Lock()

        signature = _pir_signature(model) if model.endswith(".json") else _legacy_signature(model)
        names = (self._predictor.get_input_names(), self._predictor.get_output_names())
        specs = []
        for kind, kind_names, kind_sig in zip(("input", "output"), names, signature, strict=True):
            if len(kind_names) != len(kind_sig):
                raise ValueError(f"{model}: predictor has {kind}s {kind_names}, the program {len(kind_sig)}")
            specs.append([_spec(model, kind, n, dt, shape) for n, (dt, shape) in zip(kind_names, kind_sig)])
        self.inputs, self.outputs = specs

    def _own_predictor(self) -> Any:
        predictor = getattr(self._local, "predictor", None)
        if predictor is None:
            with self._clone_lock:
                predictor = self._local.predictor = self._predictor.clone()
        return predictor

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        predictor = self._own_predictor()
        for spec in self.inputs:
            array = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
            handle = predictor.get_input_handle(spec.name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(array)
        predictor.run()
        return {spec.name: predictor.get_output_handle(spec.name).copy_to_cpu() for spec in self.outputs}

    def close(self) -> None:
        self._predictor = None
        self._local = threading.local()
