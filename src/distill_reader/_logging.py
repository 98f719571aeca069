"""The library's logging: one format whether or not the user configured logging, never twice.

Every logger of the library is below ``distill_reader``. That logger gets one
:class:`DefaultHandler`, which prints ``%(asctime)s %(levelname)s %(name)s: %(message)s`` to
stderr only while nobody else would handle the record: no handler on the root logger (the user's
``logging.basicConfig`` or ``dictConfig``) nor on the way up from the record's logger. So without
any logging configuration the reader's warnings still show, in one format (not bare, as Python's
last-resort handler prints them), and with it they show once, as the user formats them.

The pipeline process's records travel to the training process (see
:mod:`distill_reader.reader.channel`) and are handled there by :func:`handle_forwarded`, under
their own logger names, so the user's configuration applies to them too.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ROOT = "distill_reader"


class DefaultHandler(logging.Handler):
    """Prints to stderr (as it is at the time of the record) unless another handler will."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self._handled_elsewhere(record):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)

    def _handled_elsewhere(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().handlers:
            return True
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            if not logger.propagate:
                break
            logger = logger.parent  # type: ignore[assignment]
        return False


def install_default_handler() -> None:
    """Attach the :class:`DefaultHandler` to the ``distill_reader`` logger (once per process)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(handler, DefaultHandler) for handler in logger.handlers):
        logger.addHandler(DefaultHandler())


def handle_forwarded(record: logging.LogRecord) -> None:
    """Handle a record of the pipeline process as if it was logged here.

    It goes to the logger of its name, after that logger's level check, so the user's levels and
    handlers apply. A record of another library (``asyncio``, ``grpc``) goes to the
    ``distill_reader.pipeline`` logger, keeping its name: it reaches the user's handlers the same
    way, and without them our default handler instead of Python's bare last-resort one.
    """
    name = record.name
    logger = logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else ROOT + ".pipeline")
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)
