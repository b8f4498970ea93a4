"""STAC imagery read by the worker itself (download_and_predict/stac.py over cog.py): a static
catalog written with pystac and a STAC API's search, both served on 127.0.0.1 with the COGs
(UTM scenes written with rio-cogeo, served with Range as S3 does). The oracle is the scenes'
pixels reprojected with rasterio.warp (test_cog's), the footprint's mercantile's tiles over the
items' reprojected bounds, polygons met as shapely says."""

from __future__ import annotations

import json
import threading

import mercantile
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("rio_tiler")
pystac = pytest.importorskip("pystac")

from test_cog import decoded, lonlat, oracle  # noqa: E402

from cnsq.cli import main  # noqa: E402
from download_and_predict.cog import Imagery, read_tile  # noqa: E402
from download_and_predict.errors import SettingsError  # noqa: E402
from download_and_predict.http import Http  # noqa: E402
from download_and_predict.stac import Item, Stac, fetcher, intersects  # noqa: E402
from support.cogs import (  # noqa: E402
    A_ORIGIN,
    B_ORIGIN,
    RESOLUTION,
    SIZE,
    UTM_33N,
    cog_bytes,
    scene_a,
    scene_b,
)
from support.servers import RangeServer, _Quiet, _Server  # noqa: E402


def footprint(origin: tuple[float, float]) -> list[tuple[float, float]]:
    """A scene's corners in longitude and latitude (a UTM square: a slightly turned one)."""
    from rasterio.warp import transform

    x0, y0 = origin
    side = SIZE * RESOLUTION
    xs, ys = transform(UTM_33N, "EPSG:4326", [x0, x0 + side, x0 + side, x0, x0],
                       [y0, y0, y0 - side, y0 - side, y0])
    return list(zip(xs, ys, strict=True))


def stac_item(name: str, origin, when: str, cloud: float, assets: dict[str, str]):
    from datetime import datetime

    ring = footprint(origin)
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    item = pystac.Item(id=name, geometry={"type": "Polygon", "coordinates": [ring]},
                       bbox=[min(xs), min(ys), max(xs), max(ys)],
                       datetime=datetime.fromisoformat(when), properties={"eo:cloud_cover": cloud},
                       collection="scenes")
    for key, href in assets.items():
        item.add_asset(key, pystac.Asset(href=href, media_type=pystac.MediaType.COG))
    return item


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Scenes A (June, 30 % cloud) and B (July, 5 %): a 3-band ``visual`` COG each and, for A,
    its bands as single-band ``red``/``green``/``blue`` COGs; a static catalog of both written
    with pystac (self-contained: relative hrefs) and a STAC API over the same items, all on
    127.0.0.1."""
    a, a_bytes = scene_a()
    b, b_bytes = scene_b()
    root = tmp_path_factory.mktemp("stac")
    (root / "a.tif").write_bytes(a_bytes)
    (root / "b.tif").write_bytes(b_bytes)
    for i, band in enumerate(("red", "green", "blue")):
        (root / f"a-{band}.tif").write_bytes(cog_bytes(a[i:i + 1], A_ORIGIN))
    catalog = pystac.Catalog(id="scenes", description="two scenes near Rome")
    item_a = stac_item("a", A_ORIGIN, "2024-06-01T10:00:00+00:00", 30.0, {
        "visual": str(root / "a.tif"),
        **{k: str(root / f"a-{k}.tif") for k in ("red", "green", "blue")}})
    item_b = stac_item("b", B_ORIGIN, "2024-07-01T10:00:00+00:00", 5.0,
                       {"visual": str(root / "b.tif")})
    catalog.add_items([item_a, item_b])
    catalog.normalize_hrefs(str(root))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert json.loads(files["a/a.json"])["assets"]["visual"]["href"] == "../a.tif"  # relative
    server = RangeServer(files)
    api = StacApi([json.loads(files["a/a.json"]), json.loads(files["b/b.json"])], server.url)
    yield {"a": a, "b": b, "url": server.url, "catalog": f"{server.url}/catalog.json",
           "api": api.url, "api_server": api, "server": server}
    server.close()
    api.close()


class StacApi(_Server):
    """A STAC API's item search (``POST /search``): collections and bbox applied, ``limit``
    items a page (at most :attr:`page_size`), a ``next`` link (POST, with the body and a token) while more remain; every
    body asked is kept. Like many APIs it ignores ``sortby`` and ``query``: the worker applies
    both itself."""

    def __init__(self, items: list[dict], assets_root: str):
        self.items = []
        for item in items:  # hrefs made absolute, as an API's are
            item = json.loads(json.dumps(item))
            for asset in item["assets"].values():
                asset["href"] = f"{assets_root}/{asset['href'].rsplit('/', 1)[-1]}"
            self.items.append(item)
        self.bodies: list[dict] = []
        self.page_size = 1  # the most items a page holds, whatever the limit asked
        self.lock = threading.Lock()
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def do_POST(self) -> None:
            api: StacApi = self.server.owner
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with api.lock:
                api.bodies.append(body)
            if self.path != "/search":
                return self.send(404, b"{}")
            w, s, e, n = body.get("bbox", [-180, -90, 180, 90])
            found = [i for i in api.items
                     if (not body.get("collections") or i["collection"] in body["collections"])
                     and not (i["bbox"][0] > e or i["bbox"][2] < w or i["bbox"][1] > n
                              or i["bbox"][3] < s)]
            start = int(body.get("token", 0))
            limit = min(int(body.get("limit", 10)), api.page_size)
            page = {"type": "FeatureCollection", "features": found[start:start + limit],
                    "links": []}
            if start + limit < len(found):
                page["links"].append({"rel": "next", "href": f"{api.url}/search",
                                      "method": "POST", "merge": True,
                                      "body": {"token": start + limit}})
            self.send(200, json.dumps(page).encode(), "application/geo+json")


def compiled(tmp_path, imagery: str):
    """The example config with ``imagery`` (YAML lines), compiled: the config, the template's
    path, the worker's environment and its role's statements."""
    from cnsq.deploy.template import CodeLocation, compile_template
    from support.projects import example_config

    config, repo = example_config(tmp_path, imagery)
    code = {"DownloadAndPredict": CodeLocation("your-bucket", "cnsq-dev/lambdas/abc.zip")}
    path, data = compile_template(config, repo / "templates", tmp_path / "out", code)
    resources = data["Resources"]
    env = resources["DownloadAndPredictLambdaFunction"]["Properties"]["Environment"]["Variables"]
    statements = resources["LambdaProcessingRole"]["Properties"]["Policies"][0][
        "PolicyDocument"]["Statement"]
    return config, path, env, statements


def fetch():
    return fetcher(Http(pool_size=2), 10.0)


def as_the_worker(reads: list[dict], monkeypatch) -> None:
    """Credentials of a moto user holding exactly the worker's compiled S3 read statements
    (``reads``), put in the environment GDAL's S3 reads take them from."""
    from support.aws_rules import user_with, widened

    keys = user_with([widened({**s, "Resource": [
        r["Fn::Sub"].replace("${AWS::Partition}", "aws") for r in s["Resource"]]}) for s in reads])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["aws_secret_access_key"])


