"""The teacher server: the Open Inference Protocol (KServe v2) gRPC API over a backend.

``teacher_model`` declares a Python function's tensors; the server itself lives in
:mod:`distill_reader.serving.server` (``serve``, ``run_server``, ``running_server``).
"""

from distill_reader.serving.backends import Backend, load_backend
from distill_reader.serving.backends.python import teacher_model

__all__ = ["Backend", "load_backend", "running_server", "serve", "run_server", "teacher_model"]


def __getattr__(name: str):
    # Lazy: importing the decorator in a model file should not load grpc.
    if name in ("running_server", "serve", "run_server", "InferenceServer", "TeacherServer"):
        from distill_reader.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'distill_reader.serving' has no attribute {name!r}")
