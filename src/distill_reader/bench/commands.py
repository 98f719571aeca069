"""``distill bench [SCENARIO…] [--quick] [--json FILE] [--plot FILE]``: run the scenarios, print one table."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from distill_reader.bench.harness import Progress, Row, Sizes, describe_machine

#: Where dbatch-scaling writes its plot unless --plot says otherwise: the current directory (never
#: docs/, which holds the committed figure; refresh that with --plot docs/benchmarks-dbatch.png).
DEFAULT_PLOT = Path("benchmarks-dbatch.png")


@dataclass(frozen=True)
class Scenario:
    """One scenario of ``distill bench``: what it measures and how long a full run of it takes."""

    summary: str
    #: seconds of a full (not --quick) run on the 2-core development machine (measured 2026-11-30,
    #: `distill bench` prints "NAME took N s"); for --help and the estimate of what is left.
    seconds: float


SCENARIOS: dict[str, Scenario] = {
    "teacher-bound": Scenario("delivered samples/s ÷ N simulated teachers' capacity", 75),
    "latency": Scenario("the same with 20 ms network latency per request", 75),
    "training-overhead": Scenario("steps/s with DistillReader ÷ with the plain reader", 20),
    "transport": Scenario("samples/s ÷ a bare async OIP client, zero-cost teacher", 25),
    "naive-loop": Scenario("speedup over one synchronous teacher call per batch", 40),
    "memory": Scenario("pool ÷ capacity × batch bytes; RSS growth over epochs", 35),
    "dbatch-scaling": Scenario("transport ratio for d_batch_size 1 … 256 (plot)", 190),
    "sequence": Scenario("real tokens/s ÷ 4 sequence teachers' capacity at zero padding; top-k costs", 40),
    # store: writes about 150 MB to the temporary directory (docs/store.md).
    "store": Scenario("knowledge store: write ÷ no store, read ÷ pyarrow on the same files, bytes/row", 90),
    # discovery: the default size (1,000 students / 100 teachers, memory store).
    "discovery": Scenario("simulated students/teachers vs a discovery server: full sets, pushes, leases", 75),
    # llm: needs the llm extra (torch, transformers); docs/llm.md.
    "llm": Scenario("hf: teacher's tokens/s ÷ the same model's plain transformers forward", 120),
    # llm-openai: starts vLLM (build/teachers/vllm-venv) for 1-3 minutes of it (docs/llm.md).
    "llm-openai": Scenario("tokens/s of the reader over vLLM ÷ a bare HTTP client, top-8 and top-128", 240),
}
SCENARIO_NAMES = (
    "teacher-bound",
    "latency",
    "training-overhead",
    "transport",
    "naive-loop",
    "memory",
    "dbatch-scaling",
    "sequence",
)
# Run only when named: store writes to disk, discovery simulates a thousand clients, llm needs the
# llm extra, llm-openai needs vLLM's own venv.
EXTRA_SCENARIOS = ("store", "discovery", "llm", "llm-openai")


def _functions() -> dict[str, Callable[..., list[Row]]]:
    # Imported when a run starts, so that `distill bench --help` stays fast.
    from distill_reader.bench import (
        discovery,
        llm,
        llm_openai,
        memory,
        naive,
        sequence,
        store,
        teacher_bound,
        training,
        transport,
    )

    return {
        "teacher-bound": teacher_bound.teacher_bound,
        "latency": teacher_bound.latency,
        "training-overhead": training.training_overhead,
        "transport": transport.transport,
        "naive-loop": naive.naive_loop,
        "memory": memory.memory,
        "dbatch-scaling": transport.dbatch_scaling,
        "sequence": sequence.sequence,
        "store": store.store,
        "discovery": discovery.discovery,
        "llm": llm.llm,
        "llm-openai": llm_openai.llm_openai,
    }


def about(seconds: float) -> str:
    """``about 40 s`` or ``about 3 min``."""
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def _help() -> str:
    """The command's --help text, with every scenario and its duration."""
    lines = "\n".join(
        f"  {name:<18} {about(s.seconds):<12} {s.summary}{' (only when named)' if name in EXTRA_SCENARIOS else ''}"
        for name, s in SCENARIOS.items()
    )
    total = sum(SCENARIOS[name].seconds for name in SCENARIO_NAMES)
    named_only = ", ".join(EXTRA_SCENARIOS[:-1]) + f" and {EXTRA_SCENARIOS[-1]}"
    return inspect.cleandoc(
        f"""Benchmarks: how close DistillReader runs to its limits, beside the alternatives.

        Every figure is a ratio of two rates measured in the same run. Scenarios (default: all but
        {named_only}, {about(total)} in all; durations of a full run on 2 cores, --quick
        takes about a minute for all):

        \b
        {{lines}}

        Progress goes to stderr, the table to stdout. dbatch-scaling writes its plot to
        ./{DEFAULT_PLOT} (or --plot FILE); the committed figure is refreshed with
        --plot docs/benchmarks-dbatch.png. See docs/benchmarks.md; store: docs/store.md;
        llm-openai (vLLM from build/teachers/vllm-venv): docs/llm-openai.md. Faults (teachers
        killed, hung or wrong, a link cut) are the tests' business: docs/fault-tolerance.md.
        """
    ).replace("{lines}", lines)  # after cleandoc: the table is indented less than the text


