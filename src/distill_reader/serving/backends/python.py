"""Python callable backend and the :func:`teacher_model` decorator that declares its tensors."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distill_reader.oip import TensorSpec, numpy_dtype, oip_datatype, shape_matches
from distill_reader.serving.backends.base import Backend

#: One declared tensor: ``(name, dtype, per-sample shape)``; dtype in numpy (``"float32"``,
#: ``np.float32``) or OIP (``"FP32"``) spelling; ``-1`` in the shape means any size.
TensorDecl = tuple[str, Any, Sequence[int]]
ModelFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _to_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype.upper() == dtype:
        return numpy_dtype(dtype)  # OIP spelling, e.g. FP32
    dt = np.dtype(dtype)
    oip_datatype(dt)  # raises for dtypes OIP cannot carry
    return dt


def tensor_specs(decls: Sequence[TensorDecl | TensorSpec], what: str = "tensor") -> list[TensorSpec]:
    """``TensorSpec``s from ``(name, dtype, shape)`` declarations; ValueError names a bad one."""
    specs = []
    for decl in decls:
        if isinstance(decl, TensorSpec):
            specs.append(decl)
            continue
        try:
            name, dtype, shape = decl
            specs.append(TensorSpec(str(name), _to_dtype(dtype), tuple(int(d) for d in shape)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad {what} declaration {decl!r}: expected (name, dtype, shape); {e}") from e
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate {what} names in {names}")
    return specs


def teacher_model(
    inputs: Sequence[TensorDecl | TensorSpec], outputs: Sequence[TensorDecl | TensorSpec]
) -> Callable[[ModelFn], ModelFn]:
    """Declare a function's tensors so ``distill teacher serve --model module:function`` can serve it.

    ``inputs``/``outputs`` are lists of ``(name, dtype, per-sample shape)``. The function gets a
    dict of batch arrays (leading batch dim) and returns a dict of batch arrays::

        @teacher_model(inputs=[("x", "float32", (4,))], outputs=[("y", "float32", (3,))])
        def model(batch):
            return {"y": batch["x"] @ W}
    """
    in_specs = tensor_specs(inputs, "input")
    out_specs = tensor_specs(outputs, "output")

    def decorate(fn: ModelFn) -> ModelFn:
        fn.inputs = in_specs  # type: ignore[attr-defined]
        fn.outputs = out_specs  # type: ignore[attr-defined]
        return fn

    return decorate


def _import_module(module: str) -> Any:
    if module.endswith(".py"):
        if not os.path.isfile(module):
            raise ImportError(f"file {module!r} does not exist")
        name = "_distill_teacher_" + os.path.splitext(os.path.basename(module))[0]
        spec = importlib.util.spec_from_file_location(name, module)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Console scripts do not put the working directory on sys.path; `python -m` would.
        if e.name != module.split(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.insert(0, os.getcwd())
        return importlib.import_module(module)


class PythonBackend(Backend):
    """Calls a Python function on each batch and checks its outputs against the declaration."""

    platform = "python"
    triton_backend = "python"

    def __init__(self, fn: ModelFn, *, name: str | None = None) -> None:
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        if not callable(fn):
            raise ValueError(f"{self.name} is not callable")
        missing = [a for a in ("inputs", "outputs") if getattr(fn, a, None) is None]
        if missing:
            raise ValueError(
                f"{self.name} does not declare its {' and '.join(missing)}; decorate it with "
                f"@distill_reader.serving.teacher_model(inputs=[...], outputs=[...])"
            )
        self._fn = fn
        self.inputs = tensor_specs(fn.inputs, "input")  # type: ignore[attr-defined]
        self.outputs = tensor_specs(fn.outputs, "output")  # type: ignore[attr-defined]
        if not self.inputs or not self.outputs:
            raise ValueError(f"{self.name} must declare at least one input and one output")

    @classmethod
    def from_spec(cls, spec: str) -> PythonBackend:
        """The backend for ``module:function`` (``module`` may be a ``.py`` path)."""
        module, _, attr = spec.rpartition(":")
        try:
            fn = getattr(_import_module(module), attr)
        except ImportError as e:
            raise ValueError(f"model spec {spec!r}: cannot import {module!r}: {e}") from e
        except AttributeError:
            raise ValueError(f"model spec {spec!r}: module {module!r} has no attribute {attr!r}") from None
        try:
            return cls(fn, name=spec)
        except ValueError as e:
            raise ValueError(f"model spec {spec!r}: {e}") from e

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        result = self._fn(inputs)
        if not isinstance(result, dict):
            raise TypeError(f"{self.name} returned {type(result).__name__}, expected a dict of arrays")
        out = {}
        for spec in self.outputs:
            if spec.name not in result:
                raise ValueError(f"{self.name} did not return output {spec.name!r}")
            arr = np.asarray(result[spec.name])
            if arr.dtype != spec.dtype:
                raise ValueError(f"output {spec.name!r} of {self.name} has dtype {arr.dtype}, declared {spec.dtype}")
            if arr.ndim == 0 or arr.shape[0] != n or not shape_matches(spec.shape, arr.shape[1:]):
                raise ValueError(
                    f"output {spec.name!r} of {self.name} has shape {list(arr.shape)}, expected {[n, *spec.shape]}"
                )
            out[spec.name] = arr
        return out
