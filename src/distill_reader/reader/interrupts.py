"""Ctrl-C held back while slot bookkeeping changes (the training process's main thread)."""

from __future__ import annotations

import _signal
import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator

# signal.signal() wraps _signal.signal() to turn handlers into enums and back, which costs ~15 us:
# more than the rest of a batch's bookkeeping, and this runs once per batch (a held slot is freed).
_set_handler = _signal.signal


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while slot bookkeeping changes, then deliver it.

    A KeyboardInterrupt in the middle would lose slots. It is delivered a moment after the block,
    from a timer thread: raised in the block itself it could be swallowed, because a generator that
    is garbage-collected (the consumer's epoch after a ``break``) ignores exceptions raised while
    it closes. Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = _set_handler(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        _set_handler(signal.SIGINT, previous)
        if received:
            threading.Timer(0.01, _thread.interrupt_main).start()
