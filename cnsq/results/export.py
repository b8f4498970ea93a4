"""``cnsq export``: the results in the formats GIS users load — GeoParquet 1.1, FlatGeobuf,
GeoJSON, CSV — with the same thresholding and the same per-row checks as ``convert-geojson``.

Every format holds each kept tile as a polygon of its bounds (longitude/latitude, WGS 84,
counterclockwise), its id, x, y, z and every score as a typed column (``p0``, ``p1`` …).

- **GeoParquet** (written with pyarrow): WKB geometry, the ``geo`` metadata of GeoParquet 1.1,
  a ``bbox`` covering column, rows sorted along a Z-order curve of the tiles (the order of their
  quadkeys) in row groups of :data:`ROW_GROUP` rows, so a reader skips the groups outside its
  window by their statistics.
- **FlatGeobuf** (written by :mod:`cnsq.results.flatgeobuf`, read back by GDAL in the tests): its
  packed R-tree index over the same Z-order, built as the features stream.

pyarrow is the optional extra ``cnsq[geo]``; without it these two formats say what to install.
GeoJSON holds convert-geojson's features (its own writer when pyarrow is missing; else built
column-wise: the same values, a few numbers written differently, ``1`` for ``1.0``);
CSV keeps the kept rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import mercantile

from cnsq.errors import CnsqError, option
from cnsq.files import atomic_path, writable_target
from cnsq.results.flatgeobuf import DOUBLE, INT, STRING, Column, Writer
from cnsq.results.geojson import (
    PROGRESS_EVERY,
    Report,
    check_thresh_ind,
    csv_rows,
    feature,
    open_results,
    read_result,
    write_features,
)
from cnsq.results.tile_order import ZOrder
from cnsq.tiles import parse_tile_id, tile_id

FORMATS = ("geoparquet", "flatgeobuf", "geojson", "csv")
# GeoParquet's codecs. Snappy is the default of pyarrow, GeoPandas and GDAL, and the fastest
# here; zstd makes a smaller file for a longer write (how much: docs/performance.md, "Design
# choices, measured").
COMPRESSIONS = ("snappy", "zstd", "none")
ROW_GROUP = 16_384
CHUNK = 16_384  # features turned into GeoJSON text at a time
WORKERS = min(4, os.cpu_count() or 1)  # threads checking blocks of rows
GEO_EXTRA = "pip install 'cnsq[geo]' (pyarrow)"


@dataclass(frozen=True)
class Row:
    line: int
    tile: mercantile.Tile
    scores: list[float]


def read_rows(source: IO[str], thresh_ind: int | None, thresh: float | None,
              report: Report, progress: Callable[[Report], None] | None = None,
              header: bool = True) -> Iterator[Row]:
    """The kept rows of a ``tile,output`` CSV: a bad row is reported with its line and skipped;
    with ``thresh_ind``/``thresh`` only tiles scoring at least ``thresh`` there are kept.
    ``header``: a first row ``tile,output`` is the file's header (else a row like any)."""
    for line, row in csv_rows(source, report, progress, header):
        try:
            tile, scores, value = read_result(row, thresh_ind if thresh_ind is not None else 0)
        except ValueError as exc:
            report.add_bad(line, str(exc))
            continue
        bad = next((i for i, s in enumerate(scores) if isinstance(s, bool) or not isinstance(
            s, (int, float)) or not math.isfinite(s)), None)
        if bad is not None:
            report.add_bad(line, f"score {bad} is not a number: {scores[bad]!r}")
            continue
        if thresh is not None and value < thresh:
            continue
        report.kept += 1
        yield Row(line, tile, [float(s) for s in scores])


@dataclass
class Columns:
    """Kept tiles as arrays: their CSV line, x, y, z, and scores (one row per tile); with
    ``read_columns(raw=True)`` also each row's output text as written, and the rows whose
    score count differs from the file's (kept aside, not reported)."""

    line: Any
    x: Any
    y: Any
    z: Any
    scores: Any  # float64, rows × scores
    outputs: Any = None  # pyarrow string array, aligned with the arrays
    others: list | None = None  # [(Row, output text)] of other score counts

    def __len__(self) -> int:
        return len(self.x)


NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
MAX_PATTERN_SCORES = 1000  # scores per row the block check matches with one pattern
TILE_ID = r"^[0-9]{1,10}-[0-9]{1,10}-[0-9]{1,2}$"
TILE_PATTERN = re.compile(TILE_ID[1:-1])


def _from_rows(rows: list[Row], width: int) -> Columns:
    import numpy as np

    scores = np.array([r.scores for r in rows], dtype=np.float64).reshape(len(rows), width)
    return Columns(np.array([r.line for r in rows], dtype=np.int64),
                   np.array([r.tile.x for r in rows], dtype=np.int32),
                   np.array([r.tile.y for r in rows], dtype=np.int32),
                   np.array([r.tile.z for r in rows], dtype=np.int8), scores)


class _LineBreaks(Exception):
    """Only the row reader reads this file as convert-geojson does: a value holds a line break,
    a line is blank (pyarrow gives it as a row of two empty values, as it does a bare ","; the
    row reader tells them apart), a value is longer than Arrow's block or not UTF-8, or rows hold
    more scores than one pattern matches. The caller starts again with :func:`row_columns`."""


