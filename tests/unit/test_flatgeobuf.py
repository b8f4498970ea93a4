"""cnsq.results.flatgeobuf: files read back by GDAL (through pyogrio), its index searched by GDAL, and
the layout checked against the format's rules (8-byte alignment, the tree's level bounds)."""

from __future__ import annotations

import random
import struct

import pytest

from cnsq.results.flatgeobuf import DOUBLE, INT, LONG, MAGIC, STRING, Column, Writer, level_bounds

np = pytest.importorskip("numpy")
pyogrio = pytest.importorskip("pyogrio")

COLUMNS = [Column("name", STRING), Column("n", LONG), Column("v", DOUBLE), Column("i", INT)]


def test_level_bounds_are_the_specs():
    """generateLevelBounds of the reference implementation: leaves last in storage, and even a
    single item has a root above it."""
    assert level_bounds(1) == [(1, 2), (0, 1)]
    assert level_bounds(16) == [(1, 17), (0, 1)]
    assert level_bounds(17) == [(3, 20), (1, 3), (0, 1)]
    bounds = level_bounds(5000)
    sizes = [end - start for start, end in bounds]
    assert sizes == [5000, 313, 20, 2, 1] and bounds[-1] == (0, 1)
    assert all(bounds[i][0] == bounds[i + 1][1] for i in range(len(bounds) - 1))
    with pytest.raises(ValueError):
        level_bounds(0)


def boxes(count: int, seed: int = 1):
    """Small boxes along a row, in index order, and their names."""
    rng = random.Random(seed)
    west = np.cumsum([rng.uniform(0.001, 0.01) for _ in range(count)]) - 170
    south = np.array([rng.uniform(-60, 60) for _ in range(count)])
    names = [("é" if i % 7 == 0 else "") + f"box-{i}" for i in range(count)]
    return (west, south, west + 0.0005, south + 0.0005), names


def write(path, count: int, batches: list[int], seed: int = 1):
    bounds, names = boxes(count, seed)
    data = [name.encode() for name in names]
    width = max((len(d) for d in data), default=1)
    envelope = ((float(bounds[0].min()), float(bounds[1].min()), float(bounds[2].max()),
                 float(bounds[3].max())) if count else (0.0, 0.0, 0.0, 0.0))
    writer = Writer(path, "things", COLUMNS, count, envelope, width)
    first = 0
    for size in batches:
        part = slice(first, first + size)
        writer.add(tuple(b[part] for b in bounds),
                   [(b"".join(data[part]), np.array([len(d) for d in data[part]])),
                    np.arange(count)[part] * 3, np.linspace(0, 1, count)[part],
                    (np.arange(count)[part] - 2**31).astype(np.int32)])
        first += size
    writer.close()
    return bounds, names


@pytest.mark.parametrize("count, batches", [(1, [1]), (16, [16]), (17, [5, 0, 12]),
                                            (5000, [1000, 7, 3993])])
def test_gdal_reads_every_feature_and_searches_the_index(tmp_path, count, batches):
    out = tmp_path / "things.fgb"
    bounds, names = write(out, count, batches)
    info = pyogrio.read_info(out)
    assert info["features"] == count and info["layer_name"] == "things"
    assert info["capabilities"]["fast_spatial_filter"] is True
    assert list(info["fields"]) == ["name", "n", "v", "i"]
    assert info["ogr_types"] == ["OFTString", "OFTInteger64", "OFTReal", "OFTInteger"]
    _, table = pyogrio.read_arrow(out)
    assert table.column("name").to_pylist() == names
    assert table.column("n").to_pylist() == [3 * i for i in range(count)]
    assert table.column("v").to_pylist() == np.linspace(0, 1, count).tolist()
    assert table.column("i").to_pylist() == [i - 2**31 for i in range(count)]
    rng = random.Random(count)
    west, south, east, north = bounds
    for _ in range(40):
        xs = sorted(rng.uniform(float(west.min()) - 0.01, float(east.max()) + 0.01)
                    for _ in range(2))
        ys = sorted(rng.uniform(-61, 61) for _ in range(2))
        hits = pyogrio.raw.read(out, bbox=(xs[0], ys[0], xs[1], ys[1]), columns=["name"])[3][0]
        inside = (west <= xs[1]) & (east >= xs[0]) & (south <= ys[1]) & (north >= ys[0])
        assert sorted(hits) == sorted(np.array(names, dtype=object)[inside])


def test_every_flatbuffer_is_8_byte_aligned(tmp_path):
    """Format 3.0.1: the header and each feature a multiple of 8 bytes, so the index's and the
    coordinates' doubles lie on 8-byte boundaries of the file."""
    out = tmp_path / "things.fgb"
    write(out, 40, [40])
    data = out.read_bytes()
    assert data[:8] == MAGIC
    size = struct.unpack_from("<I", data, 8)[0]
    assert (4 + size) % 8 == 0
    index = 8 + 4 + size
    nodes = level_bounds(40)[0][1]
    at = index + 40 * nodes
    offsets = []
    while at < len(data):
        offsets.append(at - index - 40 * nodes)
        length = struct.unpack_from("<I", data, at)[0]
        assert (4 + length) % 8 == 0
        table = at + 4 + struct.unpack_from("<I", data, at + 4)[0]
        geometry = table + 4 + struct.unpack_from("<I", data, table + 4)[0]
        xy = geometry + 4 + struct.unpack_from("<I", data, geometry + 4)[0]
        assert (xy + 4) % 8 == 0 and struct.unpack_from("<I", data, xy)[0] == 10
        at += 4 + length
    assert len(offsets) == 40
    leaves = np.frombuffer(data, "<u8", count=5 * 40, offset=index + 40 * (nodes - 40))
    assert leaves[4::5].tolist() == offsets  # each leaf points at its feature


def test_an_empty_file_has_no_index(tmp_path):
    """A count of 0 means "unknown" to readers (GDAL's own empty files say the same): GDAL reads
    the columns and no feature."""
    out = tmp_path / "none.fgb"
    write(out, 0, [])
    info = pyogrio.read_info(out)
    assert list(info["fields"]) == ["name", "n", "v", "i"]
    assert info["capabilities"]["fast_spatial_filter"] is False
    assert len(pyogrio.read_dataframe(out)) == 0


def test_a_writer_given_too_few_or_too_many_features_says_so(tmp_path):
    with pytest.raises(ValueError, match="3 features written, the header announced 5"):
        write(tmp_path / "short.fgb", 5, [3])
    bounds, _ = boxes(3)
    writer = Writer(tmp_path / "long.fgb", "x", COLUMNS[1:3], 2, (0, 0, 1, 1), 1)
    with pytest.raises(ValueError, match="more than the 2 features"):
        writer.add(bounds, [np.arange(3), np.zeros(3)])
    with pytest.raises(ValueError, match="0 features written"):
        writer.close()


def test_a_column_type_it_does_not_write_is_refused():
    with pytest.raises(ValueError, match="type 0 is not one this writer writes"):
        Column("flag", 0)  # Byte


def test_a_text_longer_than_its_room_is_refused(tmp_path):
    bounds, _ = boxes(2)
    writer = Writer(tmp_path / "t.fgb", "x", COLUMNS[:1], 2, (0, 0, 1, 1), 3)
    with pytest.raises(ValueError, match="longer than 3 bytes"):
        writer.add(bounds, [(b"abcdefg", np.array([3, 4]))])
    writer.add(bounds, [(b"abcde", np.array([3, 2]))])
    writer.close()
    assert pyogrio.read_arrow(tmp_path / "t.fgb")[1].column("name").to_pylist() == ["abc", "de"]
