"""COG imagery read by the worker itself (download_and_predict/cog.py): real COGs in a UTM
projection written with rio-cogeo, served on 127.0.0.1 by a server that honours Range as S3 and
CDNs do. The oracle is independent of rio-tiler: rasterio.warp.reproject of the scene's pixels
onto the tile's Web Mercator grid, nearest neighbour both ways."""

from __future__ import annotations

import json

import mercantile
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("rio_tiler")

from cnsq.cli import main  # noqa: E402
from download_and_predict.cog import Imagery, read_tile  # noqa: E402
from support.cogs import (  # noqa: E402
    A_ORIGIN,
    B_ORIGIN,
    RESOLUTION,
    SIZE,
    UTM_33N,
    cog_bytes,
    decoded,
    gradient,
    lonlat,
    oracle,
    scene_a,
    scene_b,
)
from support.projects import example_config  # noqa: E402
from support.servers import RangeServer  # noqa: E402


@pytest.fixture(scope="module")
def scenes():
    a, a_bytes = scene_a()
    b, b_bytes = scene_b()
    server = RangeServer({"a.tif": a_bytes, "b.tif": b_bytes})
    yield {"a": a, "b": b, "url_a": f"{server.url}/a.tif", "url_b": f"{server.url}/b.tif",
           "server": server}
    server.close()


def test_a_tile_is_the_scene_reprojected_to_web_mercator(scenes):
    # A zoom-14 tile in the middle of scene A's north-west quarter (all valid data there).
    tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    got = decoded(read_tile(Imagery((scenes["url_a"],)), *tile))
    want = oracle(scenes["a"], A_ORIGIN, tile)
    valid = want.all(axis=0)
    assert valid.mean() > 0.99  # the tile lies within the quarter
    difference = np.abs(got.astype(int) - want.astype(int))[:, valid]
    assert difference.mean() < 2.0, difference.mean()


def test_a_jpeg_tile_is_the_same_picture_in_a_fraction_of_the_bytes(scenes):
    """imagery.format jpeg: the model gets a JPEG (quality 90) of the same pixels, a few levels
    off, in far fewer bytes than the PNG; a JPEG of two bands is refused at the read."""
    tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    jpeg = read_tile(Imagery((scenes["url_a"],), format="jpeg"), *tile)
    png = read_tile(Imagery((scenes["url_a"],)), *tile)
    assert jpeg is not None and png is not None
    assert jpeg.startswith(b"\xff\xd8\xff") and png.startswith(b"\x89PNG")
    assert len(jpeg) < len(png) / 3
    want = oracle(scenes["a"], A_ORIGIN, tile)
    valid = want.all(axis=0)
    difference = np.abs(decoded(jpeg).astype(int) - want.astype(int))[:, valid]
    assert difference.mean() < 3.0, difference.mean()
    with pytest.raises(ValueError, match="a JPEG has 1 or 3 bands, the imagery 2"):
        read_tile(Imagery((scenes["url_a"],), bands=(1, 2), format="jpeg"), *tile)


def test_a_lower_zoom_reads_an_overview_with_few_range_requests(scenes):
    """At zoom 12 a tile spans about 4 of the scene's pixels a tile pixel: the COG's overview
    answers. Once the header is cached, another tile costs a few block reads."""
    cog = Imagery((scenes["url_a"],))
    first = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 12)
    got = decoded(read_tile(cog, *first))
    want = oracle(scenes["a"], A_ORIGIN, first)
    valid = want.all(axis=0) & got.all(axis=0)
    assert valid.mean() > 0.2
    assert np.abs(got.astype(int) - want.astype(int))[:, valid].mean() < 3.0
    server = scenes["server"]
    before = len(server.requests)
    read_tile(cog, *first)  # the same tile again: the blocks are cached in this process
    again = len(server.requests) - before
    assert again <= 2, server.requests[before:]


def test_the_mosaic_takes_each_pixel_from_the_first_scene_that_has_it(scenes):
    # A tile over scene A's nodata south-east quarter, which scene B covers.
    tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE * 0.75, SIZE * 0.75), 14)
    got = decoded(read_tile(Imagery((scenes["url_a"], scenes["url_b"])), *tile))
    from_a = oracle(scenes["a"], A_ORIGIN, tile)
    from_b = oracle(scenes["b"], B_ORIGIN, tile)
    a_valid, b_valid = from_a.all(axis=0), from_b.all(axis=0)
    assert a_valid.any() is not None
    assert (~a_valid & b_valid).mean() > 0.3  # the tile holds B's pixels where A has none
    b_only = ~a_valid & b_valid
    assert np.abs(got.astype(int) - from_b.astype(int))[:, b_only].mean() < 2.0
    if a_valid.any():
        assert np.abs(got.astype(int) - from_a.astype(int))[:, a_valid].mean() < 2.0
    # The other order: B first wherever it has data.
    got_b_first = decoded(read_tile(Imagery((scenes["url_b"], scenes["url_a"])), *tile))
    assert np.abs(got_b_first.astype(int) - from_b.astype(int))[:, b_valid].mean() < 2.0


