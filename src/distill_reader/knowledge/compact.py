"""Compact top-k knowledge (``[store] precision = compact``): a position's top-k log-probs and
token ids in about 2 bytes per entry, each decoded distribution within :data:`KL_BOUND` nats of the
teacher's (both renormalized over the top-k).

A position's K pairs ``(log-prob, id)`` are kept **sorted by id** (the ids are then an increasing
sequence that Elias-Fano codes in about ``2 + log2(V / K)`` bits each) with each log-prob
quantized independently:

- **values**: ``x = max - log-prob`` (>= 0, nats below the position's largest) as an unsigned
  ``w``-bit code ``round(x / step)``, saturated at ``2**w - 1``. ``w`` (3-8, or 16) and ``step``
  are chosen per position: the fewest bits whose decoded distribution is within :data:`KL_TARGET`
  of the teacher's, computed exactly at encoding (forward KL, teacher || decoded, both renormalized
  over the K). With ``w = 8`` and ``step <= 0.08`` every error is within ``step / 2`` and
  Hoeffding's lemma bounds the KL by ``step**2 / 8 = 8e-4`` for any distribution (entries more
  than 20.4 nats below the largest, clamped there, add at most ``K * exp(-20.4)``); ``w = 16`` is
  kept for what still does not fit (none seen). The log of the top-k's total probability mass
  (``mass``, float32) is stored too: decoded log-probs are ``mass + log_softmax(-x)``, so the
  mass the top-k keeps (what ``topk_kl_loss``'s ``tail="bucket"`` needs) is the teacher's.
- **ids**: Elias-Fano with ``l = floor(log2((max id + 1) / K))`` low bits per id, and the high parts
  in unary: bit ``(id_j >> l) + j`` set for the j-th id.

Decoding gives each position's pairs in rank order: by value descending, equal (quantized) values
by ascending id, the teacher's own rule for ties. The id *sets* are exact; where two values of the
teacher's differ by less than the quantization step they may become equal and change places.

A row of ``L`` positions is one byte string (an Arrow ``binary`` value)::

    mass    float32[L]   log of the top-k's probability mass
    step    float16[L]   nats per value code
    form    uint8[L]     28 * (index of w in 1, 2, ..., 8, 16) + l (l: Elias-Fano low bits per id, <= 27)
    high    uint8[L]     bytes of the Elias-Fano high bits (K <= 512 keeps them below 256)
    payload, position after position:
      values: w // 8 byte planes of K bytes, then (w % 8)-bit codes packed 8 per (w % 8) bytes
      low:    the ids' low l bits, packed the same way
      high:   the Elias-Fano high bits (little-endian bit order)

Everything is vectorized over positions (numpy): :func:`encode_rows` in the store's writer thread,
:func:`decode_rows` when stored rows are read into the pool.
"""

from __future__ import annotations

import numpy as np

#: Version of the byte layout above, recorded in the store's manifest.
CODEC = "topk-ef-q1"
#: The promise: KL(teacher || decoded) per position, both renormalized over the top-k, in nats.
KL_BOUND = 1e-3
#: What the encoder aims at when it picks a position's bits (below the bound: float rounding).
KL_TARGET = 9.5e-4
#: Bytes of a position's header.
HEADER_BYTES = 8
#: The largest K a compact store keeps (a position's high bits then fit the header's byte).
MAX_K = 512
#: The bits a value code may have (their index is kept in a position's ``form``).
_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
_LOW_LIMIT = 28
#: (bits, span in nats covered by the codes) tried in this order, fewest bytes first; ``None``: the
#: position's whole range. The last two always meet the target (module doc).
CANDIDATES: tuple[tuple[int, float | None], ...] = (
    (3, None),
    (4, None),
    (5, None),
    (6, None),
    (7, None),
    (8, None),
    (8, 20.0),
    (16, 40.0),
)


