"""The external Z-order sort: the same order as sorting everything at once, whatever the run
and chunk sizes, with nothing left on disk."""

from __future__ import annotations

import random

import mercantile
import pytest

np = pytest.importorskip("numpy")

from cnsq.results.tile_order import ZOrder, zorder_keys  # noqa: E402


def tiles(count: int, seed: int = 5):
    rng = random.Random(seed)
    rows = []
    for line in range(count):
        z = rng.choice([0, 1, 12, 17, 17, 17, 30])
        x, y = rng.randrange(2**z), rng.randrange(2**z)
        if rng.random() < 0.2 and z > 0:  # a parent of another tile: the same corner's key
            x, y, z = x >> 1, y >> 1, z - 1
        rows.append((line, x, y, z))
    line, x, y, z = (np.array(c) for c in zip(*rows, strict=True))
    return (line.astype(np.int64), x.astype(np.int32), y.astype(np.int32), z.astype(np.int8),
            np.stack([line * 0.5, line * 0.25], axis=1))


def test_keys_follow_the_quadkeys():
    line, x, y, z, _ = tiles(2000)
    keys = zorder_keys(x, y, z)
    order = np.argsort(keys, kind="stable")
    quadkeys = [mercantile.quadkey(int(x[i]), int(y[i]), int(z[i])) for i in order]
    # One key per tile: the quadkeys' order (a parent before its children, as a prefix sorts
    # first), and the same key only for the same tile.
    assert quadkeys == sorted(quadkeys)
    assert len(set(keys.tolist())) == len(set(zip(x.tolist(), y.tolist(), z.tolist(),
                                                  strict=True)))


def test_the_keys_of_the_first_and_last_tiles_of_each_zoom():
    """The key is the tile's place in a walk of the quadtree to zoom 30: the world is 0, its
    first child 1; the last tile of zoom 30 is the last of (4**31 - 1) / 3 tiles."""
    x = np.array([0, 0, 1, 0, 2**30 - 1, 2**29 - 1])
    y = np.array([0, 0, 0, 1, 2**30 - 1, 2**29 - 1])
    z = np.array([0, 1, 1, 1, 30, 29])
    keys = zorder_keys(x, y, z).tolist()
    assert keys[:4] == [0, 1, 1 + (4**30 - 1) // 3, 1 + 2 * (4**30 - 1) // 3]
    assert keys[4] == (4**31 - 1) // 3 - 1 and keys[5] == keys[4] - 4  # its parent, 4 before


def test_bits_are_counted_alike_on_numpy_1_and_2():
    from cnsq.results.tile_order import _set_bits_by_halves, set_bits

    values = np.array([0, 1, 2**32 - 1, 2**31, 0x55555555, 12345678] +
                      list(np.random.default_rng(3).integers(0, 2**32, 1000)), dtype=np.uint64)
    expected = [bin(int(v)).count("1") for v in values]
    assert _set_bits_by_halves(values).tolist() == expected == set_bits(values).tolist()


@pytest.mark.parametrize("run,chunk", [(10_000, 500), (300, 7), (1000, 1000), (64, 1)])
def test_runs_merge_into_one_order(tmp_path, run, chunk):
    line, x, y, z, scores = tiles(3000)
    order = ZOrder(2, tmp_path, run=run, chunk=chunk)
    for start in range(0, 3000, 257):  # blocks as the reader gives them
        end = start + 257
        order.add(line[start:end], x[start:end], y[start:end], z[start:end], scores[start:end])
    merged = np.concatenate(list(order.sorted()))
    expected = np.lexsort((line, zorder_keys(x, y, z)))
    assert merged["line"].tolist() == line[expected].tolist()
    assert (merged["scores"] == scores[expected]).all()
    assert list(tmp_path.iterdir()) == []  # the spill file is gone


def test_no_rows(tmp_path):
    order = ZOrder(3, tmp_path)
    assert [len(part) for part in order.sorted()] == []


def test_the_merge_holds_a_bounded_number_of_bytes_however_wide_the_rows(tmp_path, monkeypatch):
    """Rows of many scores make short runs, so many of them: the merge reads fewer rows of
    each (at least one), not a full chunk of every run (239 runs of 1,000 scores held 7.6 GB
    in chunks of 4,181 rows)."""
    from cnsq.results import tile_order

    width = 200
    monkeypatch.setattr(tile_order, "MERGE_BYTES", 64 * tile_order.record_type(width).itemsize)
    line, x, y, z, _ = tiles(3000)
    scores = np.repeat(line[:, None] * 1.0, width, axis=1)
    order = ZOrder(width, tmp_path, run=100)  # 30 runs
    reads = []
    read = order._read
    order._read = lambda first, count: reads.append(count) or read(first, count)
    for start in range(0, 3000, 257):
        end = start + 257
        order.add(line[start:end], x[start:end], y[start:end], z[start:end], scores[start:end])
    merged = np.concatenate(list(order.sorted()))
    assert merged["line"].tolist() == line[np.lexsort((line, zorder_keys(x, y, z)))].tolist()
    assert (merged["scores"][:, -1] == merged["line"]).all()
    assert max(reads) * 30 <= 64 and min(reads) >= 1
