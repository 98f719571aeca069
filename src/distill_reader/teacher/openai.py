"""The OpenAI-compatible transport: vLLM (or another server of the OpenAI completions API that
returns prompt log-probs) as a teacher of per-token top-k knowledge.

``[conf] protocol = openai``: each ``servers`` entry is the ``host:port`` of the server's HTTP API,
``model_name`` the served model's name. A d_batch's rows go to ``POST /v1/completions`` as one
request of token-id prompts (each row cut to its length)::

    {"model": ..., "prompt": [[ids of row 0], [ids of row 1], ...], "max_tokens": 1,
     "temperature": 0, "prompt_logprobs": K, "logprobs": K, "return_tokens_as_token_ids": true}

and the answer becomes the two fetch vars ``*_topk_values`` (float, ``[-1, K]``) and
``*_topk_indices`` (integer, ``[-1, K]``) with the convention of docs/sequences.md: position ``t``
carries the distribution of the token after ``tokens[:t+1]``. vLLM's ``prompt_logprobs[t + 1]`` is
exactly that for ``t < length - 1`` (``prompt_logprobs[0]`` is null); the last position's is the
generated token's ``top_logprobs`` (``max_tokens`` 1; with ``return_tokens_as_token_ids`` its keys
are ``token_id:N``, not decoded text, which several ids can share).

What comes back is sorted here: a prompt position's dict holds the top K and, when it is not among
them, the prompt's own token (K + 1 entries), and equal log-probs may share a rank. Entries are
ordered by log-prob descending, equal ones by ascending token id (the rule of ``--topk``), and the
first K kept. A position with fewer than K entries (a vocabulary smaller than K) is filled with the
lowest unused ids at the dtype's most negative finite value (probability 0).

Errors follow :mod:`distill_reader.teacher.client`: unreachable, timed out, 429 and 502-504 are
:class:`~distill_reader.errors.TransientTeacherError`; 401/403
:class:`~distill_reader.errors.TeacherAuthError`; a missing model, ``max_model_len`` or
``max_logprobs`` too small, or answers that do not parse are
:class:`~distill_reader.errors.TeacherMismatchError` (the teacher is quarantined, the message names
the setting); other error answers :class:`~distill_reader.errors.TeacherError`.

``[conf] token_file``'s token is sent as ``Authorization: Bearer``; ``[conf] tls_ca`` makes the
connection HTTPS (``tls_cert``/``tls_key``: a client certificate).
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import warnings
from dataclasses import dataclass
from itertools import chain

import httpx
import numpy as np

from distill_reader.config import ReaderConfig
from distill_reader.errors import (
    TeacherAuthError,
    TeacherError,
    TeacherMismatchError,
    TeacherOutputError,
    TransientTeacherError,
)
from distill_reader.security import ClientSecurity, TlsFiles
from distill_reader.teacher.transport import DBatch, Transport

__all__ = ["OpenAILayout", "OpenAITransport", "openai_layout"]

_VALUES_SUFFIX = "_topk_values"
_INDICES_SUFFIX = "_topk_indices"
_TOKEN_ID_PREFIX = "token_id:"
#: HTTP statuses after which another teacher should be tried (the request is no one's fault)
_TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True)
class OpenAILayout:
    """Where the answer goes: K, and the positions in ``[fetch]`` of the values and indices vars."""

    k: int
    values: int
    indices: int


def openai_layout(config: ReaderConfig) -> OpenAILayout:
    """The fetch vars an OpenAI-compatible teacher fills; ValueError naming the var when the config
    does not fit (one integer predict var ``(-1,)``; fetch vars ``[<x>_]topk_values`` float ``(-1, K)``
    and ``[<x>_]topk_indices`` integer ``(-1, K)``, as served names)."""
    predict = config.predict_feeds
    if len(predict) != 1 or predict[0].shape != (-1,) or predict[0].dtype.kind not in "iu":
        described = ", ".join(f"{s.name} {s.dtype.name}{s.shape}" for s in predict)
        raise ValueError(
            "an OpenAI-compatible teacher takes one var of token ids: [feed] predict_feed_ids must name one "
            f"integer var of shape (-1,); it names {described}"
        )
    values = indices = None
    for i, spec in enumerate(config.fetches):
        name = config.served_name(spec.name)
        if ("_" + name).endswith(_VALUES_SUFFIX) and values is None:
            values = i
        elif ("_" + name).endswith(_INDICES_SUFFIX) and indices is None:
            indices = i
        else:
            raise ValueError(
                f"[fetch] var {spec.name!r}: an OpenAI-compatible teacher answers only top-k log-probs, "
                f"fetch vars named '<x>{_VALUES_SUFFIX}' and '<x>{_INDICES_SUFFIX}'"
            )
    if values is None or indices is None:
        missing = _VALUES_SUFFIX if values is None else _INDICES_SUFFIX
        raise ValueError(f"[fetch] fetch_vars: an OpenAI-compatible teacher needs a var named '<x>{missing}'")
    v, x = config.fetches[values], config.fetches[indices]
    if len(v.shape) != 2 or v.shape[0] != -1 or v.shape[1] < 1 or v.shape != x.shape:
        raise ValueError(
            f"[fetch] fetch_shapes: {v.name!r} and {x.name!r} must both be (-1, K), K the number of log-probs "
            f"per token; they are {v.shape} and {x.shape}"
        )
    if v.dtype.kind != "f" or x.dtype.kind not in "iu":
        raise ValueError(
            f"[fetch] fetch_types: {v.name!r} must be a float type and {x.name!r} an integer type; "
            f"they are {v.dtype.name} and {x.dtype.name}"
        )
    return OpenAILayout(v.shape[1], values, indices)


def _ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """Verifies the server with ``tls.ca`` (the system's roots without one); a client certificate
    when ``cert`` and ``key`` are given (ssl loads them from files only: a private temporary file)."""
    context = ssl.create_default_context(cadata=tls.ca.decode() if tls.ca else None)
    if tls.cert and tls.key:
        fd, path = tempfile.mkstemp(suffix=".pem")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(tls.cert + b"\n" + tls.key)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
    return context


def _error_message(response: httpx.Response) -> str:
    """The server's words for an error answer: vLLM's ``{"error": {"message": ...}}`` or
    ``{"message": ...}``, else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
        if body.get("detail"):
            return str(body["detail"])[:500]
    return str(body)[:300]


def http_client_for(
    endpoint: str,
    security: ClientSecurity,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An HTTP client of the server at ``endpoint`` (``host:port``): HTTPS with ``security.tls``,
    its token as ``Authorization: Bearer``."""
    headers = {"Authorization": f"Bearer {security.token.reveal()}"} if security.token is not None else {}
    return httpx.AsyncClient(
        base_url=f"{'https' if security.tls is not None else 'http'}://{endpoint}",
        headers=headers,
        verify=_ssl_context(security.tls) if security.tls is not None else True,
        timeout=httpx.Timeout(timeout),
        # one connection per request in flight; no pool timeout of its own (the request's is enough)
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        trust_env=False,  # a proxy from the environment must not see the token or the data
        transport=transport,
    )


class OpenAITransport(Transport):
    """One OpenAI-compatible teacher (see the module docstring), bound to the reader's config."""

    def __init__(
        self,
        endpoint: str,
        config: ReaderConfig,
        model_name: str | None = None,
        request_timeout: float = 30.0,
        *,
        check_finite: bool = True,
        security: ClientSecurity | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``http_transport``: httpx's transport to use instead of the network (tests)."""
        self.endpoint = endpoint
        self.model_name = model_name or config.model_name
        self.request_timeout = request_timeout
        self.check_finite = check_finite
        self._config = config
        self._where = f"teacher {endpoint} model {self.model_name!r}"
        try:
            self._layout = openai_layout(config)
        except ValueError as exc:
            # A teacher registered with discovery as openai for a config it cannot serve.
            self._layout = None
            self._layout_error = f"{self._where} speaks the OpenAI API, which cannot serve this config: {exc}"
        self.k = self._layout.k if self._layout is not None else 0
        security = security or ClientSecurity(config.token, config.tls)
        self._has_token = security.token is not None
        self._client = http_client_for(endpoint, security, request_timeout, http_transport)
        self._body_head = b""

    async def close(self) -> None:
        await self._client.aclose()

    # -- HTTP -------------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, content: bytes | None = None) -> httpx.Response:
        """One call; TransientTeacherError when the server cannot be reached or does not answer."""
        try:
            return await self._client.request(
                method, path, content=content, headers={"Content-Type": "application/json"} if content else None
            )
        except httpx.TimeoutException as exc:
            raise TransientTeacherError(
                f"teacher {self.endpoint}: no answer within {self.request_timeout:g} s ({type(exc).__name__})"
            ) from None
        except (httpx.TransportError, OSError) as exc:
            raise TransientTeacherError(f"teacher {self.endpoint}: {type(exc).__name__}: {exc}") from None

    def _status_error(self, response: httpx.Response, doing: str) -> Exception:
        """The exception for an error answer, by what the scheduler should do about it."""
        status = response.status_code
        message = _error_message(response)
        if status in _TRANSIENT_STATUS:
            return TransientTeacherError(f"teacher {self.endpoint}: HTTP {status}: {message}")
        if status in (401, 403):
            hint = "check [conf] token_file" if self._has_token else "set [conf] token_file to the server's API key"
            return TeacherAuthError(f"teacher {self.endpoint} refused the reader (HTTP {status}: {message}); {hint}")
        lowered = message.lower()
        if status == 400 and "logprobs" in lowered:
            return TeacherMismatchError(
                f"{self._where} refuses {self.k} log-probs per token (HTTP 400: {message}); start the server with "
                f"a max_logprobs of at least {self.k} (vLLM: --max-logprobs {self.k}), or ask for fewer in "
                "[fetch] fetch_shapes"
            )
        if status == 404 and "model" in lowered:
            return TeacherMismatchError(
                f"{self._where}: the server has no such model (HTTP 404: {message}); check [conf] model_name "
                "(vLLM: --served-model-name)"
            )
        if status == 404:
            return TeacherMismatchError(
                f"teacher {self.endpoint} is not an OpenAI-compatible server: {response.request.url.path} answered "
                f"HTTP 404 ({message}); is this the server's HTTP port?"
            )
        if status == 400 and ("context length" in lowered or "max_model_len" in lowered or "too long" in lowered):
            return TeacherMismatchError(
                f"{self._where} cannot take rows of [conf] max_length tokens (HTTP 400: {message}); start it with "
                f"a larger max_model_len (vLLM: --max-model-len)"
            )
        return TeacherError(f"{self._where}: {doing} failed: HTTP {status}: {message}")

    def _json(self, response: httpx.Response, doing: str) -> object:
        if response.status_code != 200:
            raise self._status_error(response, doing)
        try:
            return json.loads(response.content)
        except ValueError:
            raise TeacherMismatchError(
                f"teacher {self.endpoint} answered {doing} with something that is not JSON "
                f"({response.content[:80]!r}); is it an OpenAI-compatible server?"
            ) from None

    # -- metadata ---------------------------------------------------------------------------------
    async def check_metadata(self) -> bool:
        """``GET /v1/models``: the model is served, and its ``max_model_len`` (vLLM) takes rows of
        ``[conf] max_length`` plus the generated token; then one tiny completion asks for K
        log-probs, which checks ``max_logprobs`` and that prompt log-probs come back."""
        if self._layout is None:
            raise TeacherMismatchError(self._layout_error)
        listing = self._json(await self._call("GET", "/v1/models"), "GET /v1/models")
        models = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(models, list):
            raise TeacherMismatchError(
                f"teacher {self.endpoint} answered GET /v1/models without a model list; is it an OpenAI-compatible "
                "server?"
            )
        by_id = {m.get("id"): m for m in models if isinstance(m, dict)}
        model = by_id.get(self.model_name)
        if model is None:
            raise TeacherMismatchError(
                f"{self._where}: the server serves no model of that name (it serves {sorted(map(str, by_id))}); "
                "check [conf] model_name (vLLM: --served-model-name)"
            )
        max_model_len = model.get("max_model_len")
        max_length = self._config.max_length or 0
        if isinstance(max_model_len, int) and max_length + 1 > max_model_len:
            raise TeacherMismatchError(
                f"{self._where} has max_model_len {max_model_len}: rows of [conf] max_length {max_length} and the one "
                f"token generated need {max_length + 1}; start it with --max-model-len {max_length + 1} or more, or "
                "lower max_length"
            )
        # Two tokens: one prompt position and the generated token's, each with K entries.
        self._decode(await self._complete([[0, 0]]), np.array([2]), 2)  # raises if the answer does not fit
        return True

    # -- inference --------------------------------------------------------------------------------
    def _body(self, prompts: list[list[int]]) -> bytes:
        if not self._body_head:
            head = {
                "model": self.model_name,
                "max_tokens": 1,
                "temperature": 0,
                "prompt_logprobs": self.k,
                "logprobs": self.k,
                "return_tokens_as_token_ids": True,
            }
            self._body_head = json.dumps(head)[:-1].encode() + b', "prompt": '
        return self._body_head + json.dumps(prompts, separators=(",", ":")).encode() + b"}"

    async def _complete(self, prompts: list[list[int]]) -> dict:
        response = await self._call("POST", "/v1/completions", self._body(prompts))
        answer = self._json(response, "POST /v1/completions")
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise TeacherMismatchError(f"{self._where} answered /v1/completions without choices")
        return answer

    async def infer(self, batch: DBatch) -> list[np.ndarray]:
        """Run the model on one d_batch: the fetch vars in config order, ``[rows, padded, K]``, zero
        past each row's length."""
        if self._layout is None:
            raise TeacherMismatchError(self._layout_error)
        tokens = batch.inputs[0]
        lengths = np.asarray(batch.lengths[0], dtype=np.int64)
        padded = tokens.shape[1]
        sent = np.flatnonzero(lengths > 0)  # an empty row has no position to ask about
        if len(sent):
            prompts = [tokens[r, : lengths[r]].tolist() for r in sent]
            answer = await self._complete(prompts)
            values, indices = self._decode(answer, lengths[sent], padded)
        else:
            values = np.zeros((0, padded, self.k), np.float64)
            indices = np.zeros((0, padded, self.k), np.int64)
        return self._outputs(batch.count, sent, padded, values, indices)

    def _outputs(
        self, count: int, sent: np.ndarray, padded: int, values: np.ndarray, indices: np.ndarray
    ) -> list[np.ndarray]:
        layout = self._layout
        assert layout is not None
        outputs: list[np.ndarray] = []
        for i, spec in enumerate(self._config.fetches):
            source = values if i == layout.values else indices
            if len(sent) == count:
                outputs.append(source.astype(spec.dtype, copy=False))
            else:
                full = np.zeros((count, padded, layout.k), dtype=spec.dtype)
                full[sent] = source
                outputs.append(full)
        return outputs

    def _decode(self, answer: dict, lengths: np.ndarray, padded: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-K of every position of the rows asked for (``lengths``: theirs, all > 0):
        float64 values and int64 indices ``[rows, padded, K]``, zero past each row's length."""
        k = self.k
        rows = len(lengths)
        choices = answer["choices"]
        if len(choices) != rows:
            raise TeacherMismatchError(f"{self._where} answered {len(choices)} choices to {rows} prompts")
        try:
            choices = sorted(choices, key=lambda c: c["index"])
        except (KeyError, TypeError):
            raise TeacherMismatchError(f"{self._where} answered choices without an index") from None
        ids: list[str] = []  # token ids, as the strings vLLM's JSON keys are
        logprobs: list[float] = []
        counts: list[int] = []  # entries per position, positions in row-major order
        try:
            for row, (choice, length) in enumerate(zip(choices, lengths.tolist())):
                if choice["index"] != row:
                    raise TeacherMismatchError(f"{self._where} answered choice {choice['index']} for prompt {row}")
                positions = choice.get("prompt_logprobs")
                if not isinstance(positions, list) or len(positions) != length:
                    got = "no prompt_logprobs" if not isinstance(positions, list) else f"{len(positions)} positions"
                    raise TeacherMismatchError(
                        f"{self._where} answered {got} for a prompt of {length} tokens; the server must support "
                        "prompt_logprobs (vLLM does)"
                    )
                prompt = positions[1:]
                counts.extend(map(len, prompt))
                ids.extend(chain.from_iterable(prompt))
                logprobs.extend([entry["logprob"] for entries in prompt for entry in entries.values()])
                # The generated token's: keys 'token_id:N' (return_tokens_as_token_ids).
                top = choice["logprobs"]["top_logprobs"][0]
                counts.append(len(top))
                ids.append(",".join(top).replace(_TOKEN_ID_PREFIX, ""))
                logprobs.extend(top.values())
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise TeacherMismatchError(
                f"{self._where} answered log-probs in an unknown layout ({type(exc).__name__}: {exc}); "
                "is it vLLM or another server of its prompt_logprobs?"
            ) from None
        try:
            values = np.array(logprobs, dtype=np.float64)
            with warnings.catch_warnings():  # text that is not a number ends the parse early: checked below
                warnings.simplefilter("ignore", DeprecationWarning)
                # 10-20 times faster than int() or astype for each string
                token_ids = np.fromstring(",".join(ids), dtype=np.int64, sep=",")
            if len(token_ids) != len(values):
                raise ValueError(f"{len(values) - len(token_ids)} of {len(values)} ids are not integers")
        except (ValueError, TypeError) as exc:
            raise TeacherMismatchError(
                f"{self._where} answered token ids or log-probs that are not numbers ({exc}); "
                "does it support return_tokens_as_token_ids (vLLM does)?"
            ) from None
        counts_array = np.array(counts, dtype=np.int64)
        if len(counts_array) and counts_array.min() == 0:
            raise TeacherMismatchError(f"{self._where} answered a position without log-probs ({k} asked)")
        if self.check_finite and not np.isfinite(values).all():
            raise TeacherOutputError(
                f"{self._where} answered NaN or inf log-probs; disable the check with check_finite=False if your "
                "teacher means them"
            )
        return self._topk(token_ids, values, counts_array, lengths, padded)

    def _topk(
        self, token_ids: np.ndarray, values: np.ndarray, counts: np.ndarray, lengths: np.ndarray, padded: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each position's entries sorted by value descending, then id ascending; the first K kept.

        The entries go into a ``[positions, most entries]`` matrix, sorted along each row by value
        (stable: vLLM sends them nearly in order, which the sort is quick on); the rare rows with
        equal values among the first K + 1 are sorted again by (value, id)."""
        k = self.k
        rows = len(lengths)
        positions = len(counts)
        width = max(int(counts.max()), k)
        group = np.repeat(np.arange(positions), counts)
        column = np.arange(len(values)) - np.repeat(np.cumsum(counts) - counts, counts)
        matrix = np.full((positions, width), -np.inf)
        matrix[group, column] = values
        ids = np.full((positions, width), np.iinfo(np.int64).max)
        ids[group, column] = token_ids
        order = np.argsort(-matrix, axis=1, kind="stable")
        ranked = np.take_along_axis(matrix, order, axis=1)
        cut = min(width, k + 1)
        tied = np.flatnonzero(((ranked[:, 1:cut] == ranked[:, : cut - 1]) & np.isfinite(ranked[:, 1:cut])).any(axis=1))
        if len(tied):
            order[tied] = np.lexsort((ids[tied], -matrix[tied]), axis=1)
            ranked[tied] = np.take_along_axis(matrix[tied], order[tied], axis=1)
        order, ranked = order[:, :k], ranked[:, :k]
        # the flat index (row * padded + t) of each position, in the order they came
        row_of = np.repeat(np.arange(rows), lengths)
        position = row_of * padded + np.arange(positions) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out_values = np.zeros((rows * padded, k), np.float64)
        out_indices = np.zeros((rows * padded, k), np.int64)
        out_values[position] = ranked
        out_indices[position] = np.take_along_axis(ids, order, axis=1)
        for g in np.flatnonzero(counts < k):  # fewer than K entries: the lowest unused ids, probability 0
            p = position[g]
            have = counts[g]
            used = set(out_indices[p, :have].tolist())
            fill = [i for i in range(have + k) if i not in used][: k - have]
            out_indices[p, have:] = fill
            out_values[p, have:] = self._fill_value
        return out_values.reshape(rows, padded, k), out_indices.reshape(rows, padded, k)

    @property
    def _fill_value(self) -> float:
        layout = self._layout
        assert layout is not None
        return float(np.finfo(self._config.fetches[layout.values].dtype).min)