def test_a_tile_outside_the_imagery_is_missing_not_an_error(scenes):
    far = mercantile.tile(-70.0, -30.0, 14)
    assert read_tile(Imagery((scenes["url_a"],)), *far) is None
    nodata_only = mercantile.tile(*lonlat(A_ORIGIN, SIZE * 0.9, SIZE * 0.9), 15)
    assert read_tile(Imagery((scenes["url_a"],)), *nodata_only) is None  # all nodata there


@pytest.mark.parametrize("nodata, dtype", [(0, "uint8"), (255, "uint8"),
                                           (-9999.0, "float32"), (float("nan"), "float32")])
def test_the_faster_warp_reads_what_rio_tilers_default_does(nodata, dtype):
    """The worker's warp options (cog.warp_options: no nodata on the warped dataset, its empty
    pixels started at the nodata value) give the pixels and the mask rio-tiler's default read
    gives, for every nodata a COG may have: over the scene's edges, its nodata quarter, and at
    zooms that read overviews. A nodata other than 0 without INIT_DEST left the area outside
    the scene 0 and valid."""
    from rasterio import Env
    from rasterio.warp import transform_bounds
    from rio_tiler.errors import TileOutsideBounds
    from rio_tiler.io import Reader

    from download_and_predict.cog import GDAL_OPTIONS, _read

    data = gradient().astype(dtype)
    data[:, SIZE // 2:, SIZE // 2:] = nodata
    server = RangeServer({"s.tif": cog_bytes(data, A_ORIGIN, nodata=nodata)})
    url = f"{server.url}/s.tif"
    west, south, east, north = transform_bounds(
        UTM_33N, "EPSG:4326", A_ORIGIN[0], A_ORIGIN[1] - SIZE * RESOLUTION,
        A_ORIGIN[0] + SIZE * RESOLUTION, A_ORIGIN[1])
    tiles = list(mercantile.tiles(west, south, east, north, [11, 12, 13]))
    tiles += [mercantile.tile(*lonlat(A_ORIGIN, SIZE * f, SIZE * f), 15)
              for f in (0.0, 0.49, 0.51, 0.75, 1.0)]
    compared = 0
    try:
        with Env(**GDAL_OPTIONS):  # as the worker reads: no directory listing on open
            for tile in tiles:
                try:
                    with Reader(url) as plain:
                        want = plain.tile(*tile)
                except TileOutsideBounds:
                    continue
                got = _read(url, *tile, Imagery((url,)), None)
                assert (got.array.mask == want.array.mask).all(), tile
                assert np.array_equal(got.array.data, want.array.data, equal_nan=True), tile
                compared += 1
    finally:
        server.close()
    assert compared >= 20


def test_the_footprint_tiles_are_mercantiles_over_the_reprojected_bounds(scenes, tmp_path):
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(
        UTM_33N, "EPSG:4326", A_ORIGIN[0], A_ORIGIN[1] - SIZE * RESOLUTION,
        A_ORIGIN[0] + SIZE * RESOLUTION, A_ORIGIN[1])
    expected = {f"{t.x}-{t.y}-{t.z}" for t in mercantile.tiles(west, south, east, north, [13])}
    result = CliRunner().invoke(main, ["tiles", "--imagery", scenes["url_a"], "--zoom", "13",
                                       "-o", str(tmp_path / "tiles.txt")])
    assert result.exit_code == 0, result.output
    assert set((tmp_path / "tiles.txt").read_text().split()) == expected
    # With an area as well: the area's tiles the COG covers.
    area = tmp_path / "area.geojson"
    area.write_text(json.dumps({"type": "Polygon", "coordinates": [[
        [west - 0.05, south - 0.05], [(west + east) / 2, south - 0.05],
        [(west + east) / 2, (south + north) / 2], [west - 0.05, (south + north) / 2],
        [west - 0.05, south - 0.05]]]}))
    from cnsq.tiles import iter_cover, load_geojson

    inside = {f"{t.x}-{t.y}-{t.z}" for t in iter_cover(load_geojson(area), 13)} & expected
    assert 0 < len(inside) < len(expected)
    both = CliRunner().invoke(main, ["tiles", str(area), "--imagery", scenes["url_a"],
                                     "--zoom", "13"])
    assert both.exit_code == 0, both.output
    assert set(both.stdout.split()) == inside
    neither = CliRunner().invoke(main, ["tiles", "--zoom", "13"])
    assert neither.exit_code == 2 and "give an AOI.geojson, --imagery, or both" in neither.output


def test_cnsq_imagery_writes_what_the_worker_sends(scenes, tmp_path):
    tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    out = tmp_path / "tile.png"
    result = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                       scenes["url_a"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == read_tile(Imagery((scenes["url_a"],)), *tile)
    # Bands chosen and stretched: band 3 alone, 0..255 → 0..255 (the same values).
    one = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                    scenes["url_a"], "--bands", "3", "--rescale", "0,255",
                                    "--out", str(tmp_path / "b3.png")])
    assert one.exit_code == 0, one.output
    from PIL import Image

    assert Image.open(tmp_path / "b3.png").mode == "L"
    jpeg = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                     scenes["url_a"], "--format", "jpeg",
                                     "--out", str(tmp_path / "tile.jpg")])
    assert jpeg.exit_code == 0, jpeg.output
    assert Image.open(tmp_path / "tile.jpg").format == "JPEG"
    two = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                    scenes["url_a"], "--format", "jpeg", "--bands", "1,2",
                                    "--out", str(tmp_path / "two.jpg")])
    assert two.exit_code == 1
    assert "--format: a JPEG has 1 or 3 bands, --bands names 2" in two.output, two.output
    far = mercantile.tile(-70.0, -30.0, 14)
    missing = CliRunner().invoke(main, ["imagery", f"{far.x}-{far.y}-{far.z}", "--imagery",
                                        scenes["url_a"], "--out", str(tmp_path / "no.png")])
    assert missing.exit_code == 1 and "No imagery for tile" in missing.output
    assert not (tmp_path / "no.png").exists()
    wrong = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                      scenes["url_a"], "--bands", "0", "--out", str(out)])
    assert wrong.exit_code == 1 and "--bands: expected a list of band numbers" in wrong.output
    stretch = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                        scenes["url_a"], "--rescale", "lots", "--out", str(out)])
    assert stretch.exit_code == 1 and "--rescale: expected MIN,MAX, got 'lots'" in stretch.output
    bad = CliRunner().invoke(main, ["imagery", "1-2", "--imagery", scenes["url_a"],
                                    "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 1 and "tile '1-2'" in bad.output
    gone = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                     scenes["url_a"].replace("a.tif", "gone.tif"),
                                     "--out", str(tmp_path / "x.png")])
    assert gone.exit_code == 1 and "Traceback" not in gone.output
    assert f"tile {tile.x}-{tile.y}-{tile.z}:" in gone.output