def overlap_tile() -> mercantile.Tile:
    """A zoom-14 tile over scene A's nodata south-east quarter, which scene B covers."""
    return mercantile.tile(*lonlat(A_ORIGIN, SIZE * 0.75, SIZE * 0.75), 14)


def test_a_static_catalogs_items_are_mosaicked_in_the_users_order(served):
    # A zoom-15 tile where both scenes have data (A's north-east quarter, inside B).
    both = mercantile.tile(*lonlat(A_ORIGIN, SIZE * 0.76, SIZE * 0.4), 15)
    from_a, from_b = oracle(served["a"], A_ORIGIN, both), oracle(served["b"], B_ORIGIN, both)
    assert (from_a.all(axis=0) & from_b.all(axis=0)).mean() > 0.99
    assert np.abs(from_a.astype(int) - from_b.astype(int)).mean() > 5  # the scenes differ
    clear_first = Imagery(stac=Stac(catalog=served["catalog"], sortby=("eo:cloud_cover",)))
    got = decoded(read_tile(clear_first, *both, fetch=fetch()))
    assert np.abs(got.astype(int) - from_b.astype(int)).mean() < 2.0  # B (5 %) wins
    oldest_first = Imagery(stac=Stac(catalog=served["catalog"], sortby=("datetime",)))
    got = decoded(read_tile(oldest_first, *both, fetch=fetch()))
    assert np.abs(got.astype(int) - from_a.astype(int)).mean() < 2.0  # A (June) wins
    # Over A's nodata quarter, B fills whatever the order.
    tile = overlap_tile()
    from_a, from_b = oracle(served["a"], A_ORIGIN, tile), oracle(served["b"], B_ORIGIN, tile)
    b_only = ~from_a.all(axis=0) & from_b.all(axis=0)
    assert b_only.mean() > 0.3
    got = decoded(read_tile(oldest_first, *tile, fetch=fetch()))
    assert np.abs(got.astype(int) - from_b.astype(int))[:, b_only].mean() < 2.0


def test_a_property_filter_and_a_datetime_choose_the_items(served):
    inside_a_only = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    clear = Imagery(stac=Stac(catalog=served["catalog"],
                              query=(("eo:cloud_cover", "lt", 10),)))
    assert read_tile(clear, *inside_a_only, fetch=fetch()) is None  # only B passes: missing
    june = Imagery(stac=Stac(catalog=served["catalog"], datetime="2024-06-01/2024-06-30"))
    assert read_tile(june, *inside_a_only, fetch=fetch()) is not None
    july = Imagery(stac=Stac(catalog=served["catalog"], datetime="2024-07-01"))
    assert read_tile(july, *inside_a_only, fetch=fetch()) is None
    other = Imagery(stac=Stac(catalog=served["catalog"], collections=("elsewhere",)))
    assert read_tile(other, *overlap_tile(), fetch=fetch()) is None


