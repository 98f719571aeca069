"""Distil a PyTorch student from a digits teacher served by two local built-in teacher servers.

    python examples/torch_digits.py [--epochs 5]

Trains an MLP teacher on scikit-learn's digits, exports it to ONNX, serves it with
``distill teacher serve`` twice, and trains a small PyTorch student with the distillation loss
(KL divergence to the teacher's softened logits plus cross-entropy to the labels), reading the
teacher's logits through DistillReader. Prints the student's test accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill_reader import DistillReader
from distill_reader.demo.command import local_teachers
from distill_reader.demo.digits import load_digits_split, train_teacher, write_onnx, write_reader_config
from distill_reader.torch import DistillDataset


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 4.0, alpha: float = 0.9):
    """Hinton et al.: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_digits_split()
    weights = train_teacher(data)
    student = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)

    def samples():
        for x, y in zip(data.x_train, data.y_train):
            yield x, np.array([y], dtype=np.int64)

    with tempfile.TemporaryDirectory() as tmp:
        model = write_onnx(weights, Path(tmp) / "digits.onnx")
        with local_teachers(model, 2, "digits") as endpoints:
            config = write_reader_config(Path(tmp) / "reader.conf", endpoints)
            with DistillReader(config, 64, 16, capacity=8, occupied_capacity=1) as reader:
                reader.set_sample_generator(samples)
                dataset = DistillDataset(reader)
                for epoch in range(args.epochs):
                    for pixels, labels, teacher_logits in dataset:
                        loss = distillation_loss(student(pixels), teacher_logits, labels[:, 0])
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                    print(f"epoch {epoch + 1}: loss {loss.item():.3f}")

    with torch.no_grad():
        predicted = student(torch.from_numpy(data.x_test)).argmax(dim=1).numpy()
    accuracy = float((predicted == data.y_test).mean())
    print(f"student test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
