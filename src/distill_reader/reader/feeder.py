"""The feeder: one thread per epoch that takes the user's samples into the pool.

It takes free slots from the ledger (:class:`FreeSlots`), has the
:class:`~distill_reader.reader.filling.SlotFiller` write the samples into them, and passes each
slot on (:class:`SlotOutbox`): every written d_batch to the pipeline process (``Work``), every
sealed slot to the pipeline process (``Seal``) and then to its :class:`~distill_reader.reader.epoch.Epoch`,
where the consumer takes it once it is done. Nothing comes back to it but free slots.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from distill_reader.config import ReaderConfig
from distill_reader.errors import DistillReaderError, PipelineError
from distill_reader.reader.channel import Message, Seal, Work
from distill_reader.reader.epoch import END, Epoch, Failed, Sealed, Unsealed
from distill_reader.reader.filling import SlotFiller
from distill_reader.reader.slots import SlotLedger
from distill_reader.reader.source import reader_function_error
from distill_reader.reader.stats import StatsTracker

log = logging.getLogger("distill_reader")


class FreeSlots:
    """Where the filler's slots come from: the ledger's free slots, as the arrays the filler writes."""

    def __init__(
        self, ledger: SlotLedger, slots: Sequence[list[np.ndarray]], config: ReaderConfig, stats: StatsTracker
    ) -> None:
        self._ledger = ledger
        self._slots = slots
        self._feeds = len(config.feeds)
        self._vars = len(config.feeds) + len(config.fetches)
        self._stats = stats
        self.stop = threading.Event()  # set: acquire returns None (the epoch is being stopped)
        self.taken_at = 0.0  # when the slot being filled was taken

    def acquire(self) -> tuple[int, list[np.ndarray]] | None:
        asked_at = time.perf_counter()
        slot = self._ledger.acquire(self.stop)
        if slot is None:
            return None
        self.taken_at = time.perf_counter()
        self._stats.feeder_waited(self.taken_at - asked_at)
        arrays = self._slots[slot]
        # The feed vars, then the row lengths of the variable ones (after the fetch vars in the slot).
        return slot, arrays[: self._feeds] + arrays[self._vars :]


class SlotOutbox:
    """Where the filler's slots go: d_batches and seals to the pipeline process, sealed slots to the epoch."""

    def __init__(self, epoch: Epoch, send: Callable[[Message], None], work_at_seal: bool, free: FreeSlots) -> None:
        self._epoch = epoch
        self._number = epoch.number
        self._send = send
        self._work_at_seal = work_at_seal
        self._free = free
        self._sequence = 0

    def written(self, slot: int, start: int, count: int) -> None:
        if not self._work_at_seal:  # else the pipeline process makes the d_batches at the seal
            self._send(Work(self._number, self._sequence, slot, start, count))

    def sealed(self, slot: int, rows: int) -> None:
        self._send(Seal(self._number, slot, rows, self._sequence))
        self._epoch.put(Sealed(self._sequence, slot, rows, time.perf_counter() - self._free.taken_at))
        self._sequence += 1


class Feeder:
    """The feeder thread of ``epoch`` (a daemon: one stuck in the user's reader is left behind and
    frees its slot when the reader returns)."""

    def __init__(
        self,
        epoch: Epoch,
        kind: str,
        reader: Callable[[], Iterable[Any]],
        filler: SlotFiller,
        free: FreeSlots,
    ) -> None:
        self._epoch = epoch
        self._kind = kind
        self._reader = reader
        self._filler = filler  # filling slots from ``free``
        self._free = free
        self.thread = threading.Thread(target=self._run, name=f"distill-reader-feeder-{epoch.number}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop taking samples: at the next sample, or at once if waiting for a free slot."""
        self._free.stop.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the thread; True if it ended."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _run(self) -> None:
        filler, epoch, stop = self._filler, self._epoch, self._free.stop
        add = filler.adder(self._kind)
        source: Iterator[Any] | None = None
        try:
            try:
                source = iter(self._reader())
            except Exception as exc:
                raise reader_function_error(exc) from exc
            while not stop.is_set():
                try:
                    value = next(source)
                except StopIteration:
                    filler.finish()
                    epoch.put(END)
                    return
                except Exception as exc:
                    raise reader_function_error(exc, filler.position) from exc
                if not add(value):
                    return
        except (DistillReaderError, OSError) as exc:
            if isinstance(exc, OSError):  # the pipe to the pipeline process broke
                exc = PipelineError(f"lost the pipeline process: {exc}")
            epoch.put(Failed(exc))
        except BaseException as exc:  # a bug of ours: still reach the consumer, never die silently
            epoch.put(Failed(PipelineError(f"feeder failed: {type(exc).__name__}: {exc}")))
            raise
        finally:
            if filler.slot is not None:  # requests may be in flight: freed once the epoch is cancelled
                epoch.put(Unsealed(filler.slot))
            close = getattr(source, "close", None)
            if close is not None and stop.is_set():
                try:
                    close()  # run the user's generator's finally blocks
                except Exception:
                    log.debug("closing the reader's generator raised", exc_info=True)
