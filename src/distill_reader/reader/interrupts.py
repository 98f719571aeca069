"""Ctrl-C held back while slot bookkeeping changes (the training process's main thread)."""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator


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
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            threading.Timer(0.01, _thread.interrupt_main).start()
