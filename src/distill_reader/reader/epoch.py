"""One epoch's slots on their way to the training loop, in order.

The feeder puts each sealed slot here (:meth:`Epoch.put`), the receiver thread marks slots done
(:meth:`Epoch.slot_done`), and the consumer takes the next batch (:meth:`Epoch.next_batch`): the
oldest sealed slot, once the pipeline process reported it done, as views of the pool (or copies).
The epoch's lock is the only one the training loop waits on; the receiver, the feeder and the
pipeline (closed, lost, stopped) each wake it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from distill_reader.errors import DistillReaderError, PipelineError
from distill_reader.reader.interrupts import deferred_interrupt
from distill_reader.reader.pool import VariableCut, batch_views
from distill_reader.reader.slots import SlotLedger
from distill_reader.reader.stats import StatsTracker

if TYPE_CHECKING:
    from distill_reader.reader.feeder import Feeder

_WAIT_SLICE = 1.0  # waits wake at least this often (they also wake on every message for the epoch)
_LOG_FLUSH = 1.0  # seconds an error of the pipeline process waits for the records that came before it
_CLOSED_HINT = " (close() was called, maybe from another thread); a new epoch starts it again"


@dataclass(frozen=True)
class Sealed:
    """A slot the feeder filled (``rows`` of it) and sent to the pipeline process."""

    sequence: int
    slot: int
    rows: int
    fill_seconds: float  # from taking the free slot to sealing it


@dataclass(frozen=True)
class Unsealed:
    """A slot the feeder stopped filling; freed once the epoch is cancelled."""

    slot: int


@dataclass(frozen=True)
class Failed:
    """The feeder failed (the user's reader, a bad sample, the pipe)."""

    error: BaseException


END = object()  # the user's reader is exhausted and every slot sealed


class Epoch:
    """One pass over the user's reader, from the sealed slots to the training loop."""

    def __init__(
        self,
        number: int,
        ledger: SlotLedger,
        slots: Sequence[Sequence[np.ndarray]],
        cuts: Sequence[VariableCut],
        stats: StatsTracker,
        request_stats: Callable[[float], None],
        flush_logs: Callable[[float], None],
        keep: int,
        copy: bool,
        token_lengths: int | None = None,
    ) -> None:
        self.number = number
        self._ledger = ledger
        self._slots = slots
        self._cuts = cuts
        self._stats = stats
        self._request_stats = request_stats
        self._flush_logs = flush_logs
        self._keep = keep  # occupied_capacity: yielded batches the consumer may still use
        self._copy = copy
        self._token_lengths = token_lengths  # the slot array of the rows' token counts (sequences), if any
        self.feeder: Feeder | None = None  # set by the pipeline; joined when the epoch ends
        self._cond = threading.Condition()
        # Guarded by the condition:
        self._items: collections.deque[Any] = collections.deque()  # the feeder's, in order
        self._done: dict[int, float] = {}  # slot reported done -> teacher seconds
        self._error: BaseException | None = None  # the pipeline process failed the epoch
        self._acknowledged = False  # the pipeline process cancelled the epoch
        self._reclaimed = False  # cancelled and its slots taken back: a late feeder frees its own
        self._stopped: str | None = None  # why the consumer's next wait raises (a newer epoch)
        self._closed = False  # the reader was closed
        self._lost: BaseException | None = None  # the pipeline can no longer be used

    # -- the feeder --------------------------------------------------------------------------
    def put(self, item: Sealed | Unsealed | Failed | object) -> None:
        """The feeder's next item for the consumer (a sealed or abandoned slot, the end, a failure)."""
        with self._cond:
            if isinstance(item, (Sealed, Unsealed)):
                if self._reclaimed:
                    self._ledger.release(item.slot)  # a late feeder: the epoch is over and cancelled
                    return
                self._ledger.queue(item.slot)
            self._items.append(item)
            self._cond.notify_all()

    # -- the receiver thread -----------------------------------------------------------------
    def slot_done(self, slot: int, seconds: float) -> None:
        with self._cond:
            self._done[slot] = seconds
            self._cond.notify_all()

    def failed(self, error: BaseException) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()

    def cancel_acknowledged(self) -> None:
        with self._cond:
            self._acknowledged = True
            self._cond.notify_all()

    # -- the pipeline (any thread) -----------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Make the consumer's next wait raise ``reason`` (at once if it waits now)."""
        with self._cond:
            self._stopped = reason
            self._cond.notify_all()

    def close(self) -> None:
        """The reader was closed: the consumer's next wait raises."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def lose(self, error: BaseException) -> None:
        """The pipeline was lost: waits for a slot not yet done raise ``error``."""
        with self._cond:
            self._lost = self._lost or error
            self._cond.notify_all()

    def wait_cancelled(self, timeout: float) -> None:
        """Wait for the pipeline process's acknowledgement of ``Cancel`` (after which it writes
        nothing more for this epoch); not once the reader is closed (its pool is never reused)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._acknowledged and not self._closed:
                if self._lost is not None:
                    raise self._lost
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PipelineError("the pipeline process did not acknowledge a cancelled epoch")
                self._cond.wait(remaining)

    def reclaim(self) -> None:
        """Free every slot of this epoch that is not the consumer's (after the cancel
        acknowledgement): sealed, abandoned, or taken by the consumer but not yielded."""
        with self._cond:
            self._reclaimed = True
            while self._items:
                item = self._items.popleft()
                if isinstance(item, (Sealed, Unsealed)):
                    self._ledger.release(item.slot)
            self._done.clear()

    # -- the consumer ------------------------------------------------------------------------
    def next_batch(self) -> list[np.ndarray] | None:
        """The next batch in order (views of its slot, or copies), once the pipeline process
        reported its slot done; None at the end of the epoch. Raises when the epoch fails, is
        stopped, the reader is closed or the pipeline lost. Asking for it counts as taking one more
        batch: the oldest held slots beyond ``occupied_capacity`` are freed."""
        with self._cond:
            self._check()  # stopped or closed from another thread since the last batch
        if self._ledger.held_count > self._keep:  # every batch once keep are held (copy=False); never with copy=True
            with deferred_interrupt():
                self._ledger.release_held(self._keep)
        waiting_since = time.perf_counter()
        item, teacher_seconds, waited_since = self._next_done()
        if item is END:
            return None
        if isinstance(item, Failed):
            raise item.error
        done_at = time.perf_counter()
        teacher_wait = done_at - waited_since if waited_since else 0.0
        tokens = 0
        if self._token_lengths is not None:
            tokens = int(self._slots[item.slot][self._token_lengths][: item.rows].sum())
        if self._stats.batch(
            item.rows, done_at - waiting_since, item.fill_seconds, teacher_seconds, teacher_wait, tokens
        ):
            self._request_stats(0)
        views = batch_views(self._slots[item.slot], item.rows, self._cuts)
        if self._copy:
            batch = [v.copy() for v in views]
            self._ledger.release(item.slot)
        else:
            batch = views  # held until the consumer has taken occupied_capacity further batches
            self._ledger.hold(item.slot)
        return batch

    def _check(self) -> None:
        if self._stopped is not None:
            raise DistillReaderError(self._stopped)
        if self._closed:
            raise DistillReaderError(f"the reader was closed{_CLOSED_HINT}")

    def _next_done(self) -> tuple[Any, float, float]:
        """The feeder's next item; a sealed slot only once it is done (with its teacher seconds and
        when the consumer began to wait for it, 0.0 if it was done already). A slot that is not done
        stays first in the queue: if the wait raises, :meth:`reclaim` frees it."""
        waiting_since = 0.0
        try:
            with self._cond:
                while True:
                    self._check()
                    if self._error is not None:
                        raise self._error
                    if self._items:
                        head = self._items[0]
                        if type(head) is Sealed:
                            if head.slot in self._done:
                                self._items.popleft()
                                return head, self._done.pop(head.slot), waiting_since
                            if not waiting_since:
                                # The loop waits for the teachers: the statistics count that wait as
                                # it goes (a long one shows before it ends).
                                waiting_since = time.perf_counter()
                                self._stats.teachers_wait_began(waiting_since)
                        elif type(head) is not Unsealed:  # the end, or the feeder's failure
                            self._items.popleft()
                            return head, 0.0, 0.0
                    if self._lost is not None:
                        raise self._lost
                    self._cond.wait(_WAIT_SLICE)
        except Exception:
            self._flush_logs(_LOG_FLUSH)  # the pipeline process's records from before the error first
            raise
        finally:
            if waiting_since:
                self._stats.teachers_wait_ended(waiting_since)
