"""Tiles in Z-order — the order of their quadkeys — in memory bounded by a run, not the file.

GeoParquet readers skip row groups by their statistics, which only helps when each group holds
tiles close together: ``cnsq export`` sorts the kept tiles along a Z-order curve. Sorting a
million rows at once would hold them all, so this is an external merge sort: rows arrive a block
at a time, every :data:`RUN` of them are sorted and spilled to one anonymous temporary file (in
the output's folder, where the user expects disk use; the system removes it even when the
process is killed), and the runs are merged a chunk of each at a time. Kept rows that fit in one
run never touch the disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

RUN = 262_144  # rows sorted in memory at a time (about 11 MB with two scores)
CHUNK = 16_384  # rows read back from each run at a time while merging


def zorder_keys(x: Any, y: Any, z: Any) -> Any:
    """The Z-order (Morton) key of each tile: its top-left corner's column and row at zoom 30,
    their bits interleaved. A tile and its children share the key of their common corner, so
    sort by (key, z) for the quadkeys' order.

    Parameters:
        x, y, z: numpy integer arrays of the same length (z from 0 to 30).
    """
    import numpy as np

    shift = (30 - z.astype(np.int64)).astype(np.uint64)

    def spread(v):
        v = v & np.uint64(0xFFFFFFFF)
        for step, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF),
                           (4, 0x0F0F0F0F0F0F0F0F), (2, 0x3333333333333333),
                           (1, 0x5555555555555555)):
            v = (v | (v << np.uint64(step))) & np.uint64(mask)
        return v

    return spread(x.astype(np.uint64) << shift) | (spread(y.astype(np.uint64) << shift)
                                                   << np.uint64(1))


def record_type(width: int) -> Any:
    """One row as a numpy record: its key, zoom, column, row, CSV line and ``width`` scores."""
    import numpy as np

    return np.dtype([("key", "<u8"), ("z", "i1"), ("x", "<i4"), ("y", "<i4"), ("line", "<i8"),
                     ("scores", "<f8", (width,))])


class ZOrder:
    """Collects rows with :meth:`add`, then gives them back sorted with :meth:`sorted`."""

    def __init__(self, width: int, spill_dir: Path, run: int | None = None,
                 chunk: int | None = None):
        self.width, self.spill_dir = width, spill_dir
        self.run, self.chunk = run or RUN, chunk or CHUNK
        self.type = record_type(width)
        self._buffer: list[Any] = []
        self._buffered = 0
        self._runs: list[tuple[int, int]] = []  # (first record, records) in the spill file
        self._spilled = 0
        self._file: IO[bytes] | None = None

    def add(self, line: Any, x: Any, y: Any, z: Any, scores: Any) -> None:
        """Rows of one block (numpy arrays of the same length; ``scores`` rows × width)."""
        import numpy as np

        records = np.empty(len(x), self.type)
        records["key"] = zorder_keys(x, y, z)
        records["z"], records["x"], records["y"], records["line"] = z, x, y, line
        records["scores"] = scores.reshape(len(x), self.width)
        self._buffer.append(records)
        self._buffered += len(records)
        if self._buffered >= self.run:
            self._spill()

    def _sorted_buffer(self) -> Any:
        import numpy as np

        records = np.concatenate(self._buffer) if self._buffer else np.empty(0, self.type)
        self._buffer, self._buffered = [], 0
        return records[_order(records)]

    def _spill(self) -> None:
        records = self._sorted_buffer()
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir, prefix=".cnsq-sort-")
        # Through the file object: numpy's tofile/fromfile run an isinstance check in C that
        # turns a Ctrl-C arriving meanwhile into a TypeError.
        self._file.write(records.data)
        self._runs.append((self._spilled, len(records)))
        self._spilled += len(records)

    def _read(self, first: int, count: int) -> Any:
        import numpy as np

        assert self._file is not None
        self._file.seek(first * self.type.itemsize)
        records = np.empty(count, self.type)
        self._file.readinto(memoryview(records).cast("B"))
        return records

    def sorted(self) -> Iterator[Any]:
        """The rows in (key, zoom, line) order, as record arrays of up to a few chunks each; the spill
        file is closed (and so removed) at the end."""
        if not self._runs:  # everything fits in memory
            records = self._sorted_buffer()
            for start in range(0, len(records), self.chunk):
                yield records[start:start + self.chunk]
            return
        if self._buffer:
            self._spill()
        try:
            yield from self._merge()
        finally:
            assert self._file is not None
            self._file.close()
            self._file = None

    def _merge(self) -> Iterator[Any]:
        """A k-way merge, a chunk at a time: every row up to the smallest of the loaded chunks'
        last rows (among runs with more to read) is in its final place, so it is given."""
        import numpy as np

        runs = [[first, count] for first, count in self._runs]  # next record, records left
        loaded = []
        for run in runs:
            take = min(self.chunk, run[1])
            loaded.append(self._read(run[0], take))
            run[0] += take
            run[1] -= take
        while any(len(part) for part in loaded):
            limits = [(int(part["key"][-1]), int(part["z"][-1]), int(part["line"][-1]))
                      for part, run in zip(loaded, runs, strict=True) if len(part) and run[1]]
            taken = []
            for i, part in enumerate(loaded):
                if not len(part):
                    continue
                count = _count_upto(part, min(limits)) if limits else len(part)
                taken.append(part[:count])
                loaded[i] = part[count:]
                if not len(loaded[i]) and runs[i][1]:
                    take = min(self.chunk, runs[i][1])
                    loaded[i] = self._read(runs[i][0], take)
                    runs[i][0] += take
                    runs[i][1] -= take
            merged = np.concatenate(taken)
            yield merged[_order(merged)]


def _order(records: Any) -> Any:
    """(key, zoom, line): a total order, so that a tile listed twice keeps its file order
    across runs too."""
    import numpy as np

    return np.lexsort((records["line"], records["z"], records["key"]))


def _count_upto(part: Any, limit: tuple[int, int, int]) -> int:
    """How many of ``part``'s rows (in :func:`_order`) come at or before ``limit``."""
    import numpy as np

    key, zoom, line = limit
    low = int(np.searchsorted(part["key"], np.uint64(key), side="left"))
    high = int(np.searchsorted(part["key"], np.uint64(key), side="right"))
    zooms = part["z"][low:high]
    first = low + int(np.searchsorted(zooms, zoom, side="left"))
    last = low + int(np.searchsorted(zooms, zoom, side="right"))
    return first + int(np.searchsorted(part["line"][first:last], line, side="right"))
