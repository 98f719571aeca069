"""The teacher server: the Open Inference Protocol (KServe v2) gRPC API over a backend.

Public: only ``teacher_model``, the decorator that declares a Python model's tensors (for
``distill teacher serve --model module:function``). The server itself (:mod:`.server`), the
backends (:mod:`.backends`) and the rest of this package are internal and may change; run a teacher
with the ``distill teacher serve`` command.
"""

from distill_reader.serving.backends.python import teacher_model

__all__ = ["teacher_model"]
