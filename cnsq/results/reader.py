"""The results CSV, read: the one reader of ``tile,output`` rows every command uses (convert-geojson,
export, view), with the same checks and the same line numbers for a bad row. The columnar reader
(cnsq.results.columns) is the same reader for many rows at once: a row it cannot check in bulk
goes through :func:`read_result`, and tests/unit/test_readers_agree.py holds them to agree.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import mercantile

from cnsq.errors import CnsqError, option
from cnsq.tiles import parse_tile_id

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
    for result in results(source, thresh_ind if thresh_ind is not None else 0, report, progress,
                          header):
        scores = result.scores
        bad = next((i for i, s in enumerate(scores) if isinstance(s, bool) or not isinstance(
            s, (int, float)) or not math.isfinite(s)), None)
        if bad is not None:
            report.add_bad(result.line, f"score {bad} is not a number: {scores[bad]!r}")
            continue
        if thresh is not None and result.value < thresh:
            continue
        report.kept += 1
        yield Row(result.line, result.tile, [float(s) for s in scores])


@dataclass(frozen=True)
class Result:
    """One readable row: its line, tile, class scores, the score at ``thresh_ind`` and the
    output text as the file holds it."""

    line: int
    tile: mercantile.Tile
    scores: list
    value: float
    output: str


def results(source: IO[str], thresh_ind: int, report: Report,
            progress: Callable[[Report], None] | None = None,
            header: bool = True) -> Iterator[Result]:
    """Each row :func:`read_result` reads (the loop every row reader shares); a row it refuses
    is reported with its line and skipped."""
    for line, row in csv_rows(source, report, progress, header):
        try:
            tile, scores, value = read_result(row, thresh_ind)
        except ValueError as exc:
            report.add_bad(line, str(exc))
            continue
        yield Result(line, tile, scores, value, row[1])