def read_columns(source: Path, thresh_ind: int | None, thresh: float | None,
                 report: Report, raw: bool = False) -> Columns:
    """The kept rows as arrays: :func:`iter_columns`'s blocks joined (or, when values hold line
    breaks, :func:`row_columns`)."""
    try:
        return _concat(list(iter_columns(source, thresh_ind, thresh, report, raw)), raw)
    except _LineBreaks:
        return row_columns(source, thresh_ind, thresh, report, raw)


def row_columns(source: Path, thresh_ind: int | None, thresh: float | None,
                report: Report, raw: bool = False,
                progress: Callable[[Report], None] | None = None) -> Columns:
    """The kept rows as arrays, read row by row (``report`` is reset): for a file whose values
    hold line breaks, where only a row reader keeps the line numbers exact."""

    fresh = Report()
    with open_results(source) as handle:
        rows = list(read_rows(handle, thresh_ind, thresh, fresh, progress))
    report.read, report.kept, report.bad, report.bad_count = (
        fresh.read, fresh.kept, fresh.bad, fresh.bad_count)
    if not rows:
        return _empty(0, raw)
    with open_results(source) as handle:
        width = _width_of((row[0], row[1]) for row in csv.reader(handle)
                          if len(row) == 2) or len(rows[0].scores)
    same = [r for r in rows if len(r.scores) == width]
    if raw:  # every row kept, whatever its score count
        columns = _from_rows(same, width)
        columns.outputs = _texts([json.dumps(r.scores) for r in same])
        columns.others = [(r, json.dumps(r.scores)) for r in rows if len(r.scores) != width]
        return columns
    for r in rows:  # a typed table holds one count: the others fail alone, as in iter_columns
        if len(r.scores) != width:
            report.kept -= 1
            report.add_bad(r.line, f"{len(r.scores)} scores where the file's rows hold {width}")
    report.bad.sort()
    return _from_rows(same, width)


def _concat(blocks: list[Columns], raw: bool) -> Columns:
    import numpy as np
    import pyarrow as pa

    width = max((b.scores.shape[1] for b in blocks if b.scores.ndim == 2), default=0)
    blocks = [b for b in blocks if len(b)] or blocks[:1]
    if not blocks:
        return _empty(width, raw)
    line, x, y, z = (np.concatenate([getattr(b, f) for b in blocks]) for f in ("line", "x", "y", "z"))
    out = Columns(line, x, y, z, np.concatenate([b.scores.reshape(len(b), width) for b in blocks]))
    if raw:
        out.outputs = pa.concat_arrays([b.outputs for b in blocks])
        out.others = [pair for b in blocks for pair in (b.others or [])]
    return out


BLOCK = 512 << 10  # bytes of CSV parsed at a time


def _texts(values: list[str]):
    """A list of strings as an Arrow string array (see :func:`_arrow`: not ``pa.array``)."""
    import numpy as np
    import pyarrow as pa

    data = [v.encode("utf-8", "surrogateescape") for v in values]
    offsets = np.zeros(len(data) + 1, np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets),
                                                           pa.py_buffer(b"".join(data))])


def _numpy(array):
    """An Arrow boolean, int64 or float64 array without nulls as a numpy array, read from its
    buffers (``to_numpy`` goes through pandas too, see :func:`_arrow`)."""
    import numpy as np
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    data, start, end = array.buffers()[1], array.offset, array.offset + len(array)
    if array.type == pa.bool_():
        bits = np.frombuffer(data, np.uint8)
        return np.unpackbits(bits, bitorder="little")[start:end].astype(np.bool_)
    dtype = {pa.int64(): np.int64, pa.float64(): np.float64}[array.type]
    return np.frombuffer(data, dtype)[start:end]


def _scalar(text: str):
    """A string as an Arrow scalar (``pa.scalar`` asks for pandas too: see :func:`_arrow`)."""
    return _texts([text])[0]


