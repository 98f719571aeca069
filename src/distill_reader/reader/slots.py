"""The slot ledger: where every batch slot of the pool is, in one place.

A slot is always in exactly one of four places:

* ``free``: in the free queue, waiting for a feeder;
* ``filling``: taken by an epoch's feeder, rows being written;
* ``queued``: sealed (or abandoned half-filled) and handed to the epoch: at the pipeline process,
  in the consumer's queue, or taken by the consumer but not yet yielded;
* ``held``: yielded to the training loop, whose views of it are valid until it takes
  ``occupied_capacity`` further batches.

So ``free + filling + queued + held == capacity`` at every moment (:meth:`SlotLedger.counts`; the
tests assert it after every kind of epoch end). Each move names the places the slot may come
from: a slot released twice, or held without being queued, is a bug of ours that would hand one
slot to two batches, so it raises instead of corrupting a batch.
"""

from __future__ import annotations

import collections
import threading
from typing import Literal

from distill_reader.errors import PipelineError

Place = Literal["free", "filling", "queued", "held"]
PLACES: tuple[Place, ...] = ("free", "filling", "queued", "held")


class SlotLedger:
    """Every slot's place; thread-safe. ``acquire`` waits for a free slot until ``stop`` is set."""

    def __init__(self, capacity: int, tick: float = 0.1) -> None:
        self.capacity = capacity
        self._place: list[Place] = ["free"] * capacity
        self._free = collections.deque(range(capacity))
        self._held: collections.deque[int] = collections.deque()  # oldest first
        self._cond = threading.Condition()
        self._tick = tick

    def _move(self, slot: int, sources: tuple[Place, ...], to: Place) -> None:
        place = self._place[slot]
        if place not in sources:
            raise PipelineError(f"slot bookkeeping: slot {slot} is {place}, cannot become {to}")
        self._place[slot] = to

    def acquire(self, stop: threading.Event) -> int | None:
        """A free slot, now ``filling``; None once ``stop`` is set (checked every ``tick``)."""
        with self._cond:
            while not self._free:
                if stop.is_set():
                    return None
                self._cond.wait(self._tick)
            slot = self._free.popleft()
            self._move(slot, ("free",), "filling")
            return slot

    def queue(self, slot: int) -> None:
        """The feeder handed ``slot`` to its epoch (sealed or abandoned)."""
        with self._cond:
            self._move(slot, ("filling",), "queued")

    def hold(self, slot: int) -> None:
        """The consumer yielded ``slot``; it is freed by a later :meth:`release_held`."""
        with self._cond:
            self._move(slot, ("queued",), "held")
            self._held.append(slot)

    def release_held(self, keep: int) -> None:
        """Free the oldest held slots until at most ``keep`` remain."""
        with self._cond:
            while len(self._held) > keep:
                self._release(self._held.popleft(), ("held",))

    @property
    def held_count(self) -> int:
        return len(self._held)

    def release(self, slot: int) -> None:
        """Free a slot that is not held (filling or queued): an epoch's slots taken back, a copied batch."""
        with self._cond:
            self._release(slot, ("filling", "queued"))

    def _release(self, slot: int, sources: tuple[Place, ...]) -> None:
        self._move(slot, sources, "free")
        self._free.append(slot)
        self._cond.notify()

    def counts(self) -> dict[Place, int]:
        """How many slots are in each place (they sum to ``capacity``)."""
        with self._cond:
            found = collections.Counter(self._place)
        return {place: found.get(place, 0) for place in PLACES}
