"""The Hugging Face backend (``distill teacher serve --model hf:DIR``) on a tiny GPT-2 built here
(tests/llm_support.py): every real position's top-k, values and indices, against transformers'
``log_softmax`` of that row alone, in process, through a real server, and through a real
DistillReader with one of two teachers killed mid-epoch; the token budget; bad specs.

Exactness: the reference runs each row alone and unpadded; the server runs rows padded in
batches and forward passes of other shapes, whose float32 sums may differ in the last bits. So
values must match within ``ATOL`` and each index must point at a reference log-prob within
``ATOL`` of its value: where the reference has no near-tie that is the reference's index itself.
"""

from __future__ import annotations

from pathlib import Path

import llm_support
import numpy as np
import pytest

llm_support.require_llm()

import torch  # noqa: E402
import tritonclient.grpc as tc  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import TeacherProcesses  # noqa: E402

from distill_reader import DistillReader  # noqa: E402
from distill_reader.bench.sequence import sequence_config  # noqa: E402
from distill_reader.serving.backends import load_backend  # noqa: E402
from distill_reader.serving.backends.hf import device_topk  # noqa: E402
from distill_reader.serving.commands import teacher  # noqa: E402
from distill_reader.serving.topk import TopKBackend, topk  # noqa: E402

pytestmark = pytest.mark.timeout(300)

K = 8
ATOL = 2e-5  # float32 log-probs: padding and batch shapes move the last bits only
MAX_LENGTH = 48
READY_S = 240.0  # a teacher imports torch and transformers: slow on a loaded machine


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return llm_support.tiny_lm_dir()