def _arrow(values):
    """A numpy array as an Arrow array, from its buffer.

    Why not ``pa.array``: given a list or a numpy array, pyarrow first asks whether it is a
    pandas object, importing pandas when installed (0.2 s and some 60 MB, more than the rest of
    a GeoParquet export's memory)."""
    import numpy as np
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    if values.dtype == np.bool_:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def iter_columns(source: Path, thresh_ind: int | None, thresh: float | None,
                 report: Report, raw: bool = False,
                 progress: Callable[[Report], None] | None = None) -> Iterator[Columns]:
    """The kept rows as arrays, a block at a time in file order, parsed column-wise by pyarrow
    (memory: a few blocks, whatever the file's size). Ids and scores are checked and converted
    for a block at once; a row the fast checks refuse is read alone by
    :func:`~cnsq.results.geojson.read_result`, so its report (and line number) is the one
    convert-geojson gives. ``report`` is complete once the blocks are all read.

    Raises:
        _LineBreaks: a value holds a line break, or a line is blank (perhaps after some blocks
            were given): the caller starts again with :func:`row_columns`.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open_results(source) as handle:
        first = handle.readline()
    if not first:  # nothing (or a byte order mark alone): Arrow calls that an error
        return
    header = first.strip().split(",")[:2] == ["tile", "output"]
    invalid: list = []

    def on_invalid(row) -> str:
        invalid.append(row)
        return "skip"

    try:  # the first block is read here: what Arrow refuses, the row reader reads (see below)
        reader = pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(column_names=["tile", "output"], block_size=BLOCK,
                                           skip_rows=1 if header else 0, use_threads=False),
            # Blank lines are rows here (as the row reader counts them), so lines stay in step.
            parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={"tile": pa.string(),
                                                               "output": pa.string()},
                                                 strings_can_be_null=False))
    except pa.ArrowException:
        raise _LineBreaks from None
    start = 2 if header else 1
    seen = 0  # good-shaped rows so far
    width: int | None = None
    ready: deque = deque()  # checked blocks not yet given
    reported = 0
    # Blocks are checked in worker threads (Arrow's kernels and numpy release the GIL), in file
    # order: the reader parses the next block meanwhile. Each block reports into its own Report,
    # merged in order.
    pending: deque = deque()

    def settle(limit: int) -> None:
        while len(pending) > limit:
            future, local = pending.popleft()
            ready.append(future.result()[0])
            _merge(report, local)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for batch in _arrow_batches(reader, pa):
            if any(row.number is None for row in invalid):
                raise _LineBreaks
            # The physical line of each row: the bad-shaped rows (reported with their lines, as
            # the reader parses ahead) are the gaps. u_i = b_i - i; row j sits at
            # start + j + #{u_i ≤ …}.
            bad_lines = np.array(sorted(row.number for row in invalid), dtype=np.int64)
            u = bad_lines - np.arange(len(bad_lines))
            j = np.arange(seen, seen + len(batch), dtype=np.int64) + start
            lines = j + np.searchsorted(u, j, side="right")
            seen += len(batch)
            shown, report.read = report.read, seen + len(invalid)
            if progress and report.read // PROGRESS_EVERY != shown // PROGRESS_EVERY:
                progress(report)
            for row in invalid[reported:]:
                report.add_bad(row.number,
                               f"expected 2 columns (tile,output), got {row.actual_columns}")
            reported = len(invalid)
            local = Report()
            if width is None:  # the file's score count comes from its first good row
                settle(0)
                columns, width = _block(batch.column(0), batch.column(1), lines, width,
                                        thresh_ind, thresh, local, source, raw)
                ready.append(columns)
                _merge(report, local)
            else:
                pending.append((pool.submit(_block, batch.column(0), batch.column(1), lines,
                                            width, thresh_ind, thresh, local, source, raw), local))
                settle(WORKERS)
            while ready:
                block = ready.popleft()
                report.kept += len(block) + len(block.others or [])
                yield block
        settle(0)
        while ready:
            block = ready.popleft()
            report.kept += len(block) + len(block.others or [])
            yield block
    for row in invalid[reported:]:
        report.add_bad(row.number, f"expected 2 columns (tile,output), got {row.actual_columns}")
    report.read = seen + len(invalid)
    report.bad.sort()  # the reader reports bad-shaped rows ahead of its blocks


def _arrow_batches(reader: Any, pa: Any) -> Iterator[Any]:
    """The reader's record batches; a file Arrow's CSV reader refuses where the row reader reads
    on (a value longer than its block, a byte that is not UTF-8) is read row by row instead:
    the same rows kept and reported as convert-geojson, never the whole export aborted."""
    try:
        yield from reader
    except pa.ArrowException:
        raise _LineBreaks from None


def _merge(report: Report, local: Report) -> None:
    """A block's report into the file's: its bad rows in order, and the count of those past
    the listed ones."""
    for line, reason in local.bad:
        report.add_bad(line, reason)
    report.bad_count += local.bad_count - len(local.bad)


def _block(tiles, outputs, lines, width: int | None, thresh_ind: int | None,
           thresh: float | None, report: Report, source: Path,
           raw: bool = False) -> tuple[Columns, int | None]:
    """One block of rows checked and converted at once; returns the kept ones and the score
    count the file's rows hold (from its first good row)."""
    import numpy as np
    import pyarrow as pa

    from cnsq.compat.arrow_compute import CastOptions, MatchSubstringOptions, TrimOptions

    n = len(tiles)
    # Neither pattern lets a line break through (``$`` is the end of the value; spaces are
    # [ \t]), so a value holding one is among the rows read alone below, which notice it.
    good = _numpy(_call("match_substring_regex", tiles, options=MatchSubstringOptions(TILE_ID)))
    # Pieces "x", "-y", "-z": the separator leads each piece after the first.
    xyz = _numpy(_call("cast", _pieces(_where(good, tiles, "0-0-0"), "-", 3),
                       options=CastOptions(pa.int64()))).reshape(n, 3)
    x, y, z = xyz[:, 0], -xyz[:, 1], -xyz[:, 2]
    good &= (z <= 30) & (x < np.left_shift(1, np.minimum(z, 62))) & (
        y < np.left_shift(1, np.minimum(z, 62)))
    if width is None:
        width = _width_of((t, o) for start in range(0, n, 1000) for t, o in zip(
            tiles.slice(start, 1000).to_pylist(), outputs.slice(start, 1000).to_pylist(),
            strict=True))
    if width and width > MAX_PATTERN_SCORES:
        # One pattern of that many numbers is more than RE2 compiles (it logs thousands of
        # lines, then fails): such rows are read row by row.
        raise _LineBreaks
    if width:
        pattern = r"^\[[ \t]*" + NUMBER + (r"[ \t]*,[ \t]*" + NUMBER) * (width - 1) + r"[ \t]*\]$"
        good &= _numpy(_call("match_substring_regex", outputs,
                             options=MatchSubstringOptions(pattern)))
        checked = _where(good, outputs, "[" + ",".join(["0"] * width) + "]")
        # Pieces "[a", ", b", …, ", c]": trimmed, each is a JSON number the cast reads.
        scores = _call("ascii_trim", _pieces(checked, ",", width), options=TrimOptions("[], \t"))
        scores = _numpy(_call("cast", scores, options=CastOptions(pa.float64()))).reshape(n, width)
        good &= np.isfinite(scores).all(axis=1)
        if thresh_ind is not None and not -width <= thresh_ind < width:
            raise CnsqError(f"{option('thresh_ind')} {thresh_ind} is out of range: {source} has "
                              f"{width} class scores per tile (0 to {width - 1})")
    else:
        good[:] = False
        scores = np.zeros((n, 0))
    # The rows the fast checks refused: read alone, for the same reports as convert-geojson.
    extra: list[Row] = []
    extra_texts: list[str] = []
    others: list = []
    for i in np.flatnonzero(~good):
        tile_text, output_text = tiles[int(i)].as_py(), outputs[int(i)].as_py()
        if any(brk in value for value in (tile_text, output_text) for brk in "\r\n"):
            raise _LineBreaks  # a row of two lines or more: the line numbers no longer follow
        if not tile_text and not output_text:
            raise _LineBreaks  # a blank line or a bare ",": only the row reader tells which
        text = io.StringIO()
        csv.writer(text).writerow([tile_text, output_text])
        text.seek(0)
        one = Report()
        # header=False: a row "tile,output" here is a header in the middle of the file
        # (CSVs joined), reported as convert-geojson reports it, not skipped.
        rows = list(read_rows(text, thresh_ind, thresh, one, header=False))
        if one.bad:
            report.add_bad(int(lines[i]), one.bad[0][1])
        elif rows and width is not None and len(rows[0].scores) == width:
            extra.append(Row(int(lines[i]), rows[0].tile, rows[0].scores))
            extra_texts.append(output_text)
        elif rows and raw:
            others.append((Row(int(lines[i]), rows[0].tile, rows[0].scores), output_text))
        elif rows:
            report.add_bad(int(lines[i]), f"{len(rows[0].scores)} scores where the file's rows "
                                          f"hold {width or 0}")
    keep = good
    if thresh is not None and thresh_ind is not None and width:
        keep = good & (scores[:, thresh_ind] >= thresh)
    index = np.flatnonzero(keep)
    # Narrow types for what is kept (a zoom-30 x or y fits 32 bits): the arrays are the memory.
    columns = Columns(lines[index], x[index].astype(np.int32), y[index].astype(np.int32),
                      z[index].astype(np.int8), scores[index])
    if raw:
        columns.outputs = _call("take", outputs, _arrow(index))
        if isinstance(columns.outputs, pa.ChunkedArray):
            columns.outputs = columns.outputs.combine_chunks()
        columns.others = others
    if extra:
        more = _from_rows(extra, width or 0)
        texts = columns.outputs
        line, x, y, z, scores = (np.concatenate([getattr(columns, f), getattr(more, f)])
                                 for f in ("line", "x", "y", "z", "scores"))
        columns = Columns(line, x, y, z, scores)
        order = np.argsort(columns.line, kind="stable")  # the rows read alone, in their places
        _reorder(columns, order)
        if raw:
            texts = _call("take", pa.concat_arrays([texts, _texts(extra_texts)]), _arrow(order))
            columns.outputs, columns.others = texts, others
    return columns, width