@pytest.mark.parametrize("raw, says", [
    ({}, "IMAGERY.cog: expected a COG's URL or a list of them"),
    ({"cog": "ftp://x/a.tif"}, "is not an https:// or s3:// URL"),
    ({"cog": "https://x/a.tif", "bands": [0]}, "IMAGERY.bands: expected a list of band numbers"),
    ({"cog": "https://x/a.tif", "rescale": [5, 1]}, "IMAGERY.rescale: expected [min, max]"),
    ({"cog": "https://x/a.tif", "bands": [1, 2], "rescale": [[0, 1], [0, 1], [0, 1]]},
     "3 ranges for 2 bands"),
    ({"cog": "https://x/a.tif", "tileSize": 300}, "IMAGERY.tileSize: expected 256 or 512"),
    ({"cog": "https://x/a.tif", "format": "webp"}, "IMAGERY.format: expected png or jpeg"),
    ({"cog": "https://x/a.tif", "format": "jpeg", "bands": [1, 2]},
     "IMAGERY.format: a JPEG has 1 or 3 bands, IMAGERY.bands names 2"),
])
def test_a_bad_imagery_setting_is_refused_at_cold_start(raw, says):
    from download_and_predict.errors import SettingsError

    with pytest.raises(SettingsError) as error:
        Imagery.from_json(json.dumps(raw))
    assert says in str(error.value)


