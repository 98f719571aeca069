"""The demo's student: softmax regression in numpy, trained on hard labels or on soft labels."""

from __future__ import annotations

import numpy as np

UNLABELLED = -1  # the label of a sample whose label the student does not have


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Student:
    """A linear classifier trained by minibatch SGD.

    ``step(x, y, teacher_logits)`` with logits uses the distillation loss of Hinton et al.:
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy(y)``, where rows
    labelled :data:`UNLABELLED` have no cross-entropy term (both terms are averaged over the whole
    batch); without logits it is plain cross-entropy and every row needs a label.
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
        labelled = y != UNLABELLED
        if teacher_logits is None and not labelled.all():
            raise ValueError("Student.step: without teacher logits every row needs a label")
        hard = _softmax(z)
        hard[np.flatnonzero(labelled), y[labelled]] -= 1.0
        hard[~labelled] = 0.0
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


def train_without_teacher(
    x: np.ndarray, y: np.ndarray, n_classes: int, steps: int, batch_size: int, **student_args
) -> Student:
    """A :class:`Student` trained on labelled samples alone for ``steps`` minibatches, cycling
    over them in order: the baseline gets as many SGD steps as the distilled student, however few
    labelled samples it has."""
    student = Student(x.shape[1], n_classes, **student_args)
    start = 0
    for _ in range(steps):
        if start >= len(x):
            start = 0
        student.step(x[start : start + batch_size], y[start : start + batch_size])
        start += batch_size
    return student
