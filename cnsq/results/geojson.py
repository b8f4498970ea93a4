"""``cnsq convert-geojson``: results CSV → thresholded GeoJSON, streamed in constant memory.

Polygons are the tiles' bounds in the XYZ scheme the queue and imagery use (``--tms`` for ids
made in TMS). Scores are kept unrounded (the original rounded to two decimals before
thresholding, so 0.949 passed 0.95). Rings are counterclockwise, as RFC 7946 asks.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import mercantile

from cnsq.errors import CnsqError, option
from cnsq.files import atomic_write, writable_target
from cnsq.tiles import parse_tile_id, tile_id

# One output may be a long JSON document. The csv module's own limit would refuse the whole
# file at a longer field; read_result refuses that row alone instead.
MAX_OUTPUT = 16 * 1024 * 1024
csv.field_size_limit(2**31 - 1)


@dataclass
class Report:
    read: int = 0
    kept: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    bad_count: int = 0

    def add_bad(self, line: int, reason: str) -> None:
        """Count a bad row; list the 50 with the lowest line numbers, in order (a reader that
        reports rows out of order, as the columnar one does, lists what a row reader would)."""
        self.bad_count += 1
        if len(self.bad) >= 50 and line >= self.bad[-1][0]:
            return
        bisect.insort(self.bad, (line, reason))
        del self.bad[50:]


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


def read_result(row: list[str], thresh_ind: int) -> tuple[mercantile.Tile, list, float]:
    """One ``tile,output`` CSV row → (tile, its class scores, the score at ``thresh_ind``).

    Raises:
        ValueError: the row is malformed; the message says what is wrong with it.
    """
    if len(row) != 2:
        raise ValueError(f"expected 2 columns (tile,output), got {len(row)}")
    if row == ["tile", "output"]:
        raise ValueError("a header row in the middle of the file (CSV files joined?)")
    text_id, output = row
    if len(output) > MAX_OUTPUT:
        raise ValueError(f"output is larger than {MAX_OUTPUT // 2**20} MiB ({len(output):,} characters)")
    try:
        tile = parse_tile_id(text_id)
    except ValueError as exc:
        raise ValueError(f"tile: {exc}") from None
    try:
        scores = json.loads(output)
    except ValueError:
        raise ValueError(f"output is not JSON: {output[:40]!r}") from None
    except RecursionError:  # thousands of nested brackets: one poison row, not a crash
        raise ValueError("output is nested too deeply to read") from None
    if not isinstance(scores, list):
        raise ValueError("output is not a list of class scores")
    if not -len(scores) <= thresh_ind < len(scores):
        raise ValueError(f"thresh_ind {thresh_ind} is out of range for {len(scores)} scores")
    value = scores[thresh_ind]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"score {thresh_ind} is not a number: {value!r}")
    return tile, scores, float(value)


PROGRESS_EVERY = 50_000  # rows between progress updates


def csv_rows(source: IO[str], report: Report,
             progress: Callable[[Report], None] | None = None,
             header: bool = True) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) of each row of a results CSV after its optional ``tile,output``
    header (``header`` False: none is looked for), counted in ``report.read``. A header further
    down is a row like any other (read_result reports it)."""
    reader = csv.reader(source)
    for row in reader:
        line = reader.line_num
        if header and line == 1 and row[:2] == ["tile", "output"]:
            continue
        report.read += 1
        if progress and report.read % PROGRESS_EVERY == 0:
            progress(report)
        yield line, row


def convert(source: IO[str], out: IO[str], thresh_ind: int, thresh: float, tms: bool = False,
            seq: bool = False, progress: Callable[[Report], None] | None = None) -> Report:
    """Stream ``tile,output`` rows to GeoJSON features whose score at ``thresh_ind`` >= ``thresh``.

    ``seq`` writes one Feature per line (newline-delimited GeoJSON) instead of a FeatureCollection.
    ``progress(report)`` is called every ``PROGRESS_EVERY`` rows.
    """
    report = Report()

    def features() -> Iterator[str]:
        for line, row in csv_rows(source, report, progress):
            try:
                tile, scores, value = read_result(row, thresh_ind)
            except ValueError as exc:
                report.add_bad(line, str(exc))
                continue
            if value < thresh:
                continue
            if tms:
                tile = mercantile.Tile(tile.x, 2**tile.z - 1 - tile.y, tile.z)
            try:
                text = feature(tile, scores)
            except ValueError:
                report.add_bad(line, "a score is not a finite number (NaN or Infinity)")
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


def check_thresh_ind(handle: IO[str], source: Path, thresh_ind: int) -> None:
    """Refuse, before writing anything, a --thresh_ind the first result row cannot have."""

    for row in csv.reader(handle):
        if row[:2] == ["tile", "output"] or len(row) != 2:
            continue
        try:
            scores = json.loads(row[1])
        except (ValueError, RecursionError):  # the row itself is reported later
            break
        if isinstance(scores, list) and not -len(scores) <= thresh_ind < len(scores):
            handle.seek(0)
            raise CnsqError(f"{option('thresh_ind')} {thresh_ind} is out of range: {source} "
                              f"has {len(scores)} class scores per tile (0 to {len(scores) - 1})")
        break
    handle.seek(0)


def open_results(source: Path) -> IO[str]:
    """A results CSV opened for reading: a byte order mark is not part of the header, and a
    byte that is not UTF-8 spoils only its row.

    Raises:
        CnsqError: ``source`` does not exist, or is a folder.
    """

    try:
        return source.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except FileNotFoundError:
        raise CnsqError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise CnsqError(f"{source}: is a folder; name a results CSV in it") from None


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