def _where(good, texts, instead: str):
    """``texts``, with ``instead`` where ``good`` is false (no copy when all are good)."""
    return texts if good.all() else _call("if_else", _arrow(good), texts, _scalar(instead))


def _pieces(texts, separator: str, width: int):
    """Each text cut before each of its ``width - 1`` separators: one string array of
    ``len(texts) * width`` pieces, new offsets over the same bytes (no copy). A piece after
    the first starts with its separator.

    Why not ``split_pattern``: it builds a list array, and took three quarters of the checks'
    time; the texts here have passed a pattern that fixes their separator count.
    """
    import numpy as np
    import pyarrow as pa

    n = len(texts)
    offsets, data = _string_buffers(texts)
    found = np.flatnonzero(np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]]
                           == ord(separator)).astype(np.int32) + offsets[0]
    if len(found) != n * (width - 1):
        raise AssertionError(f"{len(found)} {separator!r} in {n} texts of {width} pieces")
    cuts = np.empty((n, width), np.int32)
    cuts[:, 0] = offsets[:-1]
    cuts[:, 1:] = found.reshape(n, width - 1)
    cuts = np.append(cuts.ravel(), offsets[-1])
    return pa.Array.from_buffers(pa.string(), n * width, [None, pa.py_buffer(cuts), data])


