"""The student side: DistillReader and FakeDistillReader.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
"""

from __future__ import annotations

__all__ = ["DistillReader", "FakeDistillReader"]


def __getattr__(name: str):
    # Imported when asked for, so that importing one module of this package (the teacher
    # transports map reader.pool's SharedBuffer) does not import the whole reader.
    if name == "DistillReader":
        from distill_reader.reader.distill_reader import DistillReader

        return DistillReader
    if name == "FakeDistillReader":
        from distill_reader.reader.fake import FakeDistillReader

        return FakeDistillReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