@contextlib.contextmanager
def _no_hyphen_breaks() -> Iterator[None]:
    """While help is formatted, click wraps lines at spaces only: not inside ``training-overhead``
    or ``docs/benchmarks-dbatch.png`` (textwrap breaks at hyphens and splits long words by default)."""
    try:
        from click import _textwrap

        original = _textwrap.TextWrapper
    except (ImportError, AttributeError):  # another click: its own wrapping, whatever it is
        yield
        return

    class Wrapper(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("break_on_hyphens", False)
            kwargs.setdefault("break_long_words", False)
            super().__init__(*args, **kwargs)

    _textwrap.TextWrapper = Wrapper  # type: ignore[misc]
    try:
        yield
    finally:
        _textwrap.TextWrapper = original  # type: ignore[misc]


class _HelpCommand(click.Command):
    """A command whose --help never breaks a scenario name, an option or a path at a hyphen."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with _no_hyphen_breaks():
            super().format_help(ctx, formatter)


def _discovery_options(
    students: str,
    teachers: str,
    stores: str,
    steady_s: float | None,
    servers: int = 1,
    keepalive: str = "stream",
    teachers_per_host: int = 1,
) -> dict:
    """The discovery scenario's options from the command line; a usage error names a bad one."""

    def numbers(value: str, option: str) -> list[int]:
        try:
            out = [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise click.UsageError(f"{option} must be comma-separated integers, got {value!r}") from None
        if any(n <= 0 for n in out):
            raise click.UsageError(f"{option} must be positive, got {value!r}")
        return out

    kinds = [k.strip() for k in stores.split(",") if k.strip()]
    if not kinds or any(k not in ("memory", "redis", "etcd") for k in kinds):
        raise click.UsageError(f"--discovery-store takes memory, redis and/or etcd, got {stores!r}")
    s, t = numbers(students, "--students"), numbers(teachers, "--teachers")
    if s and t and len(t) not in (1, len(s)):
        raise click.UsageError("--teachers needs one value, or one per --students value")
    if servers > 1 and "memory" in kinds:
        raise click.UsageError(
            "--servers above 1 needs a shared store: --discovery-store redis and/or etcd (memory is per server)"
        )
    return {
        "students": s,
        "teachers": t,
        "stores": kinds,
        "steady_s": steady_s,
        "servers": servers,
        "keepalive": keepalive,
        "teachers_per_host": teachers_per_host,
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:,.2f} MiB"
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def _target(row: Row) -> str:
    if row.target is None:
        return "—"
    return f"{'≤' if row.at_most else '≥'} {row.target:g}"


def _verdict(row: Row) -> str:
    return {None: "", True: "[green]pass[/]", False: "[red]miss[/]"}[row.passed]


def run_scenarios(
    names: list[str], sizes: Sizes, progress: Progress, plot: Path | None, discovery: dict | None = None
) -> dict[str, list[Row]]:
    """Run the named scenarios in order; the rows of each (``discovery``: that scenario's options)."""
    functions = _functions()
    results: dict[str, list[Row]] = {}
    for name in names:
        if name == "dbatch-scaling":
            results[name] = functions[name](sizes, progress, plot=plot)
        elif name == "discovery":
            results[name] = functions[name](sizes, progress, **(discovery or {}))
        else:
            results[name] = functions[name](sizes, progress)
    return results


def plot_path(plot_file: str | None, quick: bool) -> Path | None:
    """Where dbatch-scaling writes its plot: ``--plot FILE``, else ./benchmarks-dbatch.png in the
    current directory (even in a checkout: docs/ changes only when asked), none for --quick."""
    if plot_file:
        return Path(plot_file)
    return None if quick else Path.cwd() / DEFAULT_PLOT


def _check_prerequisites(names: list[str]) -> None:
    """A usage error, before anything runs, for a named scenario that cannot run here: llm without
    the llm extra, llm-openai without a vLLM to start (or one running, ``DISTILL_BENCH_VLLM``)."""
    import importlib.util

    if "llm" in names and not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        raise click.UsageError("llm needs torch and transformers: pip install -e '.[llm]' (make's .venv has them)")
    if "llm-openai" in names:
        from distill_reader.bench import llm_openai

        if not os.environ.get(llm_openai.SERVER_ENV) and llm_openai.vllm_python() is None:
            raise click.UsageError(
                f"llm-openai needs vLLM: run scripts/external-teachers.sh (it makes {llm_openai.VLLM_VENV}), "
                f"or set {llm_openai.PYTHON_ENV} to a python that has vllm, or {llm_openai.SERVER_ENV} to a "
                "running vLLM's host:port (docs/llm-openai.md)"
            )


class _ProgressReport:
    """Progress on stderr. On a terminal: a live line with the scenario, its current step, a bar over
    the whole run (scenarios weighted by their usual duration), the time elapsed and an estimate of
    what is left. Elsewhere (a log file, CI): one line per step with the seconds since the start."""

    def __init__(self, console: Any, names: list[str], quick: bool) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.names = names
        self.quick = quick  # --quick sizes: the full-run estimates do not apply
        self.started = time.monotonic()
        self.done_s = 0.0  # estimated seconds of the scenarios finished
        self.total_s = sum(SCENARIOS[name].seconds for name in names)
        self.current = ""
        self.current_started = self.started
        self.live = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]}"),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.task = self.live.add_task("starting", total=self.total_s, left="")

    def __enter__(self) -> _ProgressReport:
        self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.live.__exit__(*exc_info)

    def _left(self) -> str:
        if self.quick:
            return ""
        in_current = time.monotonic() - self.current_started
        left = max(
            self.total_s - self.done_s - in_current, SCENARIOS[self.current].seconds * 0.1 if self.current else 0
        )
        return f"{about(left)} left"

    def scenario(self, index: int, name: str) -> None:
        """Scenario ``index`` (from 0) starts."""
        self.current, self.current_started = name, time.monotonic()
        estimate = "" if self.quick else f" ({about(SCENARIOS[name].seconds)})"
        self.console.print(f"[bold][{index + 1}/{len(self.names)}] {name}[/]{estimate}")
        self.live.update(self.task, description=f"[{index + 1}/{len(self.names)}] {name}", left=self._left())

    def step(self, message: str) -> None:
        """A step inside the current scenario (the scenarios' ``progress`` callback)."""
        if self.live.disable:
            self.console.print(f"[dim]{time.monotonic() - self.started:6.0f} s[/]  {message}", highlight=False)
        index = self.names.index(self.current)
        self.live.update(self.task, description=f"[{index + 1}/{len(self.names)}] {message}", left=self._left())

    def finished(self, name: str) -> None:
        self.done_s += SCENARIOS[name].seconds
        self.live.update(self.task, completed=self.done_s)
        self.console.print(f"[dim]{name} took {time.monotonic() - self.current_started:.0f} s[/]")