def _width_of(pairs: Iterable[tuple[str, str]]) -> int | None:
    """The score count a file's rows hold: that of its first row (in file order) whose tile id
    is well formed and whose output is a list of one number or more; None if none is. Both
    readers ask this, so that the rows of another count fail alone, and alike."""
    for tile, output in pairs:
        try:  # the one tile grammar (braced ids and spaces too, as convert-geojson reads them)
            parse_tile_id(tile)
        except ValueError:
            continue
        try:
            value = json.loads(output)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, list) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return len(value)
    return None


def _reorder(c: Columns, order) -> None:
    """Put ``c``'s rows in ``order``, one array at a time: a copy of all of them at once would
    double the memory an export holds."""
    for name in ("line", "x", "y", "z", "scores"):
        setattr(c, name, getattr(c, name)[order])


WKB_HEADER = b"\x01" + b"".join(v.to_bytes(4, "little") for v in (3, 1, 5))  # polygon, 1 ring of 5


def tile_bounds(x: Any, y: Any, z: Any) -> tuple[Any, Any, Any, Any]:
    """West, south, east and north of each tile (numpy arrays of x, y, z), in degrees:
    mercantile.bounds' formulas (Web Mercator tiles in lon/lat), vectorised."""
    import numpy as np

    size = np.exp2(z.astype(np.float64))
    px, py = x.astype(np.float64), y.astype(np.float64)
    return (px / size * 360.0 - 180.0,
            np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (py + 1) / size)))),
            (px + 1) / size * 360.0 - 180.0,
            np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * py / size)))))


def _columns(c: Columns, width: int) -> dict:
    """The arrays as Arrow columns: id, x, y, z, p0…, the WKB polygons and their bboxes."""
    import numpy as np
    import pyarrow as pa

    n = len(c)
    west, south, east, north = tile_bounds(c.x, c.y, c.z)
    # WKB Polygon, little endian: 1, type 3, one ring of five points (93 bytes each), written
    # as rows of bytes: two block copies (a record array's unaligned fields took twice as long).
    points = np.stack([west, south, east, south, east, north, west, north, west, south], axis=1)
    wkb = np.empty((n, len(WKB_HEADER) + 80), np.uint8)
    wkb[:, :len(WKB_HEADER)] = np.frombuffer(WKB_HEADER, np.uint8)
    wkb[:, len(WKB_HEADER):] = points.astype("<f8", copy=False).view(np.uint8).reshape(n, 80)
    offsets = np.arange(0, (n + 1) * wkb.shape[1], wkb.shape[1], dtype=np.int32)
    geometry = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                             pa.py_buffer(wkb)])
    bbox = pa.StructArray.from_arrays([_arrow(west), _arrow(south), _arrow(east),
                                       _arrow(north)], ["xmin", "ymin", "xmax", "ymax"])
    # In 32 bits (a zoom-30 column or row fits), as FlatGeobuf's columns are.
    columns = {"tile": _ids(c)}
    columns.update((name, _arrow(v.astype(np.int32))) for name, v in (("x", c.x), ("y", c.y),
                                                                      ("z", c.z)))
    columns.update((f"p{i}", _arrow(c.scores[:, i])) for i in range(width))
    columns["geometry"] = geometry
    columns["bbox"] = bbox
    return columns


def _ids(c: Columns):
    """The tiles' ids (``x-y-z``, as :func:`cnsq.tiles.tile_id` writes them), an Arrow string
    array."""
    return _call("binary_join_element_wise", *(_text(a) for a in (c.x, c.y, c.z)), _scalar("-"))


def _text(values):
    """Numbers (a numpy array) as an Arrow string array of their shortest round-trip texts."""
    import pyarrow as pa

    from cnsq.compat.arrow_compute import CastOptions

    return _call("cast", _arrow(values), options=CastOptions(pa.string()))


def _call(name: str, *args, options=None):
    """The Arrow compute function ``name`` over ``args`` (cnsq.compat.arrow_compute says why
    not through ``pyarrow.compute``; ``Array.cast`` and ``Array.take`` import it too).
    Imported here: pyarrow is an extra, and the CSV export needs none."""
    from cnsq.compat.arrow_compute import call

    return call(name, *args, options=options)


def _has_geo() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _require_geo(fmt: str) -> None:
    """pyarrow (which brings numpy) for both formats."""
    if not _has_geo():
        raise CnsqError(f"{option('fmt')} {fmt} needs pyarrow: {GEO_EXTRA}")


def geo_metadata(bbox: tuple[float, float, float, float]) -> dict:
    """The GeoParquet 1.1 ``geo`` metadata of an export (CRS omitted: OGC:CRS84, lon/lat)."""
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": {
        "encoding": "WKB", "geometry_types": ["Polygon"], "bbox": list(bbox),
        "orientation": "counterclockwise", "edges": "planar",
        "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                              "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}}}}}


def _slices(c: Columns, size: int = ROW_GROUP) -> Iterator[Columns]:
    for first in range(0, len(c), size):
        yield Columns(c.line[first:first + size], c.x[first:first + size],
                      c.y[first:first + size], c.z[first:first + size],
                      c.scores[first:first + size])


