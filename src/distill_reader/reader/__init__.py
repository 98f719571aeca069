"""The student side: DistillReader and FakeDistillReader.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
"""

from distill_reader.reader.distill_reader import DistillReader
from distill_reader.reader.fake import FakeDistillReader

__all__ = ["DistillReader", "FakeDistillReader"]
