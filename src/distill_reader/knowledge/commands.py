"""``distill store info PATH`` and ``distill store verify PATH``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from distill_reader.errors import StoreError
from distill_reader.knowledge.layout import (
    KEY,
    Packed,
    Rows,
    chunk_files,
    chunk_manifest,
    differences,
    output_specs,
    pairs_of,
    partial_files,
    precision_of,
    read_chunk,
    row_shape,
    schema_of,
)


@dataclass
class StoreSummary:
    """What ``distill store info`` shows."""

    path: str
    manifest: dict[str, Any]
    chunks: int = 0
    rows: int = 0  # rows in the chunks, a key recorded twice counted twice
    keys: int = 0  # distinct keys: the rows a reader can get
    bytes: int = 0  # the chunk files' sizes
    partial: list[str] = field(default_factory=list)  # unfinished chunks (killed or running writers)

    @property
    def bytes_per_row(self) -> float:
        return self.bytes / self.rows if self.rows else 0.0


def summarize(path: str | Path) -> StoreSummary:
    """Rows, keys and bytes of the store at ``path`` (its chunks memory-mapped: only keys are read)."""
    from distill_reader.knowledge.layout import read_manifest

    path = Path(path)
    summary = StoreSummary(str(path), read_manifest(path))
    keys = []
    for file in chunk_files(path):
        batch = read_chunk(file)
        summary.chunks += 1
        summary.rows += batch.num_rows
        summary.bytes += file.stat().st_size
        keys.append(batch.column(KEY).to_numpy())
    summary.keys = len(np.unique(np.concatenate(keys))) if keys else 0
    summary.partial = [p.name for p in partial_files(path)]
    return summary


def verify(path: str | Path) -> tuple[StoreSummary, list[str]]:
    """Read every chunk of the store back in full and check it; the problems found (empty: none)."""
    path = Path(path)
    summary = summarize(path)
    manifest = summary.manifest
    fetches = output_specs(manifest)
    schema = schema_of(manifest)
    problems = []
    for file in chunk_files(path):
        where = f"{file.name}"
        try:
            batch = read_chunk(file, memory_map=False)
            batch.validate(full=True)
        except (StoreError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        found = differences(chunk_manifest(batch) or {}, manifest)
        if found:
            problems.append(f"{where}: written with another config than the manifest: {'; '.join(found)}")
            continue
        if not batch.schema.equals(schema):
            problems.append(f"{where}: its columns are not those of the manifest: {batch.schema} != {schema}")
            continue
        if any(batch.column(i).null_count for i in range(batch.num_columns)):
            problems.append(f"{where}: null values")
            continue
        rows = Rows.from_arrow(batch, fetches, pairs=pairs_of(manifest))
        for spec, output in zip(fetches, rows.outputs):
            if isinstance(output, Packed):
                problems.extend(
                    f"{where}: {problem}" for problem in _check_packed(spec.name, output, rows.lengths, spec)
                )
                continue
            if output is None or isinstance(output, np.ndarray):
                continue
            _, offsets = output
            assert rows.lengths is not None
            if (rows.lengths < 0).any():
                problems.append(f"{where}: negative lengths")
                break
            sizes = np.array([int(np.prod(row_shape(spec, int(n)))) for n in rows.lengths])
            if not np.array_equal(np.diff(offsets), sizes):
                problems.append(f"{where}: output {spec.name!r}: rows whose size does not match their length")
    return summary, problems


def _check_packed(name: str, packed: Packed, lengths: np.ndarray | None, spec) -> list[str]:
    """Decode every row of a compact top-k pair: problems found (empty: none)."""
    for start in range(0, len(packed.positions), 1024):
        rows = np.arange(start, min(start + 1024, len(packed.positions)))
        try:
            packed.decode(rows)
        except (ValueError, IndexError) as exc:
            return [f"output {name!r}: compact rows {start}-{rows[-1]} do not decode: {exc}"]
    return []


def _print_summary(summary: StoreSummary) -> None:
    manifest = summary.manifest

    def vars_text(kind: str) -> str:
        return ", ".join(f"{v['name']} {v['dtype']} {tuple(v['shape'])}" for v in manifest[kind])

    click.echo(f"store:          {summary.path}")
    click.echo(f"rows:           {summary.keys:,} ({summary.rows:,} recorded, in {summary.chunks} chunk(s))")
    click.echo(f"bytes:          {summary.bytes:,} ({summary.bytes_per_row:,.1f} per row)")
    click.echo(f"key:            {manifest['key']}")
    click.echo(
        f"precision:      {precision_of(manifest)}"
        + (f" (top-k pairs in codec {manifest.get('codec')})" if precision_of(manifest) != "exact" else "")
    )
    click.echo(f"teacher model:  {manifest['teacher_model']}")
    click.echo(f"teacher inputs: {vars_text('inputs')}")
    click.echo(f"outputs:        {vars_text('outputs')}")
    if summary.partial:
        click.echo(
            f"unfinished:     {len(summary.partial)} chunk(s) a writer is writing or was killed writing (ignored)"
        )


@click.group("store", context_settings={"help_option_names": ["-h", "--help"]})
def store() -> None:
    """Knowledge stores: teacher outputs captured by a reader with a [store] section (docs/store.md)."""


@store.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(path: str, as_json: bool) -> None:
    """Rows, bytes, bytes per row, the config and teacher the store at PATH was captured with."""
    try:
        summary = summarize(path)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({**asdict(summary), "bytes_per_row": summary.bytes_per_row}, indent=2))
    else:
        _print_summary(summary)


@store.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def verify_command(path: str) -> None:
    """Read every row of the store at PATH back and check it against the manifest; exit 1 on a problem."""
    try:
        summary, problems = verify(path)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {path}")
    click.echo(
        f"ok: {summary.keys:,} rows ({summary.rows:,} recorded) in {summary.chunks} chunk(s) read back, "
        "fingerprints, lengths and manifest checked"
        + (f"; {len(summary.partial)} unfinished chunk(s) ignored" if summary.partial else "")
    )
