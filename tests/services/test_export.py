"""cnsq export: every format read back by an independent reader (pyarrow's Parquet reader and
shapely's WKB for GeoParquet, GDAL through pyogrio for FlatGeobuf) and compared feature by feature
with convert-geojson's GeoJSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mercantile
import pytest
from click.testing import CliRunner

from cnsq.cli import main

pq = pytest.importorskip("pyarrow.parquet")
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")


def results_csv(path: Path, count: int = 400, bad: bool = True) -> dict[str, list[float]]:
    rng = random.Random(7)
    rows = {}
    tiles = {(rng.randrange(1000, 1200), rng.randrange(3000, 3200), 13) for _ in range(count)}
    for x, y, z in sorted(tiles):
        score = round(rng.random(), 6)
        rows[f"{x}-{y}-{z}"] = [round(1 - score, 6), score]
    lines = ["tile,output"] + [f'{t},"{json.dumps(s)}"' for t, s in rows.items()]
    if bad:
        lines += ['5-5-5,"[0.1, ""high""]"', '6-6-6,"[NaN, 0.5]"', '99-1-2,"[0.1, 0.9]"',
                  '7-7-7,"' + "[" * 100_000 + '"']
    path.write_text("\n".join(lines) + "\n")
    return rows


def geojson_of(tmp_path: Path, source: Path) -> dict[str, dict]:
    out = tmp_path / "reference.geojson"
    CliRunner().invoke(main, ["convert-geojson", str(source), str(out), "--thresh_ind", "1",
                              "--thresh", "0.5"])
    return {f["properties"]["tile"]: f for f in json.loads(out.read_text())["features"]}


# GeoParquet 1.1's JSON schema as the standard publishes it: format-specs/schema.json of
# opengeospatial/geoparquet at tag v1.1.0 (Apache License 2.0), unchanged.
GEOPARQUET_1_1 = json.loads((Path(__file__).parents[1] / "data" / "geoparquet-1.1.0-schema.json")
                            .read_text())


def test_geoparquet_is_geoparquet_1_1_and_matches_the_geojson(tmp_path):
    source = tmp_path / "results.csv"
    first_bad = len(results_csv(source)) + 2  # the header, then the good rows
    reference = geojson_of(tmp_path, source)
    out = tmp_path / "water.parquet"
    result = CliRunner().invoke(main, ["export", str(source), str(out), "--thresh_ind", "1",
                                       "--thresh", "0.5"])
    assert result.exit_code == 1  # the four bad rows, each named, the rest exported
    for line, reason in ((first_bad, "score 1 is not a number: 'high'"),
                         (first_bad + 1, "score 0 is not a number"),
                         (first_bad + 2, "tile: "), (first_bad + 3, "output is nested too deeply")):
        assert any(f"results.csv:{line}: " in m and reason.split(":")[0] in m
                   for m in result.stderr.splitlines()), (line, result.stderr)
    table = pq.read_table(out)
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    import jsonschema

    jsonschema.validate(geo, GEOPARQUET_1_1)
    column = geo["columns"]["geometry"]
    for spoiled in ({**geo, "version": "1.0.0-beta"},  # the schema can fail
                    {**geo, "columns": {"geometry": {**column, "orientation": "clockwise"}}},
                    {**geo, "columns": {"geometry": {**column, "bbox": [0, 0, 1]}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(spoiled, GEOPARQUET_1_1)
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert column["orientation"] == "counterclockwise"
    assert table.schema.field("p1").type == "double" and table.schema.field("z").type == "int32"
    assert table.schema.field("x").type == table.schema.field("y").type == "int32"
    rows = table.to_pylist()
    assert {r["tile"] for r in rows} == set(reference)
    for r in rows:
        feature = reference[r["tile"]]
        polygon = shapely.from_wkb(r["geometry"])
        assert polygon.exterior.is_ccw
        expected = feature["geometry"]["coordinates"][0]
        assert all(abs(a - b) < 1e-9 for p, q in zip(polygon.exterior.coords, expected, strict=True)
                   for a, b in zip(p, q, strict=True))
        assert [r["p0"], r["p1"]] == [feature["properties"]["p0"], feature["properties"]["p1"]]
        x, y, z = map(int, r["tile"].split("-"))
        assert (r["x"], r["y"], r["z"]) == (x, y, z)
        box = polygon.bounds
        assert (r["bbox"]["xmin"], r["bbox"]["ymin"], r["bbox"]["xmax"], r["bbox"]["ymax"]) == box
    # Rows in quadkey order: row groups cover compact areas.
    keys = [mercantile.quadkey(*map(int, r["tile"].split("-"))) for r in rows]
    assert keys == sorted(keys)
    overall = column["bbox"]
    assert overall[0] == min(r["bbox"]["xmin"] for r in rows)


def test_flatgeobuf_answers_a_bounding_box_through_its_index(tmp_path):
    source = tmp_path / "results.csv"
    rows = results_csv(source, bad=False)
    out = tmp_path / "all.fgb"
    result = CliRunner().invoke(main, ["export", str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not list(tmp_path.glob(".*partial*"))  # one file, nothing left
    info = pyogrio.read_info(out)
    assert info["features"] == len(rows) and info["geometry_type"] == "Polygon"
    assert info["crs"] == "EPSG:4326"
    assert info["capabilities"]["fast_spatial_filter"] is True  # the packed R-tree
    meta, table = pyogrio.read_arrow(out)
    assert sorted(table.column("tile").to_pylist()) == sorted(rows)
    window = mercantile.bounds(mercantile.Tile(1100, 3100, 13))
    boxes = [(window.west + 1e-7, window.south + 1e-7, window.east + 0.01, window.north - 1e-7)]
    # and windows of every size over the area (400 tiles: a root, 2 nodes, 25, the leaves)
    rng = random.Random(3)
    area = mercantile.bounds(mercantile.Tile(1000, 3000, 13)), mercantile.bounds(
        mercantile.Tile(1200, 3200, 13))
    for _ in range(60):
        xs = sorted(rng.uniform(area[0].west, area[1].east) for _ in range(2))
        ys = sorted(rng.uniform(area[1].south, area[0].north) for _ in range(2))
        boxes.append((xs[0], ys[0], xs[1], ys[1]))
    sizes = []
    for box in boxes:
        # (pyogrio.raw.read: read_arrow gives 65,536 empty rows when nothing matches)
        hits = sorted(pyogrio.raw.read(out, bbox=box, columns=["tile"])[3][0])
        expected = {t for t in rows if _intersects(mercantile.bounds(
            mercantile.Tile(*map(int, t.split("-")))), box)}
        assert hits == sorted(expected)
        sizes.append(len(hits))
    assert sum(1 for size in sizes[1:] if 0 < size < len(rows)) > 20  # some tiles, not all
    assert 0 in sizes[1:]


def _intersects(b, box) -> bool:
    return b.west <= box[2] and b.east >= box[0] and b.south <= box[3] and b.north >= box[1]


def test_geojson_and_csv_formats_and_every_tile_without_a_threshold(tmp_path):
    source = tmp_path / "results.csv"
    rows = results_csv(source, bad=False)
    reference = geojson_of(tmp_path, source)
    out = tmp_path / "kept.geojson"
    assert CliRunner().invoke(main, ["export", str(source), str(out), "--thresh_ind", "1",
                                     "--thresh", "0.5"]).exit_code == 0
    features = json.loads(out.read_text())["features"]  # valid JSON, in the file's order
    assert [f["properties"]["tile"] for f in features] == list(reference)
    for f in features:
        expected = reference[f["properties"]["tile"]]
        assert f["properties"] == expected["properties"]  # every score, as convert-geojson's
        assert max(abs(a - b) for p, q in zip(f["geometry"]["coordinates"][0],
                                              expected["geometry"]["coordinates"][0], strict=True)
                   for a, b in zip(p, q, strict=True)) < 1e-9
    every = tmp_path / "every.csv"
    assert CliRunner().invoke(main, ["export", str(source), str(every)]).exit_code == 0
    assert len(every.read_text().splitlines()) == len(rows) + 1
    assert set(reference) < set(rows)


def test_the_overall_bounds_are_those_of_every_tile_at_every_zoom():
    """The file's bbox (GeoParquet's metadata, FlatGeobuf's header) comes from each zoom's
    extreme columns and rows: the same as the union of every tile's bounds."""
    np = pytest.importorskip("numpy")
    from cnsq.results.columns import Columns
    from cnsq.results.export import _overall_bounds, tile_bounds

    rng = np.random.default_rng(11)
    for zooms in ([13], [0, 5, 13, 30], [2, 30]):
        z = rng.choice(zooms, 500).astype(np.int8)
        x = (rng.random(500) * np.exp2(z.astype(float))).astype(np.int32)
        y = (rng.random(500) * np.exp2(z.astype(float))).astype(np.int32)
        west, south, east, north = tile_bounds(x, y, z)
        block = Columns(np.arange(500), x, y, z, np.zeros((500, 1)))
        assert _overall_bounds(block) == (west.min(), south.min(), east.max(), north.max())

