"""Teacher models for the reader tests, served by the built-in teacher server.

``tag`` is exact: each output row is computed from its own input row only (float64 sums of
integers-valued pixels), so "the teacher output equals the model applied to that very row" can be
checked with array equality. It also encodes the row's id, so a lost, repeated or misplaced row
cannot go unnoticed.
"""

from __future__ import annotations

import os
import time

import numpy as np

# The exact model and the samples are the fault-injection benchmark's, so tests and `distill bench
# chaos` check the same thing.
from distill_reader.bench.chaos import IMG_SHAPE, make_sample, tag_rows
from distill_reader.serving import teacher_model

__all__ = ["IMG_SHAPE", "make_sample", "tag_rows"]


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"prediction": tag_rows(batch["img"])}


@teacher_model(inputs=[("image", "float32", IMG_SHAPE)], outputs=[("scale_0.tmp_0", "float32", (10,))])
def tag_paddle_names(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same model with Paddle-style served names (for serving_conf_file aliases)."""
    return {"scale_0.tmp_0": tag_rows(batch["image"])}


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
def slow_tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tag`` taking 20 ms per batch (sleeping, like a GPU), so an epoch lasts long enough to kill
    a teacher in the middle of it."""
    time.sleep(float(os.environ.get("SLOW_TAG_SECONDS", "0.02")))
    return {"prediction": tag_rows(batch["img"])}


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (10,))])
def broken(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise RuntimeError("the teacher model is broken")