def _overall_bounds(c: Columns) -> tuple[float, float, float, float]:
    """West, south, east and north of all of ``c``'s tiles: at each zoom, those of its
    extreme columns and rows (the bounds are monotonic in them), not of every tile."""
    import numpy as np

    if not len(c):
        return (0.0, 0.0, 0.0, 0.0)
    zooms = [int(c.z[0])] if c.z.min() == c.z.max() else np.unique(c.z).tolist()
    found = None
    for zoom in zooms:
        x, y = (c.x, c.y) if len(zooms) == 1 else (c.x[c.z == zoom], c.y[c.z == zoom])
        # The tile of the smallest column and largest row gives west and south; the other,
        # east and north.
        west, south, east, north = tile_bounds(np.array([x.min(), x.max()]),
                                               np.array([y.max(), y.min()]),
                                               np.array([zoom, zoom]))
        found = _union(found, (float(west[0]), float(south[0]), float(east[1]),
                               float(north[1])))
    assert found is not None
    return found


def _union(a: tuple | None, b: tuple) -> tuple:
    if a is None:
        return b
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _width(blocks: Iterator[Columns]) -> tuple[int, Iterator[Columns]]:
    """The score count of the rows (from the first block holding any), and every block."""
    held = []
    for block in blocks:
        held.append(block)
        if len(block):
            return block.scores.shape[1], _chain(held, blocks)
    return 0, iter(held)


def _empty(width: int, raw: bool = False) -> Columns:
    """No rows (with ``raw``, no output texts and no rows of other counts either)."""
    import numpy as np

    return Columns(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.int8), np.zeros((0, width)), _texts([]) if raw else None,
                   [] if raw else None)


def _groups(records, size: int) -> Iterator[Columns]:
    """Sorted record arrays regrouped in ``size`` rows (the last group the rest)."""
    import numpy as np

    held: list[Any] = []
    count = 0
    for part in records:
        if not held and len(part) == size:  # as the sort gives them, in memory: no copy
            yield _from_records(part)
            continue
        held.append(part)
        count += len(part)
        while count >= size:
            joined = np.concatenate(held)
            yield _from_records(joined[:size])
            count -= size
            held = [joined[size:]] if count else []
    if count:
        yield _from_records(np.concatenate(held))


def _from_records(r) -> Columns:
    return Columns(r["line"], r["x"], r["y"], r["z"], r["scores"])


@dataclass
class _Kept:
    """Every kept row, sorted along the Z-order curve, and what a header says of them."""

    width: int  # scores a row
    order: Any  # a cnsq.results.tile_order.ZOrder holding the rows
    count: int = 0
    bounds: tuple[float, float, float, float] | None = None
    largest: tuple[int, int, int] = (0, 0, 0)  # the largest x, y and z


def _collect(blocks: Iterator[Columns], spill_dir: Path) -> _Kept:
    """Read every block into a Z-order sort (spilled to ``spill_dir`` past a run)."""

    width, blocks = _width(blocks)
    kept = _Kept(width, ZOrder(width, spill_dir))
    for block in blocks:
        if len(block):
            kept.order.add(block.line, block.x, block.y, block.z, block.scores)
            kept.count += len(block)
            kept.bounds = _union(kept.bounds, _overall_bounds(block))
            kept.largest = tuple(max(a, int(b.max())) for a, b in  # type: ignore[assignment]
                                 zip(kept.largest, (block.x, block.y, block.z), strict=True))
    return kept


def write_geoparquet(blocks: Iterator[Columns], target: Path,
                     compression: str = COMPRESSIONS[0]) -> None:
    """Sorted along the Z-order curve in runs spilled next to ``target`` (see
    :mod:`cnsq.results.tile_order`), then written a row group at a time, each column compressed with
    ``compression`` (one of :data:`COMPRESSIONS`): memory is a run and a group, whatever the
    file's size."""
    import pyarrow as pa

    kept = _collect(blocks, target.parent)
    width = kept.width
    metadata = {b"geo": json.dumps(geo_metadata(kept.bounds or (0.0, 0.0, 0.0, 0.0))).encode()}
    schema = pa.table(_columns(_empty(width), width)).schema.with_metadata(metadata)
    writer = _parquet_writer(target, schema, compression)
    try:
        # Fewer rows a group where rows are wide, as the sort gives them.
        size = min(ROW_GROUP, kept.order.chunk)
        _build_and_write(_groups(kept.order.sorted(), size),
                         lambda part: pa.table(_columns(part, width)),
                         lambda table: writer.write_table(table, row_group_size=size))
    finally:
        writer.close()


def _parquet_writer(target: Path, schema: Any, compression: str) -> Any:
    """A Parquet writer of ``schema`` to ``target`` (cnsq.compat.arrow_parquet: pyarrow's own,
    without importing ``pyarrow.parquet``)."""
    from cnsq.compat.arrow_parquet import parquet_writer

    # No dictionaries: ids and polygons are unique, so trying them costs write time and makes
    # the file larger (docs/performance.md).
    return parquet_writer(target, schema, compression=compression, use_dictionary=False,
                          write_statistics=True)


