"""The teacher client's own request encoding is a valid ModelInferRequest; the transports import
without a cycle."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from distill_reader.teacher.codec import encode_infer_request

Request = service_pb2.ModelInferRequest


@given(rows=st.integers(0, 300), start=st.integers(0, 5), features=st.integers(1, 40))
def test_encoded_request_parses_to_the_same_message(rows, start, features):
    pool = np.arange((start + rows) * features * 3, dtype=np.float32).reshape(start + rows, features, 3)
    ids = np.arange(start + rows, dtype=np.int64).reshape(-1, 1)
    arrays = [pool[start:], ids[start:]]  # views into a bigger array, as the reader's slots are
    header = Request(
        model_name="teacher",
        inputs=[
            Request.InferInputTensor(name="x", datatype="FP32", shape=[rows, features, 3]),
            Request.InferInputTensor(name="id", datatype="INT64", shape=[rows, 1]),
        ],
        outputs=[Request.InferRequestedOutputTensor(name="y")],
    )
    expected = Request()
    expected.CopyFrom(header)
    expected.raw_input_contents.extend([a.tobytes() for a in arrays])
    assert Request.FromString(encode_infer_request(header.SerializeToString(), arrays)) == expected


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from distill_reader.teacher.codec import all_finite

    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 33)) * 1000).astype(dtype)
    assert all_finite(values) and all_finite(values[:0])
    assert all_finite(np.array([np.finfo(dtype).max, np.finfo(dtype).min, np.finfo(dtype).tiny], dtype))
    for bad in (np.nan, np.inf, -np.inf):
        for index in (0, 1000, values.size - 1):
            broken = values.copy()
            broken.flat[index] = bad
            assert not all_finite(broken), (bad, index)


@pytest.mark.parametrize(
    "module",
    ["distill_reader.teacher.shm", "distill_reader.teacher.factory", "distill_reader.teacher.scheduler"],
)
def test_each_transport_module_imports_first_without_a_cycle(module):
    """Imported first in a fresh interpreter (the pipeline process imports the factory, which maps
    the reader's pool, while the reader imports the pipeline process): no partially initialized module."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert done.returncode == 0, done.stderr
