"""Top-k compression of a teacher's outputs: publish ``X_topk_values`` and ``X_topk_indices``
instead of a distribution ``X`` of shape ``[..., V]`` (``distill teacher serve --topk K``).

A language model's output is a distribution over a vocabulary of 30k-150k entries for every
token: 120-600 KB per token dense in float32. Its top-k is ``K x (value bytes + 4)`` bytes.

:func:`topk` is the computation, vectorized over every position of a batch (numpy
``argpartition`` then a sort of the K, no Python loop per row); :class:`TopKBackend` wraps any
backend so that its metadata and outputs carry the compressed tensors. A backend that computes the
top-k itself, next to its model (the Hugging Face backend, on the model's device), says so with
``native_topk`` (the outputs it compresses) and ``infer_topk``; :class:`TopKBackend` then calls it.

Rules (the tests check them against a dense ``np.argsort`` reference):

- values in descending order; equal values in ascending index order, and where values equal
  the k-th largest fall on both sides of the cut, the lowest indices are kept;
- ``logprobs`` values are ``log_softmax(x / T)`` at the kept indices, computed in float32
  (float64 for a float64 model) with the maximum subtracted before ``exp``; ``logits`` values
  are the model's own values, unscaled;
- indices are int32; values are cast to the chosen dtype last (float16 keeps about 3 decimal
  digits: ample for log-probs, whose useful range is about [-30, 0]).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from distill_reader.oip import TensorSpec
from distill_reader.serving.backends.base import Backend

#: What the values hold: log-probabilities at a temperature, or the model's raw values.
VALUE_KINDS = ("logprobs", "logits")
#: The dtypes the values may travel in.
VALUE_DTYPES = ("float32", "float16")
#: Suffixes of the two tensors that replace an output ``X``.
VALUES_SUFFIX, INDICES_SUFFIX = "_topk_values", "_topk_indices"
#: Positions are processed in chunks of about this many entries (1 MiB of float32), so the several
#: passes over a chunk find it in the CPU's cache and the temporaries stay small (a batch of 64 rows
#: x 64 tokens x 128k vocabulary would be 2 GiB at once).
CHUNK_ELEMENTS = 1 << 18
CHUNK_ROWS = 32

_FLOAT_KINDS = ("FP16", "FP32", "FP64")


def topk(
    x: np.ndarray,
    k: int,
    *,
    values: str = "logprobs",
    temperature: float = 1.0,
    dtype: str | np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries along the last axis of ``x``: ``(values, indices)``, both of shape
    ``[..., k]``; indices int32, values ``dtype``, in descending order (rules in the module doc)."""
    _check_options(k, values, temperature)
    x = np.asarray(x)
    if x.ndim == 0 or x.dtype.kind != "f":
        raise ValueError(f"top-k needs a floating-point array with a last axis, got {x.dtype}{list(x.shape)}")
    v = x.shape[-1]
    if k > v:
        raise ValueError(f"top-k of {k} from a last axis of {v} entries")
    lead = x.shape[:-1]
    flat = x.reshape(-1, v)
    out_values = np.empty((len(flat), k), dtype=np.dtype(dtype))
    out_indices = np.empty((len(flat), k), dtype=np.int32)
    # At least CHUNK_ROWS rows: each chunk costs some twenty numpy calls, worth sharing.
    step = max(CHUNK_ROWS, CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, len(flat), step):
        top, idx = _topk_rows(flat[start : start + step], k, values == "logprobs", temperature)
        out_values[start : start + step] = top
        out_indices[start : start + step] = idx
    return out_values.reshape(*lead, k), out_indices.reshape(*lead, k)