def values_bytes(w: int | np.ndarray, k: int) -> np.ndarray | int:
    """Bytes of ``k`` codes of ``w`` bits: ``w // 8`` planes of ``k`` bytes, then the rest packed."""
    return (w // 8) * k + ((k + 7) // 8) * (w % 8)


# -- bit packing ----------------------------------------------------------------------------------


def _pack(codes: np.ndarray, w: int) -> np.ndarray:
    """``codes`` uint ``[n, k]`` (each < 2**w) as bytes ``[n, values_bytes(w, k)]``."""
    n, k = codes.shape
    parts = []
    codes = codes.astype(np.uint64)
    for plane in range(w // 8):
        parts.append(((codes >> np.uint64(8 * plane)) & np.uint64(0xFF)).astype(np.uint8))
    r = w % 8
    if r:
        groups = (k + 7) // 8
        rest = np.zeros((n, groups * 8), np.uint64)
        rest[:, :k] = (codes >> np.uint64(8 * (w // 8))) & np.uint64((1 << r) - 1)
        shifts = (np.arange(8, dtype=np.uint64) * np.uint64(r))[None, None, :]
        words = np.bitwise_or.reduce(rest.reshape(n, groups, 8) << shifts, axis=2).astype("<u8")
        parts.append(words.view(np.uint8).reshape(n, groups, 8)[:, :, :r].reshape(n, groups * r))
    if not parts:
        return np.zeros((n, 0), np.uint8)
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _unpack(data: np.ndarray, w: int, k: int) -> np.ndarray:
    """The inverse of :func:`_pack`: bytes ``[n, values_bytes(w, k)]`` to codes ``[n, k]`` (uint32)."""
    n = len(data)
    out = np.zeros((n, k), np.uint32)
    planes = w // 8
    for plane in range(planes):
        out |= data[:, plane * k : (plane + 1) * k].astype(np.uint32) << np.uint32(8 * plane)
    r = w % 8
    if r:
        groups = (k + 7) // 8
        rest = np.zeros((n, groups, 8), np.uint8)
        rest[:, :, :r] = data[:, planes * k : planes * k + groups * r].reshape(n, groups, r)
        words = rest.view("<u8").reshape(n, groups, 1)
        shifts = np.arange(8, dtype=np.uint64) * np.uint64(r)
        codes = ((words >> shifts) & np.uint64((1 << r) - 1)).reshape(n, groups * 8)[:, :k]
        out |= codes.astype(np.uint32) << np.uint32(8 * planes)
    return out


# -- encoding -------------------------------------------------------------------------------------


def _kl(p: np.ndarray, px: np.ndarray, log_z: np.ndarray, codes: np.ndarray, step: np.ndarray) -> np.ndarray:
    """KL(p || q) per row: ``p ∝ exp(-x)`` the teacher renormalized (``px`` = sum(p x), ``log_z`` =
    log sum exp(-x)), ``q ∝ exp(-codes * step)``: sum(p (xq - x)) + log sum exp(-xq) - log_z."""
    xq = codes * step[:, None]
    pxq = np.einsum("ij,ij->i", p, xq)
    np.negative(xq, out=xq)
    np.exp(xq, out=xq)
    return pxq - px + np.log(xq.sum(axis=1)) - log_z


def _quantize(x: np.ndarray, w: int, span: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``[n, k]`` (float64, integral) and the step of each row (float64, a float16 value) for
    ``w`` bits over ``span`` nats."""
    top = (1 << w) - 1
    step = np.maximum(np.maximum(span, 1e-6) / top, 6e-8).astype(np.float16).astype(np.float64)
    codes = x / step[:, None]
    np.rint(codes, out=codes)
    np.minimum(codes, top, out=codes)
    return codes, step


def encode_positions(values: np.ndarray, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Encode ``n`` positions: ``(header fields, payload bytes of all positions, payload sizes)``.

    ``values`` ``[n, k]`` top-k log-probs (any order, any float dtype), ``indices`` ``[n, k]`` their
    token ids (non-negative, distinct within a position)."""
    values = np.asarray(values)
    indices = np.asarray(indices)
    n, k = values.shape
    if n == 0:
        empty = np.zeros(0, np.uint8)
        fields = {
            "mass": np.zeros(0, np.float32),
            "step": np.zeros(0, np.float16),
            "form": empty,
            "high": empty,
        }
        return fields, empty, np.zeros(0, np.int64)
    order = np.argsort(indices, axis=1)
    ids = np.take_along_axis(indices, order, axis=1).astype(np.int64)
    if (ids[:, 0] < 0).any():
        raise ValueError("compact top-k: negative token ids")
    v = np.take_along_axis(values, order, axis=1).astype(np.float64)
    v = np.where(np.isnan(v), -np.inf, v)
    vmax = v.max(axis=1, keepdims=True)
    vmax = np.where(np.isfinite(vmax), vmax, 0.0)
    x = np.minimum(vmax - v, 1e4)  # -inf (no probability): far below
    e = np.exp(-x)
    total = e.sum(axis=1)
    p = e / total[:, None]
    log_z = np.log(total)
    px = np.einsum("ij,ij->i", p, x)
    mass = (vmax[:, 0] + log_z).astype(np.float32)
    span = x.max(axis=1)

    bits = np.zeros(n, np.uint8)
    step = np.zeros(n, np.float16)
    codes = np.zeros((n, k), np.uint32)
    todo = np.arange(n)
    for w, cap in CANDIDATES:
        if not len(todo):
            break
        xs = x[todo]
        s = span[todo] if cap is None else np.minimum(span[todo], cap)
        c, st = _quantize(xs, w, s)
        ok = _kl(p[todo], px[todo], log_z[todo], c, st) <= KL_TARGET if w < 16 else np.ones(len(todo), bool)
        chosen = todo[ok]
        bits[chosen], step[chosen], codes[chosen] = w, st[ok], c[ok]
        todo = todo[~ok]

    # Elias-Fano of the ids
    biggest = ids[:, -1]
    low = np.floor(np.log2(np.maximum((biggest + 1) / k, 1.0))).astype(np.int64)
    low = np.minimum(low, _LOW_LIMIT - 1)
    # the float log2 may be off by one near powers of two: correct it exactly
    low = np.where((low > 0) & ((biggest + 1) < (k << low)), low - 1, low)
    high = ids >> low[:, None]
    high_bits = high[:, -1] + k  # bit positions 0 .. high[-1] + k - 1
    high_bytes = (high_bits + 7) // 8
    vbytes = values_bytes(bits.astype(np.int64), k)
    lbytes = values_bytes(low, k)
    size = vbytes + lbytes + high_bytes
    if k > MAX_K or (high_bytes > 255).any():
        raise ValueError(f"compact top-k keeps K <= {MAX_K}, not {k}")
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(size, out=starts[1:])
    payload = np.zeros(int(starts[-1]), np.uint8)
    # values, grouped by bits
    for w in np.unique(bits).tolist():
        rows = np.flatnonzero(bits == w)
        packed = _pack(codes[rows], w)
        payload[starts[rows][:, None] + np.arange(packed.shape[1])] = packed
    # low bits, grouped by width
    for width in np.unique(low).tolist():
        rows = np.flatnonzero(low == width)
        if width == 0:
            continue
        packed = _pack(ids[rows] & ((1 << width) - 1), width)
        payload[(starts[rows] + vbytes[rows])[:, None] + np.arange(packed.shape[1])] = packed
    # high bits: bit (high_j + j) of the position's high section
    where = high + np.arange(k)[None, :]  # distinct and increasing within a position
    most = int(high_bytes.max())
    bitmap = np.zeros((n, most * 8), np.uint8)
    bitmap[np.arange(n)[:, None], where] = 1
    packed = np.packbits(bitmap, axis=1, bitorder="little")
    section = starts[:-1] + vbytes + lbytes
    inside = np.arange(most)[None, :] < high_bytes[:, None]
    payload[(section[:, None] + np.arange(most))[inside]] = packed[inside]
    form = np.searchsorted(np.array(_BITS), bits) * _LOW_LIMIT + low
    fields = {"mass": mass, "step": step, "form": form.astype(np.uint8), "high": high_bytes.astype(np.uint8)}
    return fields, payload, size


def encode_rows(values: np.ndarray, indices: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of positions (``values``/``indices`` ``[P, k]``: every row's positions one after the
    other, ``positions[r]`` of row ``r``) as one byte string per row: ``(flat uint8, offsets int64
    [rows + 1])``."""
    fields, payload, size = encode_positions(values, indices)
    positions = np.asarray(positions, np.int64)
    rows = len(positions)
    if not len(size):  # rows of no position
        return np.zeros(0, np.uint8), np.zeros(rows + 1, np.int64)
    first = np.zeros(rows + 1, np.int64)
    np.cumsum(positions, out=first[1:])
    pay = np.zeros(len(size) + 1, np.int64)
    np.cumsum(size, out=pay[1:])
    row_bytes = HEADER_BYTES * positions + (pay[first[1:]] - pay[first[:-1]])
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(row_bytes, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), np.uint8)
    row_of = np.repeat(np.arange(rows), positions)
    j = np.arange(len(size)) - first[row_of]  # position within its row
    base = offsets[row_of]
    length = positions[row_of]
    for name, at, dtype in _FIELDS:
        raw = fields[name].astype(dtype).view(np.uint8).reshape(len(size), -1)
        width = raw.shape[1]
        flat[(base + at * length + j * width)[:, None] + np.arange(width)] = raw
    # payloads: each row's after its header, in order
    pay_start = base + HEADER_BYTES * length + (pay[:-1] - pay[first[row_of]])
    if len(payload):
        dest = np.repeat(pay_start - pay[:-1], size) + np.arange(len(payload))
        flat[dest] = payload
    return flat, offsets


#: (field, bytes per position before it in a row's header, dtype)
_FIELDS = (("mass", 0, "<f4"), ("step", 4, "<f2"), ("form", 6, "u1"), ("high", 7, "u1"))


# -- decoding -------------------------------------------------------------------------------------


def _gather(flat: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Bytes ``flat[starts[i] : starts[i] + width]`` of each i: ``[len(starts), width]``."""
    return flat[starts[:, None] + np.arange(width)]


def decode_rows(
    flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray, positions: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode rows ``rows`` (indices into ``offsets``) of ``positions[i]`` positions each: every
    position's ``(values float32 [P, k], ids int64 [P, k])`` in rank order, row after row."""
    rows = np.asarray(rows, np.int64)
    positions = np.asarray(positions, np.int64)
    total = int(positions.sum())
    if total == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    row_of = np.repeat(np.arange(len(rows)), positions)
    first = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(positions, out=first[1:])
    j = np.arange(total) - first[row_of]
    base = np.asarray(offsets, np.int64)[rows][row_of]
    length = positions[row_of]
    fields = {}
    for name, at, dtype in _FIELDS:
        width = np.dtype(dtype).itemsize
        raw = _gather(flat, base + at * length + j * width, width)
        fields[name] = np.ascontiguousarray(raw).view(dtype).reshape(total)
    form = fields["form"].astype(np.int64)
    if (form >= len(_BITS) * _LOW_LIMIT).any():
        raise ValueError("compact top-k: corrupt header")
    fields["bits"] = np.array(_BITS)[form // _LOW_LIMIT]
    fields["low"] = form % _LOW_LIMIT
    size = values_bytes(fields["bits"], k) + values_bytes(fields["low"], k) + fields["high"].astype(np.int64)
    fields["size"] = size
    pay = np.zeros(total + 1, np.int64)
    np.cumsum(size, out=pay[1:])
    start = base + HEADER_BYTES * length + (pay[:-1] - pay[first[row_of]])
    offsets = np.asarray(offsets, np.int64)
    ends = offsets[rows] + HEADER_BYTES * positions + (pay[first[1:]] - pay[first[:-1]])
    if not np.array_equal(ends, offsets[rows + 1]):
        raise ValueError("compact top-k: a row's size does not match its positions")
    return decode_positions(flat, start, fields, k)


def decode_positions(
    flat: np.ndarray, start: np.ndarray, fields: dict[str, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions whose payloads start at ``start`` in ``flat``, with their header ``fields``."""
    n = len(start)
    bits = fields["bits"].astype(np.int64)
    low = fields["low"].astype(np.int64)
    codes = np.zeros((n, k), np.uint32)
    for w in np.unique(bits).tolist():
        chosen = np.flatnonzero(bits == w)
        codes[chosen] = _unpack(_gather(flat, start[chosen], int(values_bytes(w, k))), w, k)
    vbytes = values_bytes(bits, k)
    lbytes = values_bytes(low, k)
    ids = np.zeros((n, k), np.int64)
    for width in np.unique(low).tolist():
        if width == 0:
            continue
        chosen = np.flatnonzero(low == width)
        ids[chosen] = _unpack(_gather(flat, start[chosen] + vbytes[chosen], int(values_bytes(width, k))), width, k)
    hbytes = fields["high"].astype(np.int64)
    most = int(hbytes.max())
    hstart = start + vbytes + lbytes
    index = hstart[:, None] + np.arange(most)
    inside = np.arange(most)[None, :] < hbytes[:, None]
    high = np.where(inside, flat[np.minimum(index, len(flat) - 1)], 0).astype(np.uint8)
    width = most * 8
    found = np.flatnonzero(np.unpackbits(high, axis=1, bitorder="little"))
    if len(found) != n * k:
        raise ValueError("compact top-k: corrupt Elias-Fano high bits")
    found = found.reshape(n, k)
    found -= (np.arange(n) * width)[:, None] + np.arange(k)[None, :]  # the high parts
    if n and (found[:, 0] < 0).any() or (np.diff(found, axis=1) < 0).any():
        raise ValueError("compact top-k: corrupt Elias-Fano high bits")
    ids |= found << low[:, None]
    # values: x = code * step; log-probs = mass + log_softmax(-x), in rank order
    if int(bits.max()) <= 8:
        codes = codes.astype(np.uint8)  # a stable sort of bytes is a radix sort
    order = np.argsort(codes, axis=1, kind="stable")  # equal codes: ascending id (ids are sorted)
    order += (np.arange(n) * k)[:, None]
    codes = codes.ravel()[order]
    ids = ids.ravel()[order]
    x = codes.astype(np.float32) * fields["step"].astype(np.float32)[:, None]
    # x[:, 0] is 0 (the largest entry's code): the log-sum-exp needs no shift
    lse = np.log(np.exp(-x).sum(axis=1, dtype=np.float32))
    values = (fields["mass"].astype(np.float32) - lse)[:, None] - x
    return values.astype(np.float32), ids


def decode(flat: np.ndarray, offsets: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row of :func:`encode_rows`' output."""
    return decode_rows(flat, offsets, np.arange(len(positions)), positions, k)


def kl_renormalized(
    teacher: np.ndarray, teacher_ids: np.ndarray, decoded: np.ndarray, decoded_ids: np.ndarray
) -> np.ndarray:
    """KL(teacher || decoded) per position over its K entries (both renormalized), in float64:
    log-probs ``[n, k]`` with their ids ``[n, k]``, in any order (the id sets must be equal)."""
    t_order = np.argsort(teacher_ids, axis=1, kind="stable")
    d_order = np.argsort(decoded_ids, axis=1, kind="stable")
    if not np.array_equal(
        np.take_along_axis(np.asarray(teacher_ids), t_order, 1), np.take_along_axis(np.asarray(decoded_ids), d_order, 1)
    ):
        raise ValueError("the teacher's and the decoded top-k ids differ")
    t = np.take_along_axis(np.asarray(teacher, np.float64), t_order, 1)
    d = np.take_along_axis(np.asarray(decoded, np.float64), d_order, 1)
    lt = t - np.logaddexp.reduce(t, axis=1, keepdims=True)
    ld = d - np.logaddexp.reduce(d, axis=1, keepdims=True)
    return (np.exp(lt) * (lt - ld)).sum(axis=1)
