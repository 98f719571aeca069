"""Distil a Paddle student from a Paddle digits teacher served by two local built-in teacher servers.

    python examples/paddle_digits.py [--epochs 5]

Trains an MLP teacher on scikit-learn's digits, copies its weights into a Paddle layer, saves it
with ``paddle.jit.save`` (``teacher.json`` + ``teacher.pdiparams``), serves it with
``distill teacher serve --model DIR`` twice (the Paddle Inference backend), and trains a small
Paddle student with the distillation loss (KL divergence to the teacher's softened logits plus
cross-entropy to the labels), reading the teacher's logits through DistillReader. Prints the
student's test accuracy. Needs ``pip install 'distill-reader[paddle,demo]'``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle
    import paddle.nn.functional as F

from distill_reader import DistillReader
from distill_reader.demo.command import local_teachers
from distill_reader.demo.digits import N_CLASSES, N_FEATURES, MLPWeights, load_digits_split, train_teacher
from distill_reader.paddle import DistillDataset

# A Paddle 3 program (PIR, ``.json``) names its outputs fetch_name_0, fetch_name_1, ...
CONFIG = f"""\
[conf]
mode = fixed
servers = {{servers!r}}
model_name = 'digits'

[feed]
feed_vars = ['pixels', 'label']
feed_types = ['float32', 'int64']
feed_shapes = [({N_FEATURES},), (1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['fetch_name_0']
fetch_types = ['float32']
fetch_shapes = [({N_CLASSES},)]
"""


def save_paddle_teacher(weights: MLPWeights, directory: Path) -> Path:
    """The teacher MLP as a saved Paddle inference model: ``pixels`` [-1, 64] -> logits [-1, 10]."""
    hidden = weights.w1.shape[1]
    teacher = paddle.nn.Sequential(paddle.nn.Linear(N_FEATURES, hidden), paddle.nn.ReLU(), paddle.nn.Linear(hidden, 10))
    # paddle.nn.Linear keeps its weight as [in, out], like scikit-learn's coefs_.
    for layer, w, b in ((teacher[0], weights.w1, weights.b1), (teacher[2], weights.w2, weights.b2)):
        layer.weight.set_value(w)
        layer.bias.set_value(b)
    teacher.eval()
    spec = [paddle.static.InputSpec([None, N_FEATURES], "float32", name="pixels")]
    paddle.jit.save(teacher, str(directory / "teacher"), input_spec=spec)
    return directory


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 4.0, alpha: float = 0.9):
    """Hinton et al.: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, axis=1),
        F.log_softmax(teacher_logits / temperature, axis=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    paddle.seed(0)
    data = load_digits_split()
    weights = train_teacher(data)
    student = paddle.nn.Sequential(paddle.nn.Linear(64, 32), paddle.nn.ReLU(), paddle.nn.Linear(32, 10))
    optimizer = paddle.optimizer.Adam(learning_rate=1e-2, parameters=student.parameters())

    def samples():
        for x, y in zip(data.x_train, data.y_train):
            yield x, np.array([y], dtype=np.int64)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_paddle_teacher(weights, Path(tmp) / "teacher")
        with local_teachers(model_dir, 2, "digits") as endpoints:
            config = Path(tmp) / "reader.conf"
            config.write_text(CONFIG.format(servers=endpoints))
            with DistillReader(config, 64, 16, capacity=8, occupied_capacity=1) as reader:
                reader.set_sample_generator(samples)
                dataset = DistillDataset(reader)  # iterated directly: zero-copy tensors
                for epoch in range(args.epochs):
                    for pixels, labels, teacher_logits in dataset:
                        loss = distillation_loss(student(pixels), teacher_logits, labels[:, 0])
                        optimizer.clear_grad()
                        loss.backward()
                        optimizer.step()
                    print(f"epoch {epoch + 1}: loss {float(loss):.3f}")

    student.eval()
    with paddle.no_grad():
        predicted = student(paddle.to_tensor(data.x_test)).argmax(axis=1).numpy()
    accuracy = float((predicted == data.y_test).mean())
    print(f"student test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