def _check_options(k: int, values: str, temperature: float) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k!r}")
    if values not in VALUE_KINDS:
        raise ValueError(f"top-k values must be one of {', '.join(VALUE_KINDS)}; got {values!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if values == "logits" and temperature != 1.0:
        raise ValueError("temperature applies to logprobs values; logits values are the model's own")


def _block_size(v: int, k: int) -> int:
    """Rows are cut into ``v / B`` blocks of ``B`` entries; 1 means no blocks (small ``v``)."""
    b = 2 ** round(math.log2(max(math.sqrt(v / k) / 2, 1)))
    return b if b >= 4 else 1


def _topk_rows(x: np.ndarray, k: int, logprobs: bool, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a 2-D array (values in the working float dtype, int64 indices).

    Large rows go in two steps, both vectorized over the rows: the maxima of ``v / B`` blocks of
    ``B`` entries (entries ``j, j + v/B, j + 2v/B, ...``, so the maximum is an elementwise maximum
    of contiguous slices), then the top-k of the ``k x B`` entries of the ``k`` blocks with the
    largest maxima: every entry larger than the k-th largest lies in those blocks. Rows where values
    equal to the k-th largest may lie elsewhere take the exact rule (:func:`_exact_topk_set`).
    """
    work = np.float64 if x.dtype == np.float64 else np.float32
    n, v = x.shape
    scale = logprobs and temperature != 1.0
    b = _block_size(v, k) if k < v else 1
    nb = -(-v // b)
    if nb * b == v and x.dtype == work and not scale:
        z = x
    else:  # one copy: the working dtype, the temperature and -inf filling the last block
        z = np.empty((n, nb * b), dtype=work)
        z[:, :v] = x
        if scale:
            z[:, :v] /= work(temperature)
        z[:, v:] = -np.inf
    zv = z[:, :v]
    if b > 1:
        maxima = z.reshape(n, b, nb).max(axis=1)
        blocks = np.argpartition(maxima, nb - k, axis=1)[:, nb - k :]
        candidates = (blocks[:, :, None] + nb * np.arange(b)).reshape(n, k * b)
        values = np.take_along_axis(z, candidates, axis=1)
        pick = np.argpartition(values, k * b - k, axis=1)[:, k * b - k :]
        idx = np.take_along_axis(candidates, pick, axis=1)
        kth = np.take_along_axis(values, pick, axis=1).min(axis=1, keepdims=True)
        unsure = (np.count_nonzero(maxima >= kth, axis=1) > k) | (np.count_nonzero(values >= kth, axis=1) > k)
    elif k < v:
        idx = np.argpartition(z, v - k, axis=1)[:, v - k :]
        kth = np.take_along_axis(z, idx, axis=1).min(axis=1, keepdims=True)
        unsure = np.count_nonzero(z >= kth, axis=1) > k
    else:
        idx = np.broadcast_to(np.arange(v), (n, v)).copy()
        unsure = np.zeros(n, dtype=bool)
    if (rows := np.flatnonzero(unsure)).size:
        idx[rows] = _exact_topk_set(zv[rows], k)
    # Sorted by index first, so that the stable sort by value orders equal values by index.
    idx.sort(axis=1)
    top = np.take_along_axis(zv, idx, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    top = np.take_along_axis(top, order, axis=1)
    if logprobs:
        top -= log_sum_exp(zv)
    if np.isnan(top).any():
        raise ValueError("the model's output holds NaN")
    return top, idx


def _exact_topk_set(z: np.ndarray, k: int) -> np.ndarray:
    """The indices of the top-k of each row of ``z`` (in index order): every entry larger than the
    k-th largest value, then the entries equal to it with the lowest indices."""
    kth = np.partition(z, z.shape[1] - k, axis=1)[:, z.shape[1] - k, None]
    above = z > kth
    tied = z == kth
    keep = above | (tied & (np.cumsum(tied, axis=1) <= k - np.count_nonzero(above, axis=1, keepdims=True)))
    return np.nonzero(keep)[1].reshape(len(z), k)


def log_sum_exp(z: np.ndarray) -> np.ndarray:
    """``log(sum(exp(z)))`` over the last axis of a 2-D array, kept as a column; max subtracted first."""
    m = z.max(axis=1, keepdims=True)
    e = np.subtract(z, m)
    np.exp(e, out=e)
    return m + np.log(e.sum(axis=1, keepdims=True))


class TopKBackend(Backend):
    """``inner`` with each selected output ``X`` (per-sample shape ``[..., V]``) replaced by
    ``X_topk_values`` (``dtype``) and ``X_topk_indices`` (INT32), both of shape ``[..., k]``.

    ``outputs`` names the outputs to compress; ``None`` selects every floating-point output whose
    last dimension is fixed and larger than ``k``. Other outputs pass through unchanged. Raises
    ``ValueError`` naming the output or option that does not fit.
    """

    def __init__(
        self,
        inner: Backend,
        k: int,
        *,
        outputs: Sequence[str] | None = None,
        values: str = "logprobs",
        temperature: float = 1.0,
        dtype: str = "float32",
    ) -> None:
        _check_options(k, values, temperature)
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"top-k values dtype must be one of {', '.join(VALUE_DTYPES)}; got {dtype!r}")
        self.inner = inner
        self.k = int(k)
        self.values = values
        self.temperature = float(temperature)
        self.dtype = np.dtype(dtype)
        self.inputs = inner.inputs
        self.platform = inner.platform
        self.triton_backend = inner.triton_backend
        by_name = {s.name: s for s in inner.outputs}
        if outputs is None:
            selected = [s.name for s in inner.outputs if s.datatype in _FLOAT_KINDS and s.shape and s.shape[-1] > k]
            if not selected:
                raise ValueError(
                    f"no output to compress to the top {k}: none is floating-point with a last dimension "
                    f"larger than {k} ({inner.describe()})"
                )
        else:
            selected = list(dict.fromkeys(outputs))
            for name in selected:
                spec = by_name.get(name)
                if spec is None:
                    raise ValueError(f"top-k output {name!r} is not an output of the model; it has {list(by_name)}")
                if spec.datatype not in _FLOAT_KINDS:
                    raise ValueError(f"top-k output {name!r} is {spec.datatype}; top-k needs a floating-point output")
                if not spec.shape or 0 <= spec.shape[-1] <= k:
                    raise ValueError(
                        f"top-k output {name!r} has per-sample shape {list(spec.shape)}; top-{k} needs a last "
                        f"dimension larger than {k}"
                    )
        self.selected = frozenset(selected)
        self.outputs = []
        for spec in inner.outputs:
            if spec.name in self.selected:
                shape = (*spec.shape[:-1], self.k)
                self.outputs.append(TensorSpec(spec.name + VALUES_SUFFIX, self.dtype, shape))
                self.outputs.append(TensorSpec(spec.name + INDICES_SUFFIX, np.dtype(np.int32), shape))
            else:
                self.outputs.append(spec)
        names = [s.name for s in self.outputs]
        if clash := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"top-k output names {clash} clash with the model's own outputs")

    @property
    def on_device(self) -> bool:
        """Whether ``inner`` computes the top-k itself (``native_topk`` names every selected output):
        a model on an accelerator, whose dense outputs then never cross to the host."""
        return self.selected <= getattr(self.inner, "native_topk", frozenset())

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.on_device and len(self.inner.outputs) == len(self.selected):
            return self.inner.infer_topk(  # type: ignore[attr-defined]
                inputs, self.k, values=self.values, temperature=self.temperature, dtype=self.dtype
            )
        result = self.inner.infer(inputs)
        out: dict[str, np.ndarray] = {}
        for spec in self.inner.outputs:
            arr = result[spec.name]
            if spec.name not in self.selected:
                out[spec.name] = arr
                continue
            try:
                values, indices = topk(arr, self.k, values=self.values, temperature=self.temperature, dtype=self.dtype)
            except ValueError as e:
                raise ValueError(f"top-k of output {spec.name!r}: {e}") from None
            out[spec.name + VALUES_SUFFIX] = values
            out[spec.name + INDICES_SUFFIX] = indices
        return out

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return (
            f"{super().describe()}; top-{self.k} {self.values} of {', '.join(sorted(self.selected))} "
            f"in {self.dtype.name}"
            + (f" at temperature {self.temperature:g}" if self.temperature != 1.0 else "")
            + (" (computed by the model's backend)" if self.on_device else "")
            + (f"; {summary()}" if (summary := getattr(self.inner, "summary", None)) else "")
        )


def bytes_per_token(k: int, dtype: str = "float32") -> int:
    """Bytes one position's top-k carries: ``k`` values and ``k`` int32 indices."""
    return k * (np.dtype(dtype).itemsize + 4)


def measure_topk(vocab: int, k: int, *, values: str = "logprobs", tokens: int = 0, repeats: int = 5) -> float:
    """Seconds per token of :func:`topk` on float32 logits of ``vocab`` entries (standard normal x 3),
    best of ``repeats`` runs over ``tokens`` positions (default: about 16 M entries' worth)."""
    tokens = tokens or max(64, (1 << 24) // vocab)
    x = (np.random.default_rng(0).standard_normal((tokens, vocab), dtype=np.float32) * 3).reshape(tokens, 1, vocab)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        topk(x, k, values=values)
        best = min(best, time.perf_counter() - start)
    return best / tokens


def _main() -> None:
    """``python -m distill_reader.serving.topk``: the table of docs/sequences.md (cost per token)."""
    print("| V | K | logprobs µs/token | logits µs/token | dense bytes | top-k bytes (fp32 / fp16 values) |")
    print("|---|---|---|---|---|---|")
    for vocab in (1000, 32000, 128000):
        for k in (8, 32):
            cost = [measure_topk(vocab, k, values=v) * 1e6 for v in VALUE_KINDS]
            print(
                f"| {vocab:,} | {k} | {cost[0]:.1f} | {cost[1]:.1f} | {vocab * 4:,} | "
                f"{bytes_per_token(k)} / {bytes_per_token(k, 'float16')} |",
                flush=True,
            )


if __name__ == "__main__":
    _main()