def test_a_stac_api_search_gives_what_the_static_catalog_gives(served):
    """The API is asked for the tile's block of 64 (its ancestor three zooms up) with the
    collection and the order; its pages (one item each: the server caps them, as APIs do) are
    followed; the image is the catalog's, byte for byte; the block's other tiles ask nothing
    more; a block whose search was cut short has each tile ask for its own."""
    from download_and_predict.stac import items_for

    tile = overlap_tile()
    api = Imagery(stac=Stac(api=served["api"], collections=("scenes",),
                            sortby=("eo:cloud_cover",), max_items=5))
    bodies = served["api_server"].bodies
    bodies.clear()
    got = read_tile(api, *tile, fetch=fetch())
    static = read_tile(Imagery(stac=Stac(catalog=served["catalog"], sortby=("eo:cloud_cover",))),
                       *tile, fetch=fetch())
    assert got == static
    first = bodies[0]
    block = mercantile.parent(tile, zoom=tile.z - 3)
    assert np.allclose(first["bbox"], list(mercantile.bounds(block)))
    assert first["collections"] == ["scenes"]
    assert first["sortby"] == [{"field": "properties.eo:cloud_cover", "direction": "asc"}]
    assert [b.get("token") for b in bodies] == [None, 1]  # two pages of one
    sibling = mercantile.Tile(tile.x ^ 1, tile.y, tile.z)
    read_tile(api, *sibling, fetch=fetch())
    assert len(bodies) == 2  # the block's search answered it
    bodies.clear()
    cut = items_for(Stac(api=served["api"], max_items=4), *tile, fetch(), ancestor_most=1)
    assert sorted(i.id for i in cut) == ["a", "b"]
    assert np.allclose(bodies[0]["bbox"], list(mercantile.bounds(block)))
    assert np.allclose(bodies[-1]["bbox"], list(mercantile.bounds(tile)))  # the tile's own


def test_assets_are_stacked_in_the_order_named(served):
    """Scene A's bands as three single-band COGs (red, green, blue): stacked, they are the
    three-band visual; named blue, green, red, the bands come reversed."""
    tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    visual = decoded(read_tile(Imagery(stac=Stac(catalog=served["catalog"])), *tile,
                               fetch=fetch()))
    stacked = Imagery(stac=Stac(catalog=served["catalog"], assets=("red", "green", "blue")))
    assert np.array_equal(decoded(read_tile(stacked, *tile, fetch=fetch())), visual)
    reversed_ = Imagery(stac=Stac(catalog=served["catalog"], assets=("blue", "green", "red")))
    assert np.array_equal(decoded(read_tile(reversed_, *tile, fetch=fetch())), visual[::-1])
    # Over B's area A's band assets are not there: B has no such assets, so it is not read.
    b_only = mercantile.tile(*lonlat(B_ORIGIN, SIZE * 0.9, SIZE * 0.9), 14)
    assert read_tile(stacked, *b_only, fetch=fetch()) is None


def test_a_percentile_stretch_makes_16_bit_data_8_bit(tmp_path):
    data = (np.arange(SIZE * SIZE, dtype="uint32").reshape(1, SIZE, SIZE) % 4000 + 100
            ).astype("uint16")
    server = RangeServer({"deep.tif": cog_bytes(data, A_ORIGIN, nodata=None)})
    try:
        tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 2, SIZE / 2), 14)
        with pytest.raises(ValueError, match="not 8-bit: give imagery.rescale or imagery.stretch"):
            read_tile(Imagery((f"{server.url}/deep.tif",)), *tile)
        image = decoded(read_tile(Imagery((f"{server.url}/deep.tif",), stretch=(2.0, 98.0)),
                                  *tile))
        assert image.min() == 0 and image.max() == 255  # the tails clipped
        assert 0.01 < (image == 255).mean() < 0.2 and 0.01 < (image == 0).mean() < 0.2
    finally:
        server.close()


def test_the_footprint_tiles_are_mercantiles_over_the_items_polygons(served, tmp_path):
    """`cnsq tiles --imagery catalog.json`: the tiles over each item's reprojected bounds that
    its polygon meets (shapely's judgement), each once."""
    from shapely.geometry import Polygon, box

    expected = set()
    for origin in (A_ORIGIN, B_ORIGIN):
        ring = footprint(origin)
        polygon = Polygon(ring)
        west, south, east, north = polygon.bounds
        for t in mercantile.tiles(west, south, east, north, [14]):
            if polygon.intersects(box(*mercantile.bounds(t))):
                expected.add(f"{t.x}-{t.y}-{t.z}")
    out = tmp_path / "tiles.txt"
    result = CliRunner().invoke(main, ["tiles", "--imagery", served["catalog"], "--zoom", "14",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    listed = out.read_text().split()
    assert len(listed) == len(set(listed)) and set(listed) == expected
    june = CliRunner().invoke(main, ["tiles", "--imagery", served["catalog"], "--zoom", "14",
                                     "--datetime", "2024-06-01/2024-06-30"])
    assert june.exit_code == 0 and len(june.stdout.split()) < len(listed)
    api = CliRunner().invoke(main, ["tiles", "--imagery", served["api"], "--zoom", "14"])
    assert api.exit_code == 1 and "is a STAC API: its footprint is its whole collection" in api.output
    # A STAC API with an area: the area's tiles its items (searched over the area) cover.
    ring = footprint(A_ORIGIN)
    west, south = min(p[0] for p in ring), min(p[1] for p in ring)
    east, north = max(p[0] for p in ring), max(p[1] for p in ring)
    area = tmp_path / "area.geojson"
    area.write_text(json.dumps({"type": "Polygon", "coordinates": [[
        [west, south], [east, south], [east, north], [west, north], [west, south]]]}))
    from cnsq.tiles import iter_cover, load_geojson

    in_area = {f"{t.x}-{t.y}-{t.z}" for t in iter_cover(load_geojson(area), 14)}
    searched = CliRunner().invoke(main, ["tiles", str(area), "--imagery", served["api"],
                                         "--collection", "scenes", "--zoom", "14"])
    assert searched.exit_code == 0, searched.output
    assert set(searched.stdout.split()) == in_area & expected
    assert served["api_server"].bodies[-1]["collections"] == ["scenes"]


def test_polygon_and_box_meet_as_shapely_says():
    from shapely.geometry import Polygon, box

    diamond = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)]
    item = Item("d", (-1.0, -1.0, 1.0, 1.0), tuple(diamond), {}, ("x",))
    rng = np.random.default_rng(7)
    for _ in range(400):
        w, s = rng.uniform(-1.5, 1.2, 2)
        e, n = w + rng.uniform(0.01, 0.8), s + rng.uniform(0.01, 0.8)
        assert intersects(item, (w, s, e, n)) == Polygon(diamond).intersects(box(w, s, e, n)), \
            (w, s, e, n)


