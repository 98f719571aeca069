"""The pipeline process's side of the knowledge store.

:class:`KnowledgeSession` looks up the rows of each sealed slot (``read``, ``cache``): a row found
under its key, with the same teacher inputs, gets its outputs copied from the store into the slot
(by threads: the event loop never waits for a disk, see :meth:`KnowledgeSession.fill`); the others
go to the teachers (``cache``) or fail the epoch (``read``). It records each row the
teachers answered (``write``, ``cache``) from the slot into memory, and a writer thread writes the
recorded rows as a chunk (see :mod:`distill_reader.knowledge.layout`) when there are
:data:`CHUNK_ROWS` rows or :data:`CHUNK_BYTES` bytes of them, when the oldest waited
:data:`MAX_AGE` seconds, when none came for :data:`IDLE_COMMIT` seconds (the end of an epoch, a
paused training loop), and when the reader closes. Rows recorded but not yet written are found by
later lookups all the same: a second epoch in ``cache`` reads its rows from the store.

The index is one dict from key to ``source << 32 | row``; sources are chunk files (memory-mapped)
and recorded rows not yet written (in memory, replaced by their chunk once it is written). About
100 bytes per key: a store of 1M rows costs about 100 MB in the pipeline process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import time
from pathlib import Path

import numpy as np

from distill_reader.config import ReaderConfig
from distill_reader.errors import StoreError, StoreMismatchError, StoreMissingError
from distill_reader.knowledge.layout import (
    ChunkNamer,
    Packed,
    Rows,
    chunk_files,
    chunk_manifest,
    differences,
    fingerprint_rows,
    map_chunk,
    pairs_of,
    row_shape,
    schema_of,
    store_manifest,
    write_chunk,
)

log = logging.getLogger("distill_reader.knowledge")

CHUNK_ROWS = 65536
CHUNK_BYTES = 16 << 20  # small enough to be written quickly when the reader closes
MAX_AGE = 10.0  # seconds
IDLE_COMMIT = 1.0  # seconds
_WARN_EVERY = 10.0  # seconds between WARNINGs about rows asked again (cache)
_CLOSE_TIMEOUT = 60.0  # seconds for the last chunks to be written when the reader closes
_ROW_BITS = 32


class KnowledgeSession:
    """See the module docstring. Used from the pipeline process's event loop, which it never keeps
    waiting for a disk: stored outputs are read into the pool in threads (:meth:`fill`), chunks
    written in another."""

    def __init__(self, config: ReaderConfig, slots: list[list[np.ndarray]], batch_size: int) -> None:
        store = config.store
        assert store is not None
        self.path: Path = store.path
        self.policy = store.policy
        self.reads = store.policy in ("read", "cache")
        self.records = store.policy in ("write", "cache")
        self.batch_size = batch_size
        self.fetches = config.fetches
        self.manifest = store_manifest(config)
        self._schema = schema_of(self.manifest)
        #: compact top-k pairs (values var: indices var), encoded when a chunk is written
        self._pairs = pairs_of(self.manifest)
        n_feeds, n_vars = len(config.feeds), len(config.feeds) + len(config.fetches)
        length_of = {i: n_vars + k for k, i in enumerate(config.variable_feeds)}
        self._inputs = [
            [
                (arrays[i], arrays[length_of[i]] if i in length_of else None, config.feeds[i])
                for i in config.predict_feed_ids
            ]
            for arrays in slots
        ]
        self._outputs = [arrays[n_feeds:n_vars] for arrays in slots]
        source = config.length_source
        variable_outputs = any(spec.variable for spec in config.fetches)
        self._output_lengths = [arrays[length_of[source]] if variable_outputs else None for arrays in slots]
        #: per slot and row: the variable outputs there are 0 from this position on (the pool starts
        #: zeroed; the teachers' answers are 0 past each row's length, and so are the store's)
        self._ends = [np.zeros(batch_size, np.int64) for _ in slots]
        key_index = next((i for i, s in enumerate(config.feeds) if s.name == store.key_var), None)
        self._key_arrays = [arrays[key_index] for arrays in slots] if key_index is not None else None
        self._key_what = f"key_var {store.key_var!r}" if store.key_var else "the sample's position in the epoch"
        self._sources: list[Rows | None] = []
        self._index: dict[int, int] = {}
        self._pending: list[tuple[int, Rows]] = []  # recorded, not yet handed to the writer
        self._pending_rows = 0
        self._pending_bytes = 0
        self._first_pending = 0.0
        self._last_record = 0.0
        self._commits: collections.deque[tuple[concurrent.futures.Future, list[tuple[int, Rows]]]] = collections.deque()
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distill-knowledge-writer")
            if self.records
            else None
        )
        #: reads the stored outputs of a slot's rows found in the index into it, with the readers,
        #: off the event loop (one slot after the other); the reads in flight, which a cancelled
        #: epoch waits for
        self._filler = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distill-knowledge-filler")
            if self.reads
            else None
        )
        self._reading: list[concurrent.futures.Future] = []
        #: reads stored outputs into the pool (two: one output var each, for the usual two top-k vars)
        self._readers = (
            concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="distill-knowledge-reader")
            if self.reads
            else None
        )
        self._namer = ChunkNamer(self.path)
        self.failure: StoreError | None = None
        self._warned_at = 0.0
        self._asked_again = 0
        self.from_store = self.recorded = 0
        if self.reads:
            self._load()

    # -- the index ----------------------------------------------------------------------------
    def _add_source(self, rows: Rows) -> int:
        self._sources.append(rows)
        return len(self._sources) - 1

    def _index_rows(self, source: int, keys: np.ndarray) -> None:
        base = source << _ROW_BITS
        self._index.update(zip(keys.tolist(), range(base, base + len(keys))))

    def _load(self) -> None:
        for file in chunk_files(self.path):
            batch, base = map_chunk(file)
            found = differences(chunk_manifest(batch) or {}, self.manifest)
            if found:
                raise StoreError(f"{str(file)!r} was written with another config: {'; '.join(found)}")
            rows = Rows.from_arrow(batch, self.fetches, (file, base), self._pairs)
            self._index_rows(self._add_source(rows), rows.keys)
        log.debug("knowledge store %s: %d rows indexed", self.path, len(self._index))

    def keys(self, slot: int, rows: np.ndarray, sequence: int) -> np.ndarray:
        """The keys of ``rows`` of ``slot``, the ``sequence``-th batch of the epoch."""
        if self._key_arrays is None:
            return rows.astype(np.int64) + sequence * self.batch_size
        return self._key_arrays[slot][rows].reshape(len(rows)).astype(np.int64)

    # -- lookups (read, cache) ----------------------------------------------------------------
    def fill(self, slot: int, count: int, sequence: int) -> tuple[np.ndarray, concurrent.futures.Future | None]:
        """Look up rows ``0 .. count - 1`` of ``slot`` (in memory: the index) and start reading the
        stored outputs of those found into it, off the calling thread (the event loop).

        Returns the rows that are not in the store (sorted: they need a teacher; ``read`` raises
        StoreMissingError instead) and, when some are, a future of the reading: done once every
        found row is in the slot, its result the rows whose inputs differ from the recorded ones
        (sorted: they need a teacher too; ``read``: StoreMismatchError)."""
        self._reap()
        rows = np.arange(count)
        keys = self.keys(slot, rows, sequence)
        get = self._index.get
        locations = np.fromiter((get(k, -1) for k in keys.tolist()), np.int64, count)
        hit = locations >= 0
        if self.policy == "read" and not hit.all():
            first = int(keys[np.argmin(hit)])
            raise StoreMissingError(
                f"the knowledge store {str(self.path)!r} has no row under key {first} ({self._key_what}); "
                f"{count - int(hit.sum())} of this batch's {count} rows are missing. policy = read never asks a "
                "teacher: capture them with policy = write or cache"
            )
        found, locations = rows[hit], locations[hit]
        if not len(found):
            self._rows_end(slot, count)
            return rows, None
        sources, source_rows = locations >> _ROW_BITS, locations & ((1 << _ROW_BITS) - 1)
        # The sources are taken here: the rows stay readable if the writer replaces them meanwhile.
        parts = [(self._source(int(s)), sources == s) for s in np.unique(sources)]
        assert self._filler is not None
        future = self._filler.submit(self._fill, slot, count, keys, found, source_rows, parts)
        self._reading = [*self.reading(), future]
        return rows[~hit], future

    def reading(self) -> list[concurrent.futures.Future]:
        """The reads :meth:`fill` started that are not done (they write into slots)."""
        self._reading = [future for future in self._reading if not future.done()]
        return list(self._reading)

    def _fill(
        self,
        slot: int,
        count: int,
        keys: np.ndarray,
        found: np.ndarray,
        source_rows: np.ndarray,
        parts: list[tuple[Rows, np.ndarray]],
    ) -> np.ndarray:
        """The filler thread: copy the stored outputs of ``found`` into the slot; the rows whose
        inputs differ from the recorded ones."""
        try:
            # The outputs are read in threads while this one fingerprints the inputs (the reads
            # release the GIL). Rows whose inputs turn out to differ are written again by their
            # teacher (cache), or the epoch fails (read).
            assert self._readers is not None
            copies = [
                self._readers.submit(self._copy, slot, found[chosen], source, source_rows[chosen], var)
                for source, chosen in parts
                for var in range(len(self.fetches))
                if source.outputs[var] is not None  # the indices of a compact pair: with its values
            ]
            try:
                mine = fingerprint_rows(self._inputs[slot], found)
                stored = np.empty_like(mine)
                for source, chosen in parts:
                    stored[chosen] = source.fingerprints[source_rows[chosen]]
                bad = (mine != stored).any(axis=1)
            finally:
                concurrent.futures.wait(copies)  # nothing writes into the slot once this returns
            for copy in copies:
                copy.result()
            if bad.any():
                self._mismatch(keys[found[bad]])
        except BaseException:
            self._ends[slot][:count] = np.iinfo(np.int64).max  # rows partly copied: where they end is unknown
            raise
        self._rows_end(slot, count)
        self.from_store += len(found) - int(bad.sum())
        return found[bad]

    def _rows_end(self, slot: int, count: int) -> None:
        lengths = self._output_lengths[slot]
        if lengths is not None:  # once the slot is done, every row is 0 past its length
            self._ends[slot][:count] = lengths[:count]

    def _source(self, source: int) -> Rows:
        rows = self._sources[source]
        assert rows is not None, "the index points at a dropped source"
        return rows

    def _mismatch(self, keys: np.ndarray) -> None:
        """Rows whose inputs differ from the recorded ones (in the filler thread)."""
        message = (
            f"the teacher inputs of the sample under key {int(keys[0])} ({self._key_what}) differ from those "
            f"recorded in the knowledge store {str(self.path)!r}: its stored outputs belong to another sample "
            f"({len(keys)} such row(s) in this batch)"
        )
        if self.policy == "read":
            raise StoreMismatchError(
                message + "; inputs that change between epochs cannot be read from a store (docs/store.md)"
            )
        self._asked_again += len(keys)
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(
                "%s; asked the teacher again, the new answer replaces it (policy = cache; %d row(s) so far)",
                message,
                self._asked_again,
            )

    def _copy(self, slot: int, rows: np.ndarray, source: Rows, source_rows: np.ndarray, var: int) -> None:
        """Output ``var`` of stored rows into the slot (in a reader thread). A variable var's row is
        zeroed from its length up to where the slot's previous row there ended (:attr:`_ends`):
        past that it is 0 already."""
        spec, dst, output = self.fetches[var], self._outputs[slot][var], source.outputs[var]
        if isinstance(output, Packed):
            self._copy_packed(slot, rows, source, source_rows, var)
            return
        at = source.file_offsets[var] if source.file is not None else None
        fd = -1
        try:
            if at is not None:
                fd = os.open(source.file, os.O_RDONLY)  # type: ignore[arg-type]
            if isinstance(output, np.ndarray):
                _gather(dst, rows, output, source_rows, fd, at)
                return
            flat, offsets = output
            assert source.lengths is not None
            lengths = source.lengths[source_rows].tolist()
            if spec.shape[0] == -1 and -1 not in spec.shape[1:]:  # (-1, *rest): one read per row
                inner = max(1, int(np.prod(spec.shape[1:])))
                positions = flat.reshape(-1, *spec.shape[1:])
                starts = (offsets[source_rows] // inner).tolist()
                step = inner * flat.itemsize
                for row, start, length, end in zip(rows.tolist(), starts, lengths, self._ends[slot][rows].tolist()):
                    if at is None:
                        dst[row, :length] = positions[start : start + length]
                    else:
                        _pread(fd, dst[row, :length], at + start * step)
                    if end > length:
                        dst[row, length:end] = 0
                return
            for row, at_row, length in zip(rows.tolist(), source_rows.tolist(), lengths):
                shape = row_shape(spec, length)
                dst[row].fill(0)
                dst[row][tuple(slice(0, d) for d in shape)] = flat[offsets[at_row] : offsets[at_row + 1]].reshape(shape)
        except OSError as exc:
            raise StoreError(f"reading {str(source.file)!r} of the knowledge store failed: {exc}") from None
        finally:
            if fd >= 0:
                os.close(fd)

    def _copy_packed(self, slot: int, rows: np.ndarray, source: Rows, source_rows: np.ndarray, var: int) -> None:
        """A compact top-k pair of stored rows, decoded into the slot's values and indices vars (in a
        reader thread), zeroed past each row's length as :meth:`_copy` does."""
        spec, packed = self.fetches[var], source.outputs[var]
        dst_values, dst_indices = self._outputs[slot][var], self._outputs[slot][self._pairs[var]]
        try:
            values, ids = packed.decode(source_rows)
        except (ValueError, IndexError) as exc:
            raise StoreError(f"reading a compact row of the knowledge store {str(self.path)!r} failed: {exc}") from None
        if not spec.variable:
            dst_values[rows] = values.reshape(len(rows), *spec.shape)
            dst_indices[rows] = ids.reshape(len(rows), *spec.shape)
            return
        assert source.lengths is not None
        starts = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(packed.positions[source_rows], out=starts[1:])
        simple = spec.shape[0] == -1 and -1 not in spec.shape[1:]
        lengths = source.lengths[source_rows].tolist()
        ends = self._ends[slot][rows].tolist()
        for row, a, b, length, end in zip(rows.tolist(), starts[:-1].tolist(), starts[1:].tolist(), lengths, ends):
            for dst, block in ((dst_values, values), (dst_indices, ids)):
                if simple:
                    dst[row, :length] = block[a:b].reshape(length, *spec.shape[1:])
                    if end > length:
                        dst[row, length:end] = 0
                else:
                    shape = row_shape(spec, length)
                    dst[row].fill(0)
                    dst[row][tuple(slice(0, d) for d in shape)] = block[a:b].reshape(shape)

    def cancelled(self) -> None:
        """An epoch was cancelled: teachers' answers for its rows may never have been written, so
        nothing is known of where the slots' rows end."""
        for ends in self._ends:
            ends[:] = np.iinfo(np.int64).max

    # -- recording (write, cache) -------------------------------------------------------------
    def record(self, slot: int, rows: np.ndarray, sequence: int) -> None:
        """Record the teachers' outputs for ``rows`` of ``slot`` (just written into it)."""
        self._reap()
        # Raised once, in the epoch that finds it: the rows of the failed chunk were forgotten and
        # are asked again (cache) or recorded again (write), so a fixed disk serves the next epoch.
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure
        keys = self.keys(slot, rows, sequence)
        lengths_array = self._output_lengths[slot]
        lengths = lengths_array[rows].astype(np.int64) if lengths_array is not None else None
        outputs: list[object] = []
        nbytes = 0
        for spec, src in zip(self.fetches, self._outputs[slot]):
            if not spec.variable:
                block = src[rows]  # a copy: the slot is reused once the consumer is done with it
                outputs.append(block)
                nbytes += block.nbytes
                continue
            assert lengths is not None
            parts = [
                src[row][tuple(slice(0, d) for d in row_shape(spec, int(n)))].ravel()
                for row, n in zip(rows.tolist(), lengths.tolist())
            ]
            flat = np.concatenate(parts) if parts else np.zeros(0, spec.dtype)
            offsets = np.zeros(len(parts) + 1, np.int64)
            np.cumsum([len(p) for p in parts], out=offsets[1:])
            outputs.append((flat, offsets))
            nbytes += flat.nbytes
        piece = Rows(keys, fingerprint_rows(self._inputs[slot], rows), lengths, outputs)
        source = -1  # write only: nothing is looked up, the rows need no index
        if self.reads:
            source = self._add_source(piece)
            self._index_rows(source, keys)
        now = time.monotonic()
        if not self._pending:
            self._first_pending = now
        self._last_record = now
        self._pending.append((source, piece))
        self._pending_rows += len(rows)
        self._pending_bytes += nbytes
        self.recorded += len(rows)
        if self._pending_rows >= CHUNK_ROWS or self._pending_bytes >= CHUNK_BYTES:
            self.commit()

    def tick(self) -> None:
        """Called every fraction of a second: write what waited long enough, take in written chunks."""
        self._reap()
        if not self._pending:
            return
        now = time.monotonic()
        if now - self._last_record >= IDLE_COMMIT or now - self._first_pending >= MAX_AGE:
            self.commit()

    def commit(self) -> None:
        """Hand the recorded rows to the writer thread as one chunk."""
        if not self._pending or self._executor is None:
            return
        parts, self._pending = self._pending, []
        self._pending_rows = self._pending_bytes = 0
        future = self._executor.submit(self._write, [rows for _, rows in parts])
        self._commits.append((future, parts))

    def _write(self, parts: list[Rows]) -> Path:
        """The writer thread: one chunk file, named when it is written (after every chunk there)."""
        rows = Rows.concatenate(parts).compacted(self.fetches, self._pairs)
        file = write_chunk(self.path, self._namer.next(), rows.to_arrow(self.fetches, self._schema))
        log.debug("knowledge store %s: committed %d rows (%s)", self.path, len(rows), file.name)
        return file

    def _reap(self) -> None:
        """Take in the chunks the writer finished: their rows are then read from the file (mapped)
        instead of memory."""
        while self._commits and self._commits[0][0].done():
            future, parts = self._commits.popleft()
            try:
                file = future.result()
            except Exception as exc:
                self.failure = self.failure or StoreError(
                    f"writing to the knowledge store {str(self.path)!r} failed: {type(exc).__name__}: {exc}"
                )
                log.error("%s", self.failure)
                for source, rows in parts:  # rows that are not in the store after all: forget them
                    self._repoint(source, rows, None)
                    self._drop(source)
                continue
            if self.reads:
                try:
                    batch, base = map_chunk(file)
                except StoreError as exc:  # written but not readable now: keep reading the rows from memory
                    log.warning("%s", exc)
                    continue
                written = Rows.from_arrow(batch, self.fetches, (file, base), self._pairs)
                chunk = self._add_source(written)
                offset = 0
                for source, rows in parts:
                    self._repoint(source, rows, (chunk << _ROW_BITS) + offset)
                    offset += len(rows)
            for source, _ in parts:
                self._drop(source)

    def _drop(self, source: int) -> None:
        """The rows of ``source`` are in a chunk now (or lost): free their memory."""
        if source >= 0:
            self._sources[source] = None

    def _repoint(self, source: int, rows: Rows, new: int | None) -> None:
        """Keys that still point at ``source``'s rows point at ``new`` + row instead (None: removed)."""
        if not self.reads:
            return
        index, old = self._index, source << _ROW_BITS
        for j, key in enumerate(rows.keys.tolist()):
            if index.get(key) == old + j:
                if new is None:
                    del index[key]
                else:
                    index[key] = new + j

    def close(self) -> None:
        """Write every recorded row and let the reads into the pool end (before it is unmapped):
        both at once, :data:`_CLOSE_TIMEOUT` seconds at most (a read stuck on a disk does not keep
        the recorded rows from being written); then stop the threads."""
        self.commit()
        reading = self.reading()
        _, late = concurrent.futures.wait([*reading, *(f for f, _ in self._commits)], timeout=_CLOSE_TIMEOUT)
        stuck = not late.isdisjoint(reading)
        if stuck:
            log.error("knowledge store %s: a read did not end within %.0f s", self.path, _CLOSE_TIMEOUT)
        for threads in (self._filler, self._readers):  # the readers are idle unless a fill is stuck
            if threads is not None:
                threads.shutdown(wait=not stuck)
        self._filler = self._readers = None
        if self._executor is not None:
            self._reap()
            self._executor.shutdown(wait=False)
            self._executor = None
        if self.recorded or self.from_store:
            log.info("knowledge store %s: %d rows read from it, %d recorded", self.path, self.from_store, self.recorded)
            self.recorded = self.from_store = 0


def _gather(dst: np.ndarray, rows: np.ndarray, src: np.ndarray, src_rows: np.ndarray, fd: int, at: int | None) -> None:
    """``dst[rows] = src[src_rows]`` (``rows`` sorted), one copy; when both are runs, one read
    from the chunk file (``fd``, ``src`` starting at byte ``at``) or one memcpy."""
    n = len(rows)
    if n and rows[-1] - rows[0] == n - 1:
        target = dst[rows[0] : rows[0] + n]
        if n == 1 or (np.diff(src_rows) == 1).all():
            if at is not None:
                _pread(fd, target, at + int(src_rows[0]) * (src.nbytes // max(1, len(src))))
            else:
                target[...] = src[src_rows[0] : src_rows[0] + n]
        else:
            np.take(src, src_rows, axis=0, out=target, mode="clip")
    else:
        dst[rows] = src[src_rows]


def _pread(fd: int, target: np.ndarray, offset: int) -> None:
    """Fill the C-contiguous ``target`` with the file's bytes from ``offset`` on."""
    view = memoryview(target).cast("B")
    got = os.preadv(fd, [view], offset)
    if got != view.nbytes:
        raise OSError(f"short read: {got} of {view.nbytes} bytes at {offset} (was the file changed?)")
