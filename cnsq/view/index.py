"""The index ``cnsq view`` answers from: results read once into a SQLite file, with every parent
tile's summary computed at start.

A million results are too many for a browser, so the page asks only for what is in view: the
tiles themselves when the map is within ``DETAIL`` zooms of theirs, else one square per parent
tile at ``DETAIL`` zooms below the map's, carrying the max and mean score and the count of the
tiles under it. Those parents are computed once, level by level from the one below (each level
a quarter of the one before), so a pan or a zoom is one indexed range query. Counting the tiles
above a threshold bisects the sorted scores, held as one array of doubles (8 bytes a tile).
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import mercantile

from cnsq.errors import CnsqError, option
from cnsq.files import abandoned_partials, atomic_path, scratch_path
from cnsq.results.columns import _arrow, _call, _texts, read_columns
from cnsq.results.geojson import feature
from cnsq.results.reader import Report, open_results, results
from cnsq.tiles import parse_tile_id, tile_id

try:  # advisory locks mark the indexes live views hold (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows: the cache then keeps every index
    fcntl = None  # type: ignore[assignment]

DETAIL = 3  # zooms below a tile's own at which it is still drawn alone (4**3 = 64 per screen tile)
LIMIT = 20_000  # items in one answer, whatever the view: a safety net, not the design
BATCH = 20_000  # rows per insert
PROGRESS_EVERY = 100_000
FORMAT = 2  # of the index file: a cached index of another format is rebuilt (2: parents' mean)
KEEP = 4  # indexes kept in the cache
EARLY_BYTES = 4 << 20  # a results CSV this large is drawn before its tiles table is written

# The tiles table gets its index after the rows are in: appending then sorting once is faster
# than inserting rows in key order into a B-tree (docs/performance.md).
SCHEMA = """
CREATE TABLE tiles (z INTEGER, x INTEGER, y INTEGER, score REAL, output TEXT);
CREATE TABLE parents (z INTEGER, x INTEGER, y INTEGER, max REAL, mean REAL, n INTEGER,
                      PRIMARY KEY (z, x, y)) WITHOUT ROWID;