def test_wide_rows_make_smaller_groups_of_the_same_rows(tmp_path, monkeypatch):
    """Rows of hundreds of scores are written in groups of fewer rows (a group is bounded in
    bytes, as the sort's chunks are), so memory stays a few groups; the rows are the same."""
    from cnsq.results import tile_order

    rng = random.Random(3)
    source = tmp_path / "wide.csv"
    tiles = sorted({(rng.randrange(2**12), rng.randrange(2**12)) for _ in range(600)})
    rows = {f"{x}-{y}-12": [round(rng.random(), 3) for _ in range(300)] for x, y in tiles}
    source.write_text("tile,output\n" + "".join(f'{t},"{json.dumps(v)}"\n'
                                                for t, v in rows.items()))
    monkeypatch.setattr(tile_order, "CHUNK_BYTES", 100 * tile_order.record_type(300).itemsize)
    for suffix in ("parquet", "fgb"):
        out = tmp_path / f"wide.{suffix}"
        result = CliRunner().invoke(main, ["export", str(source), str(out)])
        assert result.exit_code == 0, result.stderr
        table = pq.read_table(out) if suffix == "parquet" else pyogrio.read_arrow(out)[1]
        assert {t: [table[f"p{i}"][n].as_py() for i in (0, 299)]
                for n, t in enumerate(table["tile"].to_pylist())} == {
            t: [v[0], v[299]] for t, v in rows.items()}
    groups = pq.ParquetFile(tmp_path / "wide.parquet").metadata
    sizes = [groups.row_group(i).num_rows for i in range(groups.num_row_groups)]
    assert sum(sizes) == len(rows) > 500 and set(sizes[:-1]) == {100} and sizes[-1] <= 100

