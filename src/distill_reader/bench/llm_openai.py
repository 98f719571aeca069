"""``distill bench llm-openai``: DistillReader over a real vLLM (``[conf] protocol = openai``)
against a bare asyncio HTTP client of the same server, in one run, at K = 8 and K = 128.

The server: vLLM's CPU build from ``build/teachers/vllm-venv`` (``scripts/external-teachers.sh``;
``DISTILL_VLLM_PYTHON`` names another python), started here with ``--max-logprobs 128``, serving
the model directory in ``DISTILL_BENCH_LLM_MODEL`` or a GPT-2 of random weights built here
(vocabulary 16,000, 2 layers of 128, no tokenizer: vLLM runs with ``--skip-tokenizer-init`` and
answers token ids only). ``DISTILL_BENCH_VLLM=host:port`` uses a running vLLM instead (its model
served as ``bench``, ``--max-logprobs`` at least 128; its CPU is measured when it runs on this
host). ``DISTILL_BENCH_ROUNDS``: rounds of each client (default 3).

The work: rows of 8-64 random tokens (uniform), d_batches of 16 rows, 4 requests in flight, each
request the d_batch's rows as token-id prompts with ``max_tokens`` 1, ``prompt_logprobs`` K,
``logprobs`` K:

- **bare client**: 4 asyncio tasks in this process, each posting one d_batch at a time with httpx
  and decoding the JSON answer (``json.loads``), nothing else: the server's own rate with the
  least a client must do;
- **reader**: a DistillReader (``batch_size`` 64, ``d_batch_size`` 16, ``max_in_flight`` 4) whose
  training loop only takes the batches: the answers parsed into ``[rows, L, K]`` top-k arrays,
  sorted, checked and written into the pool, batches yielded in order.

Each is measured in alternating rounds (the best round of each kept: other jobs on the machine
slow some) over the real tokens delivered. Also reported: CPU seconds per token of the reader (its
pipeline process and its training loop), of the bare client, and of vLLM's processes, from
``/proc`` over the same windows: what bounds the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from distill_reader.bench.harness import Progress, Row, Sizes
from distill_reader.bench.llm import build_random_gpt2

KS = (8, 128)
MIN_LENGTH, MAX_LENGTH = 8, 64
D_BATCH = 16
BATCH_SIZE = 64
IN_FLIGHT = 4
TARGET = 0.9
MODEL_NAME = "bench"
MODEL_ENV, PYTHON_ENV, SERVER_ENV = "DISTILL_BENCH_LLM_MODEL", "DISTILL_VLLM_PYTHON", "DISTILL_BENCH_VLLM"
ROUNDS_ENV = "DISTILL_BENCH_ROUNDS"
REPO = Path(__file__).resolve().parents[3]
VLLM_VENV = REPO / "build" / "teachers" / "vllm-venv"
_TICK = os.sysconf("SC_CLK_TCK")
CpuClock = Callable[[], float]


# -- vLLM -----------------------------------------------------------------------------------------
def vllm_python() -> Path | None:
    """``DISTILL_VLLM_PYTHON``, or ``build/teachers/vllm-venv``'s python when it has vllm."""
    python = Path(os.environ.get(PYTHON_ENV) or VLLM_VENV / "bin" / "python")
    if not python.exists():
        return None
    found = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return python if subprocess.run([python, "-c", found], capture_output=True, timeout=60).returncode == 0 else None


def vllm_command(
    python: Path, model: Path, port: int, name: str, *, max_logprobs: int, max_model_len: int = 256, extra=()
) -> list[str]:
    """vLLM's OpenAI server for ``model`` as ``name`` on ``127.0.0.1:port``, float32, eager (no
    compilation at start-up: it halves the start on 2 cores). ``vllm`` as a command fails on the
    CPU build (it looks up a distribution named vllm): the module runs it."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", str(model), "--served-model-name", name),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", str(max_model_len), "--dtype", "float32", "--max-logprobs", str(max_logprobs)),
        "--enforce-eager",
        *("--uvicorn-log-level", "warning"),
        *extra,
    ]


def vllm_env() -> dict[str, str]:
    """vLLM's CPU settings: 1 GiB of KV cache, no usage reports, nothing from the hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.pop("OMP_NUM_THREADS", None)  # vLLM binds its own OpenMP threads
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    return env


def wait_healthy(endpoint: str, process: subprocess.Popen | None, timeout: float, log: Path | None = None) -> float:
    """Wait for ``GET /health`` to answer 200; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"vLLM exited with code {process.returncode}:\n{tail}")
        health = f"http://{endpoint}/health"
        with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(health, timeout=2) as answer:
            if answer.status == 200:
                return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"vLLM on {endpoint} not healthy after {timeout:g} s")


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    pids.append(int(entry))
    return pids


def _vllm_session(port: str) -> int | None:
    """The session id of a vLLM OpenAI server on this host started with ``--port port`` (its CPU is
    then measured too), or None."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # ValueError: no --port (vLLM's default)
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    args = fh.read().split(b"\0")
                if b"vllm.entrypoints.openai.api_server" in args and args[args.index(b"--port") + 1] == port.encode():
                    return os.getsid(int(entry))
    return None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (those still alive)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


