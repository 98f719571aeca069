"""The pipeline process seen from the training process: start it, send to it, stop it.

It is a fresh interpreter running :func:`distill_reader.reader.pipeline_process.main` (not
``multiprocessing``: its spawn would import the user's script again), in its own session so that a
terminal's Ctrl-C goes to the training loop only, which then stops it. Two pipes join the
processes; this side writes one and the receiver thread (:mod:`.receiver`) reads the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from multiprocessing.connection import Connection

from distill_reader.errors import ChannelTimeout
from distill_reader.reader.channel import Message, Receiver, Sender, Stop
from distill_reader.reader.pipeline_process import PipelineSpec

_CHILD_MAIN = "import sys; from distill_reader.reader.pipeline_process import main; sys.exit(main(sys.argv[1:]))"
_KILL_WAIT = 2.0  # seconds for a killed process to be reaped, and for the last bytes to leave the pipe


def _enlarge_pipe(fd: int) -> None:
    """Give the pipe 1 MiB (Linux): a burst of messages never makes its writer wait."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(fd, set_size, 1 << 20)


class ProcessHandle:
    """The training process's handle on a started pipeline process: ``incoming`` is the receiving
    end of its pipe (the receiver thread's), :meth:`send_spec` then :meth:`send` write to it,
    :meth:`stop` ends it."""

    def __init__(self, pool_fd: int) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        _enlarge_pipe(from_child_w)
        _enlarge_pipe(to_child_w)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w, pool_fd),
                stdin=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C goes to the training loop, which stops it.
                start_new_session=True,
            )
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        os.close(to_child_r)
        os.close(from_child_w)
        self._to_child = Connection(to_child_w, readable=False)
        self.incoming = Receiver(Connection(from_child_r, writable=False))
        self._sender: Sender | None = None  # once the spec is sent

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def exit_code(self, wait: float) -> int | None:
        """The exit code, waiting up to ``wait`` seconds for it; None while it runs."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(wait)
        return self.popen.returncode

    def send_spec(self, spec: PipelineSpec) -> None:
        """The first message, the only one that is not a channel message (no sender exists yet)."""
        self._to_child.send(spec)
        self._sender = Sender(self._to_child)

    def send(self, message: Message, timeout: float | None = None) -> None:
        """Send to the pipeline process (from any thread); OSError once it is gone."""
        if self._sender is None:
            raise OSError("the pipeline process is not started")
        self._sender.send(message, timeout)

    def stop(self, timeout: float) -> None:
        """``Stop``, then ``timeout`` seconds to exit, then SIGKILL. A feeder still writing then gets
        EPIPE, and the receiver thread reads end-of-file and closes its end."""
        if self._sender is not None:
            with contextlib.suppress(OSError, ChannelTimeout):
                self._sender.send(Stop(), timeout=_KILL_WAIT)
        else:
            self._to_child.close()  # the spec never went: end-of-file makes it exit
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(_KILL_WAIT)
        if self._sender is not None:
            self._sender.close(_KILL_WAIT)