"""

# Level z from level z+1: its tiles and its parents (each parent holds the tiles deeper still).
# The mean is a weighted mean of the children's means, each weighted by its share of the count:
# a sum of scores overflows (two finite scores of 1.7e308 make infinity), a weighted mean stays
# within the scores' own range.
PARENTS_SQL = """
INSERT INTO parents
SELECT :z, px, py, max(max), sum(mean * (n * 1.0 / total)), total FROM (
    SELECT x >> 1 AS px, y >> 1 AS py, max, mean, n,
           sum(n) OVER (PARTITION BY x >> 1, y >> 1) AS total FROM (
        SELECT x, y, score AS max, score AS mean, 1 AS n FROM tiles WHERE z = :z + 1
        UNION ALL
        SELECT x, y, max, mean, n FROM parents WHERE z = :z + 1)
) GROUP BY px, py
"""


@dataclass
class Bbox:
    west: float
    south: float
    east: float
    north: float


@dataclass
class Index:
    """What was read: where the index lives, the zooms present, the sorted scores."""

    path: Path
    thresh_ind: int
    zooms: list[int]
    scores: array  # sorted ascending
    classes: int
    bounds: Bbox | None
    report: Report = field(default_factory=Report)
    duplicates: int = 0
    _held: Any = field(default=None, repr=False, compare=False)
    _building: _Building | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def total(self) -> int:
        return len(self.scores)

    def above(self, thresh: float) -> int:
        """How many tiles score ``thresh`` or more at ``thresh_ind``."""
        return len(self.scores) - bisect_left(self.scores, thresh)

    def histogram(self, bins: int = 20) -> dict:
        """Counts of scores in ``bins`` equal bins over [0, 1] (or the scores' own range when
        they leave it: a model may answer logits)."""
        if not self.scores:
            return {"edges": [], "counts": []}
        low, high = min(0.0, self.scores[0]), max(1.0, self.scores[-1])
        # Each edge as a weighted mean of the ends: with scores of ±1e308 (a model's logits)
        # high - low overflows to infinity, and NaN edges would reach the page.
        edges = [_tidy(low * (1 - i / bins) + high * (i / bins)) for i in range(bins)] + [high]
        cuts = [bisect_left(self.scores, edge) for edge in edges[1:-1]]
        cuts = [0, *cuts, len(self.scores)]
        return {"edges": edges, "counts": [cuts[i + 1] - cuts[i] for i in range(bins)]}

    def connect(self, tiles: bool = True) -> sqlite3.Connection:
        """A read-only connection (one per request: the server answers in threads). ``tiles``:
        the query reads the tiles table, so wait until it is written (see :func:`open_index`);
        the parents and the summary are there from the start."""
        if tiles:
            self.wait_tiles()
        with self._lock:  # the path moves once, when the tiles are written
            path = self.path
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    @property
    def tiles_ready(self) -> bool:
        return self._building is None or self._building.done.is_set()

    def wait_tiles(self) -> None:
        """Block until the tiles table is written.

        Raises:
            CnsqError: writing it failed (a full disk) or the view is stopping.
        """
        if self._building is None:
            return
        self._building.done.wait()
        if self._building.error is not None:
            raise CnsqError(f"the map's index could not be finished: {self._building.error}")

    def close(self) -> None:
        """Stop writing the tiles if that is still under way (what was written is removed: a
        half index is of no use), then :meth:`release`."""
        building = self._building
        if building is not None:
            building.cancel.set()
            building.thread.join(timeout=10)
            if building.early is not None:
                building.early.unlink(missing_ok=True)
        self.release()

    def hold(self) -> None:
        """Mark the index in use for as long as this view lives (a shared lock on its file,
        released by :meth:`release` or the process's end): the cache never prunes it."""
        if self._held is None and fcntl is not None:
            self._held = self.path.open("rb")
            fcntl.flock(self._held, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


def _index_rows(path: Path, thresh_ind: int, report: Report) -> Iterator[tuple]:
    """(z, x, y, score, output, classes) of every good row of a results CSV (the one reader,
    cnsq.results.reader); bad rows go to ``report``."""
    with open_results(path) as handle:
        for r in results(handle, thresh_ind, report):
            yield r.tile.z, r.tile.x, r.tile.y, r.value, r.output, len(r.scores)


def build(source: Path, target: Path, thresh_ind: int,
          progress: Callable[[int], None] | None = None) -> Index:
    """Read a results CSV into a new index at ``target`` (replaced if it exists).

    A tile listed twice keeps its last row, as the results table's upsert would.
    """
    index, finish = _start_build(source, target, thresh_ind, progress)
    finish(None)
    return index


class _Cancelled(Exception):
    """The view stopped while its tiles were being written."""


def _start_build(source: Path, target: Path, thresh_ind: int,
                 progress: Callable[[int], None] | None
                 ) -> tuple[Index, Callable[[threading.Event | None], None]]:
    """Everything the summary and the parents need, written and committed at ``target``; and
    the function that writes the tiles table (the bulk of the time: a million rows inserted and
    indexed) and closes the file. With the row reader (no pyarrow) the tiles are the source of
    the parents, so they are written first and the function only closes."""
    target.unlink(missing_ok=True)
    conn = sqlite3.connect(target, check_same_thread=False)
    try:
        conn.executescript("PRAGMA journal_mode=MEMORY; PRAGMA synchronous=OFF;" + SCHEMA)
        if _columnar():
            return _build_columnar(source, conn, target, thresh_ind, progress)
        index = _build_rows(source, conn, target, thresh_ind, progress)
    except BaseException:
        conn.close()
        raise
    return index, lambda cancel: conn.close()


def _build_rows(source: Path, conn: sqlite3.Connection, target: Path, thresh_ind: int,
                progress: Callable[[int], None] | None) -> Index:
    report = Report()
    classes = 0
    inserted = 0
    with conn:
        rows = _index_rows(source, thresh_ind, report)
        while batch := list(islice(rows, BATCH)):
            classes = classes or batch[0][5]
            conn.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?, ?)", [row[:5] for row in batch])
            inserted += len(batch)
            if progress and inserted // PROGRESS_EVERY != (inserted - len(batch)) // PROGRESS_EVERY:
                progress(inserted)
        _index_tiles(conn)
        zooms = [z for (z,) in conn.execute("SELECT DISTINCT z FROM tiles ORDER BY z")]
        for level in range(max(zooms, default=0) - 1, -1, -1):
            conn.execute(PARENTS_SQL, {"z": level})
        scores = array("d", (s for (s,) in conn.execute("SELECT score FROM tiles ORDER BY score")))
        extents = [conn.execute("SELECT ?, min(x), max(x), min(y), max(y) FROM tiles "
                                "WHERE z = ?", (z, z)).fetchone() for z in zooms]
        index = Index(target, thresh_ind, zooms, scores, classes, _bounds(extents), report,
                      duplicates=inserted - len(scores))
        _save_meta(conn, index)
    return index


def _columnar() -> bool:
    try:
        import numpy  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _build_columnar(source: Path, conn: sqlite3.Connection, target: Path, thresh_ind: int,
                    progress: Callable[[int], None] | None
                    ) -> tuple[Index, Callable[[threading.Event | None], None]]:
    """:func:`_start_build` with the CSV read column-wise (``cnsq[geo]``'s pyarrow: the reader
    ``cnsq export`` uses, with the same per-row reports) and the parents computed level by level
    in numpy; the same tables and answers, several times sooner."""
    import numpy as np


    report = Report()
    c = read_columns(source, None, None, report, raw=True)
    if c.scores.shape[1] and not -c.scores.shape[1] <= thresh_ind < c.scores.shape[1]:
        raise CnsqError(f"{option('thresh_ind')} {thresh_ind} is out of range: {source} has "
                        f"{c.scores.shape[1]} class scores per tile")
    classes = c.scores.shape[1]
    z, x, y, line = c.z, c.x, c.y, c.line
    score = c.scores[:, thresh_ind].copy() if classes else np.zeros(0)  # not a view: see del
    import pyarrow as pa

    texts = c.outputs  # kept in Arrow (not a million Python strings) until inserted
    # Rows of another score count (kept by the row reader too): appended as they are.
    all_others = c.others or []
    others = [(row, text) for row, text in all_others
              if -len(row.scores) <= thresh_ind < len(row.scores)]
    del c  # the other scores: the memory is the arrays
    for row, _ in all_others:
        if not -len(row.scores) <= thresh_ind < len(row.scores):
            report.kept -= 1
            report.add_bad(row.line, f"--thresh_ind {thresh_ind} is out of range for "
                                     f"{len(row.scores)} scores")
    if others:
        z = np.append(z, [r.tile.z for r, _ in others])
        x = np.append(x, [r.tile.x for r, _ in others])
        y = np.append(y, [r.tile.y for r, _ in others])
        line = np.append(line, [r.line for r, _ in others])
        score = np.append(score, [r.scores[thresh_ind] for r, _ in others])
        texts = pa.concat_arrays([texts, _texts([t for _, t in others])])
    inserted = len(z)
    # A tile listed twice keeps its last row; the rows stay in the file's order (the page's
    # download gives them so).
    order = np.lexsort((line, y, x, z))
    last = np.ones(len(z), bool)
    if len(z):
        zs, xs, ys = z[order], x[order], y[order]
        last[:-1] = (zs[1:] != zs[:-1]) | (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])
        del zs, xs, ys
    if not last.all() or others:  # else the rows stay as they are (no copy of the texts)
        keep = np.sort(order[last])
        keep = keep[np.argsort(line[keep], kind="stable")]
        z, x, y, score = z[keep], x[keep], y[keep], score[keep]
        texts = _call("take", texts, _arrow(keep))
    del order
    zooms = [int(level) for level in np.unique(z)]
    extents = [(level, int(x[at].min()), int(x[at].max()), int(y[at].min()), int(y[at].max()))
               for level in zooms for at in [z == level]]
    scores = array("d")
    scores.frombytes(np.sort(score).astype(np.float64).tobytes())
    index = Index(target, thresh_ind, zooms, scores, classes, _bounds(extents), report,
                  duplicates=inserted - len(z))
    with conn:
        _parents(conn, z, x, y, score, max(zooms, default=0))
        _save_meta(conn, index)

    def write_tiles(cancel: threading.Event | None) -> None:
        try:
            with conn:
                for start in range(0, len(z), BATCH):
                    if cancel is not None and cancel.is_set():
                        raise _Cancelled
                    end = start + BATCH
                    conn.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?, ?)", zip(
                        z[start:end].tolist(), x[start:end].tolist(), y[start:end].tolist(),
                        score[start:end].tolist(), texts.slice(start, BATCH).to_pylist(),
                        strict=True))
                    if progress and end // PROGRESS_EVERY != start // PROGRESS_EVERY:
                        progress(min(end, len(z)))
                conn.execute("CREATE UNIQUE INDEX tiles_zxy ON tiles (z, x, y)")
        finally:
            conn.close()

    return index, write_tiles


