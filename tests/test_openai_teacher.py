"""OpenAI-compatible teachers (``[conf] protocol = openai``): vLLM's completions API with prompt
log-probs, turned into the ``*_topk_values`` / ``*_topk_indices`` fetch vars.

The first tests run the transport against httpx's ``MockTransport`` answering in vLLM's layout
(string token-id keys, the prompt's own token as a (K+1)-th entry, ties, short positions, errors).
The others run a real vLLM (``build/teachers/vllm-venv``, made by ``scripts/external-teachers.sh``;
skipped without it) on the small GPT-2 of ``llm_support`` and check the reader's answers against
transformers on the same directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import settled_stats, wait_for

from distill_reader import ConfigError, DistillReader
from distill_reader.bench.sequence import sequence_config
from distill_reader.config import load_config
from distill_reader.errors import (
    TeacherAuthError,
    TeacherError,
    TeacherMismatchError,
    TransientTeacherError,
)
from distill_reader.teacher.factory import transport_factory
from distill_reader.teacher.openai import OpenAITransport
from distill_reader.teacher.transport import DBatch, TeacherRef

# The first vLLM test also waits for vLLM to start (70-120 s here, up to 300 s allowed).
pytestmark = pytest.mark.timeout(420)

K = 8
MODEL = "tiny"


def openai_config(tmp_path: Path, servers: list[str], k: int = K, max_length: int = 64, extra: str = "") -> Path:
    path = tmp_path / f"openai-{k}-{len(list(tmp_path.iterdir()))}.conf"
    conf = f"protocol = openai\nmodel_name = {MODEL}\n{extra}"
    path.write_text(sequence_config(servers, max_length, k, values_dtype="float32", conf=conf))
    return path


# -- a fake vLLM ----------------------------------------------------------------------------------
V = 50


def _logprobs(prefix: np.ndarray) -> np.ndarray:
    """A deterministic distribution over V tokens for each prefix (float32 log-probs, some ties)."""
    rng = np.random.default_rng(abs(hash(tuple(prefix.tolist()))) % 2**32)
    logits = np.round(rng.normal(size=V) * 2, 1)  # rounded: equal values occur
    logits = logits.astype(np.float32)
    return logits - np.log(np.exp(logits.astype(np.float64)).sum()).astype(np.float32)


def _dense_topk(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((np.arange(len(logprobs)), -logprobs))[:k]  # ties: lower index first
    return logprobs[order], order


def _entries(logprobs: np.ndarray, k: int, also: int | None, rng: np.random.Generator) -> dict:
    """vLLM's dict for one prompt position: the top k (torch.topk picks among ties as it likes:
    here, the highest ids) and the prompt's own token ``also``, in a random order."""
    order = np.lexsort((-np.arange(len(logprobs)), -logprobs))[:k]
    chosen = list(order) + ([also] if also is not None and also not in order else [])
    rng.shuffle(chosen)
    return {
        str(i): {"logprob": float(logprobs[i]), "rank": int((logprobs > logprobs[i]).sum()) + 1, "decoded_token": "x"}
        for i in chosen
    }


def fake_vllm(k_limit: int = 64, seen: list | None = None, short: int | None = None):
    """A MockTransport handler answering /v1/models and /v1/completions as vLLM does."""

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL, "max_model_len": 256}]})
        body = json.loads(request.content)
        if body["model"] != MODEL:
            return httpx.Response(404, json={"error": {"message": f"The model `{body['model']}` does not exist."}})
        k = body["prompt_logprobs"]
        if k > k_limit:
            message = f"Requested prompt logprobs of {k}, which is greater than max allowed: {k_limit}"
            return httpx.Response(400, json={"error": {"message": message, "type": "BadRequestError", "code": 400}})
        rng = np.random.default_rng(len(body["prompt"]))
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            tokens = np.asarray(prompt)
            positions = [None] + [
                _entries(_logprobs(tokens[:t])[:short], k, int(tokens[t]), rng) for t in range(1, len(tokens))
            ]
            last = _logprobs(tokens)[:short]
            top = {f"token_id:{i}": v["logprob"] for i, v in _entries(last, k, None, rng).items()}
            choices.append(
                {"index": index, "text": "x", "prompt_logprobs": positions, "logprobs": {"top_logprobs": [top]}}
            )
        rng.shuffle(choices)
        return httpx.Response(200, json={"id": "cmpl-1", "object": "text_completion", "choices": choices})

    return handler


