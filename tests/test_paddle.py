"""The Paddle integration: a saved Paddle model served by ``distill teacher serve``, paddle tensors
out of DistillReader (zero-copy), paddle.io.DataLoader, a Paddle student trained on soft labels."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TAG_FEED, TeacherProcesses
from reader_models import IMG_SHAPE, make_sample
from test_reader import sample_list_reader

try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No ccache found")
        import paddle
except ImportError:
    pytest.skip("PaddlePaddle is not installed (pip install 'distill-reader[paddle]')", allow_module_level=True)

from distill_reader import DistillReader  # noqa: E402
from distill_reader.paddle import DistillDataset  # noqa: E402
from distill_reader.serving.backends import load_backend  # noqa: E402
from distill_reader.serving.backends.paddle import PaddleBackend, find_paddle_model  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"
N_SAMPLES = 50

CONFIG = """\
[conf]
mode = fixed
servers = {servers!r}

"""
CONFIG += TAG_FEED
CONFIG += """
[fetch]
fetch_vars = ['fetch_name_0']
fetch_types = ['float32']
fetch_shapes = [(10,)]
"""


class Teacher(paddle.nn.Layer):
    """Linear + ReLU + Linear on the flattened 1x4x4 image."""

    def __init__(self) -> None:
        super().__init__()
        self.net = paddle.nn.Sequential(paddle.nn.Linear(16, 32), paddle.nn.ReLU(), paddle.nn.Linear(32, 10))

    def forward(self, img):
        return self.net(paddle.flatten(img, 1) / 100.0)


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory) -> tuple[Teacher, Path]:
    """The teacher layer and the prefix it was saved under with ``paddle.jit.save`` (``.json`` + ``.pdiparams``)."""
    paddle.seed(0)
    model = Teacher()
    model.eval()
    prefix = tmp_path_factory.mktemp("paddle") / "teacher" / "model"
    paddle.jit.save(model, str(prefix), input_spec=[paddle.static.InputSpec([None, *IMG_SHAPE], "float32", "img")])
    return model, prefix


@pytest.fixture(scope="module")
def paddle_teacher(teacher_model) -> str:
    """One ``distill teacher serve --model <dir>`` process serving the saved teacher."""
    fleet = TeacherProcesses()
    try:
        yield fleet.start(str(teacher_model[1].parent))
    finally:
        fleet.stop_all()


def expected(model: Teacher, img: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(img)).numpy()


def test_find_paddle_model(teacher_model, tmp_path):
    prefix = teacher_model[1]
    pair = (f"{prefix}.json", f"{prefix}.pdiparams")
    assert find_paddle_model(str(prefix)) == pair
    assert find_paddle_model(str(prefix.parent)) == pair
    assert find_paddle_model(f"{prefix}.json") == pair
    assert find_paddle_model(str(tmp_path)) is None
    (tmp_path / "other.json").write_text("{}")
    assert find_paddle_model(str(tmp_path / "other.json")) is None
    assert find_paddle_model("reader_models:tag") is None


@pytest.mark.timeout(60)
def test_backend_reads_the_signature_and_runs_the_model(teacher_model):
    model, prefix = teacher_model
    backend = load_backend(str(prefix), threads=1)
    assert isinstance(backend, PaddleBackend)
    assert backend.describe() == "inputs: img FP32[-1,1,4,4]; outputs: fetch_name_0 FP32[-1,10]"
    img = np.stack([make_sample(i)[0] for i in range(7)])
    out = backend.infer({"img": img})["fetch_name_0"]
    assert out.dtype == np.float32 and out.shape == (7, 10)
    np.testing.assert_allclose(out, expected(model, img), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
def test_backend_serves_a_legacy_pdmodel(tmp_path):
    """Paddle 2 (or FLAGS_enable_pir_api=0) writes a ProgramDesc ``.pdmodel``; its names are variable names."""
    script = f"""