def _parents(conn: sqlite3.Connection, z, x, y, score, deepest: int) -> None:
    """Every parent level from the tiles, as PARENTS_SQL computes it: level l holds, for each
    (x >> 1, y >> 1) of level l + 1, the max, mean and count of the tiles under it."""
    import numpy as np

    below = None  # the parents of level l + 1: (x, y, max, mean, n)
    for level in range(deepest - 1, -1, -1):
        at = z == level + 1
        px = [x[at]]
        py = [y[at]]
        pmax, psum, pn = [score[at]], [score[at]], [np.ones(int(at.sum()), np.int64)]
        if below is not None:
            px.append(below[0])
            py.append(below[1])
            pmax.append(below[2])
            psum.append(below[3])
            pn.append(below[4])
        cx, cy = np.concatenate(px) >> 1, np.concatenate(py) >> 1
        if not len(cx):
            below = None
            continue
        keys = (cx.astype(np.int64) << 32) | cy.astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        maxes = np.full(len(unique), -np.inf)
        np.maximum.at(maxes, inverse, np.concatenate(pmax))
        children = np.concatenate(pn)
        counts = np.bincount(inverse, weights=children, minlength=len(unique)).astype(np.int64)
        # Weighted by each child's share of its parent's count (see PARENTS_SQL): no overflow.
        sums = np.bincount(inverse, weights=np.concatenate(psum) * (children / counts[inverse]),
                           minlength=len(unique))
        ux, uy = unique >> 32, unique & 0xFFFFFFFF
        for start in range(0, len(unique), BATCH):  # as Python numbers a batch at a time
            end = start + BATCH
            conn.executemany("INSERT INTO parents VALUES (?, ?, ?, ?, ?, ?)", zip(
                [level] * len(ux[start:end]), ux[start:end].tolist(), uy[start:end].tolist(),
                maxes[start:end].tolist(), sums[start:end].tolist(), counts[start:end].tolist(),
                strict=True))
        below = (ux, uy, maxes, sums, counts)


