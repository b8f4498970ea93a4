"""convert-geojson (XYZ polygons, inclusive thresholds, bad rows) and tiles (GeoJSON cover)."""

from __future__ import annotations

import json
from pathlib import Path

import mercantile
import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.tiles import TileError, cover


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("tile,output\n" + "".join(f'{t},"{o}"\n' for t, o in
                                               ((t, o.replace('"', '""')) for t, o in rows)))
    return path


def same_polygon(ring: list, feature: dict) -> bool:
    """The same closed ring, whichever way round (mercantile writes clockwise)."""
    theirs = feature["geometry"]["coordinates"][0]
    return sorted(map(tuple, ring[:-1])) == sorted(map(tuple, theirs[:-1]))


def test_polygons_are_the_xyz_tiles_and_thresholds_are_inclusive(tmp_path):
    src = write_csv(tmp_path / "r.csv", [
        ("100-200-9", "[0.05, 0.95]"),   # exactly at the threshold: kept
        ("101-200-9", "[0.051, 0.949]"),  # the original rounded this to 0.95 and kept it
        ("102-201-9", "[0.0, 1.0]"),
    ])
    result = run("convert-geojson", str(src), str(tmp_path / "out.geojson"),
                 "--thresh_ind", "1", "--thresh", "0.95")
    assert result.exit_code == 0, result.output
    assert "Read 3 rows, kept 2, bad 0" in result.stderr
    data = json.loads((tmp_path / "out.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    tiles = [f["properties"]["tile"] for f in data["features"]]
    assert tiles == ["100-200-9", "102-201-9"]
    for feature in data["features"]:
        x, y, z = (int(v) for v in feature["properties"]["tile"].split("-"))
        assert same_polygon(feature["geometry"]["coordinates"][0], mercantile.feature((x, y, z)))
        ring = feature["geometry"]["coordinates"][0]
        area2 = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:], strict=False))
        assert area2 > 0  # counterclockwise, as RFC 7946 asks
    assert data["features"][0]["properties"] == {"tile": "100-200-9", "p0": 0.05, "p1": 0.95}


def test_tms_flag_flips_y(tmp_path):
    src = write_csv(tmp_path / "r.csv", [("100-311-9", "[0.1, 0.9]")])
    run("convert-geojson", str(src), str(tmp_path / "o.geojson"), "--thresh-ind", "1",
        "--thresh", "0.5", "--tms")
    feature = json.loads((tmp_path / "o.geojson").read_text())["features"][0]
    assert feature["properties"]["tile"] == "100-200-9"  # 2^9 - 1 - 311
    assert same_polygon(feature["geometry"]["coordinates"][0], mercantile.feature((100, 200, 9)))


def test_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path):
    src = write_csv(tmp_path / "r.csv", [
        ("1-1-2", "[0.1, 0.9]"),
        ("1-1-2", "not json"),
        ("9-9-2", "[0.1, 0.9]"),
        ("1-2", "[0.1, 0.9]"),
        ("2-2-2", "[0.9]"),
        ("3-3-2", '{"a": 1}'),
        ("0-0-2", "[0.1, 0.99]"),
    ])
    result = run("convert-geojson", str(src), str(tmp_path / "o.geojson"), "--thresh_ind", "1",
                 "--thresh", "0.5")
    assert result.exit_code == 1
    assert "Read 7 rows, kept 2, bad 5" in result.stderr
    for line in (3, 4, 5, 6, 7):
        assert f"r.csv:{line}:" in result.stderr
    assert "out of range" in result.stderr and "not JSON" in result.stderr
    assert len(json.loads((tmp_path / "o.geojson").read_text())["features"]) == 2


def test_a_poison_output_fails_its_row_alone(tmp_path):
    src = write_csv(tmp_path / "r.csv", [
        ("1-1-2", "[0.1, 0.9]"),
        ("2-1-2", "[" * 100_000 + "]" * 100_000),  # deeper than Python's JSON decoder goes
        ("3-1-2", "[0.2, 0.8]"),
    ])
    result = run("convert-geojson", str(src), str(tmp_path / "o.geojson"), "--thresh_ind", "1",
                 "--thresh", "0.5")
    assert result.exit_code == 1
    assert "Read 3 rows, kept 2, bad 1" in result.stderr
    assert "r.csv:3: output is nested too deeply" in result.stderr


