"""Hugging Face backend: a local transformers causal LM (``--model hf:DIR``) as a sequence teacher.

Inputs ``tokens`` INT64 ``[-1, -1]`` and ``tokens_length`` INT64 ``[-1]``; output ``logits``
FP32 ``[-1, -1, V]``, where position ``t`` holds the model's logits after ``tokens[:t+1]`` (the
convention of docs/sequences.md). With ``--topk K`` the server's :class:`TopKBackend` asks this
backend for the top-k itself (:meth:`HFBackend.infer_topk`): the log-softmax and the selection
run on the model's device on each forward pass's logits, and only ``[tokens, K]`` values and
indices cross to the host.

A batch is cut into forward passes of at most ``max_batch_tokens`` padded tokens (rows sorted by
length, each pass padded to its own longest row; a row longer than the budget runs alone);
what the model computes past a row's length is zeroed. Nothing is downloaded: ``DIR`` must be a local directory in
``save_pretrained`` layout with safetensors weights. Needs ``pip install 'distill-reader[llm]'``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from distill_reader.oip import TensorSpec
from distill_reader.serving.backends.base import Backend

#: The ``hf:`` prefix of a ``--model`` spec.
PREFIX = "hf:"
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_BATCH_TOKENS = 8192
#: The top-k's float32 work runs on chunks of about this many logits (256 MiB), whatever the budget.
TOPK_CHUNK_ELEMENTS = 1 << 26
TOKENS, LENGTHS, LOGITS = "tokens", "tokens_length", "logits"


def is_hf_spec(spec: str) -> bool:
    """Whether a ``--model`` spec names a Hugging Face directory (``hf:DIR``)."""
    return spec.startswith(PREFIX)


def check_directory(directory: str) -> None:
    """Raise ``ValueError`` unless ``directory`` looks like a local ``save_pretrained`` causal LM."""
    if not directory:
        raise ValueError("hf: needs a directory, e.g. hf:./my-model (nothing is downloaded)")
    if not os.path.isdir(directory):
        what = "does not exist" if not os.path.exists(directory) else "is not a directory"
        raise ValueError(
            f"{directory!r} {what}: hf:DIR loads a local transformers directory (save_pretrained layout); "
            "nothing is downloaded, so a hub name needs `huggingface-cli download NAME --local-dir DIR` first"
        )
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory!r} has no config.json: not a save_pretrained directory")
    files = os.listdir(directory)
    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
        raise ValueError(
            f"{directory!r} has no .safetensors weights (save the model with save_pretrained, "
            "which writes safetensors by default)"
        )


def resolve_device(device: str | None) -> str:
    """``device`` checked (``cpu``, ``cuda``, ``cuda:N``); default CUDA where available, else CPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"--device must be cpu, cuda or cuda:N; got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available to this torch ({torch.__version__})")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_topk(x: Any, k: int, *, logprobs: bool = True, temperature: float = 1.0) -> tuple[Any, Any]:
    """The top-k of each row of a 2-D torch tensor, on its device, by the rules of
    :mod:`~distill_reader.serving.topk`: ``(values float32, indices int64)``, values descending,
    equal values in ascending index order, the lowest indices kept among ties at the cut;
    ``logprobs``: ``log_softmax(x / temperature)`` in float32, else ``x`` itself in float32.

    As :func:`~distill_reader.serving.topk.topk` does, the selection runs on ``x / temperature``
    (the log-softmax's order); the values are then read from ``log_softmax``. The top ``K + 1``
    shows the rows where a tie crosses the cut, which alone take a second pass."""
    import torch

    z = x.float()
    if logprobs and temperature != 1.0:
        z = z / temperature
    v = z.shape[-1]
    top, idx = torch.topk(z, min(k + 1, v), dim=-1, sorted=True)
    if torch.isnan(top[:, 0]).any():  # topk ranks NaN above everything
        raise ValueError("the model's output holds NaN")
    if k < v:
        unsure = torch.nonzero(top[:, k] == top[:, k - 1]).flatten()
        top, idx = top[:, :k], idx[:, :k]
        if unsure.numel():  # values equal to the k-th on both sides of the cut: the lowest indices win
            zu, kth = z[unsure], top[unsure, -1:]
            above, tied = zu > kth, zu == kth
            room = k - above.sum(dim=-1, keepdim=True)
            keep = above | (tied & (torch.cumsum(tied.int(), dim=-1) <= room))
            idx[unsure] = torch.nonzero(keep)[:, 1].reshape(len(unsure), k)
    # Index order first, then a stable sort by value: equal values in ascending index order.
    idx, _ = idx.sort(dim=-1)
    top = torch.gather(z, 1, idx)
    order = torch.sort(top, dim=-1, descending=True, stable=True).indices
    top, idx = torch.gather(top, 1, order), torch.gather(idx, 1, order)
    if logprobs:  # torch's fused log_softmax is faster than its logsumexp on a CPU
        top = torch.gather(torch.log_softmax(z, dim=-1), 1, idx)
    return top, idx