def _save_meta(conn: sqlite3.Connection, index: Index) -> None:
    import json

    bounds = index.bounds
    meta = {"format": FORMAT, "thresh_ind": index.thresh_ind, "zooms": index.zooms,
            "classes": index.classes, "duplicates": index.duplicates,
            "bounds": [bounds.west, bounds.south, bounds.east, bounds.north] if bounds else None,
            "read": index.report.read, "bad_count": index.report.bad_count,
            "bad": index.report.bad}
    conn.execute("CREATE TABLE meta (meta TEXT, scores BLOB)")
    conn.execute("INSERT INTO meta VALUES (?, ?)", (json.dumps(meta), index.scores.tobytes()))


def load(path: Path) -> Index:
    """An index :func:`build` wrote (the sorted scores are stored whole: no sort on load).

    Raises:
        sqlite3.Error, ValueError: not such an index, or of another format.
    """
    import json

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        text, blob = conn.execute("SELECT meta, scores FROM meta").fetchone()
    finally:
        conn.close()
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: index format {meta.get('format')}, not {FORMAT}")
    scores = array("d")
    scores.frombytes(blob)
    report = Report(read=meta["read"], bad=[tuple(b) for b in meta["bad"]],
                    bad_count=meta["bad_count"])
    bounds = Bbox(*meta["bounds"]) if meta["bounds"] else None
    return Index(path, meta["thresh_ind"], meta["zooms"], scores, meta["classes"], bounds, report,
                 meta["duplicates"])