def check_fake_topk(values: np.ndarray, indices: np.ndarray, row: np.ndarray, k: int = K) -> None:
    """One row's answer from :func:`fake_vllm`: position t holds the top-k of the distribution after
    ``row[:t+1]``; 0 past the row's length."""
    for t in range(len(row)):
        logprobs = _logprobs(row[: t + 1])
        want_values, want_indices = _dense_topk(logprobs, k)
        np.testing.assert_array_equal(values[t], want_values)
        # Equal values keep ascending ids. At the cut, the server chose which of the tied ids
        # to send (here the highest, and the prompt's own token): the lowest of those are kept.
        cut = want_values[-1] == values[t]
        np.testing.assert_array_equal(indices[t][~cut], want_indices[~cut])
        at_cut = indices[t][cut]
        assert set(at_cut.tolist()) <= set(np.flatnonzero(logprobs == want_values[-1]).tolist())
        assert (np.diff(at_cut) > 0).all()
    assert not values[len(row) :].any() and not indices[len(row) :].any()


def _batch(rows: list[np.ndarray]) -> DBatch:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    tokens = np.zeros((len(rows), max(lengths.max(), 1)), np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return DBatch([tokens], [lengths])


def _transport(tmp_path: Path, handler, k: int = K, **kwargs) -> OpenAITransport:
    config = load_config(openai_config(tmp_path, ["127.0.0.1:1"], k))
    return OpenAITransport("127.0.0.1:1", config, http_transport=httpx.MockTransport(handler), **kwargs)


def test_answers_become_the_exact_topk_of_every_position(tmp_path: Path) -> None:
    """Rows of 0-20 tokens in one request: position t holds the top-K of the distribution after
    tokens[:t+1] (prompt_logprobs[t+1], the last from the generated token's), sorted by value then
    ascending id, the prompt's own (K+1)-th entry dropped; 0 past each row's length and for empty
    rows."""
    seen: list[httpx.Request] = []
    transport = _transport(tmp_path, fake_vllm(seen=seen))
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, V, n) for n in (5, 1, 0, 20, 3, 12)]
    values, indices = asyncio.run(transport.infer(_batch(rows)))
    assert values.shape == indices.shape == (len(rows), 20, K)
    assert values.dtype == np.float32 and indices.dtype == np.int32
    for r, row in enumerate(rows):
        check_fake_topk(values[r], indices[r], row)
    body = json.loads(seen[-1].content)
    assert body["prompt"] == [row.tolist() for row in rows if len(row)]
    assert (body["max_tokens"], body["temperature"], body["prompt_logprobs"], body["logprobs"]) == (1, 0, K, K)
    assert body["return_tokens_as_token_ids"] is True
    asyncio.run(transport.close())


def test_positions_with_fewer_than_k_entries_are_filled_with_unused_ids(tmp_path: Path) -> None:
    """A vocabulary of 5 for K = 8: the 5 entries, then the lowest unused ids at float32's most
    negative value (probability 0), distinct within the position."""
    transport = _transport(tmp_path, fake_vllm(short=5))
    values, indices = asyncio.run(transport.infer(_batch([np.array([1, 2, 3])])))
    for t in range(3):
        assert len(set(indices[0, t].tolist())) == K
        np.testing.assert_array_equal(values[0, t, 5:], np.finfo(np.float32).min)
        np.testing.assert_array_equal(indices[0, t, 5:], [5, 6, 7])
        assert set(indices[0, t, :5].tolist()) == set(range(5))


