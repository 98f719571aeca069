"""The PyTorch integration: zero-copy tensors, the example, DistributedDataParallel ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from reader_models import make_sample, tag_rows
from test_reader import sample_list_reader

torch = pytest.importorskip("torch")

from distill_reader import DistillReader  # noqa: E402
from distill_reader.torch import DistillDataset  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.timeout(60)
def test_dataset_yields_tensors_that_share_the_pool(write_config, tag_teachers):
    dr = DistillReader(write_config(tag_teachers), 16, 4, capacity=3, occupied_capacity=1)
    dr.set_sample_list_generator(sample_list_reader(50))
    with dr:
        batches = []
        for tensors in DistillDataset(dr):
            pool = np.frombuffer(dr._holder.pipeline._buffer.mmap, np.uint8)
            low, high = pool.ctypes.data, pool.ctypes.data + pool.nbytes
            assert all(low <= t.data_ptr() < high for t in tensors)  # views of the pool: no copy
            assert [t.dtype for t in tensors] == [torch.float32, torch.int64, torch.float32]
            batches.append([t.clone() for t in tensors])
        labels = torch.cat([b[1] for b in batches])[:, 0].numpy()
        np.testing.assert_array_equal(labels, np.arange(50))
        for img, _, prediction in batches:
            np.testing.assert_array_equal(prediction.numpy(), tag_rows(img.numpy()))
        np.testing.assert_array_equal(batches[0][0][0].numpy(), make_sample(0)[0])
        # pin_memory copies (page-locked memory needs a GPU build; on the CPU it is a plain copy).
        if torch.cuda.is_available():
            assert all(t.is_pinned() for t in next(iter(DistillDataset(dr, pin_memory=True))))


@pytest.mark.timeout(180)
def test_torch_example_trains_a_student():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "torch_digits.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.7


@pytest.mark.timeout(180)
def test_ddp_ranks_are_students_with_their_own_shards(tmp_path, teachers):
    from distill_reader.demo.digits import load_digits_split, train_teacher, write_onnx

    data = load_digits_split()
    model = write_onnx(train_teacher(data, hidden=32), tmp_path / "digits.onnx")
    endpoint = teachers.start(str(model), "--name", "digits")
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "torch_ddp.py"),
            "--teachers",
            endpoint,
            "--epochs",
            "2",
            "--port",
            str(free_port()),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    seen = [int((tmp_path / f"rank{r}").read_text().split()[0]) for r in range(2)]
    assert sum(seen) == 2 * len(data.x_train)  # 2 epochs, each rank its own half
    accuracies = [float((tmp_path / f"rank{r}").read_text().split()[1]) for r in range(2)]
    assert accuracies[0] == accuracies[1] > 0.5  # DDP keeps the replicas identical
