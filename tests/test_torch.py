"""The PyTorch integration: zero-copy tensors, the example, DistributedDataParallel ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from reader_models import make_sample, tag_rows
from test_reader import check_epoch, pool_of, sample_list_reader

torch = pytest.importorskip("torch")

from distill_reader import ConfigError, DistillReader  # noqa: E402
from distill_reader.torch import DistillDataset, can_pin_memory  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.timeout(60)
def test_dataset_yields_tensors_that_share_the_pool(write_config, tag_teachers):
    dr = DistillReader(write_config(tag_teachers), 16, 4, capacity=3, occupied_capacity=1)
    dr.set_sample_list_generator(sample_list_reader(50))
    with dr:
        batches = []
        for tensors in DistillDataset(dr):
            pool = pool_of(dr)
            low, high = pool.ctypes.data, pool.ctypes.data + pool.nbytes
            assert all(low <= t.data_ptr() < high for t in tensors)  # views of the pool: no copy
            assert [t.dtype for t in tensors] == [torch.float32, torch.int64, torch.float32]
            batches.append([t.clone() for t in tensors])
        labels = torch.cat([b[1] for b in batches])[:, 0].numpy()
        np.testing.assert_array_equal(labels, np.arange(50))
        for img, _, prediction in batches:
            np.testing.assert_array_equal(prediction.numpy(), tag_rows(img.numpy()))
        np.testing.assert_array_equal(batches[0][0][0].numpy(), make_sample(0)[0])


@pytest.mark.timeout(60)
def test_pin_memory_gives_copies_that_outlive_their_slot(write_config, tag_teachers):
    """pin_memory=True: every tensor is a copy of the batch (page-locked where torch has an
    accelerator; on a CPU-only torch a plain copy, with a warning), so it keeps its content after
    the pool's only slot was reused for every later batch."""
    dr = DistillReader(write_config(tag_teachers), 16, 4, capacity=1, occupied_capacity=0)
    dr.set_sample_list_generator(sample_list_reader(50))
    with dr:
        if can_pin_memory():
            dataset = DistillDataset(dr, pin_memory=True)
        else:
            with pytest.warns(UserWarning, match="no accelerator to pin memory for"):
                dataset = DistillDataset(dr, pin_memory=True)
        batches = []
        for tensors in dataset:
            pool = pool_of(dr)
            low, high = pool.ctypes.data, pool.ctypes.data + pool.nbytes
            assert not any(low <= t.data_ptr() < high for t in tensors)  # not views of the pool
            assert [t.is_pinned() for t in tensors] == [can_pin_memory()] * 3
            batches.append(tensors)
    check_epoch([[t.numpy() for t in b] for b in batches], 50, 16)


@pytest.mark.timeout(60)
def test_dataloader_workers_are_refused_with_a_config_error(write_config, tag_teachers):
    dr = DistillReader(write_config(tag_teachers), 16, 4, capacity=2, occupied_capacity=0)
    dr.set_sample_list_generator(sample_list_reader(50))
    loader = torch.utils.data.DataLoader(DistillDataset(dr), batch_size=None, num_workers=1)
    with dr, pytest.raises(ConfigError, match=r"DataLoader\(\.\.\., num_workers=0\)"):
        next(iter(loader))


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
