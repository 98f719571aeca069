"""A small local causal LM for the LLM-teacher tests, built here with nothing downloaded.

:func:`tiny_lm_dir` returns a directory in ``save_pretrained`` layout (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) that transformers,
tokenizers and vLLM load: a byte-level BPE tokenizer (2,048 tokens) trained with ``tokenizers``
on a fixed set of standard-library sources, and a 2-layer GPT-2 trained briefly on three of them
so its next-token distributions on that text are peaked. The build is seeded and single-threaded (deterministic),
takes 10-60 s on two busy cores, and is cached under ``build/llm-models/<version>/`` in the repository root
(gitignored; ``DISTILL_LLM_MODELS`` overrides the parent folder); a file lock keeps two
pytest-xdist workers from building at once.

:func:`token_rows` cuts token rows of varying lengths from the model's text;
:func:`reference_topk` is transformers' log-softmax top-k of each row, one row at a time.

Needs ``transformers``, ``tokenizers``, ``safetensors`` and ``torch`` (the ``llm`` extra);
:func:`require_llm` skips a test with a clear reason where they are missing.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILDER_VERSION = 2
"""Bump when the recipe below changes: the cache folder is keyed by it."""

VOCAB_SIZE = 2048
N_EMBD = 64
N_LAYER = 2
N_HEAD = 2  # head size 32: the smallest vLLM's CPU attention supports (16 fails at the first request)
N_POSITIONS = 256
TRAIN_STEPS = 200
TRAIN_BATCH = 16
TRAIN_SEQ = 64
SEED = 1234
EOS = "<|endoftext|>"

# Standard-library sources, in this order (stable within one Python): the tokenizer's text ...
TOKENIZER_SOURCES = (
    "argparse.py",
    "textwrap.py",
    "json/decoder.py",
    "json/encoder.py",
    "collections/__init__.py",
    "functools.py",
    "shutil.py",
)
# ... and the model's, small enough that a brief training run makes it peaked (rows come from it).
MODEL_SOURCES = ("textwrap.py", "json/decoder.py", "json/encoder.py")

LLM_MODULES = ("torch", "transformers", "tokenizers", "safetensors")


def llm_missing() -> list[str]:
    """The LLM packages that are not installed (empty when all are)."""
    return [name for name in LLM_MODULES if importlib.util.find_spec(name) is None]


def require_llm() -> None:
    """Skip the calling test (or module, at import) when the ``llm`` extra is not installed."""
    missing = llm_missing()
    if missing:
        import pytest

        pytest.skip(
            f"{', '.join(missing)} not installed: pip install 'distill-reader[llm]'",
            allow_module_level=True,
        )


def _stdlib_text(names: tuple[str, ...]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / name).read_text(encoding="utf-8") for name in names)


def _cache_key() -> str:
    return f"gpt2-v{BUILDER_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"


def models_root() -> Path:
    """The parent folder of the built model directories."""
    return Path(os.environ.get("DISTILL_LLM_MODELS", REPO_ROOT / "build" / "llm-models"))


def tiny_lm_dir() -> Path:
    """The tiny GPT-2 directory, built on first use (once per cache key, under a file lock)."""
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / _cache_key()
    done = target / "BUILT"
    if done.exists():
        return target
    with open(root / f"{_cache_key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if done.exists():
                return target
            staging = root / f"{_cache_key()}.tmp{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            build_tiny_lm(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            (target / "BUILT").write_text("ok\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def build_tiny_lm(directory: Path) -> None:
    """Build the tokenizer and the model into ``directory`` (seeded, single-threaded)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from distill_reader.demo.llm import train_tokenizer  # the demo's recipe: byte-level BPE, EOS special

    directory.mkdir(parents=True)
    tokenizer = train_tokenizer(_stdlib_text(TOKENIZER_SOURCES), VOCAB_SIZE)
    eos_id = tokenizer.token_to_id(EOS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    fast.model_max_length = N_POSITIONS
    fast.save_pretrained(directory)
    # Name a class every transformers version knows (vLLM's may be older than ours).
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    ids = np.asarray(tokenizer.encode(_stdlib_text(MODEL_SOURCES)).ids, dtype=np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same sums in the same order on every machine
    try:
        torch.manual_seed(SEED)
        config = GPT2Config(
            vocab_size=tokenizer.get_vocab_size(),
            n_positions=N_POSITIONS,
            n_embd=N_EMBD,
            n_layer=N_LAYER,
            n_head=N_HEAD,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        model = GPT2LMHeadModel(config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(SEED)
        for _ in range(TRAIN_STEPS):
            starts = rng.integers(0, len(ids) - TRAIN_SEQ - 1, size=TRAIN_BATCH)
            batch = torch.from_numpy(np.stack([ids[s : s + TRAIN_SEQ] for s in starts]))
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        model.save_pretrained(directory)
    finally:
        torch.set_num_threads(threads)
    (directory / "TRAINING").write_text(f"steps {TRAIN_STEPS} final loss {loss.item():.4f}\n")


def _row_ids(directory: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return np.asarray(tokenizer.encode(_stdlib_text(MODEL_SOURCES)).ids, dtype=np.int64)


def token_rows(
    directory: Path, count: int, min_length: int = 1, max_length: int = 64, seed: int = 0
) -> list[np.ndarray]:
    """``count`` int64 token rows of lengths in ``[min_length, max_length]`` cut from the model's text."""
    ids = _row_ids(directory)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        length = int(rng.integers(min_length, max_length + 1))
        start = int(rng.integers(0, len(ids) - length))
        rows.append(ids[start : start + length].copy())
    return rows


def iter_token_rows(directory: Path, lengths: list[int], seed: int = 0) -> Iterator[np.ndarray]:
    """Token rows of exactly the given lengths, cut from the model's text."""
    ids = _row_ids(directory)
    rng = np.random.default_rng(seed)
    for length in lengths:
        start = int(rng.integers(0, len(ids) - length))
        yield ids[start : start + length].copy()


def reference_topk(
    directory: Path, rows: list[np.ndarray], k: int, temperature: float = 1.0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """transformers' top-k of ``log_softmax(logits / temperature)`` at every position of each row.

    Each row runs alone (no padding), in float32 on CPU; returns ``(values [n, k] float32,
    indices [n, k] int64)`` per row, values in descending order.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    results = []
    with torch.inference_mode():
        for row in rows:
            logits = model(input_ids=torch.from_numpy(np.asarray(row, dtype=np.int64))[None]).logits[0]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            values, indices = torch.topk(logp, k, dim=-1)
            results.append((values.numpy(), indices.numpy().astype(np.int64)))
    return results