def test_metadata_check_and_errors_name_the_setting(tmp_path: Path) -> None:
    """max_logprobs too small, an unknown model name, max_model_len too small, a refused token,
    an overloaded server, a missing endpoint: each error class and its message."""
    ok = _transport(tmp_path, fake_vllm())
    assert asyncio.run(ok.check_metadata()) is True

    with pytest.raises(TeacherMismatchError, match=r"max_logprobs.*--max-logprobs 32"):
        asyncio.run(_transport(tmp_path, fake_vllm(k_limit=16), k=32).check_metadata())
    with pytest.raises(TeacherMismatchError, match=r"max_logprobs"):
        asyncio.run(_transport(tmp_path, fake_vllm(k_limit=16), k=32).infer(_batch([np.array([1, 2])])))

    config = load_config(openai_config(tmp_path, ["127.0.0.1:1"]))
    other = OpenAITransport("127.0.0.1:1", config, "other", http_transport=httpx.MockTransport(fake_vllm()))
    with pytest.raises(TeacherMismatchError, match=r"no model of that name.*\['tiny'\].*model_name"):
        asyncio.run(other.check_metadata())
    with pytest.raises(TeacherMismatchError, match=r"does not exist.*model_name"):
        asyncio.run(other.infer(_batch([np.array([1, 2])])))

    long_config = load_config(openai_config(tmp_path, ["127.0.0.1:1"], max_length=256))
    long = OpenAITransport("127.0.0.1:1", long_config, http_transport=httpx.MockTransport(fake_vllm()))
    with pytest.raises(TeacherMismatchError, match=r"max_model_len 256.*max_length 256.*--max-model-len 257"):
        asyncio.run(long.check_metadata())

    def answer(status: int, message: str):
        return lambda request: httpx.Response(status, json={"error": {"message": message}})

    with pytest.raises(TeacherAuthError, match=r"HTTP 401.*set \[conf\] token_file"):
        asyncio.run(_transport(tmp_path, answer(401, "Unauthorized")).check_metadata())
    with pytest.raises(TransientTeacherError, match="HTTP 503"):
        asyncio.run(_transport(tmp_path, answer(503, "busy")).infer(_batch([np.array([1])])))
    with pytest.raises(TeacherMismatchError, match="not an OpenAI-compatible server"):
        asyncio.run(_transport(tmp_path, answer(404, "Not Found")).check_metadata())
    error = asyncio.run(_raises(_transport(tmp_path, answer(500, "boom")).infer(_batch([np.array([1])]))))
    assert type(error) is TeacherError and "HTTP 500: boom" in str(error)

    def not_logprobs(request: httpx.Request) -> httpx.Response:  # a server that ignores prompt_logprobs
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "logprobs": None}]})

    with pytest.raises(TeacherMismatchError, match="must support prompt_logprobs"):
        asyncio.run(_transport(tmp_path, not_logprobs).check_metadata())


async def _raises(coroutine) -> Exception:
    try:
        await coroutine
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return exc
    raise AssertionError("no exception")


def test_unreachable_server_is_transient(tmp_path: Path) -> None:
    from distill_reader.teacher.local import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    config = load_config(openai_config(tmp_path, [endpoint]))
    transport = OpenAITransport(endpoint, config, request_timeout=5)
    with pytest.raises(TransientTeacherError, match=f"teacher {endpoint}: ConnectError"):
        asyncio.run(transport.check_metadata())


def test_config_protocol(tmp_path: Path) -> None:
    """``protocol = openai`` picks the transport (per teacher, discovery's protocol first); a
    config it cannot serve is refused at load, naming the var."""
    path = tmp_path / "plain.conf"
    path.write_text(sequence_config(["127.0.0.1:1"], 64, K, values_dtype="float32"))
    plain = load_config(path)
    config = load_config(openai_config(tmp_path, ["127.0.0.1:1"]))
    assert (plain.protocol, config.protocol) == ("oip", "openai")

    async def kinds() -> list[str]:
        made = [
            transport_factory(conf, 5.0, True, None, rows=8, in_flight=2)(TeacherRef("127.0.0.1:1", protocol=protocol))
            for conf, protocol in ((config, None), (config, "oip"), (plain, None), (plain, "openai"))
        ]
        for transport in made:
            await transport.close()
        return [type(t).__name__ for t in made]

    assert asyncio.run(kinds()) == ["OpenAITransport", "TeacherClient", "TeacherClient", "OpenAITransport"]

    for conf, match in (
        ("protocol = http", r"\[conf\] protocol: 'http' is not one of oip, openai"),
        ("protocol = openai\nshared_memory = on", r"shared_memory = on"),
    ):
        path.write_text(sequence_config(["127.0.0.1:1"], 64, K, values_dtype="float32", conf=conf))
        with pytest.raises(ConfigError, match=match):
            load_config(path)
    path.write_text(
        sequence_config(["127.0.0.1:1"], 64, K, values_dtype="float32", conf="protocol = openai").replace(
            "fetch_vars = ['logits_topk_values', 'logits_topk_indices']", "fetch_vars = ['logits', 'ids']"
        )
    )
    with pytest.raises(ConfigError, match=r"protocol = openai: \[fetch\] var 'logits'"):
        load_config(path)