def test_cnsq_imagery_reads_a_stac_catalog_as_the_worker_does(served, tmp_path):
    tile = overlap_tile()
    out = tmp_path / "tile.png"
    result = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                       served["catalog"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == read_tile(Imagery(stac=Stac(catalog=served["catalog"])), *tile,
                                         fetch=fetch())
    gone = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                     f"{served['url']}/nothing.json", "--out", str(out)])
    assert gone.exit_code == 1 and "HTTP 404" in gone.output and "Traceback" not in gone.output
    mixed = CliRunner().invoke(main, ["imagery", "1-1-1", "--imagery", served["catalog"],
                                      "--imagery", f"{served['url']}/a.tif", "--out", str(out)])
    assert mixed.exit_code == 1 and "given once, alone" in mixed.output


@pytest.mark.parametrize("raw, says", [
    ({"stac": {}}, "IMAGERY.stac: give one of api"),
    ({"stac": {"api": "https://x", "catalog": "https://y/c.json"}}, "give one of api"),
    ({"stac": {"api": "ftp://x"}}, "IMAGERY.stac.api: 'ftp://x' is not an https:// URL"),
    ({"stac": {"api": "https://x", "colections": ["s2"]}}, "IMAGERY.stac.colections: unknown key"),
    ({"stac": {"api": "https://x", "query": {"eo:cloud_cover": {"less": 3}}}},
     "IMAGERY.stac.query.eo:cloud_cover.less: unknown operator"),
    ({"stac": {"api": "https://x", "datetime": "last June"}}, "IMAGERY.stac.datetime:"),
    ({"stac": {"api": "https://x", "assets": []}}, "IMAGERY.stac.assets: name at least one"),
    ({"stac": {"api": "https://x", "maxItems": 0}}, "IMAGERY.stac.maxItems: expected 1 to 100"),
    ({"stac": {"api": "https://x"}, "cog": "https://x/a.tif"}, "give cog or stac, not both"),
    ({"cog": "https://x/a.tif", "stretch": [2, 98], "rescale": [0, 1]}, "rescale or stretch"),
    ({"cog": "https://x/a.tif", "stretch": [2, 101]}, "IMAGERY.stretch: expected [low, high]"),
    ({"stac": {"api": "https://x", "s3Buckets": ["My_Bucket"]}},
     "IMAGERY.stac.s3Buckets: 'My_Bucket' is not an S3 bucket's name"),
    ({"cog": "https://x/a.tif", "requesterPays": "yes"},
     "IMAGERY.requesterPays: expected true or false"),
    ({"stac": {"api": "https://x", "alternate": ["s3"]}},
     "IMAGERY.stac.alternate: expected the name of an asset's alternate (such as s3)"),
])
def test_a_bad_stac_setting_is_refused_at_cold_start(raw, says):
    with pytest.raises(SettingsError) as error:
        Imagery.from_json(json.dumps(raw))
    assert says in str(error.value)


def test_the_worker_reads_stac_imagery_and_writes_predictions(served, postgres_url):
    """The handler with a STAC catalog in IMAGERY: a tile over the scenes is predicted and
    written, one where no item is skipped (MISSING_TILES=skip); an API that answers 500 fails
    its record alone."""
    import psycopg2

    from cnsq.results.store import open_store
    from download_and_predict.handler import build
    from support.servers import ModelServer, fresh_database

    url = fresh_database(postgres_url)
    store = open_store(url)
    store.migrate()
    store.close()
    model = ModelServer()
    inside, outside = overlap_tile(), mercantile.tile(-70.0, -30.0, 14)
    source = Imagery(stac=Stac(catalog=served["catalog"], sortby=("eo:cloud_cover",)))
    try:
        app = build({"IMAGERY": source.to_json(), "PREDICTION_ENDPOINT": model.endpoint,
                     "DATABASE_URL": url})
        event = {"Records": [
            {"messageId": "in", "body": json.dumps({"x": inside.x, "y": inside.y, "z": 14})},
            {"messageId": "out", "body": json.dumps({"x": outside.x, "y": outside.y, "z": 14})}]}
        assert app.run(event) == {"batchItemFailures": []}
        broken = Imagery(stac=Stac(api=f"{served['url']}/no-api"))
        failing = build({"IMAGERY": broken.to_json(), "PREDICTION_ENDPOINT": model.endpoint,
                         "DATABASE_URL": url})
        failed = failing.run({"Records": [{"messageId": "x", "body": json.dumps(
            {"x": inside.x, "y": inside.y, "z": 14})}]})
        assert failed == {"batchItemFailures": [{"itemIdentifier": "x"}]}
    finally:
        model.close()
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT tile FROM results")
        assert [row[0] for row in cur.fetchall()] == [f"{inside.x}-{inside.y}-14"]


