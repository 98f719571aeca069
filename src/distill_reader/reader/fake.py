"""FakeDistillReader: the reader's batches with zero-filled teacher outputs, no teacher needed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from distill_reader.config import ReaderConfig, load_config, validate_reader_args
from distill_reader.reader.filling import SlotFiller
from distill_reader.reader.pool import batch_views, variable_cuts
from distill_reader.reader.source import ReaderSource, reader_function_error


class FakeDistillReader(ReaderSource):
    """A drop-in stand-in for :class:`~distill_reader.DistillReader` for running training code
    without teachers: same config, same reader methods and batch layout, fetch vars all zeros.

    Only the config file is required (``FakeDistillReader(conf_file)``, as in the seed);
    ``batch_size`` defaults to 32 and the other sizes are accepted and ignored. Batches are fresh
    arrays (never reused). Errors are DistillReader's: :class:`~distill_reader.SampleError` for a
    bad sample, :class:`~distill_reader.ReaderFunctionError` for an exception of the reader function.
    """

    def __init__(
        self,
        conf_file: str | os.PathLike[str],
        batch_size: int = 32,
        d_batch_size: int | None = None,
        capacity: int = 2,
        occupied_capacity: int = 0,
        **_ignored: Any,
    ) -> None:
        validate_reader_args(batch_size, d_batch_size or batch_size, capacity, occupied_capacity)
        self.config = load_config(conf_file)
        self.batch_size = int(batch_size)

    def _epoch(self) -> Iterator[list[np.ndarray]]:
        assert self._reader is not None
        kind, reader = self._reader
        config = self.config
        slots = _ZeroSlots(config, self.batch_size)  # both the filler's source and its sink
        filler = SlotFiller(config.feeds, self.batch_size, self.batch_size, slots, slots, config.max_length)
        add = filler.adder(kind)
        # The user's exceptions become ReaderFunctionError, bad samples SampleError, as in DistillReader.
        try:
            source = iter(reader())
        except Exception as exc:
            raise reader_function_error(exc) from exc
        while True:
            try:
                value = next(source)
            except StopIteration:
                break
            except Exception as exc:
                raise reader_function_error(exc, filler.position) from exc
            add(value)
            yield from slots.ready
            slots.ready.clear()
        filler.finish()
        yield from slots.ready


class _ZeroSlots:
    """The fake reader's slots: fresh arrays per batch, the fetch vars left at zero."""

    def __init__(self, config: ReaderConfig, batch_size: int) -> None:
        self._config, self._batch_size = config, batch_size
        self._cuts = variable_cuts(config)
        self._slots: dict[int, list[np.ndarray]] = {}
        self.ready: list[list[np.ndarray]] = []

    def acquire(self) -> tuple[int, list[np.ndarray]]:
        config, slot = self._config, len(self._slots)
        arrays = [np.zeros(s.batch_shape(self._batch_size), s.dtype) for s in config.pool_specs]
        self._slots[slot] = arrays
        n_feeds, n_vars = len(config.feeds), len(config.feeds) + len(config.fetches)
        return slot, arrays[:n_feeds] + arrays[n_vars:]

    def written(self, slot: int, start: int, count: int) -> None:
        pass

    def sealed(self, slot: int, rows: int) -> None:
        self.ready.append(batch_views(self._slots.pop(slot), rows, self._cuts))
