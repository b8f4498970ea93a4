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
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cnsq.errors import CnsqError, option
from cnsq.files import atomic_path, writable_target
from cnsq.results.columns import (
    WORKERS,
    Columns,
    _arrow,
    _call,
    _empty,
    _LineBreaks,
    _scalar,
    _string_buffers,
    _text,
    iter_columns,
    row_columns,
)
from cnsq.results.flatgeobuf import DOUBLE, INT, STRING, Column, Writer
from cnsq.results.geojson import feature, write_features
from cnsq.results.reader import (
    Report,
    check_thresh_ind,
    open_results,
    read_rows,
)
from cnsq.results.tile_order import ZOrder
from cnsq.tiles import tile_id

FORMATS = ("geoparquet", "flatgeobuf", "geojson", "csv")
# GeoParquet's codecs. Snappy is the default of pyarrow, GeoPandas and GDAL, and the fastest
# here; zstd makes a smaller file for a longer write (how much: docs/performance.md, "Design
# choices, measured").
COMPRESSIONS = ("snappy", "zstd", "none")
ROW_GROUP = 16_384
CHUNK = 16_384  # features turned into GeoJSON text at a time
GEO_EXTRA = "pip install 'cnsq[geo]' (pyarrow)"


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