def test_the_configs_stac_source_reaches_the_worker_and_its_package(tmp_path):
    from cnsq.config import ConfigError
    from cnsq.deploy.package import RASTER_REQUIREMENTS, extra_requirements
    from cnsq.deploy.template import lint
    from support.projects import example_config

    config, path, env, _ = compiled(tmp_path, (
        "  imagery:\n    stac:\n      api: https://earth-search.aws.element84.com/v1\n"
        "      collections: [sentinel-2-l2a]\n      datetime: 2024-06-01/2024-08-31\n"
        "      query: {eo:cloud_cover: {lt: 20}}\n      sortby: [eo:cloud_cover]\n"
        "      assets: [red, green, blue]\n    stretch: [2, 98]\n"))
    assert Imagery.from_json(env["IMAGERY"]) == Imagery(stac=Stac(
        api="https://earth-search.aws.element84.com/v1", collections=("sentinel-2-l2a",),
        datetime="2024-06-01/2024-08-31", query=(("eo:cloud_cover", "lt", 20),),
        sortby=("eo:cloud_cover",), assets=("red", "green", "blue")), stretch=(2.0, 98.0))
    assert lint(path) == []
    assert extra_requirements(config.values) == RASTER_REQUIREMENTS
    with pytest.raises(ConfigError) as error:
        example_config(tmp_path / "bad", "  imagery:\n    stac:\n      api: https://x\n"
                                   "      maxItems: 500\n")
    assert "config.yml:" in str(error.value)
    assert "imagery.stac.maxItems: expected 1 to 100, got 500" in str(error.value)


def test_cnsq_view_shows_cog_and_stac_imagery_under_the_predictions(served, tmp_path):
    """The view's base layer read as the worker reads it: /imagery/{z}/{x}/{y} answers the
    worker's PNG for a tile over the scenes (from a STAC catalog and from a COG), 404 outside."""
    import requests

    from cnsq.imagery import source
    from cnsq.view import prepare
    from cnsq.view.imagery import open_imagery
    from cnsq.view.server import start

    tile = overlap_tile()
    results = tmp_path / "results.csv"
    results.write_text(f'tile,output\n{tile.x}-{tile.y}-{tile.z},"[0.2, 0.8]"\n')
    for given in ([served["catalog"]], [f"{served['url']}/a.tif", f"{served['url']}/b.tif"]):
        imagery = source(given)
        viewed, _ = prepare(results, "results.csv", tmp_path, 1, 0.5,
                            open_imagery(None, None, imagery), None)
        running = start(viewed, 0)
        try:
            answer = requests.get(f"{running.url}imagery/{tile.z}/{tile.x}/{tile.y}", timeout=10)
            assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/png"
            assert answer.content == read_tile(imagery, *tile, fetch=fetch())
            far = mercantile.tile(-70.0, -30.0, 14)
            assert requests.get(f"{running.url}imagery/14/{far.x}/{far.y}",
                                timeout=10).status_code == 404
            summary = requests.get(f"{running.url}api/summary", timeout=5).json()
            assert summary["imagery"]["name"].startswith(("STAC http", "http"))
        finally:
            running.close()