def open_index(source: Path, thresh_ind: int, cache: Path | None, workdir: Path,
               progress: Callable[[int], None] | None = None,
               early: bool = False) -> tuple[Index, bool]:
    """The index of ``source``: from ``cache`` when this file (same path, size and modification
    time) was read before with this ``thresh_ind``, else built (into ``cache``, or ``workdir``
    when there is none). Returns (index, whether it came from the cache).

    The cache keeps the ``KEEP`` most recently used indexes; a new one is written under a
    temporary name and renamed, so a killed ``cnsq view`` never leaves a half index behind.

    ``early``: for a file of ``EARLY_BYTES`` or more, return as soon as the summary and the
    parents are written; the tiles table is written in a background thread, and what reads it
    waits (:meth:`Index.connect`). The map's first view of a large area needs only parents, so
    it is drawn while a million rows are still being inserted.
    """
    import hashlib
    import os

    if cache is None:
        target = workdir / "index.db"
    else:
        stat = source.stat()
        key = hashlib.sha256(f"{FORMAT}|{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|"
                             f"{thresh_ind}".encode()).hexdigest()[:24]
        target = cache / f"{key}.db"
        if target.is_file():
            try:
                index = load(target)
                index.hold()
                os.utime(target)  # most recently used
                _prune(cache)
                return index, True
            except (sqlite3.Error, ValueError, KeyError, TypeError):
                target.unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
    if early and _columnar() and source.stat().st_size >= EARLY_BYTES:
        return _build_early(source, target, thresh_ind, cache), False
    with atomic_path(target) as partial:
        index = build(source, partial, thresh_ind, progress)
    index.path = target
    index.hold()
    if cache is not None:
        _prune(cache)
    return index, False


@dataclass
class _Building:
    """The tiles table being written in the background (see :func:`open_index`)."""

    thread: threading.Thread
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    early: Path | None = None  # the copy of the parents served meanwhile


def _build_early(source: Path, target: Path, thresh_ind: int, cache: Path | None) -> Index:
    """The whole build runs in one thread, inside the same atomic write as a plain build; this
    thread waits only for its first half. The parents are served from a copy (SQLite would
    keep readers waiting while the writer holds its file); once the tiles are in, the index is
    renamed into place and the copy removed."""
    started = threading.Event()
    found: dict[str, Any] = {}

    def work() -> None:
        building = found["building"]
        index = None
        try:
            with atomic_path(target) as partial:
                index, write_tiles = _start_build(source, partial, thresh_ind, None)
                building.early = scratch_path(target, "early")
                shutil.copyfile(partial, building.early)
                index.path = building.early
                index._building = building
                found["index"] = index
                started.set()
                write_tiles(building.cancel)
            with index._lock:
                index.path = target
            building.early.unlink(missing_ok=True)
            building.early = None
            index.hold()
            if cache is not None:
                _prune(cache)
        except BaseException as exc:  # noqa: BLE001 - given to the waiting threads
            building.error = exc if not isinstance(exc, _Cancelled) else CnsqError(
                "cnsq view is stopping")
        finally:
            building.done.set()
            started.set()

    thread = threading.Thread(target=work, name="cnsq-view-index", daemon=True)
    found["building"] = _Building(thread)
    thread.start()
    started.wait()
    if "index" not in found:
        thread.join()
        raise found["building"].error
    return found["index"]