@click.command("bench", cls=_HelpCommand, help=_help(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scenarios", nargs=-1, metavar="[SCENARIO]...", type=click.Choice(SCENARIO_NAMES + EXTRA_SCENARIOS))
@click.option("--quick", is_flag=True, help="Small sizes (the whole run takes about a minute): a smoke run.")
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the results, with the machine's description, to FILE as JSON.",
)
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help=f"Where dbatch-scaling writes its PNG (needs matplotlib). Default: ./{DEFAULT_PLOT} in the current "
    "directory, none with --quick. The committed figure: --plot docs/benchmarks-dbatch.png.",
)
@click.option(
    "--students",
    default="",
    metavar="N[,N…]",
    help="discovery: simulated students per run (default 1000; --quick 200), e.g. 1000,3000,10000.",
)
@click.option(
    "--teachers",
    default="",
    metavar="N[,N…]",
    help="discovery: simulated teachers, one per --students value or one for all (default 100; --quick 20).",
)
@click.option(
    "--discovery-store",
    "stores",
    default="memory",
    show_default=True,
    metavar="KIND[,KIND…]",
    help="discovery: memory, redis and/or etcd (Redis and etcd are started by the benchmark).",
)
# The discovery scenario's store kinds were `--store` until it was confused with the `store` scenario
# (issue 17); the old spelling is refused with the new one.
@click.option("--store", "old_store", default=None, hidden=True)
@click.option("--steady-s", default=None, type=float, help="discovery: steady-state window, s (default 30; --quick 5).")
@click.option(
    "--servers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="discovery: discovery servers sharing the store (redis or etcd); clients spread over them.",
)
@click.option(
    "--keepalive-rpc",
    "keepalive",
    type=click.Choice(["stream", "unary", "batch"]),
    default="stream",
    show_default=True,
    help="discovery: simulated teachers keep alive with a message each on a KeepAliveStream (as "
    "`distill teacher register` with one --endpoint does), with a KeepAlive call each (older teachers), or "
    "the teachers of one host in one KeepAliveBatch message (as `distill teacher register` with several "
    "--endpoint does).",
)
@click.option(
    "--teachers-per-host",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="discovery: simulated teachers on one host (what --keepalive-rpc batch keeps in one message).",
)
def bench(
    scenarios: tuple[str, ...],
    quick: bool,
    json_file: str | None,
    plot_file: str | None,
    students: str,
    teachers: str,
    stores: str,
    old_store: str | None,
    steady_s: float | None,
    servers: int,
    keepalive: str,
    teachers_per_host: int,
) -> None:
    from rich.console import Console
    from rich.table import Table

    if old_store is not None:
        raise click.UsageError(
            f"--store is now --discovery-store (the discovery scenario's store kinds): --discovery-store {old_store}; "
            "`distill bench store` is the knowledge-store scenario"
        )

    names = list(dict.fromkeys(scenarios)) or list(SCENARIO_NAMES)
    discovery_options = _discovery_options(students, teachers, stores, steady_s, servers, keepalive, teachers_per_host)
    _check_prerequisites(names)
    sizes = Sizes(quick=quick)
    plot = plot_path(plot_file, quick)
    if plot is not None and "dbatch-scaling" in names:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            click.echo(
                "matplotlib is not installed: the d_batch_size plot is skipped (pip install matplotlib)", err=True
            )
            plot = None
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=200)
    machine = describe_machine()
    console.print(
        f"distill bench{' --quick' if quick else ''}: {', '.join(names)} on {machine['cpus']} CPU(s) "
        f"({machine['cpu_model'] or 'unknown CPU'}), Python {machine['python']}"
    )
    started = time.time()
    results: dict[str, list[Row]] = {}
    with _ProgressReport(console, names, quick) as report:
        for index, name in enumerate(names):
            report.scenario(index, name)
            rows = run_scenarios([name], sizes, report.step, plot, discovery_options)[name]
            results[name] = rows
            for row in rows:
                console.print(
                    f"  {name}: {row.label}: {_fmt(row.measured, row.unit)} / "
                    f"{_fmt(row.limit, row.unit)} = {row.ratio:.3f} {_verdict(row)}"
                )
            report.finished(name)
    elapsed = time.time() - started

    table = Table(title=f"distill bench{' --quick' if quick else ''} ({machine['cpus']} CPUs, {elapsed:.0f} s)")
    for column in ("scenario", "figure", "measured", "limit / baseline", "ratio", "target", ""):
        table.add_column(column, justify="right" if column in ("measured", "limit / baseline", "ratio") else "left")
    for name, rows in results.items():
        for row in rows:
            table.add_row(
                name,
                row.label,
                _fmt(row.measured, row.unit),
                f"{_fmt(row.limit, row.unit)} ({row.limit_label})" if row.limit_label else _fmt(row.limit, row.unit),
                f"{row.ratio:.3f}",
                _target(row),
                _verdict(row),
            )
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    out.print(table)
    if json_file:
        data = {
            "quick": quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": elapsed,
            "machine": machine,
            "scenarios": {name: [row.to_json() for row in rows] for name, rows in results.items()},
        }
        Path(json_file).write_text(json.dumps(data, indent=2))
        console.print(f"results written to {json_file}")