def test_cnsq_view_takes_the_options_that_choose_stac_imagery(served, tmp_path):
    """`cnsq view --imagery API` takes what `cnsq imagery` takes to choose the items, assets and
    stretch (--collection, --datetime, --assets, --bands, --stretch, ...): its base layer is the
    image `cnsq imagery` writes with the same options, not the API's every collection's
    ``visual``."""
    import os
    import signal
    import subprocess
    import sys

    import requests

    from cnsq.imagery import source

    inside_a = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    results = tmp_path / "results.csv"
    results.write_text(f'tile,output\n{inside_a.x}-{inside_a.y}-14,"[0.2, 0.8]"\n')
    options = ["--collection", "scenes", "--datetime", "2024-06-01/2024-06-30",
               "--assets", "red,green,blue", "--bands", "3,2,1", "--stretch", "2,98"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    view = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "view", str(results), "--imagery",
                             served["api"], *options, "--port", "0"], cwd=tmp_path,
                            env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = view.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), view.stderr.read()
        shown = requests.get(f"{url}imagery/14/{inside_a.x}/{inside_a.y}", timeout=20)
        assert shown.status_code == 200, shown.text
    finally:
        view.send_signal(signal.SIGINT)
        view.communicate(timeout=20)
    chosen = source([served["api"]], "3,2,1", assets="red,green,blue", collections=["scenes"],
                    datetime="2024-06-01/2024-06-30", stretch="2,98")
    assert shown.content == read_tile(chosen, *inside_a, fetch=fetch())
    assert shown.content != read_tile(source([served["api"]]), *inside_a, fetch=fetch())
    out = tmp_path / "tile.png"
    written = CliRunner().invoke(main, ["imagery", f"{inside_a.x}-{inside_a.y}-14", "--imagery",
                                        served["api"], *options, "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_bytes() == shown.content


def test_cnsq_view_refuses_imagery_options_it_would_not_use(tmp_path):
    """--stretch (or --assets, ...) over XYZ imagery would be ignored: refused, naming it."""
    results = tmp_path / "results.csv"
    results.write_text('tile,output\n1-2-3,"[0.2, 0.8]"\n')
    (tmp_path / "tiles").mkdir()
    result = CliRunner().invoke(main, ["view", str(results), "--tile-endpoint",
                                       str(tmp_path / "tiles"), "--stretch", "2,98",
                                       "--port", "0"])
    assert result.exit_code == 2, result.output
    assert ("--stretch: applies to COG or STAC imagery (--imagery, or the config's imagery:), "
            "not to XYZ tiles") in result.output


@pytest.mark.parametrize("flag", [["--collection", "s2"], ["--datetime", "2024-06-01"],
                                  ["--assets", "red"], ["--alternate", "s3"]])
def test_a_stac_option_given_for_cogs_is_refused_not_ignored(flag, tmp_path):
    result = CliRunner().invoke(main, ["imagery", "1-1-2", "--imagery", "https://x/a.tif", *flag,
                                       "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 1, result.output
    assert f"{flag[0]}: applies to a STAC source (a catalog or API), not to COGs" in result.output
    assert not (tmp_path / "a.png").exists()


def test_a_bad_datetime_is_named_by_its_flag(tmp_path):
    result = CliRunner().invoke(main, ["imagery", "1-1-2", "--imagery", "https://x/catalog.json",
                                       "--datetime", "last June", "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 1, result.output
    assert "Error: --datetime: 'last June' is not an RFC 3339 date or time" in result.output


def test_hostile_catalogs_end_with_an_error_or_are_read_once(tmp_path):
    """A catalog whose child links back to it is read once per document; a document over the
    size bound is refused before it is held; one that is not JSON is named."""
    from download_and_predict.errors import HttpTooLarge
    from download_and_predict.stac import MAX_DOCUMENT_BYTES, catalog_items

    loop = {"type": "Catalog", "id": "loop", "links": [
        {"rel": "child", "href": "./child.json"}, {"rel": "self", "href": "./catalog.json"}]}
    child = {"type": "Catalog", "id": "child", "links": [
        {"rel": "child", "href": "./catalog.json"}, {"rel": "item", "href": "./nothing.json"},
        {"rel": "parent", "href": "./catalog.json"}]}
    server = RangeServer({"catalog.json": json.dumps(loop).encode(),
                          "child.json": json.dumps(child).encode(),
                          "huge.json": b"[" + b"0," * (MAX_DOCUMENT_BYTES // 2) + b"0]",
                          "text.json": b"<html>not a catalog</html>"})
    try:
        stac = Stac(catalog=f"{server.url}/catalog.json")
        with pytest.raises(ValueError, match="HTTP 404"):  # the missing item, asked once
            catalog_items(stac, fetch())
        asked = [path for _, path, _ in server.requests]
        assert asked.count("catalog.json") == 1 and asked.count("child.json") == 1
        with pytest.raises(HttpTooLarge):
            catalog_items(Stac(catalog=f"{server.url}/huge.json"), fetch())
        with pytest.raises(ValueError, match="text.json: not JSON"):
            catalog_items(Stac(catalog=f"{server.url}/text.json"), fetch())
    finally:
        server.close()


class Stalling(_Server):
    """Accepts, reads the request, and answers nothing for a minute."""

    def __init__(self):
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def do_GET(self) -> None:
            import time

            time.sleep(60)


def test_a_stalling_catalog_fails_its_record_by_the_tile_timeout(postgres_url):
    import time

    from download_and_predict.handler import build
    from support.servers import ModelServer, fresh_database

    stalling, model = Stalling(), ModelServer()
    try:
        app = build({"IMAGERY": Imagery(stac=Stac(catalog=f"{stalling.url}/catalog.json")).to_json(),
                     "PREDICTION_ENDPOINT": model.endpoint, "DATABASE_URL": fresh_database(postgres_url),
                     "TILE_TIMEOUT": "1", "RETRIES": "1"})
        started = time.monotonic()
        failed = app.run({"Records": [{"messageId": "s", "body": json.dumps(
            {"x": 8760, "y": 6087, "z": 14})}]})
        assert failed == {"batchItemFailures": [{"itemIdentifier": "s"}]}
        assert time.monotonic() - started < 10
    finally:
        stalling.close()
        model.close()


def _s3_catalog(server_files: dict[str, bytes], hrefs: dict[str, tuple[tuple[float, float], str]]
                ) -> None:
    """A static catalog (``catalog.json``) of items named by ``hrefs``: each one's origin and
    its ``visual`` asset's href, written into ``server_files``."""
    catalog = {"type": "Catalog", "stac_version": "1.0.0", "id": "s3", "description": "s3",
               "links": [{"rel": "item", "href": f"{name}.json"} for name in hrefs]}
    server_files["catalog.json"] = json.dumps(catalog).encode()
    for name, (origin, href) in hrefs.items():
        item = stac_item(name, origin, "2024-06-01T10:00:00+00:00", 1.0, {"visual": href})
        server_files[f"{name}.json"] = json.dumps(item.to_dict(include_self_link=False)).encode()


def test_s3_assets_are_read_under_the_workers_compiled_role(served, aws, moto_url, tmp_path,
                                                            monkeypatch):
    """imagery.stac.s3Buckets: an item's s3:// asset in a bucket named there is read with exactly
    the worker's compiled role (its GetObject statements, against moto with IAM checks on). An
    asset in another bucket fails its tile before any request, naming the bucket and the key to
    set, where the role's 403 would say nothing of why."""
    import boto3

    from support.aws_rules import iam_enforced

    s3 = boto3.client("s3")
    for bucket in ("imagery", "elsewhere"):
        s3.create_bucket(Bucket=bucket)
    files = served["server"].files
    # Keys no other test reads: GDAL caches blocks by URL for the process.
    s3.put_object(Bucket="imagery", Key="granted/a.tif", Body=files["a.tif"])
    s3.put_object(Bucket="elsewhere", Key="refused/b.tif", Body=files["b.tif"])
    documents: dict[str, bytes] = {}
    _s3_catalog(documents, {"a": (A_ORIGIN, "s3://imagery/granted/a.tif"),
                            "b": (B_ORIGIN, "s3://elsewhere/refused/b.tif")})
    catalog = RangeServer(documents)
    config, _, _, statements = compiled(tmp_path, (
        f"  imagery:\n    stac:\n      catalog: {catalog.url}/catalog.json\n"
        "      s3Buckets: [imagery]\n"))
    reads = [s for s in statements if s["Action"] == ["s3:GetObject"]]
    assert reads == [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [
        {"Fn::Sub": "arn:${AWS::Partition}:s3:::imagery/*"}]}]
    source = Imagery.from_values(config.values["imagery"])
    inside_a = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    only_b = mercantile.tile(*lonlat(B_ORIGIN, SIZE * 0.75, SIZE * 0.75), 14)
    want = read_tile(Imagery((f"{served['url']}/a.tif",)), *inside_a)
    as_the_worker(reads, monkeypatch)
    try:
        with iam_enforced(moto_url):
            assert read_tile(source, *inside_a, fetch=fetch()) == want
            with pytest.raises(ValueError) as refused:
                read_tile(source, *only_b, fetch=fetch())
            assert ("its asset s3://elsewhere/refused/b.tif is in S3 bucket 'elsewhere', not in "
                    "imagery.stac.s3Buckets") in str(refused.value)
            # What the check spares the user: the role itself may not read that bucket.
            with pytest.raises(Exception, match="403|Access"):
                read_tile(Imagery(("s3://elsewhere/refused/b.tif",)), *only_b)
    finally:
        catalog.close()


def test_an_assets_alternate_is_read_when_the_config_names_it(served, aws, moto_url, tmp_path,
                                                             monkeypatch):
    """imagery.stac.alternate (STAC's alternate-assets extension): USGS's Landsat items point
    their assets at a web page's server that refuses a program (``href``) and give the same file
    in S3 (``alternate.s3.href``). Named, the alternate is read, under the worker's compiled role
    with moto's IAM checks on; an asset without that alternate is read from its href; unnamed,
    the href is read (and refused)."""
    import boto3

    from support.aws_rules import iam_enforced

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="usgs-landsat")
    files = served["server"].files
    s3.put_object(Bucket="usgs-landsat", Key="alternate/a.tif", Body=files["a.tif"])
    # The web server: every read refused, as a login page's server answers a program.
    web = RangeServer({"data/a.tif": files["a.tif"]}, required={"authorization": "a login"})
    item_a = stac_item("a", A_ORIGIN, "2024-06-01T10:00:00+00:00", 1.0,
                       {"visual": f"{web.url}/data/a.tif"})
    item_a.assets["visual"].extra_fields["alternate"] = {
        "s3": {"href": "s3://usgs-landsat/alternate/a.tif"}}
    item_b = stac_item("b", B_ORIGIN, "2024-06-01T10:00:00+00:00", 1.0,
                       {"visual": f"{served['url']}/b.tif"})
    documents = {"catalog.json": json.dumps({
        "type": "Catalog", "stac_version": "1.0.0", "id": "landsat", "description": "landsat",
        "links": [{"rel": "item", "href": "a.json"}, {"rel": "item", "href": "b.json"}]}).encode()}
    for item in (item_a, item_b):
        documents[f"{item.id}.json"] = json.dumps(item.to_dict(include_self_link=False)).encode()
    catalog = RangeServer(documents)
    config, _, _, statements = compiled(tmp_path, (
        f"  imagery:\n    stac:\n      catalog: {catalog.url}/catalog.json\n"
        "      alternate: s3\n      s3Buckets: [usgs-landsat]\n"))
    source = Imagery.from_values(config.values["imagery"])
    assert source.stac is not None and source.stac.alternate == "s3"
    reads = [s for s in statements if s["Action"] == ["s3:GetObject"]]
    inside_a = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    only_b = mercantile.tile(*lonlat(B_ORIGIN, SIZE * 0.75, SIZE * 0.75), 14)
    want_a = read_tile(Imagery((f"{served['url']}/a.tif",)), *inside_a)
    want_b = read_tile(Imagery((f"{served['url']}/b.tif",)), *only_b)
    as_the_worker(reads, monkeypatch)
    try:
        with iam_enforced(moto_url):
            assert read_tile(source, *inside_a, fetch=fetch()) == want_a
            assert read_tile(source, *only_b, fetch=fetch()) == want_b
            assert not web.requests  # the alternate only
            out = tmp_path / "a.png"
            result = CliRunner().invoke(main, [
                "imagery", f"{inside_a.x}-{inside_a.y}-14", "--imagery",
                f"{catalog.url}/catalog.json", "--alternate", "s3", "--out", str(out)])
            assert result.exit_code == 0, result.output
            assert out.read_bytes() == want_a
            unnamed = Imagery.from_values({"stac": {"catalog": f"{catalog.url}/catalog.json"}})
            with pytest.raises(Exception, match="403|Access"):
                read_tile(unnamed, *inside_a, fetch=fetch())
            assert web.requests
    finally:
        catalog.close()
        web.close()


def test_a_requester_pays_bucket_is_read_only_when_the_config_says_who_pays(served, tmp_path,
                                                                           monkeypatch):
    """imagery.requesterPays: GDAL's reads carry ``x-amz-request-payer: requester``. A
    requester-pays bucket refuses a read without it (S3's rule; moto does not model it: a fake S3
    endpoint on 127.0.0.1 does, path-style, as the worker's S3 settings address it)."""
    # Two keys: GDAL remembers a URL's failure for the process.
    bucket = RangeServer({f"usgs-landsat/scene/{name}.tif": served["server"].files["a.tif"]
                          for name in ("a", "unpaid")},
                         required={"x-amz-request-payer": "requester"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", bucket.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    tile = mercantile.tile(*lonlat(A_ORIGIN, SIZE / 4, SIZE / 4), 14)
    try:
        with pytest.raises(Exception, match="403|Access"):
            read_tile(Imagery(("s3://usgs-landsat/scene/unpaid.tif",)), *tile)
        paid = Imagery.from_values({"cog": "s3://usgs-landsat/scene/a.tif", "requesterPays": True})
        assert read_tile(paid, *tile) == read_tile(Imagery((f"{served['url']}/a.tif",)), *tile)
        out = tmp_path / "a.png"
        result = CliRunner().invoke(main, ["imagery", f"{tile.x}-{tile.y}-{tile.z}", "--imagery",
                                           "s3://usgs-landsat/scene/a.tif", "--requester-pays",
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output
        # The footprint too: cnsq tiles reads the COG's header from the bucket.
        listed = CliRunner().invoke(main, ["tiles", "--imagery", "s3://usgs-landsat/scene/a.tif",
                                           "--requester-pays", "--zoom", "11"])
        assert listed.exit_code == 0, listed.output
        above = mercantile.parent(tile, zoom=11)
        assert f"{above.x}-{above.y}-11" in listed.stdout.split()
        refused = CliRunner().invoke(main, ["tiles", "--imagery",
                                            "s3://usgs-landsat/scene/unpaid.tif", "--zoom", "11"])
        assert refused.exit_code == 1 and "403" in refused.output, refused.output
    finally:
        bucket.close()


def test_the_configs_s3_buckets_and_requester_pays_reach_the_worker(tmp_path):
    from cnsq.config import ConfigError
    from cnsq.deploy.template import lint
    from support.projects import example_config

    _, path, env, _ = compiled(tmp_path, (
        "  imagery:\n    stac:\n      api: https://earth-search.aws.element84.com/v1\n"
        "      collections: [landsat-c2-l2]\n      assets: [red, green, blue]\n"
        "      s3Buckets: [usgs-landsat]\n    requesterPays: true\n    rescale: [7000, 20000]\n"))
    read = Imagery.from_json(env["IMAGERY"])
    assert read.stac is not None and read.stac.s3_buckets == ("usgs-landsat",)
    assert read.requester_pays is True
    assert lint(path) == []
    with pytest.raises(ConfigError) as error:
        example_config(tmp_path / "bad", "  imagery:\n    stac:\n      api: https://x\n"
                                         "      s3Buckets: [s3://usgs-landsat]\n")
    assert "config.yml:" in str(error.value)
    assert "imagery.stac.s3Buckets: 's3://usgs-landsat' is not an S3 bucket's name" in str(
        error.value)


def test_an_alternate_without_a_usable_href_falls_back_to_the_assets_own():
    from download_and_predict.stac import item_from

    document = {"type": "Feature", "id": "x", "bbox": [0, 0, 1, 1], "assets": {
        "visual": {"href": "a.tif", "alternate": {"s3": {"href": 5}, "web": "b.tif"}},
        "red": {"href": "r.tif", "alternate": {"s3": {"href": "s3://bucket/r.tif"}}}}}
    base = "https://example.com/items/x.json"
    for alternate in ("s3", "web", "absent"):
        item = item_from(document, base, ["visual"], alternate)
        assert item is not None and item.hrefs == ("https://example.com/items/a.tif",)
    item = item_from(document, base, ["visual", "red"], "s3")
    assert item is not None and item.hrefs == ("https://example.com/items/a.tif",
                                               "s3://bucket/r.tif")
    assert item_from(document, base, ["red"], None).hrefs == ("https://example.com/items/r.tif",)
