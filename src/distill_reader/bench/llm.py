"""``distill bench llm``: the Hugging Face teacher (``hf:DIR``) against the same model's plain
transformers forward, in one run, on the same padded batches.

The model: a GPT-2 with random weights, saved with ``save_pretrained`` into a temporary directory
(vocabulary 8,000, 4 layers of 128; ``--quick``: 4,000, 2 layers of 64), or the directory in
``DISTILL_BENCH_LLM_MODEL``. The data: d_batches of 16 rows of 32-64 random tokens, each padded to
its longest row. Four ways to compute on them, all on the same device (CUDA when available) and
dtype (``DISTILL_BENCH_LLM_DTYPE``, default float32). The three ways in this process run batch by
batch, each on every batch in turn, so that they share whatever load the machine has; the server
runs in windows between those rounds. A rate is real tokens over the time spent, all rounds summed.

- **plain forward**: ``model(input_ids, attention_mask).logits`` in this process, nothing else;
- **plain forward + top-k**: the same, then ``log_softmax`` and ``topk`` on the device and the
  ``[tokens, K]`` values and indices copied to the host: what one writes by hand;
- **backend**: :class:`~distill_reader.serving.backends.hf.HFBackend` under ``TopKBackend`` in
  this process (rows cut into passes, ties ruled, padding zeroed, the answer laid out as
  ``[rows, length, K]``);
- **server**: ``distill teacher serve --model hf:DIR --topk K --max-batch 16`` as a process, two
  OIP clients (tritonclient) in this process, each sending one d_batch at a time.

Figures: real (unpadded) tokens per second; the backend's and the server's ÷ the plain forward
with top-k (target 0.9), and ÷ the plain forward alone (reported: the top-k's own cost).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from distill_reader.bench.harness import Progress, Row, Sizes

K = 8
ROWS = 16
MIN_LENGTH, MAX_LENGTH = 32, 64
TARGET = 0.9
MODEL_ENV, DTYPE_ENV = "DISTILL_BENCH_LLM_MODEL", "DISTILL_BENCH_LLM_DTYPE"


def build_random_gpt2(
    directory: Path, *, vocab: int, layers: int, width: int, positions: int = 512, seed: int = 0
) -> Path:
    """A GPT-2 of random weights (``save_pretrained``, safetensors, no tokenizer) in ``directory``:
    for timing only. Heads of 64 (vLLM's CPU attention takes head sizes of 32 and more); token 0 is
    its BOS and EOS (GPT-2's own 50256 lies outside a smaller vocabulary)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return directory


def make_batches(count: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` d_batches: ``(tokens [ROWS, longest] int64, lengths [ROWS] int64)``, rows zero-padded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = np.sort(rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=ROWS))[::-1].astype(np.int64)
        tokens = np.zeros((ROWS, int(lengths[0])), np.int64)
        for i, n in enumerate(lengths):
            tokens[i, :n] = rng.integers(0, vocab, size=n)
        out.append((tokens, lengths))
    return out


def _interleaved(ways: dict[str, Callable[[int], None]], batches: list, seconds: float) -> dict[str, list[float]]:
    """``[real tokens, seconds]`` of each way over about ``seconds``: batch by batch, every way on
    each batch in turn (the order rotating), so that every way sees the same load on a shared machine."""
    totals = {name: [0.0, 0.0] for name in ways}
    names = list(ways)
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or i < len(names):
        index = i % len(batches)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            began = time.perf_counter()
            ways[name](index)
            totals[name][1] += time.perf_counter() - began
            totals[name][0] += int(batches[index][1].sum())
        i += 1
    return totals


class _Plain:
    """The same model with transformers alone, on the same device and dtype."""

    def __init__(self, directory: Path, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).to(device).eval()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)

    def forward(self, tokens: np.ndarray, lengths: np.ndarray) -> object:
        torch = self.torch
        ids = torch.from_numpy(tokens).to(self.device)
        mask = (
            torch.arange(tokens.shape[1], device=self.device)[None] < torch.from_numpy(lengths).to(self.device)[:, None]
        )
        return self.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits

    def logits(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        with self.torch.inference_mode():
            self.forward(tokens, lengths)
            self._sync()

    def topk(self, tokens: np.ndarray, lengths: np.ndarray, k: int) -> None:
        torch = self.torch
        with torch.inference_mode():
            logp = torch.log_softmax(self.forward(tokens, lengths).float(), dim=-1)
            values, indices = torch.topk(logp, k, dim=-1)
            values.cpu().numpy(), indices.int().cpu().numpy()


@contextlib.contextmanager
def _server(directory: Path, device: str, dtype: str, k: int, threads: int | None) -> Iterator[str]:
    from distill_reader.bench.processes import TeacherProcesses

    options = ["--topk", str(k), "--device", device, "--dtype", dtype, "--max-batch", str(ROWS)]
    options += ["--threads", str(threads)] if threads else []
    with TeacherProcesses(f"hf:{directory}") as teachers:
        endpoint = teachers.start(None, *options, wait=False)
        teachers.wait_ready(timeout=300)  # loading the model takes a while
        yield endpoint


def _server_rate(endpoint: str, batches: list, seconds: float, clients: int = 2) -> float:
    """Real tokens/s of ``clients`` OIP clients each sending one d_batch at a time for ``seconds``."""
    import tritonclient.grpc as tc

    def request(client: tc.InferenceServerClient, tokens: np.ndarray, lengths: np.ndarray) -> None:
        inputs = []
        for name, array in (("tokens", tokens), ("tokens_length", lengths)):
            tensor = tc.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("teacher", inputs, client_timeout=120)
        result.as_numpy("logits_topk_values"), result.as_numpy("logits_topk_indices")

    done = [0] * clients
    errors: list[BaseException] = []
    stop = time.perf_counter() + seconds
    start = time.perf_counter()

    def loop(n: int) -> None:
        try:
            client = tc.InferenceServerClient(endpoint)
            i = n
            while time.perf_counter() < stop:
                tokens, lengths = batches[i % len(batches)]
                request(client, tokens, lengths)
                done[n] += int(lengths.sum())
                i += clients
            client.close()
        except BaseException as e:  # reported below, in the bench's thread
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    if errors:
        raise errors[0]
    return sum(done) / (time.perf_counter() - start)


def llm(sizes: Sizes, progress: Progress) -> list[Row]:
    """The HF backend's real tokens/s ÷ the same model's plain transformers forward (module doc)."""
    import torch

    from distill_reader.serving.backends import load_backend
    from distill_reader.serving.backends.hf import resolve_device
    from distill_reader.serving.topk import TopKBackend

    device = resolve_device(None)
    dtype = os.environ.get(DTYPE_ENV, "float32")
    # On a CPU, one torch thread each: on a shared machine OpenMP's barriers wait for descheduled
    # threads, and two threads ran 2-10 times slower than one on the 2-core development VM.
    threads = None if device.startswith("cuda") else 1
    if threads:
        torch.set_num_threads(threads)
    rounds, seconds = (2, 1.0) if sizes.quick else (4, 4.0)
    with tempfile.TemporaryDirectory(prefix="distill-bench-llm-") as scratch:
        if os.environ.get(MODEL_ENV):
            directory = Path(os.environ[MODEL_ENV])
            shape = "the model of $" + MODEL_ENV
        else:
            vocab, layers, width = (4000, 2, 64) if sizes.quick else (8000, 4, 128)
            progress(f"llm: building a random GPT-2 (vocabulary {vocab:,}, {layers} layers of {width})")
            directory = build_random_gpt2(Path(scratch) / "gpt2", vocab=vocab, layers=layers, width=width)
            shape = f"random GPT-2, V {vocab:,}, {layers} x {width}"
        progress(f"llm: loading it on {device} in {dtype}")
        plain = _Plain(directory, device, dtype)
        vocab = int(plain.model.config.vocab_size)
        batches = make_batches(8, vocab)
        backend = TopKBackend(load_backend(f"hf:{directory}", device=device, dtype=dtype, threads=threads), K)
        ways: dict[str, Callable[[int], None]] = {
            "plain forward": lambda i: plain.logits(*batches[i]),
            "plain forward + top-k": lambda i: plain.topk(*batches[i], K),
            "backend": lambda i: backend.infer({"tokens": batches[i][0], "tokens_length": batches[i][1]}),
        }
        totals = {name: [0.0, 0.0] for name in [*ways, "server"]}
        progress(f"llm: starting distill teacher serve --model hf:DIR --topk {K}")
        with _server(directory, device, dtype, K, threads) as endpoint:
            _server_rate(endpoint, batches, 0.2)  # warm-up: connect, first batches
            _interleaved(ways, batches, 0.2)
            for r in range(rounds):
                progress(f"llm: round {r + 1}/{rounds}: in process, {', '.join(ways)}, batch by batch")
                for name, (tokens, spent) in _interleaved(ways, batches, seconds * len(ways)).items():
                    totals[name][0] += tokens
                    totals[name][1] += spent
                progress(f"llm: round {r + 1}/{rounds}: server")
                totals["server"][0] += _server_rate(endpoint, batches, seconds) * seconds
                totals["server"][1] += seconds
        best = {name: tokens / spent for name, (tokens, spent) in totals.items()}
        backend.close()
    details = {
        "model": shape,
        "device": device,
        "dtype": dtype,
        "k": K,
        "rows": ROWS,
        "lengths": [MIN_LENGTH, MAX_LENGTH],
        "torch_threads": threads,
        "rounds": rounds,
        "server_window_seconds": seconds,
        "tokens_per_s": best,
    }
    where = f"{device}, {dtype}"
    rows = []
    for name, label in (("backend", "HF backend in process"), ("server", "HF teacher server, 2 clients")):
        for base, target in (("plain forward + top-k", TARGET), ("plain forward", None)):
            rows.append(
                Row(
                    "llm",
                    f"{label}, top-{K} ({where}) ÷ {base}",
                    best[name],
                    best[base],
                    "tokens/s",
                    best[name] / best[base],
                    target,
                    limit_label=f"transformers, {base}",
                    details=details,
                )
            )
    return rows
