"""``distill bench sequence``: variable-length rows through teachers whose time grows with padding.

Four simulated sequence GPUs (:func:`distill_reader.bench.teachers.simulated_sequence_gpu`) take
``a + b·t`` ms for a request of ``t`` padded tokens (rows × its longest row), one request at a
time (``--max-batch`` = the d_batch, so the server merges nothing). Rows are 8-64 tokens
(uniform), d_batches of 16 rows. Their capacity at **zero padding** is exact: a d_batch of ``T``
real tokens takes ``a + b·T`` ms, so N teachers deliver at most ``N·T̄ / (a + b·T̄)`` real tokens per
ms, ``T̄`` = 16 × the mean length. The figure is the real tokens/s the training loop receives ÷
that capacity, with the rows grouped by length (the reader's default) and in input order
(``group_by_length=False``): padding is what separates them. Also reported: the padding each way
(computed tokens ÷ real tokens, from the same grouping function on the same lengths), and the cost
per token of top-k on the server (:func:`distill_reader.serving.topk.measure_topk`) and of
decoding a top-k answer in the reader.

Then compact top-k knowledge (``[store] precision = compact``, docs/store.md) at K = 8, 32, 128:
bytes per token exact (float32 values + int32 ids) and compact, KL(teacher || decoded) per token
(both renormalized: mean and max), the probability mass the top-k keeps, and the compact codec's
decode (and encode) tokens/s, on the bench's own teacher: :func:`zipf_logits`, a 131,072-token
vocabulary with Zipf-shaped distributions whose top ids are spread over the whole vocabulary (the
worst case for the ids' coding); and the tokens/s a reader with ``policy = read`` delivers
from a compact store against an exact store of the same knowledge. ``DISTILL_BENCH_LM=DIR`` (a
transformers causal-LM directory with its ``tokenizer.json``, e.g. the tests' tiny GPT-2 under
``build/llm-models``) adds the same figures on that model's distributions over standard-library
text.
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from distill_reader.bench.harness import Progress, Row, Sizes, TeacherSpec, teacher_processes
from distill_reader.bench.teachers import SEQ_K
from distill_reader.reader.grouping import group_by_length

TEACHERS = 4
MIN_LENGTH, MAX_LENGTH = 8, 64
D_BATCH = 16
BATCH_SIZE = 256
GPU = TeacherSpec(model="simulated_sequence_gpu", a_ms=2.0, b_ms=0.1, max_batch=D_BATCH)
TARGET = 0.9


def _capacity() -> float:
    """Real tokens/s the 4 simulated teachers deliver at zero padding (the scenario's limit)."""
    mean_tokens = D_BATCH * (MIN_LENGTH + MAX_LENGTH) / 2
    return TEACHERS * mean_tokens / ((GPU.a_ms + GPU.b_ms * mean_tokens) / 1000.0)


CAPACITY_TOKENS_PER_S = _capacity()

_CONFIG = """\
[conf]
mode = fixed
servers = {servers!r}
max_length = {max_length}
{conf}
[feed]
feed_vars = ['tokens', 'id']
feed_types = ['int64', 'int64']
feed_shapes = [(-1,), (1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['{output}topk_values', '{output}topk_indices']
fetch_types = ['{values_dtype}', 'int32']
fetch_shapes = [(-1, {k}), (-1, {k})]
"""


def sequence_config(
    servers: list[str],
    max_length: int,
    k: int,
    *,
    values_dtype: str = "float16",
    output: str = "logits",
    conf: str = "",
) -> str:
    """A reader config for token rows (``tokens`` int64 ``(-1,)`` and ``id``) and a teacher's top-k
    of ``output`` (``<output>_topk_values``/``_indices``, ``(-1, k)``; ``output=""``: ``topk_*``);
    ``conf``: more ``[conf]`` lines."""
    return _CONFIG.format(
        servers=list(servers),
        max_length=max_length,
        conf=conf,
        output=f"{output}_" if output else "",
        values_dtype=values_dtype,
        k=k,
    )


def _lengths(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(MIN_LENGTH, MAX_LENGTH + 1, size=count)


def _reader(lengths: np.ndarray):
    rows = [np.arange(n, dtype=np.int64) % 1000 for n in lengths]

    def reader() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        i = 0
        while True:  # endless: the measuring window decides
            yield rows[i % len(rows)], np.array([i], dtype=np.int64)
            i += 1

    return reader


def padding_factor(lengths: np.ndarray, grouped: bool) -> float:
    """Computed tokens ÷ real tokens for batches of :data:`BATCH_SIZE` rows cut into d_batches."""
    computed = 0
    for start in range(0, len(lengths) - BATCH_SIZE + 1, BATCH_SIZE):
        batch = lengths[start : start + BATCH_SIZE]
        in_order = np.array_split(np.arange(BATCH_SIZE), BATCH_SIZE // D_BATCH)
        groups = group_by_length(batch, D_BATCH) if grouped else in_order
        computed += sum(len(g) * int(batch[g].max()) for g in groups)
    return computed / lengths[: len(lengths) // BATCH_SIZE * BATCH_SIZE].sum()


def _measure(servers: list[str], lengths: np.ndarray, grouped: bool, sizes: Sizes) -> tuple[float, float]:
    """Real tokens/s the training loop receives over the measuring window, and the window's seconds."""
    from distill_reader import DistillReader

    with tempfile.TemporaryDirectory(prefix="distill-bench-") as directory:
        conf = Path(directory) / "sequence.conf"
        conf.write_text(sequence_config(servers, MAX_LENGTH, SEQ_K))
        reader = DistillReader(conf, BATCH_SIZE, D_BATCH, capacity=6, occupied_capacity=1, group_by_length=grouped)
        try:
            reader.set_sample_generator(_reader(lengths))
            epoch = reader.distill_reader()()
            try:
                start = now = time.perf_counter()
                t0: float | None = None
                tokens = 0
                for batch in epoch:
                    now = time.perf_counter()
                    if t0 is None:
                        t0 = now if now - start >= sizes.warmup_s else None
                        continue
                    tokens += int(batch[-1].sum())  # the batch's tokens_length
                    if now - t0 >= sizes.measure_s:
                        break
            finally:
                epoch.close()
        finally:
            reader.close()
    assert t0 is not None
    return tokens / (now - t0), now - t0


def reader_decode_cost(k: int = SEQ_K, repeats: int = 200) -> float:
    """Seconds per token to check, zero the padding of and store a top-k answer in the reader
    (float16 values + int32 indices, a d_batch of 16 rows of 8-64 tokens)."""
    from distill_reader.teacher.codec import all_finite, zero_padding

    lengths = _lengths(D_BATCH, seed=1)
    longest = int(lengths.max())
    values = np.zeros((D_BATCH, longest, k), np.float16)
    indices = np.zeros((D_BATCH, longest, k), np.int32)
    pool_values = np.zeros((BATCH_SIZE, MAX_LENGTH, k), np.float16)
    pool_indices = np.zeros((BATCH_SIZE, MAX_LENGTH, k), np.int32)
    rows = np.arange(D_BATCH) * 3
    started = time.perf_counter()
    for _ in range(repeats):
        for answer, pool in ((values, pool_values), (indices, pool_indices)):
            block = zero_padding(answer, (-1, k), lengths)
            if block.dtype.kind == "f":
                all_finite(block)
            pool[rows, :longest] = block
            pool[rows, longest:] = 0
    return (time.perf_counter() - started) / repeats / lengths.sum()


# -- compact top-k knowledge ----------------------------------------------------------------------

COMPACT_KS = (8, 32, 128)
LARGE_VOCAB = 131072
_MULTIPLIER = 0x9E3779B1 % LARGE_VOCAB | 1  # odd: i -> i * m mod 2**17 permutes the vocabulary


def zipf_logits(tokens: np.ndarray, vocab: int = LARGE_VOCAB) -> np.ndarray:
    """Dense logits ``[rows, length, vocab]`` (``vocab`` a power of 2) of a causal "language model"
    whose distribution at each position depends on the row's tokens so far: Zipf-shaped
    (``-a * log(rank)``, ``a`` from 0.6, nearly flat over the top 128, to 2.5, peaked), the ranks
    spread over the whole vocabulary by a permutation (``rank = (id * m + shift) mod vocab``),
    small deterministic noise; one position in five rounded to multiples of 0.25 (exact ties)."""
    tokens = np.asarray(tokens, np.int64)
    rows, length = tokens.shape
    state = np.cumsum(tokens * 2654435761 % 1000003, axis=1) % 1000003  # causal: the prefix decides
    ids = np.arange(vocab, dtype=np.int64)
    out = np.empty((rows, length, vocab), np.float32)
    for r in range(rows):
        for t in range(length):
            s = int(state[r, t])
            a = 0.6 + 1.9 * ((s * 7919) % 1000) / 1000
            rank = (ids * _MULTIPLIER + s * 104729) % vocab + 1
            noise = ((ids * 40503 + s) % 65521) / 65521.0 - 0.5
            logits = -a * np.log(rank) + 0.3 * noise
            if s % 5 == 0:
                logits = np.round(logits * 4) / 4
            out[r, t] = logits
    return out


def lm_logits(directory: str | Path, tokens: int) -> np.ndarray:
    """Dense logits ``[tokens, V]`` of a transformers causal LM over standard-library text (rows
    of 64 tokens)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = np.asarray(Tokenizer.from_file(str(Path(directory) / "tokenizer.json")).encode(text).ids, np.int64)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    rows = ids[: tokens // 64 * 64].reshape(-1, 64)
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(rows)).logits.float().numpy().reshape(-1, model.config.vocab_size)


def compact_figures(logits: np.ndarray, k: int, row_tokens: int = 64, repeats: int = 5) -> dict[str, float]:
    """Top-``k`` of each position of ``logits`` ``[T, V]`` (as ``distill teacher serve --topk``
    publishes it) kept compact: bytes per token each way, KL per token, mass kept, tokens/s."""
    from distill_reader.knowledge.compact import decode_rows, encode_rows, kl_renormalized
    from distill_reader.serving.topk import topk

    values, indices = topk(logits, k)
    tokens = len(values)
    positions = np.full(-(-tokens // row_tokens), row_tokens, np.int64)
    positions[-1] = tokens - row_tokens * (len(positions) - 1)
    # CPU seconds of this process (numpy runs on one core here): on a loaded machine the wall clock
    # also counts the time other processes held the core
    encode_s = decode_s = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        flat, offsets = encode_rows(values, indices, positions)
        encode_s = min(encode_s, time.process_time() - started)
        started = time.process_time()
        got_values, got_ids = decode_rows(flat, offsets, np.arange(len(positions)), positions, k)
        decode_s = min(decode_s, time.process_time() - started)
    kl = kl_renormalized(values, indices, got_values, got_ids)
    return {
        "tokens": tokens,
        "vocab": logits.shape[-1],
        "exact_bytes": float(k * (4 + 4)),
        "compact_bytes": len(flat) / tokens,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "mass": float(np.exp(np.logaddexp.reduce(values.astype(np.float64), axis=1)).mean()),
        "decode_tokens_per_s": tokens / decode_s,
        "encode_tokens_per_s": tokens / encode_s,
    }


def compact_rows(sizes: Sizes, progress: Progress) -> list[Row]:
    """The compact top-k figures (module doc) on the bench's teacher, and on ``DISTILL_BENCH_LM``."""
    from distill_reader.knowledge.compact import KL_BOUND

    tokens = 128 if sizes.quick else 512
    sources = [("Zipf teacher", lambda: zipf_logits(np.arange(tokens, dtype=np.int64)[None] * 7 + 1)[0])]
    if os.environ.get("DISTILL_BENCH_LM"):
        directory = os.environ["DISTILL_BENCH_LM"]
        sources.append((f"LM {Path(directory).name}", lambda: lm_logits(directory, tokens)))
    rows: list[Row] = []
    progress("sequence: reading a compact and an exact store (policy = read)")
    count, length = (64, 128) if sizes.quick else (256, 256)
    exact = store_read_tokens_per_s("exact", count, length)
    compact = store_read_tokens_per_s("compact", count, length)
    rows.append(
        Row(
            "sequence",
            f"read, policy = read, top-128, rows of {length} tokens: compact store "
            f"({compact['bytes_per_token']:.0f} B/token) ÷ exact ({exact['bytes_per_token']:.0f} B/token)",
            compact["tokens_per_s"],
            exact["tokens_per_s"],
            "tokens/s",
            compact["tokens_per_s"] / exact["tokens_per_s"],
            limit_label="the exact store",
            details={"rows": count, "length": length, "exact": exact, "compact": compact},
        )
    )
    for name, make in sources:
        progress(f"sequence: compact top-k knowledge, {name}")
        logits = make()
        for k in COMPACT_KS:
            f = compact_figures(logits, k)
            where = f"{name}, V = {f['vocab']:,}, top-{k}"
            details = {key: value for key, value in f.items()}
            goal = 300.0 if k == 128 else f["exact_bytes"]
            rows += [
                Row(
                    "sequence",
                    f"compact {where}: bytes per token",
                    f["compact_bytes"],
                    goal,
                    "B",
                    f["compact_bytes"] / goal,
                    1.0 if k == 128 else None,
                    at_most=True,
                    limit_label="300 B (goal)" if k == 128 else f"exact: {f['exact_bytes']:.0f} B",
                    details=details,
                ),
                Row(
                    "sequence",
                    f"compact {where}: KL per token, max (mean {f['kl_mean'] * 1e3:.2f} mnats)",
                    f["kl_max"] * 1e3,
                    KL_BOUND * 1e3,
                    "mnats",
                    f["kl_max"] / KL_BOUND,
                    1.0,
                    at_most=True,
                    limit_label="the bound",
                ),
                Row(
                    "sequence",
                    f"compact {where}: probability mass the top-k keeps (mean)",
                    f["mass"] * 100,
                    100.0,
                    "%",
                    f["mass"],
                    limit_label="the whole distribution",
                ),
                Row(
                    "sequence",
                    f"compact {where}: decode tokens/s, CPU time (encode {f['encode_tokens_per_s']:,.0f})",
                    f["decode_tokens_per_s"],
                    CAPACITY_TOKENS_PER_S,
                    "tokens/s",
                    f["decode_tokens_per_s"] / CAPACITY_TOKENS_PER_S,
                    limit_label="the 4 simulated teachers' capacity",
                ),
            ]
    return rows


def store_read_tokens_per_s(precision: str, rows: int, length: int, k: int = 128, epochs: int = 3) -> dict[str, float]:
    """Tokens/s a reader with ``policy = read`` delivers (best of ``epochs``; batches of 64 rows, no
    teacher) from a store of ``precision`` holding ``rows`` rows of ``length`` tokens of top-``k``
    knowledge (Zipf-shaped log-probs, ids spread over 131,072), written directly (as a capture
    would); and the chunk's bytes per token."""
    from distill_reader import DistillReader
    from distill_reader.config import load_config
    from distill_reader.knowledge.layout import (
        ChunkNamer,
        Rows,
        fingerprint_rows,
        pairs_of,
        prepare_knowledge_store,
        schema_of,
        store_manifest,
        write_chunk,
    )

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 30000, (rows, length)).astype(np.int64)
    lengths = np.full(rows, length, np.int64)
    positions = rows * length
    logits = -rng.uniform(0.6, 2.5, (positions, 1)) * np.log(np.arange(1, k + 1))[None, :]
    logits += rng.normal(0, 0.2, (positions, k))
    values = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True) - 0.3).astype(np.float32)
    shift = rng.integers(0, LARGE_VOCAB, (positions, 1))
    ids = ((np.arange(k)[None, :] * _MULTIPLIER + shift) % LARGE_VOCAB).astype(np.int32)  # distinct, spread
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as directory:
        path = Path(directory) / "store"
        conf = Path(directory) / "store.conf"
        text = sequence_config(["127.0.0.1:1"], length, k, values_dtype="float32")
        conf.write_text(f"{text}\n[store]\npath = {path}\npolicy = write\nprecision = {precision}\n")
        config = load_config(conf)
        prepare_knowledge_store(config)
        manifest = store_manifest(config)
        offsets = np.arange(rows + 1, dtype=np.int64) * length * k
        stored = Rows(
            np.arange(rows, dtype=np.int64),
            fingerprint_rows([(tokens, lengths, config.feeds[0])], np.arange(rows)),
            lengths,
            [(values.ravel(), offsets), (ids.ravel(), offsets)],
        ).compacted(config.fetches, pairs_of(manifest))
        file = write_chunk(path, ChunkNamer(path).next(), stored.to_arrow(config.fetches, schema_of(manifest)))
        conf.write_text(conf.read_text().replace("policy = write", "policy = read"))
        reader = DistillReader(conf, 64, 16, capacity=4, occupied_capacity=1, teacher_timeout=1)
        reader.set_sample_generator(lambda: ((tokens[i], np.array([i], np.int64)) for i in range(rows)))
        best = 0.0
        with reader:
            for _ in range(epochs):
                started = time.perf_counter()
                count = sum(int(batch[-1].sum()) for batch in reader.distill_reader()())
                best = max(best, count / (time.perf_counter() - started))
        return {"tokens_per_s": best, "bytes_per_token": file.stat().st_size / positions}


def sequence(sizes: Sizes, progress: Progress) -> list[Row]:
    """Real tokens/s ÷ the teachers' capacity at zero padding; padding, top-k costs per token."""
    from distill_reader.serving.topk import measure_topk

    lengths = _lengths(4096)
    mean_tokens = D_BATCH * float(np.mean(lengths))
    capacity = TEACHERS * mean_tokens / ((GPU.a_ms + GPU.b_ms * mean_tokens) / 1000.0)
    rows: list[Row] = []
    progress(f"sequence: starting {TEACHERS} simulated sequence teachers")
    with teacher_processes(GPU, TEACHERS) as servers:
        for grouped in (True, False):
            label = "grouped by length" if grouped else "input order (group_by_length=False)"
            progress(f"sequence: {label}")
            tokens_per_s, seconds = _measure(servers, lengths, grouped, sizes)
            rows.append(
                Row(
                    "sequence",
                    f"real tokens/s, {label}",
                    tokens_per_s,
                    capacity,
                    "tokens/s",
                    tokens_per_s / capacity,
                    TARGET if grouped else None,
                    limit_label="teachers' capacity at zero padding",
                    details={
                        "teachers": TEACHERS,
                        "a_ms": GPU.a_ms,
                        "b_ms_per_token": GPU.b_ms,
                        "lengths": [MIN_LENGTH, MAX_LENGTH],
                        "d_batch_size": D_BATCH,
                        "batch_size": BATCH_SIZE,
                        "padding_factor": padding_factor(lengths, grouped),
                        "seconds": seconds,
                    },
                )
            )
    progress("sequence: top-k costs per token")
    server = measure_topk(32000, SEQ_K, repeats=2 if sizes.quick else 5)
    reader = reader_decode_cost()
    for label, seconds in (
        (f"top-{SEQ_K} on the server, V = 32,000 (log-probs), per token", server),
        (f"top-{SEQ_K} answer checked and stored in the pool (reader), per token", reader),
    ):
        gpu_us = GPU.b_ms * 1000  # what the simulated GPU spends on a token: the scale of these costs
        rows.append(
            Row(
                "sequence", label, seconds * 1e6, gpu_us, "µs", seconds * 1e6 / gpu_us, limit_label="GPU time per token"
            )
        )
    return rows + compact_rows(sizes, progress)
