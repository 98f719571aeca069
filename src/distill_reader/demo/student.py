"""The demo's student: softmax regression in numpy, trained on hard labels or on soft labels."""

from __future__ import annotations

import numpy as np


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Student:
    """A linear classifier trained by minibatch SGD.

    ``step(x, y, teacher_logits)`` with logits uses the distillation loss of Hinton et al.:
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy(y)``; without logits it
    is plain cross-entropy.
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        lr: float = 0.5,
        temperature: float = 4.0,
        alpha: float = 0.9,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(0, 0.01, (n_features, n_classes))
        self.b = np.zeros(n_classes)
        self.lr = lr
        self.temperature = temperature
        self.alpha = alpha

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w + self.b

    def step(self, x: np.ndarray, y: np.ndarray, teacher_logits: np.ndarray | None = None) -> None:
        x = x.astype(np.float64)
        z = self.logits(x)
        hard = _softmax(z)
        hard[np.arange(len(y)), y] -= 1.0
        grad = hard
        if teacher_logits is not None:
            t = self.temperature
            soft = _softmax(z / t) - _softmax(teacher_logits.astype(np.float64) / t)
            grad = self.alpha * t * soft + (1 - self.alpha) * hard
        grad /= len(x)
        self.w -= self.lr * x.T @ grad
        self.b -= self.lr * grad.sum(axis=0)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.logits(x.astype(np.float64)).argmax(axis=1) == y).mean())
