"""Tile lists (``x-y-z`` lines, XYZ scheme) and the tiles covering GeoJSON geometries."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import mercantile

from cnsq.errors import CnsqError
from download_and_predict.tiles import MAX_ZOOM, tile_id
from download_and_predict.tiles import parse_tile_id as parse_lambda_tile_id

MAX_LAT = 85.0511287798066


class TileError(CnsqError):
    """A tile id or a GeoJSON input is malformed."""


class Line(NamedTuple):
    """One line of a tile list: its number, the tile (None if bad) and why it is bad."""

    number: int
    tile: mercantile.Tile | None
    error: str | None = None


def parse_tile_id(text: str) -> mercantile.Tile:
    """``"x-y-z"`` (or ``"{x,y,z}"``, as the original Lambda stored tiles) → mercantile Tile;
    the Lambda package's parser (its one home), as mercantile's type for cnsq's geometry.

    Raises:
        ValueError: not three integers, or out of range for the zoom.
    """
    return mercantile.Tile(*parse_lambda_tile_id(text))


def read_lines(stream: IO[str], start_after: int = 0) -> Iterator[Line]:
    """Parse a tile list; blank lines and ``#`` comments are skipped, bad lines reported."""
    for number, raw in enumerate(stream, start=1):
        if number <= start_after:
            continue
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            yield Line(number, parse_tile_id(text))
        except ValueError as exc:
            yield Line(number, None, str(exc))


# ---------------------------------------------------------------------------------------------
# Tile cover


def _fractional(lon: float, lat: float, zoom: int) -> tuple[float, float]:
    """Web Mercator position in tile units at ``zoom`` (x right, y down)."""
    lat = max(-MAX_LAT, min(MAX_LAT, lat))
    n = 2**zoom
    x = (lon + 180.0) / 360.0 * n
    rad = math.radians(lat)
    y = (1.0 - math.log(math.tan(rad) + 1.0 / math.cos(rad)) / math.pi) / 2.0 * n
    return min(max(x, 0.0), n), min(max(y, 0.0), n)


def _segment_cells(a: tuple[float, float], b: tuple[float, float], n: int) -> Iterator[tuple[int, int]]:
    """Cells whose open interior the segment a→b passes through.

    The segment is cut where it crosses grid lines; the middle of each piece lies in exactly one
    cell's interior, unless the piece runs along a grid line (then it only touches two cells).
    """
    (x0, y0), (x1, y1) = a, b
    cuts = {0.0, 1.0}
    for start, end in ((x0, x1), (y0, y1)):
        if start != end:
            lo, hi = sorted((start, end))
            for k in range(math.ceil(lo), math.floor(hi) + 1):
                cuts.add((k - start) / (end - start))
    ordered = sorted(t for t in cuts if 0.0 <= t <= 1.0)
    eps = 1e-9
    for t0, t1 in zip(ordered, ordered[1:], strict=False):
        if t1 - t0 < 1e-12:
            continue
        t = (t0 + t1) / 2
        mx, my = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
        if abs(mx - round(mx)) < eps or abs(my - round(my)) < eps:
            continue  # along a grid line
        cx, cy = int(mx), int(my)
        if 0 <= cx < n and 0 <= cy < n:
            yield cx, cy


def _row_spans(edges: list, row: int, n: int) -> Iterator[tuple[int, int]]:
    """The columns of ``row`` whose centre is inside the rings of ``edges`` (even-odd), as
    inclusive (first, last) spans: cells the boundary does not cross are wholly inside or
    outside, and inside iff their centre is."""
    line = row + 0.5
    crossings = sorted(
        ax + (line - ay) * (bx - ax) / (by - ay)
        for (ax, ay), (bx, by) in edges
        if (ay <= line < by) or (by <= line < ay)
    )
    for left, right in zip(crossings[::2], crossings[1::2], strict=False):
        first, last = max(math.ceil(left - 0.5), 0), min(math.floor(right - 0.5), n - 1)
        if first <= last:
            yield first, last


def _geometries(data: Any, where: str) -> Iterator[dict]:
    if not isinstance(data, dict) or "type" not in data:
        raise TileError(f"{where}: not a GeoJSON object (no 'type')")
    kind = data["type"]
    if kind == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise TileError(f"{where}: FeatureCollection without a 'features' list")
        for i, feature in enumerate(features):
            yield from _geometries(feature, f"{where}: features[{i}]")
    elif kind == "Feature":
        if data.get("geometry") is not None:
            yield from _geometries(data["geometry"], f"{where}.geometry")
    elif kind == "GeometryCollection":
        for i, geometry in enumerate(data.get("geometries") or []):
            yield from _geometries(geometry, f"{where}: geometries[{i}]")
    elif kind in ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
                  "MultiPolygon"):
        if "coordinates" not in data:
            raise TileError(f"{where}: {kind} without coordinates")
        yield data | {"_where": where}
    else:
        raise TileError(f"{where}: unknown GeoJSON type {kind!r}")


def _position(value: Any, where: str) -> tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) < 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:2])):
        raise TileError(f"{where}: bad position {value!r} (expected [lon, lat])")
    lon, lat = float(value[0]), float(value[1])
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise TileError(f"{where}: position {value!r} is outside lon -180..180, lat -90..90")
    return lon, lat


