"""A FlatGeobuf writer for tiles: polygons of their bounds with typed columns, a packed R-tree.

FlatGeobuf (https://flatgeobuf.org, format 3.0.1) is magic bytes, a header, the packed R-tree
index, then the features, each header and feature a size-prefixed flatbuffer. GDAL writes it too
(``cnsq export`` used it through pyogrio), but GDAL builds a feature at a time, then holds every
feature's box until it sorts and writes the index: for a million tiles 5-7 times the time to read
the CSV and about 300 MB at three million. Here every feature of a file has the same flatbuffer
layout (one ring of five points, the same columns), so features are numpy records written a batch
at a time, and the index is streamed: leaves beside the features through a second handle, the
levels above (a sixteenth of the leaves) written last. Memory is a batch and those upper levels.

The features must come in the order the index will have them: ``cnsq export`` gives them in the
tiles' Z-order (quadkey order), the order its GeoParquet has. FlatGeobuf's own writers sort along a
Hilbert curve; readers only follow the tree, and a Z-order keeps a node's sixteen tiles as close.

Every flatbuffer here is a multiple of 8 bytes with its doubles 8-aligned from its size prefix,
as format 3.0.1 asks, so readers can map coordinates without copying.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MAGIC = b"fgb\x03fgb\x01"  # format 3, patch level 1
NODE_SIZE = 16
POLYGON = 3  # GeometryType
# ColumnType values this writer uses, and each fixed-size one's value in a feature's properties.
# (Only those GDAL reads back as written: it read a Byte column's values as 4 bytes.)
INT, LONG, DOUBLE, STRING = 5, 7, 10, 11
_VALUES = {INT: "<i4", LONG: "<i8", DOUBLE: "<f8"}
NODE = (("minx", "<f8"), ("miny", "<f8"), ("maxx", "<f8"), ("maxy", "<f8"), ("offset", "<u8"))


@dataclass(frozen=True)
class Column:
    """One attribute column: its name and type (:data:`INT`, :data:`LONG`, :data:`DOUBLE` or
    :data:`STRING`)."""

    name: str
    type: int

    def __post_init__(self) -> None:
        if self.type not in (*_VALUES, STRING):
            raise ValueError(f"column {self.name}: type {self.type} is not one this writer "
                             f"writes (INT, LONG, DOUBLE or STRING)")


def level_bounds(count: int, node_size: int = NODE_SIZE) -> list[tuple[int, int]]:
    """Where each level of a packed R-tree of ``count`` items lies, in nodes from the start of
    the index, leaves first and the root last (the spec's ``generateLevelBounds``: even one item
    gets a root above it).

    Raises:
        ValueError: for no items (an empty file has no index).
    """
    if count < 1:
        raise ValueError("a packed R-tree needs at least one item")
    sizes = [count]
    n = count
    while True:
        n = (n + node_size - 1) // node_size
        sizes.append(n)
        if n == 1:
            break
    bounds, end = [], sum(sizes)
    for size in sizes:
        bounds.append((end - size, end))
        end -= size
    return bounds


# --- flatbuffers -------------------------------------------------------------------------------
# A header is a handful of tables; they are laid out front to back (each table after its vtable,
# children after the table that points at them: uoffsets only point forward).

_SCALARS = {"u8": "<B", "u16": "<H", "i32": "<i", "u64": "<Q"}


def _pad(out: bytearray, align: int, before: int = 0) -> None:
    """Zeros until ``len(out) + before`` is a multiple of ``align``."""
    out.extend(b"\0" * (-(len(out) + before) % align))


def _table(out: bytearray, fields: Sequence[tuple[int, str, Any]]) -> int:
    """Append a table of ``fields`` — (slot, kind, value) with kind a scalar of
    :data:`_SCALARS`, ``str``, ``f64s`` (a vector of doubles), ``table`` (a list of fields) or
    ``tables`` (a list of those) — and what it points to; return where the table starts."""
    inline = sorted(fields, key=lambda f: -_inline_size(f[1]))
    slots = max((f[0] for f in fields), default=-1) + 1
    _pad(out, 2)
    vtable = len(out)
    out.extend(b"\0" * (4 + 2 * slots))
    # The table starts 4-aligned; with an 8-byte field, 4 past a multiple of 8, so the first
    # field (after the 4-byte vtable offset) is 8-aligned and the others follow by size.
    _pad(out, 8 if any(_inline_size(f[1]) == 8 for f in fields) else 4,
         4 if any(_inline_size(f[1]) == 8 for f in fields) else 0)
    start = len(out)
    out.extend(struct.pack("<i", start - vtable))
    where: dict[int, int] = {}
    for slot, kind, value in inline:
        where[slot] = len(out)
        out.extend(struct.pack(_SCALARS.get(kind, "<I"), value if kind in _SCALARS else 0))
    struct.pack_into("<HH", out, vtable, 4 + 2 * slots, len(out) - start)
    for slot, position in where.items():
        struct.pack_into("<H", out, vtable + 4 + 2 * slot, position - start)
    for slot, kind, value in inline:
        if kind not in _SCALARS:
            struct.pack_into("<I", out, where[slot], _child(out, kind, value) - where[slot])
    return start


def _inline_size(kind: str) -> int:
    return struct.calcsize(_SCALARS[kind]) if kind in _SCALARS else 4


def _child(out: bytearray, kind: str, value: Any) -> int:
    if kind == "table":
        return _table(out, value)
    if kind == "str":
        data = value.encode()
        _pad(out, 4)
        start = len(out)
        out.extend(struct.pack("<I", len(data)) + data + b"\0")
        return start
    if kind == "f64s":
        _pad(out, 8, 4)  # the doubles after the length 8-aligned
        start = len(out)
        out.extend(struct.pack(f"<I{len(value)}d", len(value), *value))
        return start
    if kind == "tables":
        _pad(out, 4)
        start = len(out)
        out.extend(struct.pack("<I", len(value)) + b"\0" * (4 * len(value)))
        for i, fields in enumerate(value):
            slot = start + 4 + 4 * i
            struct.pack_into("<I", out, slot, _table(out, fields) - slot)
        return start
    raise ValueError(f"unknown flatbuffer field kind {kind!r}")


def header(name: str, envelope: Sequence[float], count: int, columns: Sequence[Column],
           node_size: int = NODE_SIZE) -> bytes:
    """The header of a file of ``count`` polygons in EPSG:4326, size prefix included (a
    multiple of 8 bytes)."""
    out = bytearray(8)  # the size prefix, then the root's offset
    fields = [(0, "str", name), (1, "f64s", list(envelope)), (2, "u8", POLYGON),
              (7, "tables", [[(0, "str", c.name), (1, "u8", c.type), (7, "u8", 0)]
                             for c in columns]),
              (8, "u64", count), (9, "u16", node_size),
              (10, "table", [(0, "str", "EPSG"), (1, "i32", 4326), (2, "str", "WGS 84")])]
    struct.pack_into("<I", out, 4, _table(out, fields) - 4)
    _pad(out, 8)
    struct.pack_into("<I", out, 0, len(out) - 4)
    return bytes(out)


# --- features ------------------------------------------------------------------------------------
# Every feature, from its size prefix (offsets in bytes):
#    0 size of the rest          4 root: the Feature table at 24
#    8 Feature's vtable (geometry at +4, properties at +8)
#   16 Geometry's vtable (no ends: one ring; xy at +4)
#   24 Feature: vtable offset, geometry (at 36), properties (at 128)
#   36 Geometry: vtable offset, xy (at 44)
#   44 10 doubles: the ring from 48     128 properties: their length, then each column's
#   index and value, the string column last (its length varies), zeros to a multiple of 8.
_PREFIX = struct.pack("<II4H4H", 0, 20, 8, 12, 4, 8, 8, 8, 0, 4) + struct.pack(
    "<iIIiII", 16, 8, 96, 20, 4, 10)
_PROPERTIES = 132


def feature_type(columns: Sequence[Column], text_width: int) -> Any:
    """The numpy record of one feature of ``columns``; string columns come last in its
    properties (their lengths vary), each with room for ``text_width`` bytes."""
    import numpy as np

    text_width = max(text_width, 1)
    names, formats, offsets = ["prefix", "ring", "length"], ["V48", ("<f8", (10,)), "<u4"], \
        [0, 48, 128]
    at = _PROPERTIES
    ordered = sorted(enumerate(columns), key=lambda ic: ic[1].type == STRING)
    for index, column in ordered:
        names.append(f"i{index}")
        formats.append("<u2")
        offsets.append(at)
        if column.type == STRING:
            names += [f"n{index}", f"v{index}"]
            formats += ["<u4", f"V{text_width}"]
            offsets += [at + 2, at + 6]
            at += 6 + text_width
        else:
            names.append(f"v{index}")
            formats.append(_VALUES[column.type])
            offsets.append(at + 2)
            at += 2 + np.dtype(_VALUES[column.type]).itemsize
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": at + -at % 8})


def features(columns: Sequence[Column], text_width: int, bounds: tuple[Any, Any, Any, Any],
             values: Sequence[Any]) -> Any:
    """The features of a batch as records of :func:`feature_type`.

    Parameters:
        bounds: west, south, east and north of each tile (numpy arrays).
        values: one per column, in ``columns``' order: a numpy array, or for the string column
            a pair of numpy arrays — the texts' UTF-8 bytes one after another and their lengths.
    """
    import numpy as np

    kind = feature_type(columns, text_width)
    n = len(bounds[0])
    records = np.zeros(n, kind)
    # The size prefix counts the rest of the record: zeros past the properties are padding.
    records["prefix"] = np.frombuffer(struct.pack("<I", kind.itemsize - 4) + _PREFIX[4:],
                                      "V48")[0]
    west, south, east, north = bounds
    ring = records["ring"]
    ring[:, 0], ring[:, 1], ring[:, 2], ring[:, 3] = west, south, east, south
    ring[:, 4], ring[:, 5], ring[:, 6], ring[:, 7] = east, north, west, north
    ring[:, 8], ring[:, 9] = west, south
    fixed = sum(2 + np.dtype(_VALUES[c.type]).itemsize for c in columns if c.type != STRING)
    length = np.full(n, fixed, np.uint32)
    for index, (column, value) in enumerate(zip(columns, values, strict=True)):
        records[f"i{index}"] = index
        if column.type != STRING:
            records[f"v{index}"] = value
            continue
        data, sizes = value
        if n and int(sizes.max()) > text_width:
            raise ValueError(f"column {column.name}: a value longer than {text_width} bytes")
        records[f"n{index}"] = sizes
        length += 6 + sizes.astype(np.uint32)
        # The texts, one after another, go to the first ``size`` bytes of each record's slot:
        # a boolean mask picks those bytes in row order.
        start, width = kind.fields[f"v{index}"][1], kind.fields[f"v{index}"][0].itemsize
        slots = records.view(np.uint8).reshape(n, kind.itemsize)[:, start:start + width]
        slots[np.arange(width) < sizes[:, None]] = np.frombuffer(data, np.uint8)
    records["length"] = length
    return records


class Writer:
    """Writes a FlatGeobuf of exactly ``count`` features, given in index order with
    :meth:`add`; :meth:`close` writes the index above the leaves and checks the count.

    The file is laid out before the first feature (the header's size, the index's, one
    feature's), so the features and the leaves each stream to their own place.
    """

    def __init__(self, path: Path, name: str, columns: Sequence[Column], count: int,
                 envelope: Sequence[float], text_width: int):
        import numpy as np

        self.columns, self.count, self.text_width = list(columns), count, text_width
        self.record = feature_type(self.columns, text_width).itemsize
        node_size = NODE_SIZE if count else 0  # an empty file has no index
        self._head = MAGIC + header(name, envelope, count, self.columns, node_size)
        self._levels = level_bounds(count) if count else []
        nodes = self._levels[0][1] if count else 0
        leaves_at = len(self._head) + (self._levels[0][0] if count else 0) * 40
        self._node = np.dtype(list(NODE))
        self._written = 0
        self._carry = np.zeros((0, 4))  # boxes of leaves not yet in a parent
        self._parents: list[Any] = []  # the boxes of the level above the leaves
        self._data: IO[bytes] = path.open("wb")
        self._index: IO[bytes] | None = None
        try:
            self._index = path.open("r+b")
            self._index.seek(leaves_at)
            self._data.seek(len(self._head) + nodes * 40)
        except BaseException:
            self._close_files()
            raise

    def add(self, bounds: tuple[Any, Any, Any, Any], values: Sequence[Any]) -> None:
        """The next features: ``bounds`` and ``values`` as :func:`features` takes them."""
        import numpy as np

        n = len(bounds[0])
        if self._written + n > self.count:
            raise ValueError(f"more than the {self.count} features the header announced")
        records = features(self.columns, self.text_width, bounds, values)
        leaves = np.empty(n, self._node)
        leaves["minx"], leaves["miny"], leaves["maxx"], leaves["maxy"] = bounds[0], bounds[1], \
            bounds[2], bounds[3]
        leaves["offset"] = (self._written + np.arange(n, dtype=np.uint64)) * np.uint64(
            self.record)
        assert self._index is not None
        self._data.write(records.data)
        self._index.write(leaves.data)
        self._written += n
        boxes = np.concatenate([self._carry, np.stack(bounds, axis=1)])
        whole = len(boxes) // NODE_SIZE * NODE_SIZE
        if whole:
            self._parents.append(_enclosing(boxes[:whole]))
        self._carry = boxes[whole:]

    def close(self) -> None:
        """Write the header and the index's upper levels, and close the file."""
        import numpy as np

        try:
            if self._written != self.count:
                raise ValueError(f"{self._written} features written, the header announced "
                                 f"{self.count}")
            upper = b""
            if self.count:
                if len(self._carry):
                    self._parents.append(_enclosing(self._carry))
                boxes = np.concatenate(self._parents)
                levels = []
                for below, (start, end) in zip(self._levels, self._levels[1:], strict=False):
                    nodes = np.empty(end - start, self._node)
                    for i, name in enumerate(("minx", "miny", "maxx", "maxy")):
                        nodes[name] = boxes[:, i]
                    # A parent's offset is where its first child is, in nodes from the index start.
                    nodes["offset"] = below[0] + NODE_SIZE * np.arange(end - start,
                                                                        dtype=np.uint64)
                    levels.append(nodes)
                    boxes = _enclosing(boxes)
                upper = b"".join(level.tobytes() for level in reversed(levels))
            assert self._index is not None
            self._index.seek(0)
            self._index.write(self._head + upper)
        finally:
            self._close_files()

    def abandon(self) -> None:
        """Close the file as it is, unfinished, after an error (which stands: a failure to
        flush what is buffered is not raised over it); the caller removes the file."""
        try:
            self._close_files()
        except OSError:
            pass

    def _close_files(self) -> None:
        """Close both handles, even when closing the first fails (its error raised after)."""
        failure = None
        for handle in (self._data, self._index):
            if handle is not None:
                try:
                    handle.close()
                except BaseException as exc:  # noqa: BLE001 - raised below
                    failure = failure or exc
        if failure is not None:
            raise failure


def _enclosing(boxes: Any) -> Any:
    """The box around each group of :data:`NODE_SIZE` boxes (rows of minx, miny, maxx, maxy;
    the last group may be short)."""
    import numpy as np

    starts = np.arange(0, len(boxes), NODE_SIZE)
    return np.stack([np.minimum.reduceat(boxes[:, 0], starts),
                     np.minimum.reduceat(boxes[:, 1], starts),
                     np.maximum.reduceat(boxes[:, 2], starts),
                     np.maximum.reduceat(boxes[:, 3], starts)], axis=1)
