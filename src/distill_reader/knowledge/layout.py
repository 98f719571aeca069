"""The knowledge store on disk: its manifest, its chunk files, and rows to and from Arrow.

A store is a directory::

    manifest.json                      the config it was captured with (inputs, outputs, key, teacher)
    chunks/<sequence>-<host>-<pid>-<random>-<n>.arrow   Arrow IPC files, one record batch each, never changed
    chunks/.<name>.tmp                 a chunk being written (renamed to its name when complete)

Each chunk holds rows of: ``_key`` (int64: the row's position in the epoch, or its ``key_var``
value), ``_fingerprint`` (16 bytes: a hash of the row's teacher inputs, :func:`fingerprint_rows`),
``_length`` (int32, only when a fetch var has a variable dimension: the row's length) and one column per fetch var: a
fixed shape as ``fixed_size_list<T>[prod(shape)]`` (a scalar as ``T``), a variable one without
padding, as ``list<fixed_size_list<T>[prod(rest)]>`` for ``(-1, *rest)`` (``list<T>`` for ``(-1,)``)
and as ``list<T>`` of the row's flattened values for other variable shapes. Every field carries
its per-row ``shape`` in its metadata and every chunk the manifest in its schema's.

Writers never touch each other's files: each writes chunks under a name of its own and renames
each one into place only once it is complete (and synced), so a capture killed at any moment
leaves whole chunks and at most a ``.tmp`` file that readers ignore. When a key is in several
chunks, the newest chunk wins: names sort by a sequence number that no clock moves
(:class:`ChunkNamer`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from distill_reader.config import ReaderConfig
from distill_reader.errors import StoreError
from distill_reader.oip import TensorSpec

FORMAT = "distill-reader knowledge store"
VERSION = 1
#: The version of a store with ``precision = compact`` (its top-k pairs are one compact column each:
#: a version that does not know them refuses the store instead of misreading it).
COMPACT_VERSION = 2
TOPK_VALUES, TOPK_INDICES = "topk_values", "topk_indices"
MANIFEST = "manifest.json"
CHUNKS = "chunks"
KEY, FINGERPRINT, LENGTH = "_key", "_fingerprint", "_length"
FINGERPRINT_BYTES = 16
_SCHEMA_KEY = b"distill_reader.manifest"

log = logging.getLogger("distill_reader.knowledge")


# -- the manifest ---------------------------------------------------------------------------------


def _describe(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype.name, "shape": list(spec.shape)}


def manifest_of(config: ReaderConfig, precision: str | None = None) -> dict[str, Any]:
    """What identifies the rows a store may give this config: inputs, outputs, key, teacher model
    (and, for ``precision`` compact, which defaults to the config's, the precision and codec)."""
    store = config.store
    assert store is not None
    precision = precision or store.precision
    manifest = {
        "format": FORMAT,
        "version": VERSION if precision == "exact" else COMPACT_VERSION,
        "key": f"var {store.key_var}" if store.key_var else "position",
        # with teacher groups, each group's model (its outputs are named after the group)
        "teacher_model": {g.name: g.model_name for g in config.groups} if config.groups else config.model_name,
        "inputs": [_describe(spec) for spec in config.predict_feeds],
        "outputs": [_describe(spec) for spec in config.fetches],
    }
    if precision != "exact":
        from distill_reader.knowledge.compact import CODEC

        manifest["precision"] = precision
        manifest["codec"] = CODEC
    return manifest


def precision_of(manifest: dict[str, Any]) -> str:
    """``exact`` or ``compact``: how a store keeps its top-k knowledge (stores of version 1: exact)."""
    return str(manifest.get("precision", "exact"))


def compact_pairs(fetches: Sequence[TensorSpec]) -> dict[int, int]:
    """The top-k pairs among ``fetches`` that a compact store keeps compact: ``{values var: indices
    var}`` (indices into ``fetches``), for each ``X_topk_values`` (floating point) whose
    ``X_topk_indices`` (integer) has the same shape, fixed last dimension K."""
    by_name = {spec.name: j for j, spec in enumerate(fetches)}
    pairs = {}
    for j, spec in enumerate(fetches):
        if not spec.name.endswith(TOPK_VALUES) or spec.dtype.kind != "f":
            continue
        i = by_name.get(spec.name[: -len(TOPK_VALUES)] + TOPK_INDICES)
        if i is None:
            continue
        other = fetches[i]
        if other.dtype.kind in "iu" and other.shape == spec.shape and spec.shape and spec.shape[-1] > 0:
            pairs[j] = i
    return pairs


def compact_column(spec: TensorSpec) -> str:
    """The column of a compact pair: ``X_topk`` for ``X_topk_values``."""
    return spec.name[: -len("_values")]


def store_manifest(config: ReaderConfig) -> dict[str, Any]:
    """The manifest this config reads and writes its store with: the config's precision, except
    that ``policy = read`` reads a store in the precision it was captured with."""
    store = config.store
    assert store is not None
    if store.policy == "read":
        try:
            stored = read_manifest(store.path)
        except StoreError:
            stored = None  # no store: prepare_knowledge_store says so
        if stored is not None and precision_of(stored) != store.precision:
            return manifest_of(config, precision_of(stored))
    return manifest_of(config)


def _var_text(var: dict[str, Any]) -> str:
    return f"{var['dtype']} {tuple(var['shape'])}"


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between a store's manifest and a config's, one phrase each (empty: they agree)."""
    found = []
    for field in ("format", "version", "key", "teacher_model", "precision", "codec"):
        if stored.get(field) != wanted.get(field):
            found.append(f"{field} {stored.get(field)!r} in the store, {wanted.get(field)!r} in this config")
    for field in ("inputs", "outputs"):
        have = {v["name"]: v for v in stored.get(field, [])}
        want = {v["name"]: v for v in wanted[field]}
        for name in want.keys() - have.keys():
            found.append(f"{field[:-1]} {name!r} is not in the store")
        for name in have.keys() - want.keys():
            found.append(f"{field[:-1]} {name!r} is in the store but not in this config")
        for name in want.keys() & have.keys():
            if _var_text(have[name]) != _var_text(want[name]):
                stored_text, wanted_text = _var_text(have[name]), _var_text(want[name])
                found.append(f"{field[:-1]} {name!r} is {stored_text} in the store, {wanted_text} in this config")
        if not found and [v["name"] for v in stored.get(field, [])] != [v["name"] for v in wanted[field]]:
            found.append(f"{field} are in another order in the store")
    return sorted(found)


def _manifest_file(path: Path) -> dict[str, Any] | None:
    """The manifest file of the store at ``path``; None when it is empty or not JSON (cut off by
    a crash of a version that did not sync it); StoreError if there is none or it is not ours."""
    try:
        text = (path / MANIFEST).read_text()
    except FileNotFoundError:
        raise StoreError(f"no knowledge store at {str(path)!r} (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{str(path / MANIFEST)!r}: unreadable manifest: {exc}") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{str(path / MANIFEST)!r} is not the manifest of a {FORMAT}")
    return manifest


def _manifest_of_chunks(path: Path) -> dict[str, Any] | None:
    """The manifest the store's newest readable chunk was written with (each chunk carries it)."""
    for file in reversed(chunk_files(path)):
        try:
            manifest = chunk_manifest(read_chunk(file))
        except (StoreError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
            return manifest
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at ``path``; StoreError if there is none or it is unreadable.

    A manifest file that is empty or cut off (what a power loss left of it before it was synced
    when created) is read from the chunks instead, each of which carries it, with a WARNING."""
    manifest = _manifest_file(path)
    if manifest is not None:
        return manifest
    manifest = _manifest_of_chunks(path)
    if manifest is None:
        raise StoreError(
            f"{str(path / MANIFEST)!r}: unreadable manifest (empty or cut off, as a crash while the store "
            "was created leaves it) and no chunk to recover it from: the store holds no rows; remove it"
        )
    log.warning(
        "%s is empty or cut off (a crash while the store was created); using the manifest its chunks were "
        "written with (a reader with policy write or cache rewrites the file)",
        path / MANIFEST,
    )
    return manifest


def prepare_knowledge_store(config: ReaderConfig) -> None:
    """Check (``read``) or create (``write``, ``cache``) the store of ``config``'s ``[store]``.

    Raises StoreError when there is no store to read, or when the store was captured with another
    config (naming each difference)."""
    store = config.store
    assert store is not None
    wanted = store_manifest(config)
    if precision_of(wanted) == "compact" and not compact_pairs(config.fetches):
        raise StoreError(
            "[store] precision = compact keeps top-k knowledge compact: it needs a pair of fetch vars "
            "X_topk_values (floating point) and X_topk_indices (integer) of the same shape, (..., K); "
            f"the fetch vars are {', '.join(spec.name for spec in config.fetches)} (use precision = exact)"
        )
    if precision_of(wanted) == "compact":
        from distill_reader.knowledge.compact import MAX_K

        too_big = [config.fetches[j].name for j in compact_pairs(config.fetches) if config.fetches[j].shape[-1] > MAX_K]
        if too_big:
            raise StoreError(
                f"[store] precision = compact keeps top-k knowledge of K <= {MAX_K}; {', '.join(too_big)} has "
                f"K = {max(config.fetches[j].shape[-1] for j in compact_pairs(config.fetches))} (use precision = exact)"
            )
    if store.policy != "read":
        try:
            created = not store.path.exists()
            (store.path / CHUNKS).mkdir(parents=True, exist_ok=True)
            if created:
                _sync_folder(store.path.parent)
            if not (store.path / MANIFEST).exists():
                _create_manifest(store.path, wanted)
            elif _damaged_manifest(store.path):
                _replace_manifest(store.path, _manifest_of_chunks(store.path) or wanted)
        except OSError as exc:
            raise StoreError(f"[store] path: cannot create the knowledge store {str(store.path)!r}: {exc}") from None
    try:
        stored = read_manifest(store.path)
    except StoreError as exc:
        hint = "; policy = read needs a store captured with policy write or cache" if store.policy == "read" else ""
        raise StoreError(f"[store] path: {exc}{hint}") from None
    if precision_of(stored) != precision_of(wanted):
        raise StoreError(
            f"[store] precision: the knowledge store {str(store.path)!r} holds {precision_of(stored)} top-k "
            f"knowledge; this config writes {precision_of(wanted)} (policy = {store.policy}): set precision = "
            f"{precision_of(stored)}, or use another path"
        )
    found = differences(stored, wanted)
    if found:
        raise StoreError(
            f"[store] path: the knowledge store {str(store.path)!r} was captured with another config: "
            + "; ".join(found)
            + " (use another path for this config)"
        )


def _damaged_manifest(path: Path) -> bool:
    try:
        return _manifest_file(path) is None
    except StoreError:
        return False  # missing or not ours: read_manifest says so


def _sync_folder(folder: Path) -> None:
    """Make the names created in ``folder`` durable (not possible on every file system)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_synced(file: Path, text: str) -> None:
    with open(file, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _create_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically and durably: its contents synced before its name appears, the
    name synced after. The first of several concurrent writers wins, the others compare theirs
    with it."""
    tmp = path / f".{MANIFEST}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        _write_synced(tmp, json.dumps(manifest, indent=2) + "\n")
        os.link(tmp, path / MANIFEST)  # fails if another writer was first: never replaces it
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _sync_folder(path)


def _replace_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace an empty or cut-off manifest file (synced, then renamed over it)."""
    log.warning("%s is empty or cut off (a crash while the store was created); rewriting it", path / MANIFEST)
    tmp = path / f".{MANIFEST}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        _write_synced(tmp, json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path / MANIFEST)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _sync_folder(path)


# -- chunks ---------------------------------------------------------------------------------------


def chunk_files(path: Path) -> list[Path]:
    """The store's complete chunks, oldest first."""
    folder = path / CHUNKS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".arrow" and not p.name.startswith("."))


def partial_files(path: Path) -> list[Path]:
    """Chunks a writer had not finished (it was killed, or is still writing them)."""
    folder = path / CHUNKS
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


_SEQUENCE = re.compile(r"(\d{20})-")


def chunk_sequence(name: str) -> int | None:
    """The sequence number at the start of a chunk's name (None: not a name of ours)."""
    match = _SEQUENCE.match(name)
    return int(match.group(1)) if match else None


def newest_sequence(path: Path) -> int:
    """The largest sequence number among the store's complete chunks (0: none)."""
    try:
        names = os.listdir(path / CHUNKS)
    except OSError:
        return 0
    found = (chunk_sequence(name) for name in names if name.endswith(".arrow") and not name.startswith("."))
    return max((n for n in found if n is not None), default=0)


class ChunkNamer:
    """Names of one writer's chunks, ``<sequence>-<writer>-<n>.arrow``: unique across hosts and
    processes (the writer: host, process, random), and sorted oldest first by a counter that no
    clock moves. Each name's sequence is one more than the largest in the store's folder, and
    than this writer's previous one: a chunk sorts after every chunk that was complete when it
    was named (and that the folder listed), whatever the clocks of the hosts say. Two writers that
    name a chunk at once may get the same sequence: the writer, then ``n``, decide (the same order
    for every reader). Chunks named by earlier versions (by wall-clock time, ``time_ns``) read as
    sequences too: the first chunk named here comes after all of them."""

    def __init__(self, path: Path) -> None:
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:40] or "host"
        self._path = path
        self._tag = f"{host}-{os.getpid()}-{secrets.token_hex(3)}"
        self._count = 0
        self._sequence = 0

    def next(self) -> str:
        self._count += 1
        self._sequence = max(self._sequence, newest_sequence(self._path)) + 1
        return f"{self._sequence:020d}-{self._tag}-{self._count:06d}.arrow"


def write_chunk(path: Path, name: str, batch: pa.RecordBatch) -> Path:
    """Write ``batch`` as the chunk ``name`` of the store: into a temporary file, synced, then renamed."""
    folder = path / CHUNKS
    final = folder / name
    tmp = folder / f".{name}.tmp"
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.rename(tmp, final)
        _sync_folder(folder)  # the rename itself, durable
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return final


def map_chunk(file: Path) -> tuple[pa.RecordBatch, int]:
    """A chunk's rows, memory-mapped (the bytes are read when used; no file stays open), and the
    address of the file's first byte in memory."""
    try:
        with open(file, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        buffer = pa.py_buffer(mapped)
        return _one_batch(pa.ipc.open_file(pa.BufferReader(buffer))), buffer.address
    except (OSError, ValueError, pa.ArrowException, IndexError) as exc:
        raise StoreError(f"{str(file)!r}: unreadable chunk of the knowledge store: {exc}") from None


def read_chunk(file: Path, memory_map: bool = True) -> pa.RecordBatch:
    """A chunk's rows (memory-mapped by default, else read into memory)."""
    if memory_map:
        return map_chunk(file)[0]
    try:
        with pa.OSFile(str(file), "rb") as source:
            return _one_batch(pa.ipc.open_file(source))
    except (OSError, pa.ArrowException, IndexError) as exc:
        raise StoreError(f"{str(file)!r}: unreadable chunk of the knowledge store: {exc}") from None


def _one_batch(reader: pa.ipc.RecordBatchFileReader) -> pa.RecordBatch:
    if reader.num_record_batches == 1:
        return reader.get_batch(0)
    return reader.read_all().combine_chunks().to_batches()[0]  # not written by us: copies


# -- rows -----------------------------------------------------------------------------------------


def _arrow_type(spec: TensorSpec) -> pa.DataType:
    item = pa.from_numpy_dtype(spec.dtype)
    if not spec.variable:
        return item if spec.shape == () else pa.list_(item, int(np.prod(spec.shape)))
    rest = spec.shape[1:]
    if spec.shape[0] == -1 and -1 not in rest:
        return pa.list_(item if rest == () else pa.list_(item, int(np.prod(rest))))
    return pa.list_(item)


def pairs_of(manifest: dict[str, Any]) -> dict[int, int]:
    """The fetch vars a store keeps compact, as :func:`compact_pairs` (none in an exact store)."""
    return compact_pairs(output_specs(manifest)) if precision_of(manifest) == "compact" else {}


def schema_of(manifest: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of a store's chunks. In a compact store, each top-k pair is one ``binary``
    column ``X_topk`` (a row's positions encoded by :mod:`distill_reader.knowledge.compact`) where
    ``X_topk_values`` would be, with the pair, the per-row shape and the codec in its metadata."""
    fetches = output_specs(manifest)
    pairs = pairs_of(manifest)
    paired = set(pairs.values())
    fields = [pa.field(KEY, pa.int64()), pa.field(FINGERPRINT, pa.binary(FINGERPRINT_BYTES))]
    if any(spec.variable for spec in fetches):
        fields.append(pa.field(LENGTH, pa.int32()))
    for j, spec in enumerate(fetches):
        if j in paired:
            continue
        shape = json.dumps(list(spec.shape))
        if j in pairs:
            metadata = {
                "shape": shape,
                "precision": "compact",
                "codec": str(manifest.get("codec")),
                "vars": json.dumps([spec.name, fetches[pairs[j]].name]),
                "dtypes": json.dumps([spec.dtype.name, fetches[pairs[j]].dtype.name]),
            }
            fields.append(pa.field(compact_column(spec), pa.binary(), metadata=metadata))
            continue
        fields.append(pa.field(spec.name, _arrow_type(spec), metadata={"shape": shape}))
    return pa.schema(fields, metadata={_SCHEMA_KEY: json.dumps(manifest).encode()})


def chunk_manifest(batch: pa.RecordBatch) -> dict[str, Any] | None:
    """The manifest a chunk was written with (its schema's metadata)."""
    raw = (batch.schema.metadata or {}).get(_SCHEMA_KEY)
    return json.loads(raw) if raw else None


def row_shape(spec: TensorSpec, length: int) -> tuple[int, ...]:
    return tuple(length if d == -1 else d for d in spec.shape)


def positions_of(spec: TensorSpec, lengths: np.ndarray | None, n: int) -> np.ndarray:
    """The top-k positions (all dims but the last) of each of ``n`` rows of ``spec``."""
    if not spec.variable:
        return np.full(n, int(np.prod(spec.shape[:-1])), np.int64)
    assert lengths is not None
    return np.array([int(np.prod(row_shape(spec, int(m))[:-1])) for m in lengths.tolist()], np.int64)


@dataclass
class Packed:
    """A compact top-k pair's rows (:mod:`distill_reader.knowledge.compact`): row ``r`` is the
    bytes ``flat[offsets[r]:offsets[r + 1]]``; ``positions[r]`` its positions."""

    flat: np.ndarray  # uint8
    offsets: np.ndarray  # int64 [n + 1]
    positions: np.ndarray  # int64 [n]
    k: int

    def decode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values float32 ``[P, k]`` and ids int64 ``[P, k]`` of ``rows``' positions, row after row."""
        from distill_reader.knowledge.compact import decode_rows

        return decode_rows(self.flat, self.offsets, rows, self.positions[rows], self.k)


@dataclass
class Rows:
    """Stored rows in memory (recorded, not yet committed) or mapped from a chunk file.

    ``outputs[j]`` is, for a fixed-shape fetch var, an array ``[n, *shape]``; for a variable one, a
    pair ``(flat, offsets)``: every row's values flattened one after the other (1-D) and ``n + 1``
    offsets into them."""

    keys: np.ndarray  # int64 [n]
    fingerprints: np.ndarray  # uint8 [n, 16]
    lengths: np.ndarray | None  # [n] the rows' lengths, when a fetch var is variable
    outputs: list[Any]
    #: the chunk file of mapped rows, and where each output's (flat) values start in it: they are
    #: read with ``preadv`` straight into the pool, faster here than copying from the mapping
    file: Path | None = None
    file_offsets: tuple[int | None, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concatenate(parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        outputs: list[Any] = []
        for j, first in enumerate(parts[0].outputs):
            if first is None:  # the indices of a compact pair: in its values' Packed
                outputs.append(None)
                continue
            if isinstance(first, Packed):
                packed = [p.outputs[j] for p in parts]
                starts = np.cumsum([0] + [len(q.flat) for q in packed[:-1]])
                offsets = np.concatenate([[0]] + [q.offsets[1:] + start for q, start in zip(packed, starts)])
                outputs.append(
                    Packed(
                        np.concatenate([q.flat for q in packed]),
                        offsets.astype(np.int64),
                        np.concatenate([q.positions for q in packed]),
                        first.k,
                    )
                )
                continue
            if isinstance(first, np.ndarray):
                outputs.append(np.concatenate([p.outputs[j] for p in parts]))
                continue
            flats = [p.outputs[j][0] for p in parts]
            starts = np.cumsum([0] + [len(f) for f in flats[:-1]])
            offsets = np.concatenate([[0]] + [p.outputs[j][1][1:] + start for p, start in zip(parts, starts)]).astype(
                np.int64
            )
            outputs.append((np.concatenate(flats), offsets))
        lengths = None if parts[0].lengths is None else np.concatenate([p.lengths for p in parts])
        return Rows(
            np.concatenate([p.keys for p in parts]),
            np.concatenate([p.fingerprints for p in parts]),
            lengths,
            outputs,
        )

    def to_arrow(self, fetches: Sequence[TensorSpec], schema: pa.Schema) -> pa.RecordBatch:
        columns: list[pa.Array] = [
            pa.array(self.keys, pa.int64()),
            pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(FINGERPRINT_BYTES), len(self), [None, pa.py_buffer(np.ascontiguousarray(self.fingerprints))]
            ),
        ]
        if self.lengths is not None:
            columns.append(pa.array(self.lengths.astype(np.int32)))
        for spec, output in zip(fetches, self.outputs):
            if output is None:
                continue
            if isinstance(output, Packed):
                buffers = [None, pa.py_buffer(output.offsets.astype(np.int32)), pa.py_buffer(output.flat)]
                columns.append(pa.BinaryArray.from_buffers(pa.binary(), len(self), buffers))
                continue
            kind = _arrow_type(spec)
            if isinstance(output, np.ndarray):
                flat = pa.array(output.reshape(-1))
                columns.append(flat if spec.shape == () else pa.FixedSizeListArray.from_arrays(flat, kind.list_size))
                continue
            flat, offsets = output
            values: pa.Array = pa.array(flat)
            inner = kind.value_type
            if pa.types.is_fixed_size_list(inner):
                values = pa.FixedSizeListArray.from_arrays(values, inner.list_size)
                offsets = offsets // inner.list_size
            columns.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values))
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    @staticmethod
    def from_arrow(
        batch: pa.RecordBatch,
        fetches: Sequence[TensorSpec],
        mapped: tuple[Path, int] | None = None,
        pairs: dict[int, int] | None = None,
    ) -> Rows:
        """Numpy views of a chunk's columns (no copy); ``mapped``: the chunk file and the address
        where :func:`map_chunk` mapped it; ``pairs``: the compact top-k pairs (:func:`pairs_of`)."""
        n = batch.num_rows
        fingerprints = np.frombuffer(batch.column(FINGERPRINT).buffers()[1], np.uint8)[: n * FINGERPRINT_BYTES]
        lengths = batch.column(LENGTH).to_numpy() if LENGTH in batch.schema.names else None
        outputs: list[Any] = []
        pairs = pairs or {}
        paired = set(pairs.values())
        for j, spec in enumerate(fetches):
            if j in paired:
                outputs.append(None)
                continue
            if j in pairs:
                column = batch.column(compact_column(spec))
                offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset : column.offset + n + 1]
                data = column.buffers()[2]
                flat = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
                outputs.append(Packed(flat, offsets.astype(np.int64), positions_of(spec, lengths, n), spec.shape[-1]))
                continue
            column = batch.column(spec.name)
            if not spec.variable:
                values = column if spec.shape == () else column.values
                outputs.append(values.to_numpy(zero_copy_only=False).reshape(n, *spec.shape))
                continue
            offsets = column.offsets.to_numpy().astype(np.int64)
            values = column.values
            if pa.types.is_fixed_size_list(values.type):
                offsets = offsets * values.type.list_size
                values = values.values
            outputs.append((values.to_numpy(zero_copy_only=False), offsets))
        rows = Rows(batch.column(KEY).to_numpy(), fingerprints.reshape(n, FINGERPRINT_BYTES), lengths, outputs)
        if mapped is not None:
            file, base = mapped
            size = file.stat().st_size
            rows.file = file
            offsets_in_file: list[int | None] = []
            for output in outputs:
                if output is None or isinstance(output, Packed):  # decoded from the mapping, not read
                    offsets_in_file.append(None)
                    continue
                flat = output if isinstance(output, np.ndarray) else output[0]
                inside = base <= flat.ctypes.data and flat.ctypes.data + flat.nbytes <= base + size
                offsets_in_file.append(flat.ctypes.data - base if inside else None)
            rows.file_offsets = tuple(offsets_in_file)
        return rows

    def compacted(self, fetches: Sequence[TensorSpec], pairs: dict[int, int]) -> Rows:
        """These rows with each top-k pair of ``pairs`` (exact) encoded as one :class:`Packed`."""
        if not pairs:
            return self
        from distill_reader.knowledge.compact import encode_rows

        outputs = list(self.outputs)
        n = len(self)
        for j, i in pairs.items():
            spec = fetches[j]
            k = spec.shape[-1]
            values, indices = outputs[j], outputs[i]
            if isinstance(values, Packed):
                continue
            if isinstance(values, np.ndarray):
                v, x = values.reshape(-1, k), indices.reshape(-1, k)
            else:
                v, x = values[0].reshape(-1, k), indices[0].reshape(-1, k)
            positions = positions_of(spec, self.lengths, n)
            flat, offsets = encode_rows(v, x, positions)
            outputs[j], outputs[i] = Packed(flat, offsets, positions, k), None
        return Rows(self.keys, self.fingerprints, self.lengths, outputs)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


_coefficients: dict[tuple[int, int, bool], np.ndarray] = {}


def _coefficients_of(var: int, words: int, last_only: bool = False) -> np.ndarray:
    """The odd multipliers of predict var ``var``'s first ``words`` 8-byte words, one row per lane:
    ``splitmix64(var << 40 | lane << 32 | word) | 1`` (``last_only``: of word ``words - 1`` only)."""
    cached = _coefficients.get((var, words, last_only))
    if cached is None:
        index = np.arange(words - 1 if last_only else 0, words, dtype=np.uint64)
        lanes = [(np.uint64(var) << np.uint64(40)) | (np.uint64(lane) << np.uint64(32)) | index for lane in range(2)]
        cached = _splitmix64(np.stack(lanes)) | np.uint64(1)
        _coefficients[(var, words, last_only)] = cached
    return cached


def _words(block: np.ndarray) -> np.ndarray:
    """Rows of ``block`` as little-endian uint64 words ``[n, words]`` (each row's bytes, zero-padded
    to a multiple of 8)."""
    data = np.ascontiguousarray(block).view(np.uint8).reshape(len(block), -1)
    if data.shape[1] % 8:
        data = np.pad(data, ((0, 0), (0, 8 - data.shape[1] % 8)))
    return data.view("<u8")


def _is_run(rows: np.ndarray) -> bool:
    """Whether ``rows`` are ``k, k + 1, ..., k + n - 1`` in this order (and not empty)."""
    n = len(rows)
    return bool(n) and rows[-1] - rows[0] == n - 1 and (n < 3 or bool((np.diff(rows) == 1).all()))


def fingerprint_rows(
    inputs: Sequence[tuple[np.ndarray, np.ndarray | None, TensorSpec]], rows: np.ndarray
) -> np.ndarray:
    """A 128-bit fingerprint of each row's teacher inputs: uint8 ``[len(rows), 16]``.

    ``inputs`` is ``(pool array, lengths, spec)`` per predict var (``lengths`` None for a fixed
    shape). Two 64-bit lanes of a multilinear hash, each finalized with SplitMix64: lane ``j`` is
    ``sum(word[i] * c[var, j, i]) + length * c[var, j, 2**32 - 1]`` over the 8-byte words of every var's row
    (mod 2**64, coefficients from :func:`_coefficients_of`). Vectorized over the rows (about 2 GB/s
    here, against 0.2 GB/s for BLAKE2b row by row): the bytes of a variable row past its length are
    0 in the pool (they add nothing), and its length counts. Not cryptographic: it tells a changed
    sample from the recorded one, it does not resist someone crafting a collision."""
    n = len(rows)
    lanes = np.zeros((n, 2), np.uint64)
    # a run of rows in order (the usual case) is a view, not a copy; rows of a d_batch grouped by
    # length (``[0, 2, 1, 3]``) span a run too, out of order: each row's own fingerprint, in order
    picked: Any = slice(int(rows[0]), int(rows[0]) + n) if _is_run(rows) else rows
    with np.errstate(over="ignore"):
        for var, (array, lengths, spec) in enumerate(inputs):
            block = array[picked]
            if lengths is not None:
                row_lengths = lengths[picked].astype(np.uint64)
                if spec.shape[0] == -1 and -1 not in spec.shape[1:]:
                    block = block[:, : int(row_lengths.max(initial=0))]  # the rest is 0 in every row
                # the length's multipliers: word index 2**32 - 1, which no row reaches
                lanes += row_lengths[:, None] * _coefficients_of(var, 1 << 32, last_only=True).T
            words = _words(block)
            # both lanes in one pass, without a temporary of products (einsum: 2.5x faster here)
            lanes += np.einsum("ij,kj->ik", words, _coefficients_of(var, words.shape[1]))
    return _splitmix64(lanes).astype("<u8").view(np.uint8).reshape(n, FINGERPRINT_BYTES)


def output_specs(manifest: dict[str, Any]) -> tuple[TensorSpec, ...]:
    """The fetch vars a store holds, from its manifest."""
    return tuple(TensorSpec(v["name"], np.dtype(v["dtype"]), tuple(v["shape"])) for v in manifest["outputs"])