def _rings(coords: Any, depth: int, where: str) -> Iterator[list[tuple[float, float]]]:
    """Yield lists of positions at the given nesting depth (1: a line/ring, 2: rings, 3: polygons)."""
    if not isinstance(coords, list):
        raise TileError(f"{where}: coordinates must be a list")
    if depth == 1:
        yield [_position(p, where) for p in coords]
    else:
        for item in coords:
            yield from _rings(item, depth - 1, where)


def cover(geojson: Any, zoom: int) -> list[mercantile.Tile]:
    """The tiles at ``zoom`` whose interior meets the geometries (polygons: their area; lines:
    the tiles they pass through; points: the tile holding them), sorted, without duplicates.

    Raises:
        TileError: not GeoJSON, an unknown type, or a bad position (with where it is).
    """
    return list(iter_cover(geojson, zoom))


def iter_cover(geojson: Any, zoom: int) -> Iterator[mercantile.Tile]:
    """:func:`cover`, streamed row by row (north to south, west to east): memory follows the
    geometries' outlines and one row, never the number of tiles (3.3 million at zoom 15 for a
    20° square). The input is read and checked before the first tile.

    Raises:
        TileError: as :func:`cover`, at the call, before any tile.
    """
    if not 0 <= zoom <= MAX_ZOOM:
        raise TileError(f"zoom must be within 0..{MAX_ZOOM}, got {zoom}")
    n = 2**zoom
    outline: dict[int, set[int]] = {}  # row → columns the boundaries, lines and points touch
    areas: list[tuple[int, int, list]] = []  # (first row, last row, edges) of each polygon
    count = 0
    for geometry in _geometries(geojson, "input"):
        count += 1
        kind, where, coords = geometry["type"], geometry["_where"], geometry["coordinates"]
        if kind in ("Point", "MultiPoint"):
            points = [coords] if kind == "Point" else coords
            for point in points:
                lon, lat = _position(point, where)
                tile = mercantile.tile(lon, max(-MAX_LAT, min(MAX_LAT, lat)), zoom)
                outline.setdefault(tile.y, set()).add(tile.x)
            continue
        if kind in ("LineString", "MultiLineString"):
            depth, area = (1 if kind == "LineString" else 2), False
            groups = [list(_rings(coords, depth, where))]
        elif kind == "Polygon":
            groups, area = [list(_rings(coords, 2, where))], True
        else:
            if not isinstance(coords, list):
                raise TileError(f"{where}: coordinates must be a list")
            groups, area = [list(_rings(polygon, 2, where)) for polygon in coords], True
        for rings in groups:
            if area:
                for ring in rings:
                    if len(ring) < 4 or ring[0] != ring[-1]:
                        raise TileError(f"{where}: a polygon ring needs 4+ positions, first = last")
            projected = [[_fractional(lon, lat, zoom) for lon, lat in ring] for ring in rings]
            edges = [(a, b) for ring in projected for a, b in zip(ring, ring[1:], strict=False)]
            for a, b in edges:
                for x, y in _segment_cells(a, b, n):
                    outline.setdefault(y, set()).add(x)
            if area and edges:
                ys = [y for ring in projected for _, y in ring]
                areas.append((max(int(min(ys)), 0), min(int(max(ys)), n - 1), edges))
    if count == 0:
        raise TileError("input: no geometries")
    return _rows(outline, areas, n, zoom)


def _rows(outline: dict[int, set[int]], areas: list[tuple[int, int, list]], n: int, zoom: int
          ) -> Iterator[mercantile.Tile]:
    first = min([*outline, *(a[0] for a in areas)], default=0)
    last = max([*outline, *(a[1] for a in areas)], default=-1)
    for row in range(first, last + 1):
        spans = sorted([(x, x) for x in outline.pop(row, ())]
                       + [span for top, bottom, edges in areas if top <= row <= bottom
                          for span in _row_spans(edges, row, n)])
        done = -1  # the last column written in this row
        for start, end in spans:
            for x in range(max(start, done + 1), end + 1):
                yield mercantile.Tile(x, row, zoom)
            done = max(done, end)


def load_geojson(path: str | Path, text: str | None = None) -> Any:
    """Read a GeoJSON file; invalid JSON is reported with line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8") if text is None else text
    except FileNotFoundError:
        raise TileError(f"{path}: no such file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TileError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def write_tiles(tiles: Iterable[mercantile.Tile], out: IO[str]) -> int:
    count = 0
    for tile in tiles:
        out.write(tile_id(tile) + "\n")
        count += 1
    return count


def cover_bounds(bounds: Iterable[tuple[float, float, float, float]], zoom: int
                 ) -> Iterator[mercantile.Tile]:
    """The tiles at ``zoom`` over each (west, south, east, north) box in longitude and latitude
    (an imagery's footprint: its files' bounds), each once, north to south and west to east.

    Raises:
        TileError: a zoom outside 0..MAX_ZOOM, a box that is not one.
    """
    if not 0 <= zoom <= MAX_ZOOM:
        raise TileError(f"zoom must be within 0..{MAX_ZOOM}, got {zoom}")
    found: set[mercantile.Tile] = set()
    for west, south, east, north in bounds:
        if not (west <= east and south <= north):
            raise TileError(f"bounds {west}, {south}, {east}, {north} are not a box")
        found.update(mercantile.tiles(west, max(-MAX_LAT, south), east, min(MAX_LAT, north),
                                      [zoom]))
    yield from sorted(found, key=lambda t: (t.y, t.x))
