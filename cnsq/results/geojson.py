"""``cnsq convert-geojson``: results CSV → thresholded GeoJSON, streamed in constant memory.

Polygons are the tiles' bounds in the XYZ scheme the queue and imagery use (``--tms`` for ids
made in TMS). Scores are kept unrounded (the original rounded to two decimals before
thresholding, so 0.949 passed 0.95). Rings are counterclockwise, as RFC 7946 asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

import mercantile

from cnsq.files import atomic_write, writable_target
from cnsq.results.reader import (
    Report,
    check_thresh_ind,
    open_results,
    results,
)
from cnsq.tiles import tile_id


def tile_ring(tile: mercantile.Tile) -> list[list[float]]:
    """The tile's bounds as a closed counterclockwise ring of [lon, lat]."""
    b = mercantile.bounds(tile)
    return [[b.west, b.south], [b.east, b.south], [b.east, b.north], [b.west, b.north],
            [b.west, b.south]]


def _feature(identifier: str, tile: mercantile.Tile, scores: list) -> str:
    properties = {"tile": identifier}
    properties.update((f"p{i}", value) for i, value in enumerate(scores))
    # allow_nan=False: NaN and Infinity are not JSON, and a GeoJSON holding them is unreadable.
    return json.dumps({"type": "Feature",
                       "geometry": {"type": "Polygon", "coordinates": [tile_ring(tile)]},
                       "properties": properties}, separators=(",", ":"), allow_nan=False)


def convert(source: IO[str], out: IO[str], thresh_ind: int, thresh: float, tms: bool = False,
            seq: bool = False, progress: Callable[[Report], None] | None = None) -> Report:
    """Stream ``tile,output`` rows to GeoJSON features whose score at ``thresh_ind`` >= ``thresh``.

    ``seq`` writes one Feature per line (newline-delimited GeoJSON) instead of a FeatureCollection.
    ``progress(report)`` is called every ``PROGRESS_EVERY`` rows.
    """
    report = Report()

    def features() -> Iterator[str]:
        for result in results(source, thresh_ind, report, progress):
            if result.value < thresh:
                continue
            tile = result.tile
            if tms:
                tile = mercantile.Tile(tile.x, 2**tile.z - 1 - tile.y, tile.z)
            try:
                text = feature(tile, result.scores)
            except ValueError:
                report.add_bad(result.line, "a score is not a finite number (NaN or Infinity)")
                continue
            report.kept += 1
            yield text

    write_features(features(), out, seq)
    return report


def feature(tile: mercantile.Tile, scores: list) -> str:
    """One tile's Feature as compact JSON text (its id written ``x-y-z``).

    Raises:
        ValueError: a score is NaN or Infinity.
    """
    return _feature(tile_id(tile), tile, scores)


def write_features(features: Iterable[str], out: IO[str], seq: bool = False) -> None:
    """Features as a FeatureCollection, or one per line with ``seq``: the one writer of
    convert-geojson and of cnsq view's download, so both give the same bytes."""
    if not seq:
        out.write('{"type":"FeatureCollection","features":[\n')
    first = True
    for text in features:
        if seq:
            out.write(text + "\n")
        else:
            out.write(("" if first else ",\n") + text)
        first = False
    if not seq:
        out.write("\n]}\n")


def convert_file(source: Path, target: str, stdout: IO[str] | None, **options) -> Report:
    """Convert a file; the output goes to a temporary name and is renamed when complete."""
    with open_results(source) as handle:
        check_thresh_ind(handle, source, options["thresh_ind"])
        if target == "-":
            if stdout is None:
                raise ValueError("target '-' needs a stdout to write to")
            return convert(handle, stdout, **options)

        with atomic_write(writable_target(target, source)) as out:
            return convert(handle, out, **options)
