"""distill-reader: service-based knowledge distillation.

The public API is what this module exports, plus ``distill_reader.serving.teacher_model``,
``distill_reader.torch`` (``DistillDataset``), ``distill_reader.paddle``, ``distill_reader.hf``,
``distill_reader.alignment`` and the ``distill`` command; every other module is internal and may
change (docs/architecture.md lists them).
"""

from distill_reader._logging import install_default_handler
from distill_reader.errors import (
    ConfigError,
    DiscoveryError,
    DistillReaderError,
    NoTeacherError,
    PipelineError,
    PipelineProcessError,
    ReaderArgumentError,
    ReaderFunctionError,
    SampleError,
    StoreError,
    StoreMismatchError,
    StoreMissingError,
    TeacherAuthError,
    TeacherError,
    TeacherMismatchError,
    TeacherOutputError,
)

__version__ = "0.1.0"

# The library's log lines show in one format without any logging configuration, and only in the
# user's once there is one (see distill_reader._logging).
install_default_handler()

__all__ = [
    "ConfigError",
    "DiscoveryError",
    "DistillReader",
    "DistillReaderError",
    "FakeDistillReader",
    "NoTeacherError",
    "PipelineError",
    "PipelineProcessError",
    "ReaderArgumentError",
    "ReaderFunctionError",
    "SampleError",
    "StoreError",
    "StoreMismatchError",
    "StoreMissingError",
    "TeacherAuthError",
    "TeacherError",
    "TeacherMismatchError",
    "TeacherOutputError",
    "__version__",
]


def __getattr__(name: str):
    # Imported lazily so that `distill teacher serve` and friends do not pay for the reader's imports.
    if name in ("DistillReader", "FakeDistillReader"):
        from distill_reader import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'distill_reader' has no attribute {name!r}")