IN_FLIGHT = 2  # groups built or being written while the next is merged


def _build_and_write(parts: Iterator[Any], build: Callable[[Any], Any],
                     write: Callable[[Any], object]) -> None:
    """``write(build(part))`` for each part, in order, in two threads: one builds a part's
    columns while the other writes the part before and the caller's thread merges the next
    (numpy, Arrow and the writers release the GIL). At most :data:`IN_FLIGHT` parts wait, so
    memory is a few groups. Every task has ended when this returns or raises, however many
    Ctrl-Cs came: a file closed under a write crashed the process."""
    builder, writer = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    pending: deque = deque()
    stopped = threading.Event()  # after an error or a Ctrl-C: nothing more is written

    def write_built(built: Future) -> None:
        if stopped.is_set():
            return
        try:
            write(built.result())
        except BaseException:
            stopped.set()  # before the next part's write, which this thread runs next
            raise

    try:
        for part in parts:
            pending.append(writer.submit(write_built, builder.submit(build, part)))
            if len(pending) > IN_FLIGHT:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    except BaseException:
        stopped.set()
        raise
    finally:
        try:
            _join(builder)
        finally:
            _join(writer)


def _join(pool: ThreadPoolExecutor) -> None:
    """Wait for every task given to ``pool`` (of one worker), however many Ctrl-Cs come
    meanwhile; the last is raised after.

    Why not ``pool.shutdown(wait=True)``: a Ctrl-C that interrupts a thread's join leaves the
    thread marked as ended (Python 3.11), so a second join returns at once. One worker runs its
    tasks in order: an empty task put last ends after them all.
    """
    interrupted = None
    last = None
    while True:
        try:
            if last is None:
                last = pool.submit(int)
            last.result()
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    pool.shutdown(wait=False)
    if interrupted is not None:
        raise interrupted


def write_flatgeobuf(blocks: Iterator[Columns], target: Path) -> None:
    """Sorted as GeoParquet is (the index's leaves in the file's order), then written a group at
    a time with :class:`cnsq.results.flatgeobuf.Writer`: memory is a run, a group and a sixteenth of the
    index, whatever the file's size."""

    kept = _collect(blocks, target.parent)
    columns = [Column("tile", STRING), Column("x", INT), Column("y", INT), Column("z", INT)]
    columns += [Column(f"p{i}", DOUBLE) for i in range(kept.width)]
    # The longest id the kept tiles can have: the widest x, y and z, and two dashes.
    widest = sum(len(str(v)) for v in kept.largest) + 2
    writer = Writer(target, "tiles", columns, kept.count, kept.bounds or (0.0, 0.0, 0.0, 0.0),
                    widest)
    whole = False
    try:
        _build_and_write(
            (_from_records(records) for records in kept.order.sorted()),
            lambda part: (tile_bounds(part.x, part.y, part.z),
                          [_id_bytes(part), part.x, part.y, part.z,
                           *(part.scores[:, i] for i in range(kept.width))]),
            lambda built: writer.add(*built))
        whole = True
    finally:
        if whole:
            writer.close()
        else:  # the error stands (a full disk, a Ctrl-C), not the writer's count check
            writer.abandon()


def _id_bytes(c: Columns) -> tuple[Any, Any]:
    """The tiles' ids as UTF-8 bytes one after another, and each one's length."""
    import numpy as np

    offsets, data = _string_buffers(_ids(c))
    return memoryview(data)[offsets[0]:offsets[-1]], np.diff(offsets)


def _string_buffers(texts) -> tuple[Any, Any]:
    """An Arrow string array's offsets (numpy, one past its last text; a slice's are not from
    0) and the buffer of its bytes."""
    import numpy as np

    _, offsets, data = texts.buffers()
    return np.frombuffer(offsets, np.int32, len(texts) + 1, texts.offset * 4), data


def write_geojson(blocks: Iterator[Columns], out: IO[bytes]) -> None:
    """A FeatureCollection as convert-geojson writes it (the same features, in file order, ids
    and properties), its text built :data:`CHUNK` features at a time by Arrow's string kernels
    in worker threads, written in order: numbers in their shortest round-trip form, coordinates
    from the vectorised bounds (within 1e-12 degrees of mercantile's)."""
    out.write(b'{"type":"FeatureCollection","features":[\n')
    parts = (part for block in blocks for part in _slices(block, CHUNK))
    pending: deque = deque()
    first = True
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for part in _chain(parts, [None]):
            if part is not None:
                pending.append(pool.submit(_features_text, part))
            while pending and (part is None or len(pending) > WORKERS):
                if not first:
                    out.write(b",\n")
                first = False
                out.write(pending.popleft().result())
    out.write(b"\n]}\n")