class Reference:
    """transformers' float32 log-softmax of each row alone, unpadded (rows cached by content)."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.cache: dict[bytes, np.ndarray] = {}

    def logprobs(self, row: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        key = np.asarray(row, np.int64).tobytes() + str(temperature).encode()
        if key not in self.cache:
            with torch.inference_mode():
                logits = self.model(input_ids=torch.from_numpy(np.asarray(row, np.int64))[None]).logits[0]
                self.cache[key] = torch.log_softmax(logits.float() / temperature, dim=-1).numpy()
        return self.cache[key]

    def check(self, row: np.ndarray, values: np.ndarray, indices: np.ndarray, atol: float = ATOL) -> None:
        """``values``/``indices`` ``[len(row), K]`` are the top-K of the reference at every position."""
        logp = self.logprobs(row)
        want_i = np.argsort(-logp, axis=-1, kind="stable")[:, : values.shape[-1]]
        want_v = np.take_along_axis(logp, want_i, axis=-1)
        assert values.shape == indices.shape == want_v.shape
        np.testing.assert_allclose(values, want_v, rtol=0, atol=atol)
        np.testing.assert_allclose(
            np.take_along_axis(logp, indices.astype(np.int64), axis=-1), values, rtol=0, atol=atol
        )
        # Where neighbours in the reference's order are further apart than the tolerance, the index is its.
        gaps = np.abs(np.diff(want_v, axis=-1))
        clear = np.ones_like(want_v, dtype=bool)
        clear[:, 1:] &= gaps > 2 * atol
        clear[:, :-1] &= gaps > 2 * atol
        np.testing.assert_array_equal(indices[clear], want_i[clear])
        assert all(len(set(r)) == len(r) for r in indices.tolist())


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


def padded(rows: list[np.ndarray], extra: int = 0, pad: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Rows padded with ``pad`` past each length (it must change nothing), and the lengths."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    tokens = np.full((len(rows), int(lengths.max()) + extra), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, lengths


# --- in process -----------------------------------------------------------------------------------


def test_device_topk_follows_the_rules_of_topk() -> None:
    """Ties (many, as in bfloat16 logits) keep the lowest indices and sort by index, like numpy's topk."""
    rng = np.random.default_rng(0)
    for vocab, k in ((50, 8), (2048, 16), (3000, 1)):
        x = rng.integers(-4, 4, size=(64, vocab)).astype(np.float32)
        for logprobs in (True, False):
            values, indices = device_topk(torch.from_numpy(x), k, logprobs=logprobs)
            want = topk(x, k, values="logprobs" if logprobs else "logits")
            np.testing.assert_array_equal(indices.numpy(), want[1])
            np.testing.assert_allclose(values.numpy(), want[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        device_topk(torch.tensor([[0.0, float("nan"), 1.0]]), 2)


def test_backend_topk_and_dense_match_transformers(model_dir: Path, reference: Reference) -> None:
    """Rows of different lengths in one forward pass, and a budget that cuts the batch into several."""
    rows = llm_support.token_rows(model_dir, 9, 1, MAX_LENGTH, seed=1)
    tokens, lengths = padded(rows, extra=3, pad=-100)  # not a token: the backend must not embed it
    for budget in (None, 50):  # one pass (all rows padded together); passes of at most 50 tokens
        backend = load_backend(f"hf:{model_dir}", device="cpu", max_batch_tokens=budget, threads=1)
        assert f"on cpu in float32, at most {budget or 8192:,} tokens per forward pass" in backend.describe()
        if budget:
            passes = backend.passes(lengths)
            assert len(passes) > 1 and all(len(p) * lengths[p].max() <= budget for p in passes)
            assert sorted(np.concatenate(passes).tolist()) == list(range(len(rows)))
        top = TopKBackend(backend, K)
        assert top.on_device and "computed by the model's backend" in top.describe()
        out = top.infer({"tokens": tokens, "tokens_length": lengths})
        values, indices = out["logits_topk_values"], out["logits_topk_indices"]
        assert values.dtype == np.float32 and indices.dtype == np.int32 and values.shape == (*tokens.shape, K)
        dense = backend.infer({"tokens": tokens, "tokens_length": lengths})["logits"]
        assert dense.shape == (*tokens.shape, backend.vocab_size)
        for i, row in enumerate(rows):
            n = len(row)
            reference.check(row, values[i, :n], indices[i, :n])
            assert not values[i, n:].any() and not indices[i, n:].any() and not dense[i, n:].any()
            logp = torch.log_softmax(torch.from_numpy(dense[i, :n]), dim=-1).numpy()
            np.testing.assert_allclose(logp, reference.logprobs(row), rtol=0, atol=ATOL)
        backend.close()


def test_backend_temperature_float16_logits_and_bfloat16(model_dir: Path, reference: Reference) -> None:
    rows = llm_support.token_rows(model_dir, 4, 2, 20, seed=2)
    tokens, lengths = padded(rows)
    backend = load_backend(f"hf:{model_dir}", device="cpu", threads=1)
    out = TopKBackend(backend, K, temperature=2.0, dtype="float16").infer({"tokens": tokens, "tokens_length": lengths})
    assert out["logits_topk_values"].dtype == np.float16
    for i, row in enumerate(rows):
        logp = reference.logprobs(row, temperature=2.0)
        n = len(row)
        got_v, got_i = out["logits_topk_values"][i, :n], out["logits_topk_indices"][i, :n]
        np.testing.assert_allclose(got_v, np.sort(logp, axis=-1)[:, ::-1][:, :K], rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(np.take_along_axis(logp, got_i.astype(np.int64), -1), got_v, rtol=1e-3, atol=2e-3)
    raw = TopKBackend(backend, 3, values="logits").infer({"tokens": tokens, "tokens_length": lengths})
    dense = backend.infer({"tokens": tokens, "tokens_length": lengths})["logits"]
    for i, row in enumerate(rows):
        want = topk(dense[i, : len(row)], 3, values="logits")
        np.testing.assert_array_equal(raw["logits_topk_indices"][i, : len(row)], want[1])
        np.testing.assert_allclose(raw["logits_topk_values"][i, : len(row)], want[0], rtol=0, atol=1e-5)
    bad = tokens.copy()
    bad[0, 0] = backend.vocab_size
    with pytest.raises(ValueError, match=f"tokens must lie in 0..{backend.vocab_size - 1}"):
        backend.infer({"tokens": bad, "tokens_length": lengths})
    too_long = np.zeros((1, llm_support.N_POSITIONS + 1), np.int64)
    with pytest.raises(ValueError, match=f"a row of {llm_support.N_POSITIONS + 1} tokens exceeds the model's"):
        backend.infer({"tokens": too_long, "tokens_length": np.array([too_long.shape[1]])})
    bf16 = load_backend(f"hf:{model_dir}", device="cpu", dtype="bfloat16", threads=1)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    out = TopKBackend(bf16, K).infer({"tokens": tokens, "tokens_length": lengths})
    for i, row in enumerate(rows):  # bfloat16 keeps about 3 digits: the same distribution, roughly
        n = len(row)
        logp = reference.logprobs(row)
        np.testing.assert_allclose(out["logits_topk_values"][i, :n, 0], logp.max(-1), atol=0.15)


# --- bad specs ------------------------------------------------------------------------------------


def _serve(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(teacher, ["serve", *args])
    return result.exit_code, result.output


def test_bad_specs_give_clear_errors(model_dir: Path, tmp_path: Path) -> None:
    code, out = _serve("--model", "hf:gpt2")
    assert code == 1 and "'gpt2' does not exist" in out and "nothing is downloaded" in out
    (tmp_path / "file").write_text("")
    code, out = _serve("--model", f"hf:{tmp_path / 'file'}")
    assert code == 1 and "is not a directory" in out
    code, out = _serve("--model", f"hf:{tmp_path}")
    assert code == 1 and "has no config.json" in out
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    code, out = _serve("--model", f"hf:{tmp_path}")
    assert code == 1 and "has no .safetensors weights" in out
    code, out = _serve("--model", f"hf:{model_dir}", "--dtype", "float64")
    assert code == 2 and "Invalid value for '--dtype'" in out
    code, out = _serve("--model", f"hf:{model_dir}", "--device", "tpu")
    assert code == 1 and "--device must be cpu, cuda or cuda:N; got 'tpu'" in out
    code, out = _serve("--model", "serving_models:affine", "--dtype", "float16", "--max-batch-tokens", "9")
    assert code == 1 and "--dtype, --max-batch-tokens apply to hf:DIR models only" in out


# --- real servers, a real reader ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_teachers(model_dir: Path) -> TeacherProcesses:
    """Two ``distill teacher serve --model hf:DIR --topk 8`` processes, started together; the
    token budget of 128 cuts most merged batches (and every large request) into several passes."""
    fleet = TeacherProcesses()
    options = ("--topk", str(K), "--device", "cpu", "--threads", "1", "--max-batch-tokens", "128")
    try:
        for _ in range(2):
            fleet.start(f"hf:{model_dir}", *options, "--max-delay-ms", "20", wait=False)
        fleet.wait_ready(timeout=READY_S)
        yield fleet
    finally:
        fleet.stop_all()


def test_server_metadata_and_requests_over_the_budget(
    hf_teachers: TeacherProcesses, model_dir: Path, reference: Reference
) -> None:
    address = hf_teachers.alive()[-1]
    client = tc.InferenceServerClient(address)
    meta = client.get_model_metadata("teacher", as_json=True)
    assert meta["platform"] == "transformers"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("tokens", "INT64", ["-1", "-1"]),
        ("tokens_length", "INT64", ["-1"]),
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("logits_topk_values", "FP32", ["-1", "-1", str(K)]),
        ("logits_topk_indices", "INT32", ["-1", "-1", str(K)]),
    ]
    # 12 rows of up to 48 tokens: about 4 times the budget of 128 tokens, in one request.
    rows = llm_support.token_rows(model_dir, 12, 20, MAX_LENGTH, seed=3)
    tokens, lengths = padded(rows, extra=2)
    inputs = []
    for name, array in (("tokens", tokens), ("tokens_length", lengths)):
        tensor = tc.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("teacher", inputs, client_timeout=120)
    values, indices = result.as_numpy("logits_topk_values"), result.as_numpy("logits_topk_indices")
    assert values.shape == indices.shape == (*tokens.shape, K)
    for i, row in enumerate(rows):
        reference.check(row, values[i, : len(row)], indices[i, : len(row)])
        assert not values[i, len(row) :].any()


def test_reader_with_a_teacher_killed_mid_epoch(
    hf_teachers: TeacherProcesses, model_dir: Path, reference: Reference, tmp_path: Path
) -> None:
    """Two teachers, one killed after a few batches: every row once, in order, every position exact."""
    endpoints = hf_teachers.alive()
    assert len(endpoints) == 2, "the module's teachers are already down"
    n, batch_size = 96, 8
    rows = llm_support.token_rows(model_dir, n, 1, MAX_LENGTH, seed=4)
    config = tmp_path / "reader.conf"
    config.write_text(sequence_config(endpoints, MAX_LENGTH, K, values_dtype="float32"))
    dr = DistillReader(str(config), batch_size, 4, capacity=3, occupied_capacity=1, copy=True, teacher_timeout=120)
    dr.set_sample_generator(lambda: ((row, np.array([i], np.int64)) for i, row in enumerate(rows)))
    seen: list[int] = []
    with dr:
        for step, (tokens, ids, values, indices, lengths) in enumerate(dr.distill_reader()()):
            if step == 2:
                hf_teachers.kill(endpoints[0])
            assert tokens.shape[1] == values.shape[1] == int(lengths.max())
            for r, i in enumerate(ids[:, 0].tolist()):
                n_i = len(rows[i])
                assert lengths[r] == n_i
                np.testing.assert_array_equal(tokens[r, :n_i], rows[i])
                reference.check(rows[i], values[r, :n_i], indices[r, :n_i])
                assert not values[r, n_i:].any() and not indices[r, n_i:].any()
                seen.append(i)
    assert seen == list(range(n))
    assert hf_teachers.processes[endpoints[0]].poll() is not None
