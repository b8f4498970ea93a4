"""The external Z-order sort: the same order as sorting everything at once, whatever the run
and chunk sizes, with nothing left on disk."""

from __future__ import annotations

import random

import mercantile
import pytest

np = pytest.importorskip("numpy")

from cnsq.tile_order import ZOrder, zorder_keys  # noqa: E402


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
    order = np.lexsort((z, keys))
    quadkeys = [mercantile.quadkey(int(x[i]), int(y[i]), int(z[i])) for i in order]
    # Z-order is the quadkeys' order once each is padded to zoom 30 (a parent before its
    # children, as a prefix sorts first).
    assert quadkeys == sorted(quadkeys, key=lambda q: (q.ljust(30, "0"), len(q)))


@pytest.mark.parametrize("run,chunk", [(10_000, 500), (300, 7), (1000, 1000), (64, 1)])
def test_runs_merge_into_one_order(tmp_path, run, chunk):
    line, x, y, z, scores = tiles(3000)
    order = ZOrder(2, tmp_path, run=run, chunk=chunk)
    for start in range(0, 3000, 257):  # blocks as the reader gives them
        end = start + 257
        order.add(line[start:end], x[start:end], y[start:end], z[start:end], scores[start:end])
    merged = np.concatenate(list(order.sorted()))
    expected = np.lexsort((line, z, zorder_keys(x, y, z)))
    assert merged["line"].tolist() == line[expected].tolist()
    assert (merged["scores"] == scores[expected]).all()
    assert list(tmp_path.iterdir()) == []  # the spill file is gone


def test_no_rows(tmp_path):
    order = ZOrder(3, tmp_path)
    assert [len(part) for part in order.sorted()] == []