@contextlib.contextmanager
def fake_vllm_server(
    handler: Callable[[httpx.Request], httpx.Response], tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    """``handler`` (a :func:`fake_vllm`) behind a real HTTP server on loopback (HTTPS with ``tls``),
    for a reader's pipeline process; yields its ``host:port``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = f"http://{self.headers['Host']}{self.path}"
            response = handler(httpx.Request(self.command, url, headers=dict(self.headers), content=body))
            self.send_response(response.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_https_with_tls_ca_and_a_client_certificate(tmp_path: Path) -> None:
    """``tls_ca`` makes the connection HTTPS (the server verified with that CA), ``tls_cert``/
    ``tls_key`` present a client certificate, and the token goes as ``Authorization: Bearer``; a
    server whose certificate another CA signed is not trusted."""
    from security_support import make_pki

    pki = make_pki(tmp_path / "pki")
    seen: list[httpx.Request] = []
    fake = fake_vllm(seen=seen)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED  # mTLS: the reader must present a certificate of the CA
    with fake_vllm_server(fake, context) as endpoint:
        (tmp_path / "token").write_text("sekrit\n")
        tls = f"token_file = token\ntls_ca = {pki.ca}\ntls_cert = {pki.client_cert}\ntls_key = {pki.client_key}\n"
        transport = OpenAITransport(endpoint, load_config(openai_config(tmp_path, [endpoint], extra=tls)))
        assert asyncio.run(transport.check_metadata()) is True
        values, _ = asyncio.run(transport.infer(_batch([np.array([1, 2, 3])])))
        assert values.shape == (1, 3, K) and values[0, :, 0].all()
        assert seen and all(r.headers["authorization"] == "Bearer sekrit" for r in seen)

        other = f"tls_ca = {pki.other_ca}\ntls_cert = {pki.client_cert}\ntls_key = {pki.client_key}\n"
        untrusting = OpenAITransport(endpoint, load_config(openai_config(tmp_path, [endpoint], extra=other)))
        with pytest.raises(TransientTeacherError, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(untrusting.check_metadata())


def test_bench_finds_a_running_vllm_by_its_port_and_passes_over_one_without_port() -> None:
    """``DISTILL_BENCH_VLLM``'s server is found by its ``--port``; a vLLM-like process without one
    (vLLM's default port) is not it, and does not stop the search."""
    import subprocess
    import sys

    from distill_reader.bench.llm_openai import _vllm_session

    sleep = [sys.executable, "-c", "import time; time.sleep(60)", "vllm.entrypoints.openai.api_server"]
    without = subprocess.Popen(sleep, start_new_session=True)
    with_port = subprocess.Popen([*sleep, "--port", "1"], start_new_session=True)
    try:
        for process in (without, with_port):  # their command lines are theirs once they run Python
            wait_for(lambda p=process: b"api_server" in Path(f"/proc/{p.pid}/cmdline").read_bytes(), 30, "exec")
        assert _vllm_session("1") == with_port.pid
        assert _vllm_session("2") is None
    finally:
        for process in (without, with_port):
            process.kill()
            process.wait(10)


# -- a real vLLM ----------------------------------------------------------------------------------
#: vLLM's --max-logprobs in these tests; K = 32 asks for more
MAX_LOGPROBS = 16
API_KEY = "vllm-test-key"
MAX_LENGTH = 64


@dataclass
class Vllm:
    endpoint: str
    model: Path
    #: 96 token rows of 1-64 tokens of local text, and transformers' top-(K+1) of each position
    rows: list[np.ndarray]
    reference: list[tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vllm]:
    """One vLLM for the module (about 70-120 s to start on 2 cores), serving the tiny GPT-2 as
    ``tiny`` with ``--api-key``; transformers' reference is computed while it starts (loading
    transformers' model takes 15-60 s here). ``DISTILL_TEST_VLLM=host:port`` uses a running vLLM
    instead (started with these settings, e.g. while iterating on these tests)."""
    from external_support import missing_external_teacher
    from llm_support import reference_topk, require_llm, tiny_lm_dir, token_rows
    from vllm_support import start_vllm, vllm_python

    require_llm()
    python = vllm_python()
    if python is None:
        missing_external_teacher(
            "build/teachers/vllm-venv missing or broken: run scripts/external-teachers.sh", "vllm-venv"
        )
    model = tiny_lm_dir()
    server = None
    if os.environ.get("DISTILL_TEST_VLLM"):
        endpoint = os.environ["DISTILL_TEST_VLLM"]
    else:
        workdir = tmp_path_factory.mktemp("vllm")
        server = start_vllm(python, model, workdir, MODEL, max_logprobs=MAX_LOGPROBS, api_key=API_KEY)
        endpoint = server.endpoint
    try:
        rows = token_rows(model, 96, 1, MAX_LENGTH, seed=7)
        reference = reference_topk(model, rows, K + 1)
        if server is not None:
            server.wait_ready(300)
        yield Vllm(endpoint, model, rows, reference)
    finally:
        if server is not None:
            server.stop()


def vllm_reader(
    tmp_path: Path, servers: list[str], k: int = K, token: str | None = API_KEY, extra: str = "", **options
):
    if token is not None:
        (tmp_path / "token").write_text(token + "\n")
        extra += "token_file = token\n"
    conf = openai_config(tmp_path, servers, k, MAX_LENGTH, extra)
    return DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=60, **options)


def check_against_transformers(vllm: Vllm, batches: list[list[np.ndarray]]) -> None:
    """Every sample once, in order (sample ``i`` is row ``i % 96``); at every real position the
    top-K of transformers' log_softmax on the same directory (values within 1e-4; indices where
    the reference's values are not tied within 1e-5, the (K+1)-th included); 0 past each row's
    length."""
    rows, reference = vllm.rows, vllm.reference
    ids = np.concatenate([b[1][:, 0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    assert len(ids) >= len(rows)
    for tokens, id_, values, indices, lengths in batches:
        assert values.shape == indices.shape == (*tokens.shape, K)
        for r in range(len(tokens)):
            row = rows[int(id_[r, 0]) % len(rows)]
            n = len(row)
            assert lengths[r] == n
            np.testing.assert_array_equal(tokens[r, :n], row)
            want_values, want_indices = reference[int(id_[r, 0]) % len(rows)]
            np.testing.assert_allclose(values[r, :n], want_values[:, :K], atol=1e-4, rtol=0)
            gaps = np.abs(np.diff(want_values, axis=1)) > 1e-5  # [n, K]: rank j apart from rank j+1
            apart = gaps & np.concatenate([np.ones((n, 1), bool), gaps[:, : K - 1]], axis=1)
            np.testing.assert_array_equal(indices[r, :n][apart], want_indices[:, :K][apart])
            assert not values[r, n:].any() and not indices[r, n:].any()


def test_the_reader_over_vllm_matches_transformers(vllm: Vllm, tmp_path: Path) -> None:
    """DistillReader over a real vLLM: 96 rows of 1-64 tokens, grouped by length into d_batches of
    4; every position's top-8 is transformers' on the same model directory; stats count the
    requests."""
    endpoint = vllm.endpoint
    dr = vllm_reader(tmp_path, [endpoint])
    dr.set_sample_generator(lambda: ((row, np.array([i])) for i, row in enumerate(vllm.rows)))
    with dr:
        batches = list(dr.distill_reader()())
        stats = settled_stats(dr)
    check_against_transformers(vllm, batches)
    (teacher,) = stats.teachers
    assert teacher.endpoint == endpoint and teacher.healthy and teacher.quarantined is None
    assert teacher.requests >= 96 // 4 and teacher.failures == 0


def test_a_teacher_killed_mid_epoch(vllm: Vllm, tmp_path: Path) -> None:
    """Two teachers: vLLM and a relay to it that is SIGKILLed mid-epoch, while a request is in
    flight through it (its connections reset, as a killed server's do): its requests go to vLLM,
    every sample arrives once, in order, with transformers' top-k.

    The relay holds each piece of an answer half a second, so its requests stay in flight that
    long; two requests per teacher keep both busy (with many, vLLM's idle workers take all the
    work); and the consumer keeps taking batches (a consumer that stops lets the pool fill, and
    then nothing is in flight anywhere) and looks after each one. The epoch is long enough for the
    relay's slow metadata check to end well before it does."""
    from vllm_support import Relay

    endpoint = vllm.endpoint
    relay = Relay(endpoint, delay=0.5)
    samples = 10 * len(vllm.rows)
    try:
        dr = vllm_reader(tmp_path, [relay.endpoint, endpoint], max_in_flight=2)
        dr.set_sample_generator(lambda: ((vllm.rows[i % len(vllm.rows)], np.array([i])) for i in range(samples)))
        batches = []
        killed_after = None
        with dr:
            for batch in dr.distill_reader()():
                batches.append(batch)
                if relay.alive and any(
                    t.endpoint == relay.endpoint and t.in_flight for t in dr.stats(timeout=2).teachers
                ):
                    relay.kill()
                    killed_after = len(batches)
            stats = settled_stats(dr)
    finally:
        relay.kill()
    assert killed_after is not None and killed_after < len(batches), (
        f"the relay was to die mid-epoch with a request in flight; killed after batch {killed_after} of {len(batches)}"
    )
    check_against_transformers(vllm, batches)
    assert sum(len(b[0]) for b in batches) == samples
    by_endpoint = {t.endpoint: t for t in stats.teachers}
    assert by_endpoint[relay.endpoint].failures >= 1 and not by_endpoint[relay.endpoint].healthy
    assert by_endpoint[endpoint].healthy


@pytest.mark.parametrize(
    ("k", "token", "error", "message"),
    [
        (K, None, TeacherAuthError, r"refused the reader \(HTTP 401.*set \[conf\] token_file"),
        (K, "wrong", TeacherAuthError, r"refused the reader \(HTTP 401.*check \[conf\] token_file"),
        (2 * MAX_LOGPROBS, API_KEY, TeacherMismatchError, rf"max_logprobs.*--max-logprobs {2 * MAX_LOGPROBS}"),
    ],
    ids=["no-token", "wrong-token", "max-logprobs"],
)
def test_a_teacher_that_does_not_fit_is_quarantined(vllm: Vllm, tmp_path: Path, k, token, error, message) -> None:
    """The only teacher quarantined: the epoch fails at once with a message naming the setting."""
    endpoint = vllm.endpoint
    dr = vllm_reader(tmp_path, [endpoint], k, token)
    dr.set_sample_generator(lambda: ((np.arange(1, 9), np.array([i])) for i in range(4)))
    with dr, pytest.raises(error, match=message):
        list(dr.distill_reader()())


def test_wrong_model_name_is_quarantined(vllm: Vllm, tmp_path: Path) -> None:
    """A model name the server does not serve: the one teacher quarantined, naming model_name and
    what the server serves."""
    endpoint = vllm.endpoint
    (tmp_path / "token").write_text(API_KEY)
    conf = openai_config(tmp_path, [endpoint], K, MAX_LENGTH, "token_file = token\n").read_text()
    conf_path = tmp_path / "other.conf"
    conf_path.write_text(conf.replace(f"model_name = {MODEL}", "model_name = gpt-4"))
    dr = DistillReader(conf_path, 4, 4, capacity=2, occupied_capacity=1, teacher_timeout=60)
    dr.set_sample_generator(lambda: ((np.arange(1, 9), np.array([i])) for i in range(4)))
    with dr, pytest.raises(TeacherMismatchError, match=r"'gpt-4'.*serves \['tiny'\].*model_name"):
        list(dr.distill_reader()())


def test_discover_mode_uses_the_protocol_a_teacher_registered(vllm: Vllm, tmp_path: Path) -> None:
    """``distill teacher register --protocol openai`` puts vLLM in a discovery service; a student
    whose config says nothing of protocols (``oip`` by default) reaches it over the OpenAI API,
    with the registered model name, and gets transformers' top-k."""
    from distill_reader.discovery.server import running_discovery

    (tmp_path / "token").write_text(API_KEY)
    with running_discovery() as discovery:
        command = [sys.executable, "-m", "distill_reader", "teacher", "register", "--discovery", discovery]
        command += ["--service-name", "llm", "--endpoint", vllm.endpoint, "--model-name", MODEL]
        register = subprocess.Popen([*command, "--protocol", "openai"], stderr=subprocess.PIPE)
        try:
            text = sequence_config([], MAX_LENGTH, K, values_dtype="float32", conf="token_file = token\n")
            text = text.replace(
                "mode = fixed\nservers = []",
                f"mode = discover\nhost = {discovery}\nservice_name = llm\nrequire_num = 1",
            )
            conf = tmp_path / "discover.conf"
            conf.write_text(text)
            dr = DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=60)
            dr.set_sample_generator(lambda: ((row, np.array([i])) for i, row in enumerate(vllm.rows)))
            with dr:
                batches = list(dr.distill_reader()())
        finally:
            register.terminate()
            _, errors = register.communicate(timeout=10)
    check_against_transformers(vllm, batches)
    assert b"(openai) registered in 'llm'" in errors, errors


VLLM_BESIDE_OIP = """\
[conf]
mode = fixed
max_length = {max_length}
token_file = token

[teacher b]
servers = {b!r}
predict_feed_ids = [1]

[teacher llm]
servers = {llm!r}
protocol = openai
model_name = {model}

[feed]
feed_vars = ['tokens', 'label']
feed_types = ['int64', 'int64']
feed_shapes = [(-1,), (1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['b.prediction', 'llm.topk_values', 'llm.topk_indices']
fetch_types = ['float32', 'float32', 'int32']
fetch_shapes = [(3,), (-1, {k}), (-1, {k})]
"""


def test_an_oip_group_beside_a_vllm_group(vllm: Vllm, tmp_path: Path, teachers) -> None:
    """Teacher groups over two protocols: group ``b`` (OIP, two teacher processes, one SIGKILLed
    mid-epoch) takes the label, group ``llm`` (the real vLLM) the tokens: every sample once, in
    order, with ``label_rows`` of its label and transformers' top-k of its tokens."""
    from reader_models import label_rows

    b = [teachers.start("reader_models:slow_label") for _ in range(2)]
    (tmp_path / "token").write_text(API_KEY)
    conf = tmp_path / "groups.conf"
    conf.write_text(VLLM_BESIDE_OIP.format(max_length=MAX_LENGTH, b=b, llm=[vllm.endpoint], model=MODEL, k=K))
    dr = DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=60)
    dr.set_sample_generator(lambda: ((row, np.array([i])) for i, row in enumerate(vllm.rows)))
    batches = []
    with dr:
        for step, batch in enumerate(dr.distill_reader()()):
            batches.append(batch)
            if step == 1:
                teachers.kill(b[0])
        stats = settled_stats(dr)
    for _tokens, label, prediction, *_ in batches:
        np.testing.assert_array_equal(prediction, label_rows(label))
    check_against_transformers(
        vllm, [[tokens, label, values, indices, lengths] for tokens, label, _, values, indices, lengths in batches]
    )
    assert sum(t.rows for t in stats.groups["b"]) == sum(t.rows for t in stats.groups["llm"]) == len(vllm.rows)