def test_the_worker_reads_cog_imagery_and_writes_predictions(scenes, postgres_url):
    """The handler with IMAGERY and no TILE_ENDPOINT: tiles inside are predicted and written,
    one outside is skipped (MISSING_TILES=skip), one on a COG that is gone fails alone."""
    import psycopg2

    from cnsq.results.store import open_store
    from download_and_predict.handler import build
    from support.servers import ModelServer, fresh_database

    url = fresh_database(postgres_url)
    store = open_store(url)
    store.migrate()
    store.close()
    model = ModelServer()
    inside = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    outside = mercantile.tile(-70.0, -30.0, 14)
    try:
        app = build({"IMAGERY": Imagery((scenes["url_a"], scenes["url_b"])).to_json(),
                     "PREDICTION_ENDPOINT": model.endpoint, "DATABASE_URL": url})
        event = {"Records": [
            {"messageId": "in", "body": json.dumps({"x": inside.x, "y": inside.y, "z": 14})},
            {"messageId": "out", "body": json.dumps({"x": outside.x, "y": outside.y, "z": 14})}]}
        assert app.run(event) == {"batchItemFailures": []}
        broken = build({"IMAGERY": Imagery((scenes["url_a"].replace("a.tif", "gone.tif"),)).to_json(),
                        "PREDICTION_ENDPOINT": model.endpoint, "DATABASE_URL": url})
        failed = broken.run({"Records": [{"messageId": "gone", "body": json.dumps(
            {"x": inside.x, "y": inside.y, "z": 14})}]})
        assert failed == {"batchItemFailures": [{"itemIdentifier": "gone"}]}
    finally:
        model.close()
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT tile FROM results")
        assert [row[0] for row in cur.fetchall()] == [f"{inside.x}-{inside.y}-14"]


def test_the_configs_imagery_reaches_the_worker_and_its_package(tmp_path):
    from cnsq.deploy.package import RASTER_REQUIREMENTS, extra_requirements
    from cnsq.deploy.template import CodeLocation, compile_template, lint

    config, repo = example_config(tmp_path, "  imagery:\n    cog: [https://example.com/a.tif, "
                                      "s3://bucket/b.tif]\n    bands: [3, 2, 1]\n"
                                      "    rescale: [0, 3000]\n")
    code = {"DownloadAndPredict": CodeLocation("your-bucket", "cnsq-dev/lambdas/abc.zip")}
    path, data = compile_template(config, repo / "templates", tmp_path / "out", code)
    env = data["Resources"]["DownloadAndPredictLambdaFunction"]["Properties"]["Environment"][
        "Variables"]
    assert Imagery.from_json(env["IMAGERY"]) == Imagery(
        ("https://example.com/a.tif", "s3://bucket/b.tif"), (3, 2, 1), ((0.0, 3000.0),), 256)
    assert lint(path) == []
    # The worker may read the S3 COG (GDAL's range requests are GetObject), nothing else of S3.
    statements = data["Resources"]["LambdaProcessingRole"]["Properties"]["Policies"][0][
        "PolicyDocument"]["Statement"]
    reads = [s for s in statements if s["Action"] == ["s3:GetObject"]]
    assert reads == [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [
        {"Fn::Sub": "arn:${AWS::Partition}:s3:::bucket/b.tif"}]}]
    assert extra_requirements(config.values) == RASTER_REQUIREMENTS
    plain, _ = example_config(tmp_path / "plain", "")
    assert extra_requirements(plain.values) == ()  # XYZ imagery: no raster libraries


def test_a_bad_imagery_key_is_a_config_error_with_its_line(tmp_path):
    from cnsq.config import ConfigError

    with pytest.raises(ConfigError) as error:
        example_config(tmp_path, "  imagery:\n    cog: https://example.com/a.tif\n    tileSize: 300\n")
    assert "config.yml:" in str(error.value)
    assert "imagery.tileSize: expected 256 or 512, got 300" in str(error.value)


def test_an_s3_cog_is_read_from_moto_as_from_an_https_server(scenes, aws):
    """An s3:// COG through GDAL's S3 reader, at the endpoint boto3 is pointed at
    (AWS_ENDPOINT_URL: moto's server here), signed with the environment's credentials: the same
    image as the same file over HTTPS, and a missing key fails as a read error."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="imagery")
    s3.put_object(Bucket="imagery", Key="scenes/a.tif",
                  Body=scenes["server"].files["a.tif"])
    tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    from_s3 = read_tile(Imagery(("s3://imagery/scenes/a.tif",)), *tile)
    assert from_s3 is not None and from_s3 == read_tile(Imagery((scenes["url_a"],)), *tile)
    with pytest.raises(Exception, match="does not exist"):
        read_tile(Imagery(("s3://imagery/scenes/gone.tif",)), *tile)
