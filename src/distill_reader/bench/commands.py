"""``distill bench [SCENARIO…] [--quick] [--json FILE]``: run the scenarios, print one table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click

from distill_reader.bench.harness import Progress, Row, Sizes, describe_machine

DEFAULT_PLOT = Path("docs") / "benchmarks-dbatch.png"


def _scenarios() -> dict[str, tuple[str, Callable[..., list[Row]]]]:
    from distill_reader.bench import chaos, memory, naive, teacher_bound, training, transport

    return {
        "teacher-bound": ("delivered samples/s ÷ N simulated teachers' capacity", teacher_bound.teacher_bound),
        "latency": ("the same with 20 ms network latency per request", teacher_bound.latency),
        "training-overhead": ("steps/s with DistillReader ÷ with the plain reader", training.training_overhead),
        "transport": ("samples/s ÷ a bare async OIP client, zero-cost teacher", transport.transport),
        "naive-loop": ("speedup over one synchronous teacher call per batch", naive.naive_loop),
        "memory": ("pool ÷ capacity × batch bytes; RSS growth over epochs", memory.memory),
        "dbatch-scaling": ("transport ratio for d_batch_size 1 … 256 (plot)", transport.dbatch_scaling),
        "chaos": ("faults injected: samples lost/duplicated/wrong, seconds to recover", chaos.chaos_rows),
    }


SCENARIO_NAMES = (
    "teacher-bound",
    "latency",
    "training-overhead",
    "transport",
    "naive-loop",
    "memory",
    "dbatch-scaling",
)
# Run only when named (`distill bench chaos`): it kills processes and takes minutes.
EXTRA_SCENARIOS = ("chaos",)


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


def run_scenarios(names: list[str], sizes: Sizes, progress: Progress, plot: Path | None) -> dict[str, list[Row]]:
    """Run the named scenarios in order; the rows of each."""
    table = _scenarios()
    results: dict[str, list[Row]] = {}
    for name in names:
        function = table[name][1]
        if name == "dbatch-scaling":
            results[name] = function(sizes, progress, plot=plot)
        else:
            results[name] = function(sizes, progress)
    return results


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scenarios", nargs=-1, type=click.Choice(SCENARIO_NAMES + EXTRA_SCENARIOS))
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
    help=f"Where dbatch-scaling writes its PNG (needs matplotlib). Default: {DEFAULT_PLOT} when "
    "./docs exists and the run is not --quick.",
)
def bench(scenarios: tuple[str, ...], quick: bool, json_file: str | None, plot_file: str | None) -> None:
    """Benchmarks: how close DistillReader runs to its limits, beside the alternatives.

    Scenarios (default: all): teacher-bound, latency, training-overhead, transport, naive-loop,
    memory, dbatch-scaling. Every figure is a ratio of two rates measured in the same run.
    See docs/benchmarks.md. `distill bench chaos` (only when named) injects faults: teachers killed,
    hung or wrong, discovery/Redis/etcd restarted, a link cut; see docs/fault-tolerance.md.
    """
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(scenarios)) or list(SCENARIO_NAMES)
    sizes = Sizes(quick=quick)
    plot: Path | None = Path(plot_file) if plot_file else None
    if plot is None and not quick and DEFAULT_PLOT.parent.is_dir():
        plot = DEFAULT_PLOT
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
    with console.status("starting") as status:

        def progress(message: str) -> None:
            status.update(f"[bold]{message}")

        for name in names:
            t0 = time.monotonic()
            rows = run_scenarios([name], sizes, progress, plot)[name]
            results[name] = rows
            for row in rows:
                console.print(
                    f"  {name}: {row.label}: {_fmt(row.measured, row.unit)} / "
                    f"{_fmt(row.limit, row.unit)} = {row.ratio:.3f} {_verdict(row)}"
                )
            console.print(f"[dim]{name} took {time.monotonic() - t0:.0f} s[/]")
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