def test_seq_writes_one_feature_per_line(tmp_path):
    src = write_csv(tmp_path / "r.csv", [(f"{i}-0-4", "[0.2, 0.8]") for i in range(5)])
    result = run("convert-geojson", str(src), "-", "--thresh_ind", "0", "--thresh", "0.1", "--seq")
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all(json.loads(line)["type"] == "Feature" for line in lines)


def test_empty_result_is_a_valid_collection(tmp_path):
    src = write_csv(tmp_path / "r.csv", [("1-1-2", "[0.9, 0.1]")])
    run("convert-geojson", str(src), str(tmp_path / "o.geojson"), "--thresh_ind", "1",
        "--thresh", "0.5")
    assert json.loads((tmp_path / "o.geojson").read_text()) == {"type": "FeatureCollection",
                                                                "features": []}


def test_missing_input_file(tmp_path):
    result = CliRunner().invoke(main, ["convert-geojson", str(tmp_path / "nope.csv"), "o.geojson",
                                       "--thresh_ind", "1", "--thresh", "0.5"])
    assert result.exit_code == 1 and "no such file" in result.stderr


def polygon(w: float, s: float, e: float, n: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def test_tiles_of_a_known_polygon(tmp_path):
    bbox = (-3.71, 40.38, -3.62, 40.46)
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": polygon(*bbox)}]}))
    result = run("tiles", str(aoi), "--zoom", "15", "-o", str(tmp_path / "tiles.txt"))
    assert result.exit_code == 0
    assert "99 tiles at zoom 15" in result.stderr
    lines = (tmp_path / "tiles.txt").read_text().split()
    expected = {f"{t.x}-{t.y}-{t.z}" for t in mercantile.tiles(*bbox, 15)}
    assert len(lines) == len(set(lines)) == 99 and set(lines) == expected



def test_tiles_refuses_to_write_over_its_area_or_into_nowhere(tmp_path):
    """'-o area.geojson' replaced the area with its tile list: refused, the area kept."""
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps(polygon(-3.71, 40.38, -3.62, 40.46)))
    before = aoi.read_bytes()
    for output, said in ((aoi, "is the file being read"), (tmp_path, "is a folder"),
                         (tmp_path / "no" / "t.txt", "does not exist")):
        result = CliRunner().invoke(main, ["tiles", str(aoi), "--zoom", "15", "-o", str(output)])
        assert result.exit_code == 1 and said in result.stderr, result.output
    assert aoi.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["aoi.geojson"]

def test_a_tile_shaped_polygon_covers_exactly_its_tiles():
    b = mercantile.bounds(300, 400, 10)
    assert cover(polygon(b.west, b.south, b.east, b.north), 10) == [mercantile.Tile(300, 400, 10)]
    assert len(cover(polygon(b.west, b.south, b.east, b.north), 12)) == 16


def test_a_triangle_leaves_out_the_corner_it_misses():
    triangle = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [0, 10], [0, 0]]]}
    got = {(t.x, t.y) for t in cover(triangle, 6)}
    assert got == {(32, 30), (32, 31), (33, 31)}  # (33, 30) lies beyond the hypotenuse


def test_holes_and_multipolygons():
    outer = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    hole = [[1.5, 1.5], [2.5, 1.5], [2.5, 2.5], [1.5, 2.5], [1.5, 1.5]]
    with_hole = {"type": "Polygon", "coordinates": [outer, hole]}
    inside_hole = mercantile.tile(2.0, 2.0, 12)
    assert inside_hole not in cover(with_hole, 12)
    multi = {"type": "MultiPolygon", "coordinates": [polygon(0, 0, 1, 1)["coordinates"],
                                                     polygon(5, 5, 6, 6)["coordinates"]]}
    assert len(cover(multi, 8)) == len(cover(polygon(0, 0, 1, 1), 8)) + len(cover(polygon(5, 5, 6, 6), 8))