def _features_text(part: Columns) -> memoryview:
    """The GeoJSON Features of ``part``, joined by ",\\n"."""
    import numpy as np

    def texts(first, second):
        # Neighbouring tiles share edges (a tile's east is the next one's west) and a run of
        # tiles shares its rows and columns: each distinct edge is written once, then copied.
        # (Compared as bits, so that no two numbers with different texts are merged.)
        bits = np.concatenate([first, second]).view(np.int64)
        distinct, where = np.unique(bits, return_inverse=True)
        both = _call("take", _text(distinct.view(np.float64)), _arrow(where.astype(np.int64)))
        return both.slice(0, len(first)), both.slice(len(first))

    width = part.scores.shape[1]
    west, south, east, north = tile_bounds(part.x, part.y, part.z)
    (w, e), (s, n) = texts(west, east), texts(south, north)
    ids = _ids(part)
    comma = _scalar(",")
    # The ring's four corners once each (joining fewer, longer pieces is the cheaper join).
    ws, es, en, wn = (_call("binary_join_element_wise", a, b, comma)
                      for a, b in ((w, s), (e, s), (e, n), (w, n)))
    pieces = ['{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[', ws, "],[", es,
              "],[", en, "],[", wn, "],[", ws, ']]]},"properties":{"tile":"', ids, '"']
    for i in range(width):
        pieces += [f',"p{i}":', _text(part.scores[:, i])]
    pieces.append("}},\n")
    joined = _call("binary_join_element_wise",
                   *(_scalar(p) if isinstance(p, str) else p for p in pieces), _scalar(""))
    offsets, data = _string_buffers(joined)
    body = memoryview(data)[offsets[0]:offsets[-1]]
    return body[:len(body) - 2]  # the last feature's ",\n" comes before the next part


def _chain(held, rest):
    yield from held
    yield from rest


def _write(fmt: str, blocks: Iterator[Columns], target: Path, compression: str | None) -> None:
    if fmt == "geojson":
        with target.open("wb") as binary:
            write_geojson(blocks, binary)
    elif fmt == "geoparquet":
        write_geoparquet(blocks, target, compression or COMPRESSIONS[0])
    else:
        write_flatgeobuf(blocks, target)


class NothingValid(CnsqError):
    """Every row of the source was bad: nothing is written, and an existing target keeps what
    it held. ``report`` lists the bad rows."""

    def __init__(self, message: str, report: Report):
        super().__init__(message)
        self.report = report


def export(source: Path, target: Path, fmt: str, thresh_ind: int | None, thresh: float | None,
           progress: Callable[[Report], None] | None = None,
           compression: str | None = None) -> Report:
    """Export ``source`` (a results CSV) to ``target`` in ``fmt``; the file appears whole or not
    at all (written under a temporary name, then renamed). ``progress(report)`` is called as
    every ``PROGRESS_EVERY`` rows are read. ``compression``: GeoParquet's codec (one of
    :data:`COMPRESSIONS`, the first by default); the other formats refuse one."""
    if fmt not in FORMATS:
        raise CnsqError(f"{option('fmt')} {fmt}: expected one of {', '.join(FORMATS)}")
    if compression is not None and fmt != "geoparquet":
        raise CnsqError(f"{option('compression')} is for {option('fmt')} geoparquet; {fmt} is "
                          "written as its format defines it")
    if compression is not None and compression not in COMPRESSIONS:
        raise CnsqError(f"{option('compression')} {compression}: expected one of "
                          f"{', '.join(COMPRESSIONS)}")
    if (thresh_ind is None) != (thresh is None):
        raise CnsqError(f"{option('thresh_ind')} and {option('thresh')} go together (or "
                          "neither: every tile)")
    if fmt in ("geoparquet", "flatgeobuf"):
        _require_geo(fmt)

    writable_target(str(target), source)  # before any work

    handle = open_results(source)
    report = Report()
    with atomic_path(target) as partial, handle:
        if thresh_ind is not None:
            check_thresh_ind(handle, source, thresh_ind)
        def by_rows(rows_from: IO[str]) -> None:
            with partial.open("w", encoding="utf-8", newline="") as out:
                rows = read_rows(rows_from, thresh_ind, thresh, report, progress)
                if fmt == "geojson":

                    write_features((feature(r.tile, r.scores) for r in rows), out)
                else:
                    writer = csv.writer(out)
                    writer.writerow(["tile", "output"])
                    writer.writerows([tile_id(r.tile), json.dumps(r.scores)] for r in rows)

        if fmt == "csv" or (fmt == "geojson" and not _has_geo()):
            by_rows(handle)
        else:
            try:
                _write(fmt, iter_columns(source, thresh_ind, thresh, report, progress=progress),
                       partial, compression)
            except _LineBreaks:  # start again, row by row: its line numbers are exact
                partial.unlink(missing_ok=True)
                _write(fmt, iter([row_columns(source, thresh_ind, thresh, report,
                                              progress=progress)]), partial, compression)
            if fmt == "geojson" and report.bad_count:
                # GeoJSON holds rows of any score count, as convert-geojson writes them: a file
                # with a row the typed columns refused is written again row by row, so both
                # keep and report the same rows.
                partial.unlink(missing_ok=True)
                report.read = report.kept = report.bad_count = 0
                report.bad = []
                with open_results(source) as again:
                    by_rows(again)
        if report.bad_count and report.bad_count >= report.read:
            # A failed export, not an empty result: the target is replaced only by a file
            # that holds what the source holds (raised here, the partial file is removed).
            raise NothingValid(f"no row of {source} is valid: {target} was not written", report)
    return report
