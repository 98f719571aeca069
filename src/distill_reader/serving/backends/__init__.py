"""Teacher backends: one small interface (:class:`Backend`), one implementation per file."""

from distill_reader.serving.backends.base import Backend, load_backend

__all__ = ["Backend", "load_backend"]
