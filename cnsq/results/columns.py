"""The results CSV read by columns: the reader of cnsq.results.reader for many rows at once
(pyarrow's CSV reader and compute functions over blocks of rows), for export and view. Every
row it cannot check in bulk (a line break in a value, an odd score count, a tile id outside
the strict form) is read alone by :func:`~cnsq.results.reader.read_rows`, so its report and
line number are the row reader's; tests/unit/test_readers_agree.py holds the two to agree.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnsq.errors import CnsqError, option
from cnsq.results.reader import (
    PROGRESS_EVERY,
    Report,
    Row,
    open_results,
    read_rows,
)
from cnsq.tiles import parse_tile_id
from download_and_predict.tiles import MAX_ZOOM, TILE_ID_STRICT

WORKERS = min(4, os.cpu_count() or 1)  # threads checking blocks of rows


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


TILE_ID = f"^{TILE_ID_STRICT}$"


TILE_PATTERN = re.compile(TILE_ID_STRICT)


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
    :func:`~cnsq.results.reader.read_result`, so its report (and line number) is the one
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
    good &= (z <= MAX_ZOOM) & (x < np.left_shift(1, np.minimum(z, 62))) & (
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


def _empty(width: int, raw: bool = False) -> Columns:
    """No rows (with ``raw``, no output texts and no rows of other counts either)."""
    import numpy as np

    return Columns(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.int8), np.zeros((0, width)), _texts([]) if raw else None,
                   [] if raw else None)


def _string_buffers(texts) -> tuple[Any, Any]:
    """An Arrow string array's offsets (numpy, one past its last text; a slice's are not from
    0) and the buffer of its bytes."""
    import numpy as np

    _, offsets, data = texts.buffers()
    return np.frombuffer(offsets, np.int32, len(texts) + 1, texts.offset * 4), data