def test_points_and_lines():
    assert cover({"type": "Point", "coordinates": [2.35, 48.85]}, 14) == [mercantile.tile(2.35, 48.85, 14)]
    line = cover({"type": "LineString", "coordinates": [[0.01, 0.01], [0.99, 0.01]]}, 9)
    assert len(line) == len({t.x for t in line}) and all(t.y == line[0].y for t in line)


@pytest.mark.parametrize("text, message", [
    ('{"type": "Polygon"}', "Polygon without coordinates"),
    ('{"type": "Circle", "coordinates": []}', "unknown GeoJSON type 'Circle'"),
    ('{"features": []}', "not a GeoJSON object"),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}', "polygon ring needs 4"),
    ('{"type": "Point", "coordinates": [200, 0]}', "outside lon -180..180"),
    ('{"type": "FeatureCollection", "features": []}', "no geometries"),
])
def test_invalid_geojson_is_a_clear_error(tmp_path, text, message):
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(text)
    result = CliRunner().invoke(main, ["tiles", str(aoi), "--zoom", "10"])
    assert result.exit_code == 1
    assert message in result.stderr


def test_json_syntax_error_names_line_and_column(tmp_path):
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text('{\n  "type": "Polygon",\n  "coordinates": [,]\n}')
    result = CliRunner().invoke(main, ["tiles", str(aoi), "--zoom", "10"])
    assert result.exit_code == 1 and "aoi.geojson:3:" in result.stderr


def test_cover_rejects_a_bad_zoom():
    with pytest.raises(TileError, match="zoom must be within"):
        cover(polygon(0, 0, 1, 1), 31)


def test_progress_is_reported_on_long_input(tmp_path):
    import io

    from cnsq.results import geojson

    rows = [(f"{i % 512}-{i // 512}-12", "[0.5, 0.5]") for i in range(120_000)]
    src = write_csv(tmp_path / "r.csv", rows)
    seen = []
    with src.open(newline="") as handle:
        report = geojson.convert(handle, io.StringIO(), 1, 0.9, progress=lambda r: seen.append(r.read))
    assert seen == [50_000, 100_000] and report.read == 120_000


def test_options_are_checked_before_anything_is_written(tmp_path):
    from click.testing import CliRunner

    from cnsq.cli import main

    source = tmp_path / "results.csv"
    source.write_text('tile,output\n1-2-3,"[0.1, 0.9]"\n4-5-6,"[0.8, 0.2]"\n')
    nan = CliRunner().invoke(main, ["convert-geojson", str(source), str(tmp_path / "a.geojson"),
                                    "--thresh_ind", "1", "--thresh", "nan"])
    assert nan.exit_code == 2 and "nan is not a finite number" in nan.output
    out_of_range = CliRunner().invoke(main, ["convert-geojson", str(source), str(tmp_path / "b.geojson"),
                                             "--thresh_ind", "2", "--thresh", "0.5"])
    assert out_of_range.exit_code == 1
    assert "--thresh_ind 2 is out of range: " in out_of_range.stderr and "2 class scores" in out_of_range.stderr
    assert out_of_range.stderr.count("\n") == 1
    assert not (tmp_path / "a.geojson").exists() and not (tmp_path / "b.geojson").exists()


def test_a_non_finite_score_never_reaches_the_geojson(tmp_path):
    import json

    from cnsq.results.geojson import convert_file

    source = tmp_path / "results.csv"
    source.write_text('tile,output\n1-2-3,"[NaN, 0.9]"\n4-5-6,"[0.1, 0.95]"\n')
    report = convert_file(source, str(tmp_path / "out.geojson"), None, thresh_ind=1, thresh=0.5)
    text = (tmp_path / "out.geojson").read_text()
    assert "NaN" not in text and "Infinity" not in text
    features = json.loads(text)["features"]
    assert [f["properties"]["tile"] for f in features] == ["4-5-6"]
    assert report.bad == [(2, "a score is not a finite number (NaN or Infinity)")]


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    from cnsq.results.geojson import convert_file

    source = tmp_path / "results.csv"
    source.write_bytes(b'\xef\xbb\xbftile,output\n1-2-3,"[0.1, 0.9]"\n')
    report = convert_file(source, str(tmp_path / "out.geojson"), None, thresh_ind=1, thresh=0.5)
    assert (report.read, report.kept, report.bad) == (1, 1, [])