class HFBackend(Backend):
    """A transformers causal LM from a local directory, run with torch on ``device`` in ``dtype``."""

    platform = "transformers"
    triton_backend = "python"

    def __init__(
        self,
        directory: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_tokens: int | None = None,
        threads: int | None = None,
    ) -> None:
        check_directory(directory)
        dtype = dtype or "float32"
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        budget = DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else int(max_batch_tokens)
        if budget < 1:
            raise ValueError(f"--max-batch-tokens must be at least 1, got {budget}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the hub
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ValueError(f"hf: models need torch and transformers: pip install 'distill-reader[llm]' ({e})") from e
        self.directory = directory
        self.device = resolve_device(device)
        self.dtype = dtype
        self.max_batch_tokens = budget
        if threads:
            torch.set_num_threads(threads)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory,
                dtype=getattr(torch, dtype),
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
            )
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{directory!r}: transformers cannot load it as a causal LM: {e}") from e
        self.model = model.to(self.device).eval()
        config = self.model.config
        self.max_positions: int | None = next(
            (getattr(config, a) for a in ("max_position_embeddings", "n_positions") if getattr(config, a, None)),
            None,
        )
        self._torch = torch
        self._lock = threading.Lock()  # one forward pass at a time: --instances share one model
        with torch.inference_mode():
            one = torch.ones((1, 1), dtype=torch.long, device=self.device)
            probe = self.model(input_ids=one * 0, attention_mask=one).logits
        self.vocab_size = int(probe.shape[-1])
        self.inputs = [
            TensorSpec(TOKENS, np.dtype(np.int64), (-1,)),
            TensorSpec(LENGTHS, np.dtype(np.int64), ()),
        ]
        self.outputs = [TensorSpec(LOGITS, np.dtype(np.float32), (-1, self.vocab_size))]
        #: The outputs :meth:`infer_topk` compresses itself (see :class:`~distill_reader.serving.topk.TopKBackend`).
        self.native_topk = frozenset({LOGITS})

    def summary(self) -> str:
        """The model, where and how it runs (the server's start line shows it, with or without --topk)."""
        return (
            f"transformers {type(self.model).__name__} from {self.directory} on {self.device} in "
            f"{self.dtype}, at most {self.max_batch_tokens:,} tokens per forward pass"
        )

    def describe(self) -> str:
        return f"{super().describe()}; {self.summary()}"

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    # -- batches ---------------------------------------------------------------------------------

    def _rows(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(inputs[TOKENS])
        if tokens.ndim != 2:
            raise ValueError(f"{TOKENS} must be [rows, length], got shape {list(tokens.shape)}")
        lengths = np.asarray(inputs.get(LENGTHS, np.full(len(tokens), tokens.shape[1])), dtype=np.int64)
        if lengths.shape != (len(tokens),):
            raise ValueError(f"{LENGTHS} must be [rows], got shape {list(lengths.shape)} for {len(tokens)} rows")
        if len(lengths) and (lengths.min() < 0 or lengths.max() > tokens.shape[1]):
            raise ValueError(f"{LENGTHS} must lie in 0..{tokens.shape[1]} (the tokens' length)")
        if self.max_positions and len(lengths) and lengths.max() > self.max_positions:
            raise ValueError(f"a row of {int(lengths.max())} tokens exceeds the model's {self.max_positions} positions")
        padding = self._padding(lengths, tokens.shape[1])
        real = tokens[~padding]
        if real.size and (real.min() < 0 or real.max() >= self.vocab_size):
            raise ValueError(f"{TOKENS} must lie in 0..{self.vocab_size - 1} (the model's vocabulary)")
        # Whatever a client padded with (-100, say) becomes token 0, which the model can embed.
        return np.where(padding, 0, tokens), lengths

    def passes(self, lengths: np.ndarray) -> list[np.ndarray]:
        """The rows (indices) of each forward pass: rows longest first, cut so that rows x the
        longest row of a pass stays within the token budget (a row over the budget runs alone)."""
        order = np.argsort(-lengths, kind="stable")
        out: list[np.ndarray] = []
        start = 0
        while start < len(order):
            longest = max(int(lengths[order[start]]), 1)
            count = max(1, self.max_batch_tokens // longest)
            out.append(order[start : start + count])
            start += count
        return out

    def _forward(self, tokens: np.ndarray, lengths: np.ndarray) -> Any:
        """The logits of one pass, ``[rows, longest row, V]`` on the device (right-padded rows)."""
        torch = self._torch
        width = max(int(lengths.max()), 1)
        ids = torch.from_numpy(np.ascontiguousarray(tokens[:, :width])).to(self.device)
        positions = torch.arange(width, device=self.device)
        lens = torch.from_numpy(lengths).to(self.device)
        # A row of length 0 keeps its first position, so that no attention row is all masked.
        attention = ((positions[None, :] < lens[:, None]) | (positions[None, :] == 0)).long()
        return self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits

    @staticmethod
    def _padding(lengths: np.ndarray, width: int) -> np.ndarray:
        """``[rows, width]``: True past each row's length."""
        return np.arange(width)[None, :] >= lengths[:, None]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens, lengths = self._rows(inputs)
        out = np.zeros((*tokens.shape, self.vocab_size), dtype=np.float32)
        with self._lock, self._torch.inference_mode():
            for rows in self.passes(lengths):
                if not lengths[rows].any():
                    continue
                block = self._forward(tokens[rows], lengths[rows]).float().cpu().numpy()
                block[self._padding(lengths[rows], block.shape[1])] = 0
                out[rows, : block.shape[1]] = block
        return {LOGITS: out}

    def infer_topk(
        self,
        inputs: dict[str, np.ndarray],
        k: int,
        *,
        values: str = "logprobs",
        temperature: float = 1.0,
        dtype: np.dtype | str = np.float32,
    ) -> dict[str, np.ndarray]:
        """``logits_topk_values`` / ``logits_topk_indices`` ``[rows, length, k]``, computed on the device."""
        from distill_reader.serving.topk import INDICES_SUFFIX, VALUES_SUFFIX

        torch = self._torch
        tokens, lengths = self._rows(inputs)
        out_values = np.zeros((*tokens.shape, k), dtype=np.dtype(dtype))
        out_indices = np.zeros((*tokens.shape, k), dtype=np.int32)
        chunk = max(1, TOPK_CHUNK_ELEMENTS // self.vocab_size)
        value_dtype = torch.float16 if np.dtype(dtype) == np.float16 else torch.float32
        with self._lock, torch.inference_mode():
            for rows in self.passes(lengths):
                if not lengths[rows].any():
                    continue
                # Padded positions too (rows of a pass have similar lengths): no [tokens, V] copy.
                logits = self._forward(tokens[rows], lengths[rows])
                flat = logits.reshape(-1, self.vocab_size)
                parts_v, parts_i = [], []
                for start in range(0, len(flat), chunk):
                    try:
                        v, i = device_topk(
                            flat[start : start + chunk], k, logprobs=values == "logprobs", temperature=temperature
                        )
                    except ValueError as e:
                        raise ValueError(f"top-k of output {LOGITS!r}: {e}") from None
                    parts_v.append(v.to(value_dtype))
                    parts_i.append(i.int())
                shape = (len(rows), logits.shape[1], k)
                block_v = torch.cat(parts_v).reshape(shape).cpu().numpy()
                block_i = torch.cat(parts_i).reshape(shape).cpu().numpy()
                padding = self._padding(lengths[rows], shape[1])
                block_v[padding] = 0
                block_i[padding] = 0
                out_values[rows, : shape[1]] = block_v
                out_indices[rows, : shape[1]] = block_i
        return {LOGITS + VALUES_SUFFIX: out_values, LOGITS + INDICES_SUFFIX: out_indices}