import paddle
class M(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(4, 3)
    def forward(self, x, ids):
        return self.fc(x), paddle.cast(ids, "int64") * 2
paddle.seed(0)
paddle.jit.save(M(), {str(tmp_path / "model")!r}, input_spec=[
    paddle.static.InputSpec([None, 4], "float32", "x"), paddle.static.InputSpec([None, 2], "int32", "ids")])
"""
    (tmp_path / "save.py").write_text(script)  # dy2static reads the layer's source: a file, not -c
    env = {**os.environ, "FLAGS_enable_pir_api": "0"}
    subprocess.run([sys.executable, str(tmp_path / "save.py")], env=env, check=True, capture_output=True, timeout=50)
    assert (tmp_path / "model.pdmodel").is_file()
    backend = load_backend(str(tmp_path / "model.pdmodel"))
    assert [(s.name, s.datatype, s.shape) for s in backend.inputs] == [("x", "FP32", (4,)), ("ids", "INT32", (2,))]
    assert [(s.datatype, s.shape) for s in backend.outputs] == [("FP32", (3,)), ("INT64", (2,))]
    out = backend.infer({"x": np.ones((5, 4), np.float32), "ids": np.arange(10, dtype=np.int32).reshape(5, 2)})
    first, second = (out[s.name] for s in backend.outputs)
    assert first.shape == (5, 3)
    np.testing.assert_array_equal(second, np.arange(10).reshape(5, 2) * 2)


@pytest.mark.timeout(60)
def test_served_paddle_model_through_the_reader(tmp_path, teacher_model, paddle_teacher):
    """Every row exactly once, in order, with the Paddle model's own output on that row."""
    model = teacher_model[0]
    config = tmp_path / "reader.conf"
    config.write_text(CONFIG.format(servers=[paddle_teacher]))
    with DistillReader(config, 16, 4, capacity=3, occupied_capacity=1, copy=True) as dr:
        dr.set_sample_list_generator(sample_list_reader(N_SAMPLES))
        batches = list(dr.distill_reader()())
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    img, label, prediction = (np.concatenate(field) for field in zip(*batches))
    np.testing.assert_array_equal(label[:, 0], np.arange(N_SAMPLES))
    np.testing.assert_array_equal(img, np.stack([make_sample(i)[0] for i in range(N_SAMPLES)]))
    np.testing.assert_allclose(prediction, expected(model, img), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dataset_yields_paddle_tensors_that_share_the_pool(tmp_path, teacher_model, paddle_teacher):
    model = teacher_model[0]
    config = tmp_path / "reader.conf"
    config.write_text(CONFIG.format(servers=[paddle_teacher]))
    with DistillReader(config, 16, 4, capacity=3, occupied_capacity=1) as dr:
        dr.set_sample_list_generator(sample_list_reader(N_SAMPLES))
        batches = []
        for tensors in DistillDataset(dr):
            pool = np.frombuffer(dr._holder.pipeline._buffer.mmap, np.uint8)
            low, high = pool.ctypes.data, pool.ctypes.data + pool.nbytes
            assert all(low <= t.data_ptr() < high for t in tensors)  # views of the pool: no copy
            assert [t.dtype for t in tensors] == [paddle.float32, paddle.int64, paddle.float32]
            assert all(t.place.is_cpu_place() for t in tensors)
            batches.append([t.numpy().copy() for t in tensors])
        img, label, prediction = (np.concatenate(field) for field in zip(*batches))
        np.testing.assert_array_equal(label[:, 0], np.arange(N_SAMPLES))
        np.testing.assert_allclose(prediction, expected(model, img), rtol=1e-5, atol=1e-6)

        # copy=True: tensors of their own.
        first = next(iter(DistillDataset(dr, copy=True)))
        pool = np.frombuffer(dr._holder.pipeline._buffer.mmap, np.uint8)
        assert not any(pool.ctypes.data <= t.data_ptr() < pool.ctypes.data + pool.nbytes for t in first)
        np.testing.assert_array_equal(first[1].numpy()[:, 0], np.arange(16))

        # Workers would each start a reader: the worker's RuntimeError reaches the loop as Paddle's SystemError.
        with pytest.raises((RuntimeError, SystemError)):
            for _ in paddle.io.DataLoader(DistillDataset(dr), batch_size=None, num_workers=1):
                pass


def check_loader(loader, model: Teacher, slow: bool) -> None:
    """The loader yields every sample once, in order, with its teacher output, even with a slow consumer."""
    got = []
    for tensors in loader:
        assert [t.dtype for t in tensors] == [paddle.float32, paddle.int64, paddle.float32]
        if slow:
            time.sleep(0.02)  # a training step: a prefetching loader runs ahead meanwhile
        got.append([t.numpy().copy() for t in tensors])
    img, label, prediction = (np.concatenate(field) for field in zip(*got))
    np.testing.assert_array_equal(label[:, 0], np.arange(len(label)))
    np.testing.assert_allclose(prediction, expected(model, img), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
def test_buffered_dataloader_gets_copies(tmp_path, teacher_model, paddle_teacher):
    """paddle.io.DataLoader (even with ``use_buffer_reader=False``) prefetches in a thread into a
    queue and holds the tensors it took without copying them: zero-copy tensors would see their
    pool slots reused (seen: labels 32.. in the first batch with occupied_capacity=1). With
    ``copy=True`` every batch is right."""
    config = tmp_path / "reader.conf"
    config.write_text(CONFIG.format(servers=[paddle_teacher]))
    with DistillReader(config, 8, 4, capacity=2, occupied_capacity=1) as dr:
        dr.set_sample_list_generator(sample_list_reader(120))
        loader = paddle.io.DataLoader(DistillDataset(dr, copy=True), batch_size=None, num_workers=0)
        check_loader(loader, teacher_model[0], slow=True)


@pytest.mark.timeout(60)
def test_student_trains_on_soft_labels(tmp_path, paddle_teacher):
    """A Paddle student fitted to the teacher's softened outputs with a KL loss: the loss goes down."""
    config = tmp_path / "reader.conf"
    config.write_text(CONFIG.format(servers=[paddle_teacher]))
    paddle.seed(1)
    student = paddle.nn.Linear(16, 10)
    optimizer = paddle.optimizer.Adam(learning_rate=0.01, parameters=student.parameters())
    kl = paddle.nn.KLDivLoss(reduction="batchmean", log_target=True)
    with DistillReader(config, 16, 4, capacity=4, occupied_capacity=1) as dr:
        dr.set_sample_list_generator(sample_list_reader(64))
        dataset = DistillDataset(dr)
        losses = []  # per epoch
        for _ in range(8):
            epoch = []
            for img, _label, teacher_logits in dataset:
                log_p = paddle.nn.functional.log_softmax(student(paddle.flatten(img, 1) / 100.0) / 2.0, axis=1)
                loss = kl(log_p, paddle.nn.functional.log_softmax(teacher_logits / 2.0, axis=1))
                optimizer.clear_grad()
                loss.backward()
                optimizer.step()
                epoch.append(float(loss))
            losses.append(np.mean(epoch))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.timeout(180)
def test_paddle_example_trains_a_student():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "paddle_digits.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.7