def test_tile_ids_the_original_lambda_wrote_are_read(tmp_path):
    import json

    from cnsq.results.geojson import convert_file

    source = tmp_path / "results.csv"
    source.write_text('tile,output\n"{16047,12355,15}","[0.1, 0.9]"\n')
    report = convert_file(source, str(tmp_path / "out.geojson"), None, thresh_ind=1, thresh=0.5)
    assert (report.kept, report.bad) == (1, [])
    feature = json.loads((tmp_path / "out.geojson").read_text())["features"][0]
    assert feature["properties"]["tile"] == "16047-12355-15"


def test_a_killed_writers_partial_file_is_removed_by_the_next_run(tmp_path):
    """kill -9 during convert-geojson or download left .NAME.partial-PID for good."""
    import subprocess
    import sys

    source = tmp_path / "results.csv"
    source.write_text('tile,output\n1-2-3,"[0.1, 0.9]"\n')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    abandoned = tmp_path / f".out.geojson.partial-{dead.pid}"
    abandoned.write_text('{"type": "FeatureCollection", "features": [')
    with_suffix = tmp_path / f".out.fgb.partial-{dead.pid}.fgb"  # an earlier export's (GDAL's)
    with_suffix.write_bytes(b"fgb")
    mine = tmp_path / f".other.partial-{__import__('os').getpid()}"  # a live writer's: kept
    mine.write_text("in progress")
    result = run("convert-geojson", str(source), str(tmp_path / "out.geojson"), "--thresh_ind", "1", "--thresh", "0.5")
    assert result.exit_code == 0, result.output
    assert not abandoned.exists() and not with_suffix.exists() and mine.exists()
    assert json.loads((tmp_path / "out.geojson").read_text())["features"]


def test_an_output_over_16_mib_fails_its_row_alone(tmp_path):
    """csv's field limit refused the whole file ("Error: Error: field larger than field limit")."""
    source = tmp_path / "results.csv"
    huge = "[" + ", ".join(["0.5"] * 3_500_000) + "]"  # about 17 MiB
    source.write_text(f'tile,output\n1-2-3,"[0.1, 0.9]"\n4-5-6,"{huge}"\n7-8-9,"[0.2, 0.8]"\n')
    result = run("convert-geojson", str(source), str(tmp_path / "out.geojson"), "--thresh_ind", "1", "--thresh", "0.5")
    assert result.exit_code == 1, result.output  # a row was unreadable
    assert "results.csv:3: output is larger than 16 MiB" in result.stderr, result.stderr
    features = json.loads((tmp_path / "out.geojson").read_text())["features"]
    assert [f["properties"]["tile"] for f in features] == ["1-2-3", "7-8-9"]


def test_tiles_streams_with_memory_flat_in_the_number_of_tiles(tmp_path):
    """cnsq tiles held every tile in memory (816 MB at zoom 15 for a 20° square)."""
    import subprocess
    import sys

    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps(polygon(0, 0, 20, 20)))
    out = tmp_path / "tiles.txt"
    # The peak of this process's own memory (VmHWM: ru_maxrss would count the forking parent's).
    code = ("import sys; from cnsq.cli import main; sys.argv = ['cnsq', 'tiles', "
            f"{str(aoi)!r}, '--zoom', '14', '-o', {str(out)!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split()[-1]) / 1024
    with out.open() as lines:
        count = sum(1 for _ in lines)
    assert count == 847_230 and "847,230 tiles at zoom 14" in result.stderr
    assert peak_mb < 150, f"{peak_mb:.0f} MB for {count:,} tiles"  # 227 MB before it streamed
