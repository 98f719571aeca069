"""A tiny MNIST-shaped teacher for the README's example: a fixed linear layer and a softmax.

Serve it from the repository root (it needs no training and no download):

    distill teacher serve --model examples/mnist_teacher.py:predict --listen 127.0.0.1:8001 --name mnist_teacher

A real teacher is a trained model: an ONNX file, a saved Paddle model, or a function like this one
that runs your framework's model (see the README, "Teachers").
"""

from __future__ import annotations

import numpy as np

from distill_reader.serving import teacher_model

# Fixed weights (seeded), so every run and every teacher process computes the same function.
_WEIGHTS = np.random.default_rng(0).standard_normal((28 * 28, 10)).astype(np.float32) / 28


@teacher_model(inputs=[("img", "float32", (1, 28, 28))], outputs=[("prediction", "float32", (10,))])
def predict(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Class probabilities for a batch of 1×28×28 images: ``softmax(img @ W)``."""
    logits = batch["img"].reshape(len(batch["img"]), -1) @ _WEIGHTS
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {"prediction": exp / exp.sum(axis=1, keepdims=True)}