def test_bad_requests_are_clear(tmp_path):
    source = tmp_path / "results.csv"
    results_csv(source, count=5, bad=False)
    unknown = CliRunner().invoke(main, ["export", str(source), str(tmp_path / "x.shp")])
    assert unknown.exit_code == 1 and "say --format" in unknown.stderr
    half = CliRunner().invoke(main, ["export", str(source), str(tmp_path / "x.fgb"),
                                     "--thresh", "0.5"])
    assert half.exit_code == 1 and "--thresh_ind and --thresh go together" in half.stderr
    assert not (tmp_path / "x.fgb").exists()
    nowhere = CliRunner().invoke(main, ["export", str(source), str(tmp_path / "no" / "x.parquet")])
    assert nowhere.exit_code == 1 and "folder" in nowhere.stderr and "partial" not in nowhere.stderr



def test_geoparquet_is_snappy_as_geopandas_writes_it_or_as_asked(tmp_path):
    """Snappy by default (pyarrow's, GeoPandas' and GDAL's default); --compression zstd for a
    smaller file, none for none; the values are the same whichever. Other formats refuse it."""
    source = tmp_path / "results.csv"
    results_csv(source, count=50, bad=False)
    tables = {}
    for asked, codec in ((None, "SNAPPY"), ("zstd", "ZSTD"), ("none", "UNCOMPRESSED")):
        out = tmp_path / f"{asked}.parquet"
        result = CliRunner().invoke(main, ["export", str(source), str(out)]
                                    + (["--compression", asked] if asked else []))
        assert result.exit_code == 0, result.stderr
        group = pq.ParquetFile(out).metadata.row_group(0)
        assert {group.column(i).compression for i in range(group.num_columns)} == {codec}
        tables[asked] = pq.read_table(out)
    assert tables[None].equals(tables["zstd"]) and tables[None].equals(tables["none"])
    for suffix in ("fgb", "geojson", "csv"):
        refused = CliRunner().invoke(main, ["export", str(source), str(tmp_path / f"x.{suffix}"),
                                            "--compression", "zstd"])
        assert refused.exit_code != 0 and "--compression" in refused.stderr
        assert "geoparquet" in refused.stderr and not (tmp_path / f"x.{suffix}").exists()
    unknown = CliRunner().invoke(main, ["export", str(source), str(tmp_path / "x.parquet"),
                                        "--compression", "gzip2"])
    assert unknown.exit_code == 2 and "gzip2" in unknown.stderr


def test_the_geoparquet_is_what_pyarrow_parquet_writes(tmp_path, monkeypatch):
    """Export calls pyarrow's writer itself (not through pyarrow.parquet, whose imports cost
    14 ms): the file is the one pyarrow.parquet.ParquetWriter writes, byte for byte, which is
    also what a pyarrow refusing the direct call gets."""
    import pyarrow._parquet

    source = tmp_path / "results.csv"
    results_csv(source, count=300, bad=False)
    files = []
    real = pyarrow._parquet.ParquetWriter

    def refuse_a_path(where, *args, **kwargs):  # export's call; pyarrow.parquet's gives a file
        if isinstance(where, str):
            raise TypeError("an unexpected keyword argument")
        return real(where, *args, **kwargs)

    for refused in (False, True):
        if refused:
            monkeypatch.setattr(pyarrow._parquet, "ParquetWriter", refuse_a_path)
        out = tmp_path / f"{refused}.parquet"
        result = CliRunner().invoke(main, ["export", str(source), str(out), "--compression",
                                           "zstd"])
        assert result.exit_code == 0, result.stderr
        files.append(out.read_bytes())
    assert files[0] == files[1] and len(pq.read_table(tmp_path / "False.parquet")) == 300

@pytest.mark.parametrize("how", ["same name", "symlink", "hard link"])
@pytest.mark.parametrize("command", ["export", "convert-geojson"])
def test_an_output_that_is_the_input_is_refused_and_the_results_kept(tmp_path, how, command):
    """A typo of OUT for IN.csv would replace the results with their filtered copy (export
    --format csv) or with GeoJSON: refused before anything is read, the file unchanged."""
    source = tmp_path / "results.csv"
    results_csv(source, count=20, bad=False)
    before = source.read_bytes()
    target = {"same name": source, "symlink": tmp_path / "link.csv",
              "hard link": tmp_path / "hard.csv"}[how]
    if how == "symlink":
        target.symlink_to(source)
    elif how == "hard link":
        target.hardlink_to(source)
    extra = ["--format", "csv"] if command == "export" else []
    result = CliRunner().invoke(main, [command, str(source), str(target), "--thresh_ind", "1",
                                       "--thresh", "0.5", *extra])
    assert result.exit_code != 0
    assert "is the file being read" in result.stderr and str(target) in result.stderr
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"results.csv", target.name})  # no partial left either


@pytest.mark.parametrize("command", ["export", "convert-geojson"])
def test_a_folder_or_a_missing_file_as_the_input_is_named(tmp_path, command):
    for source, said in ((tmp_path, "is a folder"), (tmp_path / "nope.csv", "no such file")):
        result = CliRunner().invoke(main, [command, str(source), str(tmp_path / "o.geojson"),
                                           "--thresh_ind", "1", "--thresh", "0.5"])
        assert result.exit_code == 1, result.output
        assert f"{source}: {said}" in result.stderr
    assert not (tmp_path / "o.geojson").exists()

