"""The student side: DistillReader and FakeDistillReader."""

from distill_reader.reader.distill_reader import DistillReader
from distill_reader.reader.fake import FakeDistillReader

__all__ = ["DistillReader", "FakeDistillReader"]