@contextlib.contextmanager
def running_vllm(model: Path, max_logprobs: int, progress: Progress) -> Iterator[tuple[str, list[int]]]:
    """``(endpoint, the session id of its processes or [])``: ``DISTILL_BENCH_VLLM``, or a vLLM
    started here (in a session of its own, stopped on exit)."""
    if os.environ.get(SERVER_ENV):
        endpoint = os.environ[SERVER_ENV]
        session = _vllm_session(endpoint.rpartition(":")[2])
        yield endpoint, [session] if session is not None else []
        return
    from distill_reader.teacher.local import free_port

    python = vllm_python()
    if python is None:
        raise RuntimeError(f"no vLLM: run scripts/external-teachers.sh (it makes {VLLM_VENV}) or set {PYTHON_ENV}")
    port = free_port()
    extra = () if (model / "tokenizer.json").exists() else ("--skip-tokenizer-init",)
    with tempfile.NamedTemporaryFile(prefix="distill-bench-vllm-", suffix=".log", delete=False) as log_file:
        log = Path(log_file.name)
        process = subprocess.Popen(
            vllm_command(python, model, port, MODEL_NAME, max_logprobs=max_logprobs, extra=extra),
            env=vllm_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"127.0.0.1:{port}"
    try:
        progress(f"llm-openai: starting vLLM on {endpoint} (1-3 minutes on 2 cores; log {log})")
        seconds = wait_healthy(endpoint, process, 600, log)
        progress(f"llm-openai: vLLM healthy after {seconds:.0f} s")
        yield endpoint, [process.pid]
    finally:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in session_pids(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while session_pids(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not session_pids(process.pid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        with contextlib.suppress(OSError):
            log.unlink()


def _vocab(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


# -- the work -------------------------------------------------------------------------------------
def _rows(vocab: int, seed: int) -> Iterator[np.ndarray]:
    """Endless rows of MIN_LENGTH-MAX_LENGTH random tokens (fresh ones: nothing served from a cache)."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.integers(0, vocab, int(rng.integers(MIN_LENGTH, MAX_LENGTH + 1)), dtype=np.int64)


Measured = tuple[float, float, float, float]  # tokens/s, seconds, client CPU s, server CPU s


def bare_client(endpoint: str, k: int, vocab: int, sizes: Sizes, seed: int, server_cpu: CpuClock) -> Measured:
    """Real tokens/s of IN_FLIGHT asyncio tasks posting d_batches and decoding the JSON; the window's
    seconds, this process's and the server's CPU seconds in it."""
    import httpx

    rows = _rows(vocab, seed)
    head = {"model": MODEL_NAME, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k, "logprobs": k}
    head["return_tokens_as_token_ids"] = True

    async def run() -> Measured:
        loop = asyncio.get_running_loop()
        start = loop.time()
        window: dict[str, float] = {}
        tokens = 0
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=f"http://{endpoint}", timeout=120, limits=limits) as client:

            async def worker() -> None:
                nonlocal tokens
                while True:
                    now = loop.time()
                    if "t0" not in window and now - start >= sizes.warmup_s:
                        window.update(t0=now, cpu0=time.process_time(), server0=server_cpu())
                        tokens = 0
                    if "t0" in window and now - window["t0"] >= sizes.measure_s:
                        return
                    prompts = [next(rows).tolist() for _ in range(D_BATCH)]
                    answer = await client.post("/v1/completions", json={**head, "prompt": prompts})
                    answer.raise_for_status()
                    json.loads(answer.content)
                    if "t0" in window:
                        tokens += sum(map(len, prompts))
                        window.update(t1=loop.time(), cpu1=time.process_time(), server1=server_cpu())

            await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        seconds = window["t1"] - window["t0"]
        return tokens / seconds, seconds, window["cpu1"] - window["cpu0"], window["server1"] - window["server0"]

    return asyncio.run(run())


def reader_run(
    endpoint: str, k: int, vocab: int, sizes: Sizes, seed: int, server_cpu: CpuClock, *, group_by_length: bool = True
) -> Measured:
    """Real tokens/s a DistillReader's training loop receives; the window's seconds, the CPU seconds
    of the reader's processes (training loop and pipeline process) and of the server in it."""
    from distill_reader import DistillReader
    from distill_reader.bench.sequence import sequence_config

    rows = _rows(vocab, seed)
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as directory:
        conf = Path(directory) / "openai.conf"
        extra = f"protocol = openai\nmodel_name = {MODEL_NAME}\n"
        conf.write_text(sequence_config([endpoint], MAX_LENGTH, k, values_dtype="float32", conf=extra))
        reader = DistillReader(
            conf,
            BATCH_SIZE,
            D_BATCH,
            capacity=8,
            occupied_capacity=1,
            max_in_flight=IN_FLIGHT,
            request_timeout=120,
            group_by_length=group_by_length,
        )
        reader.set_sample_generator(lambda: ((row, np.array([i])) for i, row in enumerate(rows)))
        try:
            epoch = reader.distill_reader()()
            pids: list[int] = []
            try:
                start = now = time.perf_counter()
                t0: float | None = None
                cpu0 = server0 = 0.0
                tokens = 0
                for batch in epoch:
                    now = time.perf_counter()
                    if t0 is None:
                        if now - start >= sizes.warmup_s:
                            pids = [_pipeline_pid(reader)]
                            t0, cpu0, server0 = now, time.process_time() + cpu_seconds(pids), server_cpu()
                        continue
                    tokens += int(batch[-1].sum())  # the batch's tokens_length
                    if now - t0 >= sizes.measure_s:
                        break
                cpu = time.process_time() + cpu_seconds(pids) - cpu0
                server = server_cpu() - server0
            finally:
                epoch.close()
        finally:
            reader.close()
    assert t0 is not None
    return tokens / (now - t0), now - t0, cpu, server


def _pipeline_pid(reader) -> int:
    """The pid of a running reader's pipeline process (where the answers are parsed)."""
    process = getattr(reader._holder.pipeline, "_process", None)
    if process is None:
        raise RuntimeError("the reader's pipeline process is not running")
    return process.pid


def warm_up(endpoint: str, k: int, vocab: int) -> None:
    """A few requests of every size class first: vLLM's first batches of new shapes are slow."""
    import httpx

    rows = _rows(vocab, seed=1)
    head = {"model": MODEL_NAME, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k, "logprobs": k}
    with httpx.Client(base_url=f"http://{endpoint}", timeout=300) as client:
        for _ in range(3):
            client.post("/v1/completions", json={**head, "prompt": [next(rows).tolist() for _ in range(D_BATCH)]})


def llm_openai(sizes: Sizes, progress: Progress) -> list[Row]:
    """The reader's tokens/s over vLLM ÷ a bare client's, at K = 8 and 128; CPU per token of each."""
    with contextlib.ExitStack() as stack:
        if os.environ.get(MODEL_ENV):
            model = Path(os.environ[MODEL_ENV])
        else:
            progress("llm-openai: building a GPT-2 of random weights (vocabulary 16,000)")
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-bench-llm-")))
            model = build_random_gpt2(scratch, vocab=16000, layers=2, width=128, positions=256)
        vocab = _vocab(model)
        endpoint, server = stack.enter_context(running_vllm(model, max(KS), progress))
        server_pids = session_pids(server[0]) if server else []  # vLLM's processes, started by now

        def server_cpu() -> float:
            return cpu_seconds(server_pids)

        rows: list[Row] = []
        rounds = 1 if sizes.quick else int(os.environ.get(ROUNDS_ENV, "3"))
        for k in KS:
            progress(f"llm-openai: K = {k}, warming up")
            warm_up(endpoint, k, vocab)
            results: dict[str, list[Measured]] = {"bare": [], "reader": []}
            for round_ in range(rounds):
                for name, run in (("bare", bare_client), ("reader", reader_run)):
                    progress(f"llm-openai: K = {k}, {name}, round {round_ + 1} of {rounds}")
                    seed = 1000 * k + 10 * round_ + len(name)
                    results[name].append(run(endpoint, k, vocab, sizes, seed, server_cpu))
            bare, reader = max(results["bare"]), max(results["reader"])
            fields = ("tokens_per_s", "seconds", "client_cpu_s", "server_cpu_s")
            details = {
                "model": str(model) if os.environ.get(MODEL_ENV) else "random GPT-2, vocabulary 16,000, 2 x 128",
                "vocab": vocab,
                "k": k,
                "lengths": [MIN_LENGTH, MAX_LENGTH],
                "d_batch_size": D_BATCH,
                "in_flight": IN_FLIGHT,
                "rounds": {name: [dict(zip(fields, r)) for r in rs] for name, rs in results.items()},
            }
            rows.append(
                Row(
                    "llm-openai",
                    f"reader over vLLM, top-{k}, real tokens/s",
                    reader[0],
                    bare[0],
                    "tokens/s",
                    reader[0] / bare[0],
                    TARGET,
                    limit_label="bare asyncio HTTP client of the same vLLM",
                    details=details,
                )
            )
            wall = 1e6 / bare[0]  # µs per token of the bare client
            for label, (rate, seconds, cpu, server_s) in (("reader", reader), ("bare client", bare)):
                tokens = rate * seconds
                for what, used in ((label, cpu), (f"vLLM (with the {label})", server_s)):
                    if what.startswith("vLLM") and not server:
                        continue
                    per_token = used / tokens * 1e6
                    rows.append(
                        Row(
                            "llm-openai",
                            f"{what} CPU per token, top-{k}",
                            per_token,
                            wall,
                            "µs",
                            per_token / wall,
                            limit_label="wall time per token of the bare client",
                        )
                    )
        return rows


if __name__ == "__main__":  # pragma: no cover
    for row in llm_openai(Sizes(quick="--quick" in sys.argv), lambda message: print(message, flush=True)):
        print(json.dumps(row.to_json()))
