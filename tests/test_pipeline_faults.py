"""Faults between the training process and its pipeline process. Each leaves the reader usable."""

from __future__ import annotations

import pickle
import threading

import pytest
from conftest import wait_for
from test_reader import check_epoch, sample_list_reader

from distill_reader import DistillReader, DistillReaderError, PipelineError
from distill_reader.errors import PipelineProcessError, TeacherError
from distill_reader.reader.channel import EpochError, Fatal, decode, encode
from distill_reader.reader.pipeline import Epoch

pytestmark = pytest.mark.timeout(300)


def _places(dr: DistillReader) -> dict[str, int]:
    return dr._holder.pipeline.ledger.counts()


# -- an exception that cannot be pickled --------------------------------------------------------
class _Locked(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class _TwoArguments(Exception):
    """Pickles, but cannot be unpickled (its __init__ takes two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


class _LockedTeacherError(TeacherError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    ("error", "kind", "name", "text"),
    [
        (_Locked("a socket went away"), PipelineProcessError, "_Locked", "a socket went away"),
        (_TwoArguments("this", "that"), PipelineProcessError, "_TwoArguments", "this and that"),
        # One of ours keeps its type, so `except TeacherError` still catches it.
        (_LockedTeacherError("the teacher is gone"), TeacherError, "_LockedTeacherError", "the teacher is gone"),
    ],
)
def test_an_error_that_cannot_cross_the_channel_arrives_as_text(error, kind, name, text):
    for message in (EpochError(3, _raised(error)), Fatal(_raised(error))):
        received = decode(encode(message))
        got = received.error
        assert isinstance(got, kind), got
        assert name in str(got) and text in str(got) and "Traceback" in str(got) and "_raised" in str(got)
        pickle.loads(pickle.dumps(got))
    # An error that crosses as it is keeps its type and its attributes.
    assert decode(encode(EpochError(1, ValueError("plain")))).error.args == ("plain",)


# -- a seal that fails --------------------------------------------------------------------------
def test_a_failed_seal_fails_the_epoch_and_frees_its_slot(write_config, tag_teachers, monkeypatch):
    """Sealing a slot fails once (injected into the feeder's sink): the epoch fails with that error,
    every slot is free again, and the next epochs use them all."""
    original = Epoch.sealed
    calls = []

    def failing_sealed(self, slot, rows):
        calls.append(slot)
        if len(calls) == 3:
            raise PipelineError("injected: sealing the slot failed")
        return original(self, slot, rows)

    monkeypatch.setattr(Epoch, "sealed", failing_sealed)
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=0, copy=True)
    dr.set_sample_list_generator(sample_list_reader(160, 5))
    with dr:
        with pytest.raises(DistillReaderError, match="injected: sealing the slot failed"):
            list(dr.distill_reader()())
        pipeline = dr._holder.pipeline
        assert pipeline.alive  # nothing was wrong with the pipeline process: it is kept
        wait_for(lambda: _places(dr)["free"] == 4, 10, "every slot free after the failed epoch")
        assert _places(dr) == {"free": 4, "filling": 0, "queued": 0, "held": 0}
        for _ in range(2):
            check_epoch(list(dr.distill_reader()()), 160, 8)
            assert _places(dr) == {"free": 4, "filling": 0, "queued": 0, "held": 0}
        assert dr._holder.pipeline is pipeline
