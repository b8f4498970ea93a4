"""``cnsq export``: the results in the formats GIS users load — GeoParquet 1.1, FlatGeobuf,
GeoJSON, CSV — with the same thresholding and the same per-row checks as ``convert-geojson``.

Every format holds each kept tile as a polygon of its bounds (longitude/latitude, WGS 84,
counterclockwise), its id, x, y, z and every score as a typed column (``p0``, ``p1`` …).

- **GeoParquet** (written with pyarrow): WKB geometry, the ``geo`` metadata of GeoParquet 1.1,
  a ``bbox`` covering column, rows sorted along a Z-order curve of the tiles (the order of their
  quadkeys) in row groups of :data:`ROW_GROUP` rows, so a reader skips the groups outside its
  window by their statistics.
- **FlatGeobuf** (written with pyogrio, GDAL's FlatGeobuf driver): its packed Hilbert R-tree
  index; chosen as GDAL is what QGIS itself uses to read and write the format.

pyarrow and pyogrio are the optional extra ``cnsq[geo]``; without it these two formats say what
to install. GeoJSON is ``convert-geojson``'s writer (the same bytes); CSV keeps the kept rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import mercantile

from .errors import CnsqError
from .geojson import Report, check_thresh_ind, read_result

FORMATS = ("geoparquet", "flatgeobuf", "geojson", "csv")
ROW_GROUP = 16_384
CHUNK = 65_536  # rows parsed and turned into columns at a time
GEO_EXTRA = "pip install 'cnsq[geo]' (pyarrow and pyogrio)"


@dataclass(frozen=True)
class Row:
    line: int
    tile: mercantile.Tile
    scores: list[float]


def read_rows(source: IO[str], thresh_ind: int | None, thresh: float | None,
              report: Report) -> Iterator[Row]:
    """The kept rows of a ``tile,output`` CSV: a bad row is reported with its line and skipped;
    with ``thresh_ind``/``thresh`` only tiles scoring at least ``thresh`` there are kept."""
    reader = csv.reader(source)
    for row in reader:
        line = reader.line_num
        if line == 1 and row[:2] == ["tile", "output"]:
            continue
        report.read += 1
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


def _morton(x: int, y: int) -> int:
    """The Z-order key of a tile at one zoom (its quadkey's order)."""
    key = 0
    for bit in range(32):
        key |= ((x >> bit) & 1) << (2 * bit) | ((y >> bit) & 1) << (2 * bit + 1)
    return key


def _sort_key(row: Row) -> tuple[int, int]:
    # Quadkey order across zooms: the tile's key shifted to the deepest zoom (30).
    shift = 30 - row.tile.z
    return _morton(row.tile.x << shift, row.tile.y << shift), row.tile.z


def _columns(rows: list[Row], width: int):
    """The rows as typed arrays: id, x, y, z, p0…, the WKB polygons and their bboxes."""
    import numpy as np
    import pyarrow as pa

    n = len(rows)
    x = np.fromiter((r.tile.x for r in rows), np.int64, n)
    y = np.fromiter((r.tile.y for r in rows), np.int64, n)
    z = np.fromiter((r.tile.z for r in rows), np.int64, n)
    # Tile bounds, vectorised (mercantile's formulas: Web Mercator tiles in lon/lat).
    size = np.exp2(z.astype(np.float64))
    west = x / size * 360.0 - 180.0
    east = (x + 1) / size * 360.0 - 180.0
    north = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * y / size))))
    south = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (y + 1) / size))))
    # WKB Polygon, little endian: 1, type 3, one ring of five points (93 bytes each).
    record = np.dtype([("order", "u1"), ("type", "<u4"), ("rings", "<u4"), ("points", "<u4"),
                       ("xy", "<f8", (10,))])
    wkb = np.zeros(n, record)
    wkb["order"], wkb["type"], wkb["rings"], wkb["points"] = 1, 3, 1, 5
    wkb["xy"] = np.stack([west, south, east, south, east, north, west, north, west, south], axis=1)
    offsets = np.arange(0, (n + 1) * record.itemsize, record.itemsize, dtype=np.int32)
    geometry = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                             pa.py_buffer(wkb.tobytes())])
    scores = np.full((n, width), np.nan)
    for i, r in enumerate(rows):
        scores[i, :len(r.scores)] = r.scores
    bbox = pa.StructArray.from_arrays([pa.array(west), pa.array(south), pa.array(east),
                                       pa.array(north)], ["xmin", "ymin", "xmax", "ymax"])
    columns = {"tile": pa.array([f"{r.tile.x}-{r.tile.y}-{r.tile.z}" for r in rows]),
               "x": pa.array(x), "y": pa.array(y), "z": pa.array(z)}
    columns.update((f"p{i}", pa.array(scores[:, i])) for i in range(width))
    columns["geometry"] = geometry
    columns["bbox"] = bbox
    return columns, (float(west.min()), float(south.min()), float(east.max()), float(north.max()))


