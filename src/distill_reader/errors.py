"""Every exception distill-reader raises, in one place (public: the classes ``distill_reader``
exports; docs/architecture.md).

All derive from :class:`DistillReaderError`, so ``except DistillReaderError`` catches anything the
library raises on purpose; anything else is a bug. Two deliberate exceptions to that rule:
importing ``distill_reader.torch`` or ``distill_reader.paddle`` without the framework installed
raises ``ImportError``, and operating-system failures outside our control (``/dev/shm`` or the
process table exhausted while the pool or the pipeline process is created) surface as ``OSError``.
Some classes also derive from the built-in exception a caller would expect (``ValueError``,
``TypeError``, ``TimeoutError``, ``KeyError``, ``RuntimeError``), so ``except ValueError`` keeps
working.

The first part holds the errors users catch (``distill_reader`` exports them); the second, the
internal signals that cross modules inside distill-reader and never reach the user's code. An
exception raised and caught inside one module stays private there, next to its one use
(``serving/batcher.py: _OwnLengths``, ``serving/server.py: _Refused``).
"""

from __future__ import annotations


class DistillReaderError(Exception):
    """Base class of every error raised by distill-reader."""


class ConfigError(DistillReaderError, ValueError):
    """The reader's config file, constructor arguments or setup are invalid (e.g. a
    ``DistillDataset`` iterated in DataLoader worker processes); the message names the key."""


class ReaderArgumentError(DistillReaderError, TypeError):
    """``set_sample_generator`` and its siblings were given something that is not a function (a
    ``TypeError`` too, the usual exception for an argument of the wrong type)."""


class SampleError(DistillReaderError, ValueError):
    """A sample from the user's reader does not match the config (arity, shape or dtype)."""


class ReaderFunctionError(DistillReaderError):
    """The user's reader function raised; the original exception is the ``__cause__``."""


class TeacherError(DistillReaderError):
    """A teacher answered with an error or with outputs that do not match the config."""


class TeacherMismatchError(TeacherError):
    """A teacher's model metadata or answers do not match the config (name, dtype or shape of a
    var), or the endpoint is not an Open Inference Protocol server. The teacher is quarantined; the
    epoch fails with this error only when no usable teacher is left."""


class TeacherAuthError(TeacherError):
    """A teacher refused the reader's token (``UNAUTHENTICATED`` or ``PERMISSION_DENIED``): check
    ``[conf] token_file``. Handled like a mismatch: the teacher is quarantined."""


class TeacherOutputError(TeacherError):
    """A teacher answered NaN or inf for rows whose inputs are all finite (``check_finite=True``;
    NaN in a sample's inputs is data, and the teacher's NaN for it passes through). Handled like a
    mismatch: the teacher is quarantined and the request goes to another teacher."""


class NoTeacherError(DistillReaderError, TimeoutError):
    """No teacher answered within the configured timeout."""


class PipelineError(DistillReaderError):
    """The reader's pipeline process died or stopped answering."""


class PipelineProcessError(PipelineError):
    """An exception of the reader's pipeline process that reaches the training loop as text: a crash
    there, or an exception that cannot travel between the processes as it is (it cannot be pickled,
    e.g. it holds a lock or a socket, as errors of client libraries do). ``type_name`` names its
    type (module and name), ``message`` is its ``str()``, ``remote_traceback`` its traceback in the
    pipeline process; ``str()`` shows all three, after ``context`` (what failed) if there is one."""

    def __init__(self, type_name: str, message: str, remote_traceback: str, context: str = "") -> None:
        super().__init__(type_name, message, remote_traceback, context)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.context = context

    def __str__(self) -> str:
        head = f"{self.context}: " if self.context else ""
        return f"{head}{self.type_name}: {self.message}\n\nIn the pipeline process:\n{self.remote_traceback}"


class StoreError(DistillReaderError):
    """The knowledge store (``[store]``, docs/store.md) cannot be used: it was captured with another
    config (the message names the difference), a file of it is unreadable, or it cannot be written."""


class StoreMissingError(StoreError, KeyError):
    """``[store] policy = read`` and the store has no row under a sample's key (named in the
    message): a ``read`` reader never asks a teacher."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreMismatchError(StoreError):
    """The teacher inputs of a sample differ from what the store recorded under its key (named in the
    message): the stored outputs belong to another sample. Raised by ``policy = read``; ``cache``
    asks the teacher again instead and replaces the row (with a WARNING)."""


class DiscoveryError(DistillReaderError):
    """Bad arguments for discovery (service name, require_num, endpoint, store URL), or a request
    the discovery server rejected as invalid. Unreachable discovery servers are not errors: clients
    retry."""


# -- internal signals -------------------------------------------------------------------------
# Raised in one module of distill-reader and caught in another; none reaches the user's code (each
# is turned into one of the errors above, an RPC status, or a retry), so ``distill_reader`` does not
# export them. They are DistillReaderErrors all the same, so the rule above holds without exception.


class StoreUnavailable(DistillReaderError):
    """The store cannot be reached right now (the caller retries)."""


class StoreRefused(StoreUnavailable):
    """The store answered but refused this server: a wrong user or password, a missing permission, or
    a failed TLS handshake. Retrying will not help until the configuration is fixed; the message says
    what to fix (and never holds a secret)."""


class AlreadyRegistered(DistillReaderError):
    """A live lease for this member is held by another instance."""


class ChannelTimeout(DistillReaderError):
    """A bounded send could not start in time: the other side does not read its pipe."""


class BatcherStopped(DistillReaderError, RuntimeError):
    """The batcher stopped before the request ran."""


class RequestError(DistillReaderError, ValueError):
    """A request that does not fit the model; becomes INVALID_ARGUMENT."""


class TransientTeacherError(DistillReaderError):
    """The teacher is unreachable or timed out; the request should go to another teacher."""


class RegionError(DistillReaderError, ValueError):
    """A registration or a tensor's region parameters the server refuses (INVALID_ARGUMENT)."""


class RegionsFull(RegionError):
    """Too many regions registered (RESOURCE_EXHAUSTED)."""


class RegionExists(RegionError):
    """A region of that name is registered already (ALREADY_EXISTS)."""
