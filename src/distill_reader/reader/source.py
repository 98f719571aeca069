"""The seed's reader-setting API, shared by DistillReader and FakeDistillReader."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from distill_reader.errors import DistillReaderError, ReaderArgumentError, ReaderFunctionError

ReaderFunction = Callable[[], Iterable[Any]]


def reader_function_error(exc: Exception, samples: int | None = None) -> ReaderFunctionError:
    """The error for an exception of the user's reader function: raised when it was called
    (``samples`` None) or after it had yielded ``samples`` samples. Raise it ``from exc``."""
    after = "" if samples is None else f" after {samples} samples"
    return ReaderFunctionError(f"the reader function raised {type(exc).__name__}{after}: {exc}")


class ReaderSource:
    """``set_*_generator`` and ``distill_reader()``; subclasses implement one epoch in ``_epoch``."""

    _reader: tuple[str, ReaderFunction] | None = None

    def set_sample_generator(self, reader: ReaderFunction) -> ReaderSource:
        """``reader()`` yields one sample at a time: a tuple of per-field arrays (feed_vars order)."""
        return self._set_reader("sample", reader)

    def set_sample_list_generator(self, reader: ReaderFunction) -> ReaderSource:
        """``reader()`` yields lists of samples."""
        return self._set_reader("sample_list", reader)

    def set_batch_generator(self, reader: ReaderFunction) -> ReaderSource:
        """``reader()`` yields batches: one array per feed var with a leading batch dimension."""
        return self._set_reader("batch", reader)

    def distill_reader(self) -> Callable[[], Iterator[list[np.ndarray]]]:
        """A callable; each call runs one epoch (calling the user's reader again) as a generator."""
        if self._reader is None:
            raise DistillReaderError(
                "no reader set: call set_sample_generator, set_sample_list_generator or set_batch_generator first"
            )
        return self._epoch

    def _set_reader(self, kind: str, reader: ReaderFunction) -> ReaderSource:
        if not callable(reader):
            raise ReaderArgumentError(
                f"the reader must be a function returning an iterable, got {type(reader).__name__}"
            )
        self._reader = (kind, reader)
        return self

    def _epoch(self) -> Iterator[list[np.ndarray]]:
        raise NotImplementedError