POISON = [
    '1-2-3,"[0.1, 0.9]"',
    '1-2-3,"[0.1, 0.9]",extra',        # three columns
    '2-2-3,"[0.2,0.8]"',
    'nonsense',                         # one column
    '3-2-3,"[1e-3, 9.99E-1]"',
    '9-2-3,"[0.1, 0.9]"',              # x outside zoom 3's grid
    '4-2-3,"[0.1, true]"',
    '5-2-3,"[0.1, 0.9, 0.3]"',         # a third score where the rows hold two
    '6-2-3," [ 0.1 , 0.9 ] "',         # spaces around: still a list of two numbers
    '7-2-3,"[-0, 1]"',
    '0-0-31,"[0.1, 0.9]"',             # zoom beyond 30
    '7-7-3,"{""a"": 1}"',
    '1-1-1,"[0.5, 0.5]"',
]


@pytest.mark.parametrize("header", [True, False])
def test_the_columnar_reader_reports_what_the_row_reader_does(tmp_path, header):
    from cnsq.results.columns import read_columns
    from cnsq.results.reader import Report, read_rows

    source = tmp_path / "poison.csv"
    source.write_text(("tile,output\n" if header else "") + "\n".join(POISON) + "\n")
    fast, slow = Report(), Report()
    columns = read_columns(source, 1, 0.5, fast)
    with source.open(newline="") as handle:
        rows = [r for r in read_rows(handle, 1, 0.5, slow) if len(r.scores) == 2]
    assert sorted(fast.bad) == sorted(slow.bad + [
        (POISON.index('5-2-3,"[0.1, 0.9, 0.3]"') + 1 + header, "3 scores where the file's rows hold 2")])
    assert (fast.read, fast.kept) == (slow.read, len(rows))
    assert sorted(zip(columns.line.tolist(), columns.x.tolist(), columns.scores[:, 1].tolist(),
                      strict=True)) == sorted((r.line, r.tile.x, r.scores[1]) for r in rows)


@pytest.mark.parametrize("brk", ["\n", "\r", "\r\n"])
@pytest.mark.parametrize("where", ["output", "tile"])
def test_a_value_holding_a_line_break_is_read_row_by_row(tmp_path, brk, where):
    """A quoted line break (\\n, a bare \\r, or both) makes a row two lines: the bad row after
    it is reported at its physical line, as the row reader counts them."""
    from cnsq.results.columns import read_columns
    from cnsq.results.reader import Report

    source = tmp_path / "multiline.csv"
    first = f'1-1-2,"[0.1,{brk} 0.9]"' if where == "output" else f'"1-1{brk}-2","[0.1, 0.9]"'
    source.write_bytes(f'tile,output\n{first}\n2-1-2,"[0.1, 0.9]"\n3-1-2,"[0.2, x]"\n'.encode())
    report = Report()
    columns = read_columns(source, None, None, report)
    assert report.bad[-1][0] == 5, report.bad  # its physical line
    assert columns.x.tolist() == ([1, 2] if where == "output" else [2])


def test_geopandas_reads_both_files_as_the_geojson_says(tmp_path):
    geopandas = pytest.importorskip("geopandas")
    source = tmp_path / "results.csv"
    results_csv(source, bad=False)
    reference = geojson_of(tmp_path, source)
    for name in ("kept.parquet", "kept.fgb"):
        out = tmp_path / name
        assert CliRunner().invoke(main, ["export", str(source), str(out), "--thresh_ind", "1",
                                         "--thresh", "0.5"]).exit_code == 0
        frame = (geopandas.read_parquet(out) if name.endswith(".parquet")
                 else geopandas.read_file(out))
        assert frame.crs.to_epsg() == 4326 or frame.crs.to_string() == "OGC:CRS84"
        assert set(frame["tile"]) == set(reference)
        for row in frame.itertuples():
            expected = reference[row.tile]["geometry"]["coordinates"][0]
            got = list(row.geometry.exterior.coords)
            assert row.geometry.exterior.is_ccw
            assert max(abs(a - b) for p, q in zip(got, expected, strict=True)
                       for a, b in zip(p, q, strict=True)) < 1e-9
            assert row.p1 == reference[row.tile]["properties"]["p1"]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_results_table_is_exported_as_download_reads_it(tmp_path, kind, request):
    from cnsq.results.store import open_store

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'results.db'}"
    else:
        from support.servers import fresh_database

        url = fresh_database(request.getfixturevalue("postgres_url"), "export")
    store = open_store(url)
    store.migrate()
    rows = results_csv(tmp_path / "reference.csv", count=200, bad=False)
    store.upsert([(tile, scores) for tile, scores in rows.items()])
    store.close()
    out = tmp_path / "from-table.parquet"
    result = CliRunner().invoke(main, ["export", str(out), "--database-url", url,
                                       "--thresh_ind", "1", "--thresh", "0.5"])
    assert result.exit_code == 0, result.output
    reference = geojson_of(tmp_path, tmp_path / "reference.csv")
    assert set(pq.read_table(out).column("tile").to_pylist()) == set(reference)
    assert not list(tmp_path.glob(".cnsq-export-*"))  # the staged CSV is gone
    assert "Read 200 rows from the results table." in result.stderr


