"""The errors module's promise: every exception distill-reader raises on purpose is a
DistillReaderError, with the built-in base a caller would catch; and the public surface is what the
docs say it is."""

from __future__ import annotations

import importlib

import pytest

import distill_reader
from distill_reader import errors
from distill_reader.errors import DistillReaderError

ERROR_CLASSES = [c for c in vars(errors).values() if isinstance(c, type) and c.__module__ == errors.__name__]


def test_every_class_of_errors_py_is_a_distill_reader_error() -> None:
    assert len(ERROR_CLASSES) > 20  # the module's classes were found
    assert [c.__name__ for c in ERROR_CLASSES if not issubclass(c, DistillReaderError)] == []


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("ConfigError", ValueError),
        ("ReaderArgumentError", TypeError),
        ("SampleError", ValueError),
        ("NoTeacherError", TimeoutError),
        ("StoreMissingError", KeyError),
        ("BatcherStopped", RuntimeError),
        ("RequestError", ValueError),
        ("RegionError", ValueError),
        ("RegionsFull", ValueError),
        ("RegionExists", ValueError),
    ],
)
def test_builtin_bases_are_kept(name: str, builtin: type) -> None:
    assert issubclass(getattr(errors, name), builtin)


def test_the_exported_errors_are_the_users() -> None:
    exported = {n for n in distill_reader.__all__ if n.endswith("Error")}
    assert exported <= {c.__name__ for c in ERROR_CLASSES}
    # The internal signals stay unexported: they never reach the user's code.
    assert exported.isdisjoint({"StoreUnavailable", "ChannelTimeout", "RequestError", "TransientTeacherError"})


def test_serving_exports_only_teacher_model() -> None:
    import distill_reader.serving as serving

    assert serving.__all__ == ["teacher_model"]
    for internal in ("Backend", "load_backend", "serve", "run_server", "running_server", "InferenceServer"):
        assert not hasattr(serving, internal), internal


@pytest.mark.parametrize("module", ["config", "oip", "security", "rpc"])
def test_internal_modules_say_so(module: str) -> None:
    doc = importlib.import_module(f"distill_reader.{module}").__doc__ or ""
    assert "not public API" in doc, module