def _prune(cache: Path) -> None:
    """Keep the ``KEEP`` most recently used indexes, and remove what a killed ``cnsq view``
    left half written (its process is gone)."""

    for stale in sorted(cache.glob("*.db"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
        _remove_unless_held(stale)
    for partial in abandoned_partials(cache):
        partial.unlink(missing_ok=True)


def _tidy(value: float) -> float:
    """Round to 9 decimals what a page shows as decimals (round() of a huge value overflows)."""
    return round(value, 9) if abs(value) < 1e12 else value


def _remove_unless_held(path: Path) -> None:
    """Remove an index no running view holds (:meth:`Index.hold`)."""
    if fcntl is None:  # no advisory locks here: keep it rather than break a view
        return
    try:
        with path.open("rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a live view reads it
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/cnsq/view`` (``~/.cache/cnsq/view``)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnsq" / "view"


def _index_tiles(conn: sqlite3.Connection) -> None:
    """The unique (z, x, y) index; a tile listed twice keeps its last row first."""
    try:
        conn.execute("CREATE UNIQUE INDEX tiles_zxy ON tiles (z, x, y)")
    except sqlite3.IntegrityError:
        conn.execute("DELETE FROM tiles WHERE rowid NOT IN "
                     "(SELECT max(rowid) FROM tiles GROUP BY z, x, y)")
        conn.execute("CREATE UNIQUE INDEX tiles_zxy ON tiles (z, x, y)")


def _bounds(extents: list[tuple[int, int, int, int, int]]) -> Bbox | None:
    """The area the tiles cover, from each zoom's (z, min x, max x, min y, max y)."""
    boxes = []
    for z, x0, x1, y0, y1 in extents:
        nw, se = mercantile.bounds(x0, y0, z), mercantile.bounds(x1, y1, z)
        boxes.append(Bbox(nw.west, se.south, se.east, nw.north))
    if not boxes:
        return None
    return Bbox(min(b.west for b in boxes), min(b.south for b in boxes),
                max(b.east for b in boxes), max(b.north for b in boxes))


def _ranges(bbox: Bbox, z: int) -> tuple[int, int, int, int]:
    """x0, x1, y0, y1 of the tiles at ``z`` that cover ``bbox`` (clamped to the world)."""
    epsilon = 1e-9
    west, east = max(bbox.west, -180.0), min(bbox.east, 180.0 - epsilon)
    south = max(bbox.south, -85.051128)
    north = min(bbox.north, 85.051128)
    top_left = mercantile.tile(west, north, z)
    bottom_right = mercantile.tile(east, south, z)
    return top_left.x, bottom_right.x, top_left.y, bottom_right.y


def needs_tiles(index: Index, zoom: int) -> bool:
    """Whether :func:`features` at ``zoom`` reads the tiles table (else only parents)."""
    return any(z <= max(zoom + DETAIL, 0) for z in index.zooms)


def features(index: Index, conn: sqlite3.Connection, zoom: int, bbox: Bbox) -> dict:
    """What the map at ``zoom`` shows in ``bbox``.

    ``tiles``: ``[x, y, z, score]`` of each tile within ``DETAIL`` zooms of the map's;
    ``parents``: ``[x, y, z, max, mean, count]`` of each parent at ``zoom + DETAIL`` holding
    deeper tiles. ``truncated`` is true when ``LIMIT`` cut the answer short.
    """
    level = max(zoom + DETAIL, 0)
    tiles: list[list] = []
    parents: list[list] = []
    for z in index.zooms:
        if z > level:
            continue
        x0, x1, y0, y1 = _ranges(bbox, z)
        tiles += map(list, conn.execute(
            "SELECT x, y, z, score FROM tiles WHERE z = ? AND x BETWEEN ? AND ? "
            "AND y BETWEEN ? AND ? LIMIT ?", (z, x0, x1, y0, y1, LIMIT - len(tiles))))
    if index.zooms and max(index.zooms) > level:
        x0, x1, y0, y1 = _ranges(bbox, level)
        parents = list(map(list, conn.execute(
            "SELECT x, y, z, max, mean, n FROM parents WHERE z = ? AND x BETWEEN ? AND ? "
            "AND y BETWEEN ? AND ? LIMIT ?", (level, x0, x1, y0, y1, LIMIT))))
    return {"level": level, "tiles": tiles, "parents": parents,
            "truncated": len(tiles) >= LIMIT or len(parents) >= LIMIT}


def features_above(conn: sqlite3.Connection, thresh: float) -> Iterator[str]:
    """The GeoJSON Feature of each tile the map holds with a score of ``thresh`` or more, in the
    results' order: what the page's download gives (the index, not the CSV, which may have
    changed since the map was drawn)."""
    import json


    query = "SELECT z, x, y, output FROM tiles WHERE score >= ? ORDER BY rowid"
    for z, x, y, output in conn.execute(query, (thresh,)):
        yield feature(mercantile.Tile(x, y, z), json.loads(output))


def tile_scores(conn: sqlite3.Connection, text_id: str) -> dict | None:
    """The id and every score of one tile, or None when it has no result."""
    import json


    tile = parse_tile_id(text_id)
    row = conn.execute("SELECT output FROM tiles WHERE z = ? AND x = ? AND y = ?",
                       (tile.z, tile.x, tile.y)).fetchone()
    if row is None:
        return None
    return {"tile": tile_id(tile), "scores": json.loads(row[0])}