@pytest.mark.parametrize("suffix", ["parquet", "fgb"])
def test_the_last_tile_of_zoom_30_and_the_world_tile(tmp_path, suffix):
    """x and y are kept in 32 bits: the bounds of the last tile of zoom 30 must not overflow,
    nor its id (the longest there is) its room in a FlatGeobuf feature."""
    source = tmp_path / "edges.csv"
    last = 2**30 - 1
    source.write_text(f'tile,output\n{last}-{last}-30,"[0.1, 0.9]"\n0-0-0,"[0.2, 0.8]"\n')
    out = tmp_path / f"edges.{suffix}"
    assert CliRunner().invoke(main, ["export", str(source), str(out)]).exit_code == 0
    if suffix == "parquet":
        rows = {r["tile"]: r for r in pq.read_table(out).to_pylist()}
    else:
        _, table = pyogrio.read_arrow(out)
        rows = {}
        for r in table.to_pylist():
            west, south, east, north = shapely.from_wkb(r.pop("wkb_geometry")).bounds
            rows[r["tile"]] = {**r, "bbox": {"xmin": west, "ymin": south, "xmax": east,
                                             "ymax": north}}
    assert set(rows) == {f"{last}-{last}-30", "0-0-0"}
    for tile in (f"{last}-{last}-30", "0-0-0"):
        b = mercantile.bounds(mercantile.Tile(*map(int, tile.split("-"))))
        box = rows[tile]["bbox"]
        assert abs(box["xmin"] - b.west) < 1e-9 and abs(box["ymin"] - b.south) < 1e-9
        assert abs(box["xmax"] - b.east) < 1e-9 and abs(box["ymax"] - b.north) < 1e-9
        assert rows[tile]["x"] == int(tile.split("-")[0])


@pytest.mark.parametrize("suffix", ["parquet", "geojson", "fgb"])
def test_export_does_not_load_pandas(tmp_path, suffix):
    """pyarrow imports pandas, when installed, the first time it is given a list or a numpy
    array (0.2 s and some 60 MB): export builds its Arrow arrays from buffers instead. Nor does
    it load pyarrow.compute, which builds a wrapper for each of Arrow's functions (20-30 ms):
    it calls them by name."""
    import subprocess
    import sys

    source = tmp_path / "results.csv"
    results_csv(source, count=50)
    script = ("import sys\nfrom cnsq.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('pandas' in sys.modules, 'pyarrow.compute' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, "export", str(source),
                           str(tmp_path / f"out.{suffix}")], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout + done.stderr
    assert (tmp_path / f"out.{suffix}").stat().st_size > 0
    if suffix == "fgb":  # and what it wrote is whole
        assert len(pyogrio.read_dataframe(tmp_path / "out.fgb")) == 50


@pytest.mark.parametrize("suffix", ["parquet", "fgb"])
def test_a_sort_spilled_to_disk_writes_the_same_file(tmp_path, monkeypatch, suffix):
    """Past a run of rows, the Z-order sort spills sorted runs and merges them: the rows (and
    GeoParquet's groups, FlatGeobuf's index) are those of a sort in memory, and nothing is left
    beside the output."""
    from cnsq.results import tile_order

    source = tmp_path / "results.csv"
    results_csv(source, count=3000, bad=False)
    tables, files = {}, {}
    for run in (tile_order.RUN_BYTES, 100 * tile_order.record_type(2).itemsize):
        monkeypatch.setattr(tile_order, "RUN_BYTES", run)
        folder = tmp_path / f"run-{run}"
        folder.mkdir()
        out = folder / f"out.{suffix}"
        result = CliRunner().invoke(main, ["export", str(source), str(out)])
        assert result.exit_code == 0, result.output
        assert [p.name for p in folder.iterdir()] == [out.name]
        tables[run] = pq.read_table(out) if suffix == "parquet" else pyogrio.read_arrow(out)[1]
        files[run] = out.read_bytes()
    memory, spilled = tables.values()
    smallest = 100 * tile_order.record_type(2).itemsize
    assert spilled.to_pylist() == memory.to_pylist() and len(memory) > 2000
    keys = [mercantile.quadkey(*map(int, t.split("-"))) for t in spilled["tile"].to_pylist()]
    assert keys == sorted(keys)
    if suffix == "fgb":
        assert files[smallest] == files[tile_order.RUN_BYTES]


@pytest.mark.parametrize("suffix", ["geojson", "parquet", "fgb"])
def test_a_line_break_far_into_the_file_starts_again_row_by_row(tmp_path, suffix):
    """The fast reader finds the line break blocks after the first were written: the export
    starts again with the row reader and reports the bad row's physical line."""
    rows = [f'{i % 1000}-{i // 1000}-12,"[0.25, 0.75]"' for i in range(40_000)]  # > 1 MB
    rows[-2] = '1-1-12,"[0.25,\n 0.75]"'
    rows[-1] = '2-2-12,"[0.25, x]"'
    source = tmp_path / "results.csv"
    source.write_text("tile,output\n" + "\n".join(rows) + "\n")
    out = tmp_path / f"out.{suffix}"
    result = CliRunner().invoke(main, ["export", str(source), str(out)])
    assert result.exit_code == 1
    assert "results.csv:40002: " in result.stderr  # header, 39,999 rows, one of two lines
    assert "Read 40,000 rows, kept 39,999, bad 1" in result.output
    if suffix == "geojson":
        assert len(json.loads(out.read_text())["features"]) == 39_999
    else:
        assert len(pyogrio.read_dataframe(out) if suffix == "fgb" else pq.read_table(out)) == 39_999


