"""Tiles in Z-order — the order of their quadkeys — in memory bounded by a run, not the file.

GeoParquet readers skip row groups by their statistics, which only helps when each group holds
tiles close together: ``cnsq export`` sorts the kept tiles along a Z-order curve. Sorting every
row at once would hold them all, so this is an external merge sort: rows arrive a block at a
time into a buffer of :data:`RUN_BYTES`; each time it fills, its rows are sorted and spilled to
one anonymous temporary file (in the output's folder, where the user expects disk use; the
system removes it even when the process is killed), and the runs are merged a chunk of each at
a time. Kept rows that fit in one run (800,000 with two scores) never touch the disk; what
spilling and merging cost an export is in docs/performance.md ("Design choices, measured").
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

RUN_BYTES = 32 << 20  # rows sorted in memory at a time: 800,000 of 41 bytes (two scores)
CHUNK = 16_384  # rows given, and read back from each run while merging, at a time
CHUNK_BYTES = 4 << 20  # ... or fewer rows where CHUNK of them would take more (wide rows)
MERGE_BYTES = 32 << 20  # at most (a row of each run at least) read back at a time, all runs


def zorder_keys(x: Any, y: Any, z: Any) -> Any:
    """The place of each tile in the quadkeys' order, as one integer: its index in a walk of
    the quadtree to zoom 30 that gives each tile, then its four children's subtrees in quadkey
    digit order (a parent before its children, as a prefix sorts first).

    From the Morton key ``m`` of the tile's top-left corner at zoom 30 (its column's and row's
    bits interleaved: the quadkey's digits d₁…d_z in base 4, then zeros), the index is
    z + Σ dᵢ·(4^(31-i) - 1)/3 = z + (4m - Σ dᵢ)/3, each subtree below zoom i holding
    (4^(31-i) - 1)/3 tiles; the digits' sum is the column's set bits plus twice the row's.

    Parameters:
        x, y, z: numpy integer arrays of the same length (z from 0 to 30).
    """
    import numpy as np

    x, y = x.astype(np.uint64), y.astype(np.uint64)
    shift = (30 - z.astype(np.int64)).astype(np.uint64)

    def spread(v):
        v = v & np.uint64(0xFFFFFFFF)
        for step, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF),
                           (4, 0x0F0F0F0F0F0F0F0F), (2, 0x3333333333333333),
                           (1, 0x5555555555555555)):
            v = (v | (v << np.uint64(step))) & np.uint64(mask)
        return v

    morton = spread(x << shift) | (spread(y << shift) << np.uint64(1))
    digits = set_bits(x) + (set_bits(y) << np.uint64(1))
    return (((morton << np.uint64(2)) - digits) // np.uint64(3)) + z.astype(np.uint64)


def set_bits(v: Any) -> Any:
    """The count of set bits of each value (a numpy uint64 array of values below 2**32)."""
    import numpy as np

    if hasattr(np, "bitwise_count"):  # numpy 2
        return np.bitwise_count(v).astype(np.uint64)
    return _set_bits_by_halves(v)


def _set_bits_by_halves(v: Any) -> Any:
    """:func:`set_bits` for numpy 1: pairs, nibbles and bytes of bits summed in place."""
    import numpy as np

    v = v - ((v >> np.uint64(1)) & np.uint64(0x55555555))
    v = (v & np.uint64(0x33333333)) + ((v >> np.uint64(2)) & np.uint64(0x33333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F)
    return ((v * np.uint64(0x01010101)) & np.uint64(0xFFFFFFFF)) >> np.uint64(24)


def record_type(width: int) -> Any:
    """One row as a numpy record: its key, zoom, column, row, CSV line and ``width`` scores."""
    import numpy as np

    return np.dtype([("key", "<u8"), ("z", "i1"), ("x", "<i4"), ("y", "<i4"), ("line", "<i8"),
                     ("scores", "<f8", (width,))])


class ZOrder:
    """Collects rows with :meth:`add`, then gives them back sorted with :meth:`sorted`."""

    def __init__(self, width: int, spill_dir: Path, run: int | None = None,
                 chunk: int | None = None):
        """``run``: rows a run holds (by default as many as :data:`RUN_BYTES` hold); ``chunk``:
        rows given at a time (by default :data:`CHUNK`, within :data:`CHUNK_BYTES`)."""
        self.width, self.spill_dir = width, spill_dir
        self.type = record_type(width)
        self.run = run or max(1, RUN_BYTES // self.type.itemsize)
        self.chunk = chunk or max(1, min(CHUNK, CHUNK_BYTES // self.type.itemsize))
        self._buffer: Any = None  # a run's records, allocated at the first row
        self._buffered = 0
        self._runs: list[tuple[int, int]] = []  # (first record, records) in the spill file
        self._spilled = 0
        self._file: BinaryIO | None = None

    def add(self, line: Any, x: Any, y: Any, z: Any, scores: Any) -> None:
        """Rows of one block (numpy arrays of the same length; ``scores`` rows × width), in the
        file's order: rows of the same tile keep it."""
        import numpy as np

        if self._buffer is None:
            self._buffer = np.empty(self.run, self.type)
        keys = zorder_keys(x, y, z)
        scores = scores.reshape(len(x), self.width)
        done = 0
        while done < len(x):
            if self._buffered == self.run:
                self._spill()
            take = min(len(x) - done, self.run - self._buffered)
            into = self._buffer[self._buffered:self._buffered + take]
            part = slice(done, done + take)
            into["key"], into["z"], into["x"], into["y"] = keys[part], z[part], x[part], y[part]
            into["line"], into["scores"] = line[part], scores[part]
            self._buffered += take
            done += take

    def _order(self) -> Any:
        """The buffered rows' order (positions in the buffer)."""
        return _order(self._buffer["key"][:self._buffered])

    def _spill(self) -> None:
        order = self._order()
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir, prefix=".cnsq-sort-")
        # A chunk at a time, so the sorted copy is a chunk, not a second run. Through the file
        # object: numpy's tofile/fromfile run an isinstance check in C that turns a Ctrl-C
        # arriving meanwhile into a TypeError.
        for start in range(0, len(order), self.chunk):
            self._file.write(self._buffer[order[start:start + self.chunk]].data)
        self._runs.append((self._spilled, len(order)))
        self._spilled += len(order)
        self._buffered = 0

    def _read(self, first: int, count: int) -> Any:
        import numpy as np

        assert self._file is not None
        self._file.seek(first * self.type.itemsize)
        records = np.empty(count, self.type)
        self._file.readinto(records.data.cast("B"))  # type: ignore[attr-defined]  # a binary file
        return records

    def sorted(self) -> Iterator[Any]:
        """The rows in (key, line) order, as record arrays of up to a few chunks each; the spill
        file is closed (and so removed) at the end."""
        if not self._runs:  # everything fits in memory
            if self._buffered:
                order = self._order()
                for start in range(0, len(order), self.chunk):
                    yield self._buffer[order[start:start + self.chunk]]
            self._buffer, self._buffered = None, 0
            return
        if self._buffered:
            self._spill()
        self._buffer = None
        try:
            yield from self._merge()
        finally:
            assert self._file is not None
            self._file.close()
            self._file = None

    def _merge(self) -> Iterator[Any]:
        """A k-way merge, a chunk at a time: every row up to the smallest of the loaded chunks'
        last rows (among runs with more to read) is in its final place, so it is given. Rows
        of the same tile keep their runs' order, which is the file's."""
        import numpy as np

        runs = [[first, count] for first, count in self._runs]  # next record, records left
        # Wide rows make short runs, so many: fewer rows of each, so the chunks held stay
        # within MERGE_BYTES.
        chunk = max(1, min(self.chunk, MERGE_BYTES // (self.type.itemsize * len(runs))))
        loaded = []
        for run in runs:
            take = min(chunk, run[1])
            loaded.append(self._read(run[0], take))
            run[0] += take
            run[1] -= take
        while any(len(part) for part in loaded):
            limits = [(int(part["key"][-1]), i)
                      for i, (part, run) in enumerate(zip(loaded, runs, strict=True))
                      if len(part) and run[1]]
            taken = []
            for i, part in enumerate(loaded):
                if not len(part):
                    continue
                count = _count_upto(part, i, min(limits)) if limits else len(part)
                taken.append(part[:count])
                loaded[i] = part[count:]
                if not len(loaded[i]) and runs[i][1]:
                    take = min(chunk, runs[i][1])
                    loaded[i] = self._read(runs[i][0], take)
                    runs[i][0] += take
                    runs[i][1] -= take
            merged = np.concatenate(taken)
            # Sorted pieces one after another, in run order: a stable sort merges them.
            yield merged[np.argsort(merged["key"], kind="stable")]


def _order(keys: Any) -> Any:
    """Positions of ``keys`` in ascending order, equal keys (a tile listed twice) in their
    positions' order. Numpy's default sort (vectorised) is much faster than its stable one on
    keys in no order (docs/performance.md); the stable one runs only when a key repeats."""
    import numpy as np

    order = np.argsort(keys)
    ranked = keys[order]
    if len(keys) > 1 and (ranked[1:] == ranked[:-1]).any():
        order = np.argsort(keys, kind="stable")
    return order


def _count_upto(part: Any, run: int, limit: tuple[int, int]) -> int:
    """How many of ``part``'s rows (sorted, from run number ``run``) come before the row that
    ends ``limit`` = (key, its run): those of a smaller key, and those of the same key from a
    run up to the limit's (the earlier lines)."""
    import numpy as np

    key, last_run = limit
    if run <= last_run:
        return int(np.searchsorted(part["key"], np.uint64(key), side="right"))
    return int(np.searchsorted(part["key"], np.uint64(key), side="left"))