def _require_geo() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyogrio  # noqa: F401
    except ImportError:
        raise CnsqError(f"this format needs pyarrow and pyogrio: {GEO_EXTRA}") from None


def _score_width(rows: list[Row], source: Path) -> int:
    widths = {len(r.scores) for r in rows}
    if len(widths) > 1:
        raise CnsqError(f"{source}: the rows hold {sorted(widths)} scores; a typed table needs "
                        "one count (export them to GeoJSON, which keeps each row's own)")
    return widths.pop() if widths else 0


def geo_metadata(bbox: tuple[float, float, float, float]) -> dict:
    """The GeoParquet 1.1 ``geo`` metadata of an export (CRS omitted: OGC:CRS84, lon/lat)."""
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": {
        "encoding": "WKB", "geometry_types": ["Polygon"], "bbox": list(bbox),
        "orientation": "counterclockwise", "edges": "planar",
        "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                              "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}}}}}


def write_geoparquet(rows: list[Row], target: Path, width: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=_sort_key)
    columns, bbox = _columns(rows, width) if rows else ({}, (0.0, 0.0, 0.0, 0.0))
    if not rows:
        columns = _columns([Row(0, mercantile.Tile(0, 0, 0), [0.0] * width)], width)[0]
    table = pa.table(columns)
    if not rows:
        table = table.slice(0, 0)
    table = table.replace_schema_metadata({b"geo": json.dumps(geo_metadata(bbox)).encode()})
    pq.write_table(table, target, row_group_size=ROW_GROUP, compression="zstd",
                   write_statistics=True)


def write_flatgeobuf(rows: list[Row], target: Path, width: int) -> None:
    import pyarrow as pa
    from pyogrio import write_arrow

    columns, _ = _columns(rows or [Row(0, mercantile.Tile(0, 0, 0), [0.0] * width)], width)
    columns.pop("bbox")
    table = pa.table(columns)
    if not rows:
        table = table.slice(0, 0)
    write_arrow(table, str(target), driver="FlatGeobuf", geometry_name="geometry",
                geometry_type="Polygon", crs="EPSG:4326", layer=target.stem,
                layer_options={"SPATIAL_INDEX": "YES"})


def export(source: Path, target: Path, fmt: str, thresh_ind: int | None, thresh: float | None,
           progress: Callable[[Report], None] | None = None) -> Report:
    """Export ``source`` (a results CSV) to ``target`` in ``fmt``; the file appears whole or not
    at all (written under a temporary name, then renamed)."""
    if fmt not in FORMATS:
        raise CnsqError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if (thresh_ind is None) != (thresh is None):
        raise CnsqError("--thresh_ind and --thresh go together (or neither: every tile)")
    if fmt in ("geoparquet", "flatgeobuf"):
        _require_geo()
    try:
        handle = source.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except FileNotFoundError:
        raise CnsqError(f"{source}: no such file") from None
    report = Report()
    partial = target.with_name(f".{target.name}.partial")
    with handle:
        if thresh_ind is not None:
            check_thresh_ind(handle, source, thresh_ind)
        if fmt in ("geojson", "csv"):
            with partial.open("w", encoding="utf-8", newline="") as out:
                rows = read_rows(handle, thresh_ind, thresh, report)
                if fmt == "geojson":
                    from .geojson import feature, write_features

                    write_features((feature(r.tile, r.scores) for r in rows), out)
                else:
                    writer = csv.writer(out)
                    writer.writerow(["tile", "output"])
                    writer.writerows([f"{r.tile.x}-{r.tile.y}-{r.tile.z}", json.dumps(r.scores)]
                                     for r in rows)
        else:
            rows = list(read_rows(handle, thresh_ind, thresh, report))
            width = _score_width(rows, source)
            partial.unlink(missing_ok=True)
            (write_geoparquet if fmt == "geoparquet" else write_flatgeobuf)(rows, partial, width)
    partial.replace(target)
    return report
