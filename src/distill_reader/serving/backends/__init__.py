"""Teacher backends: one small interface (:class:`Backend`), one implementation per file, and
:func:`load_backend`, the factory that picks one for a ``--model`` spec."""

from __future__ import annotations

import os

from distill_reader.serving.backends.base import Backend


def load_backend(
    spec: str,
    *,
    threads: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_batch_tokens: int | None = None,
) -> Backend:
    """The backend for SPEC: ``path/to/model.onnx`` (an existing file), a saved Paddle inference
    model (``PATH.json``/``PATH.pdmodel``, the prefix ``PATH`` or a directory holding one; see
    :mod:`~distill_reader.serving.backends.paddle`), ``hf:DIR`` (a local transformers causal LM;
    see :mod:`~distill_reader.serving.backends.hf`) or ``module:function``.

    ``module`` may also be a path to a ``.py`` file. ``threads`` sets ONNX Runtime's, Paddle's or
    torch's intra-op threads (ignored by Python backends). ``device``, ``dtype`` and
    ``max_batch_tokens`` are for ``hf:`` models only. Raises ``ValueError`` naming the spec when it is unusable.
    """
    from distill_reader.serving.backends.hf import PREFIX, is_hf_spec

    if is_hf_spec(spec):
        from distill_reader.serving.backends.hf import HFBackend

        try:
            return HFBackend(
                spec[len(PREFIX) :], device=device, dtype=dtype, max_batch_tokens=max_batch_tokens, threads=threads
            )
        except ValueError as e:
            raise ValueError(f"model {spec!r}: {e}") from e
    llm_only = {"--device": device, "--dtype": dtype, "--max-batch-tokens": max_batch_tokens}
    if given := [name for name, value in llm_only.items() if value is not None]:
        raise ValueError(f"model {spec!r}: {', '.join(given)} apply to hf:DIR models only")
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
        "(PATH.json or PATH.pdmodel beside PATH.pdiparams), a transformers directory (hf:DIR) nor a "
        "Python callable (module:function)"
    )


__all__ = ["Backend", "load_backend"]