@pytest.mark.parametrize("suffix", ["parquet", "fgb", "geojson", "csv"])
def test_bad_rows_fail_alone_in_every_format(tmp_path, suffix):
    """A non-numeric score, NaN, a bad id and a 100,000-bracket output: each named with its
    line, exit 1, and every good row in the file."""
    source = tmp_path / "results.csv"
    rows = results_csv(source)
    out = tmp_path / f"out.{suffix}"
    result = CliRunner().invoke(main, ["export", str(source), str(out)])
    assert result.exit_code == 1
    first_bad = len(rows) + 2
    named = [line for line in range(first_bad, first_bad + 4)
             if f"results.csv:{line}: " in result.stderr]
    assert named == list(range(first_bad, first_bad + 4)), result.stderr
    if suffix == "geojson":
        tiles = [f["properties"]["tile"] for f in json.loads(out.read_text())["features"]]
    elif suffix == "csv":
        tiles = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    else:
        tiles = (pyogrio.read_arrow(out)[1] if suffix == "fgb" else pq.read_table(out)).column(
            "tile").to_pylist()
    assert sorted(tiles) == sorted(rows)


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"tile,output\n"])
@pytest.mark.parametrize("suffix", ["parquet", "fgb", "geojson", "csv"])
def test_an_empty_file_gives_an_empty_file(tmp_path, suffix, content):
    """A zero-byte CSV (a run that wrote nothing) was Arrow's 'Empty CSV file' error."""
    source = tmp_path / "results.csv"
    source.write_bytes(content)
    out = tmp_path / f"out.{suffix}"
    result = CliRunner().invoke(main, ["export", str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert "Read 0 rows, kept 0, bad 0" in result.output
    if suffix == "geojson":
        assert json.loads(out.read_text())["features"] == []
    elif suffix == "parquet":
        assert pq.read_table(out).num_rows == 0
    elif suffix == "fgb":
        assert len(pyogrio.read_dataframe(out)) == 0


@pytest.mark.parametrize("text", [
    'tile,output\n1-1-2,"[0.1, 0.9]"\n\n2-1-2,"[0.1, x]"\n',  # a blank line between rows
    'tile,output\r\n1-1-2,"[0.1, 0.9]"\r\n\r\n2-1-2,"[0.1, x]"\r\n',
    '\ntile,output\n2-1-2,"[0.1, x]"\n',  # first
    'tile,output\n2-1-2,"[0.1, x]"\n\n',  # last
])
def test_blank_lines_are_counted_as_the_row_reader_counts_them(tmp_path, text):
    """pyarrow skips blank lines, so every row after one was reported a line early; the row
    reader counts them (and reports each as a row of no columns)."""
    from cnsq.results.columns import read_columns
    from cnsq.results.reader import Report, read_rows

    source = tmp_path / "blank.csv"
    source.write_bytes(text.encode())
    fast, slow = Report(), Report()
    read_columns(source, None, None, fast)
    with source.open(newline="") as handle:
        list(read_rows(handle, None, None, slow))
    assert (fast.read, fast.kept, fast.bad) == (slow.read, slow.kept, slow.bad)


PIECES = ["0.5", "1", "0", "-0", "01", "1.", ".5", "+1", "1e5", "1E-3", "2.5e+2", "NaN",
          "Infinity", "-Infinity", "1e400", "true", "null", '"0.5"', "[0.5]", "0x10", " 0.5",
          "0.5 ", "\t0.5", "٣", "1_000", "9" * 30]


def _random_row(rng: random.Random, whole: bool = False) -> str:
    z = rng.choice([0, 1, 12, 30, 31])
    x, y = rng.randrange(2 ** min(z, 30) + 1), rng.randrange(2 ** min(z, 30) + 1)
    tile = rng.choice([f"{x}-{y}-{z}"] * 6 + [f"{x}-{y}", f"{x}--{y}-{z}", f" {x}-{y}-{z}",
                                               f"{x}-{y}-{z} ", "", "a-b-c", f"{x}-{y}-0{z}"])
    scores = ", ".join(rng.choice(PIECES[:3] * 8 + PIECES) for _ in range(rng.choice([2] * 8 + [1, 3])))
    output = rng.choice([f"[{scores}]"] * 8 + [scores, f"[{scores}", f"{{{scores}}}", "[]", ""])
    if whole and not tile and not output:  # as a blank line reads (see below)
        tile = "1-1-1"
    row = f'{tile},"{output}"'
    odd = [f"{row},extra", tile or "1-2-3", f'{tile},"{output}"""']
    if not whole:  # a blank line and a stray quote: rows no longer one a line (read by rows)
        odd += ['"', ""]
    return rng.choice([row] * 20 + odd)


def _first_width(source: Path) -> int:
    """The score count of the first row whose id is x-y-z (digits, in range) and whose output
    is a list of one number or more."""
    import csv
    import re

    with source.open(newline="") as handle:
        for row in csv.reader(handle):
            if len(row) != 2 or not re.fullmatch(r"[0-9]{1,10}-[0-9]{1,10}-[0-9]{1,2}", row[0]):
                continue
            x, y, z = map(int, row[0].split("-"))
            try:
                value = json.loads(row[1])
            except ValueError:
                continue
            if z <= 30 and x < 2**z and y < 2**z and isinstance(value, list) and value and all(
                    type(v) in (int, float) for v in value):
                return len(value)
    raise AssertionError("no row gives the width")


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_columnar_reader_agrees_with_the_row_reader_on_random_rows(tmp_path, seed, whole):
    """Rows drawn at random from good and poison pieces (JSON's number grammar at its edges,
    wrong widths and ids, stray quotes and columns, blank lines): the same rows kept, the same
    reports at the same lines."""
    from cnsq.results.columns import iter_columns, read_columns
    from cnsq.results.reader import Report, read_rows

    rng = random.Random(seed)
    source = tmp_path / "random.csv"
    source.write_text("tile,output\n" + "\n".join(_random_row(rng, whole) for _ in range(3000))
                      + "\n")
    fast, slow = Report(), Report()
    if whole:  # one row a line: the columnar path itself, not its fallback
        list(iter_columns(source, 1, 0.25, Report()))
    columns = read_columns(source, 1, 0.25, fast)
    with source.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(read_rows(handle, 1, 0.25, slow))
    width = _first_width(source)  # the file's score count, by the documented rule
    assert columns.scores.shape[1] == width
    wide = [(r.line, len(r.scores)) for r in rows if len(r.scores) != width]
    assert (fast.read, fast.bad_count) == (slow.read, slow.bad_count + len(wide))
    # Each lists its 50 first bad rows: the fast one also lists the rows of another width.
    reported, expected = dict(fast.bad), dict(slow.bad)
    expected.update((line, f"{n} scores where the file's rows hold {width}") for line, n in wide)
    last = fast.bad[-1][0] if len(fast.bad) == 50 else float("inf")
    assert reported == {line: r for line, r in expected.items() if line <= last}
    kept = [(r.line, r.tile.x, r.tile.y, r.tile.z, r.scores) for r in rows if len(r.scores) == width]
    assert list(zip(columns.line.tolist(), columns.x.tolist(), columns.y.tolist(),
                    columns.z.tolist(), columns.scores.tolist(), strict=True)) == kept


def test_duckdb_reads_the_geoparquet_and_can_skip_its_row_groups(tmp_path, monkeypatch):
    """DuckDB, a reader of its own: the geometry typed from the `geo` metadata (lon/lat), the rows
    of convert-geojson's output, and row groups whose bbox statistics cover small areas, so a
    window query reads few of them."""
    duckdb = pytest.importorskip("duckdb")
    from cnsq.results import export as export_module

    monkeypatch.setattr(export_module, "ROW_GROUP", 50)  # several groups from a small file
    source = tmp_path / "results.csv"
    results_csv(source, count=2000, bad=False)
    header, *lines = source.read_text().splitlines()
    random.Random(4).shuffle(lines)  # the file's order says nothing of where tiles are
    source.write_text("\n".join([header, *lines]) + "\n")
    reference = geojson_of(tmp_path, source)
    out = tmp_path / "water.parquet"
    assert CliRunner().invoke(main, ["export", str(source), str(out), "--thresh_ind", "1",
                                     "--thresh", "0.5"]).exit_code == 0
    con = duckdb.connect()
    types = dict((name, kind) for name, kind, *_ in con.execute(
        f"DESCRIBE SELECT * FROM '{out}'").fetchall())
    assert types["geometry"].startswith("GEOMETRY") and "CRS84" in types["geometry"]
    rows = con.execute(f"SELECT tile, p1, bbox.xmin, bbox.ymax FROM '{out}'").fetchall()
    assert {tile: p1 for tile, p1, _, _ in rows} == {
        t: f["properties"]["p1"] for t, f in reference.items()}
    for tile, _, west, north in rows:
        ring = reference[tile]["geometry"]["coordinates"][0]
        assert abs(west - ring[0][0]) < 1e-9 and abs(north - ring[2][1]) < 1e-9
    stats: dict[int, dict[str, tuple[float, float]]] = {}
    for group, column, low, high in con.execute(
            f"SELECT row_group_id, path_in_schema, stats_min, stats_max FROM "
            f"parquet_metadata('{out}') WHERE path_in_schema LIKE 'bbox, %'").fetchall():
        stats.setdefault(group, {})[column.split(", ")[1]] = (float(low), float(high))
    boxes = [(s["xmin"][0], s["ymin"][0], s["xmax"][1], s["ymax"][1]) for s in stats.values()]
    assert len(boxes) > 10
    west, south = min(b[0] for b in boxes), min(b[1] for b in boxes)
    east, north = max(b[2] for b in boxes), max(b[3] for b in boxes)
    areas = sorted((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)
    assert areas[len(areas) // 2] < (east - west) * (north - south) / 4  # compact groups
    # A window of a ninth of the area (its south-west corner): by their statistics alone a
    # reader keeps only the groups that may hold it.
    window = (west, south, west + (east - west) / 3, south + (north - south) / 3)
    kept = [b for b in boxes if b[0] <= window[2] and b[2] >= window[0]
            and b[1] <= window[3] and b[3] >= window[1]]
    assert 0 < len(kept) <= len(boxes) / 2


@pytest.mark.parametrize("suffix", ["parquet", "geojson", "csv"])
def test_a_long_export_says_how_far_it_has_read(tmp_path, suffix):
    from cnsq.results.export import export
    from cnsq.results.reader import PROGRESS_EVERY

    source = tmp_path / "results.csv"
    count = PROGRESS_EVERY * 2 + 10
    source.write_text("tile,output\n" + "".join(
        f'{i % 4096}-{i // 4096}-12,"[0.5, 0.5]"\n' for i in range(count)))
    seen: list[int] = []
    fmt = {"parquet": "geoparquet"}.get(suffix, suffix)
    report = export(source, tmp_path / f"out.{suffix}", fmt, None, None,
                    lambda r: seen.append(r.read))
    assert report.read == count
    assert len(seen) >= 2 and seen == sorted(seen) and PROGRESS_EVERY <= seen[-1] <= count


def test_the_geoparquet_writer_waits_for_its_write_through_ctrl_c():
    """The file is closed only once the write in flight has ended: closing it under a write
    crashed the process (a segfault, 1 in ~400 exports interrupted at random). Two Ctrl-Cs
    arrive while a write runs; the wait outlasts both and raises one KeyboardInterrupt."""
    import os
    import signal
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from cnsq.results.export import _join

    ended = []
    pool = ThreadPoolExecutor(max_workers=1)
    pool.submit(lambda: (time.sleep(0.6), ended.append(time.monotonic())))
    timers = [threading.Timer(t, os.kill, (os.getpid(), signal.SIGINT)) for t in (0.1, 0.3)]
    for timer in timers:
        timer.start()
    with pytest.raises(KeyboardInterrupt):
        _join(pool)
    assert ended and time.monotonic() >= ended[0]  # returned after the write, not before


def test_groups_are_built_and_written_in_order_and_an_error_stops_the_writes():
    """Built in one thread, written in another: in the parts' order whatever each takes; a
    part that fails to build (or write) is raised, nothing after it is written, and no
    thread is still writing when the call returns."""
    import threading
    import time

    from cnsq.results.export import _build_and_write

    written, threads = [], set()

    def build(i):
        time.sleep(0.01 * (i % 3))
        if i == 7:
            raise ValueError("part 7")
        return i * 10

    def write(value):
        threads.add(threading.current_thread().name)
        time.sleep(0.005)
        written.append(value)

    _build_and_write(iter(range(6)), lambda i: i * 10 if i % 2 else (time.sleep(0.02), i * 10)[1],
                     write)
    assert written == [0, 10, 20, 30, 40, 50] and threading.current_thread().name not in threads
    written.clear()
    with pytest.raises(ValueError, match="part 7"):
        _build_and_write(iter(range(20)), build, write)
    done = list(written)
    assert done == [i * 10 for i in range(7)]  # up to the failed part, in order
    time.sleep(0.1)
    assert written == done  # nothing written after the call returned

@pytest.mark.parametrize("suffix", ["parquet", "fgb", "geojson", "csv"])
def test_a_full_disk_is_reported_as_such_and_leaves_nothing(tmp_path, suffix):
    """A write that fails (here the file-size limit, as a full disk would: EFBIG instead of
    ENOSPC) is named as the system names it, exit 1, and no partial file is left; the
    FlatGeobuf writer's own count check must not hide it."""
    import resource
    import signal
    import subprocess
    import sys

    source = tmp_path / "results.csv"
    results_csv(source, count=3000, bad=False)
    out = tmp_path / f"out.{suffix}"

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run([sys.executable, "-m", "cnsq.cli", "export", str(source), str(out)],
                          capture_output=True, text=True, preexec_fn=limited)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "File too large" in done.stderr, done.stderr
    assert "features written" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_groups_hold_the_rows_in_order_whatever_the_parts():
    """The sort's parts (of any length, the size itself included) regrouped: every row once, in
    order, every group full but the last."""
    np = pytest.importorskip("numpy")
    from cnsq.results.export import _groups
    from cnsq.results.tile_order import record_type

    rows = np.zeros(100, record_type(1))
    rows["line"] = np.arange(100)
    for lengths in ([10] * 10, [7, 10, 3, 10, 10, 25, 5, 30], [100], [1] * 100, [33, 67]):
        bounds = np.cumsum([0, *lengths])
        parts = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        groups = list(_groups(iter(parts), 10))
        assert [len(g) for g in groups] == [10] * 10
        assert np.concatenate([g.line for g in groups]).tolist() == list(range(100))
    assert [len(g) for g in _groups(iter([rows[:15]]), 10)] == [10, 5]


@pytest.mark.parametrize("suffix", [".parquet", ".fgb", ".geojson", ".csv"])
def test_a_failed_export_leaves_a_good_output_as_it_was(tmp_path, suffix):
    """A source whose every row is bad replaced a good existing OUT with a 0-row file. OUT is
    replaced only by a file that holds what the source holds; the bad rows are still listed."""
    good = tmp_path / "good.csv"
    good.write_text('tile,output\n1-2-3,"[0.1, 0.9]"\n4-5-6,"[0.8, 0.2]"\n')
    out = tmp_path / f"out{suffix}"
    first = CliRunner().invoke(main, ["export", str(good), str(out)])
    assert first.exit_code == 0, first.output
    before = out.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text('tile,output\n{1,2,3},"[0.1, 0.9]"\n7-8,"[1]"\n')
    result = CliRunner().invoke(main, ["export", str(bad), str(out)])
    assert result.exit_code == 1
    assert f"{bad}:2:" in result.stderr and f"{bad}:3:" in result.stderr
    assert "not written (it keeps what it held)" in result.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good.csv", "bad.csv", out.name])
