"""`cnsq view` without a browser: the index and its parents, the HTTP API, the imagery proxy and
the command as a user runs it. The page itself is tested in test_view_browser.py."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mercantile
import pytest
import requests

from cnsq.errors import CnsqError
from cnsq.results.geojson import convert
from cnsq.view import prepare, results_csv
from cnsq.view.imagery import open_imagery
from cnsq.view.index import DETAIL, LIMIT, Bbox, build, features, open_index
from cnsq.view.server import start
from support.projects import SECRETS
from support.servers import TileServer, free_port, fresh_database

TOKEN = SECRETS["TILE_ACCESS_TOKEN"]


def write_results(path: Path, count: int, zoom: int = 17, seed: int = 1,
                  origin: tuple[int, int] = (64_000, 48_000)) -> dict[tuple[int, int, int], float]:
    """A square block of ``count`` tiles with random two-class scores; returns score 1 by tile."""
    rng = random.Random(seed)
    side = int(count ** 0.5) + 1
    scores = {}
    with path.open("w") as out:
        out.write("tile,output\n")
        for i in range(count):
            x, y = origin[0] + i % side, origin[1] + i // side
            p = round(rng.random(), 6)
            scores[(x, y, zoom)] = p
            out.write(f'{x}-{y}-{zoom},"[{round(1 - p, 6)}, {p}]"\n')
    return scores


def viewport(center: mercantile.LngLat, zoom: int, width: int = 1280, height: int = 800) -> Bbox:
    """The bounds a map of ``width`` x ``height`` pixels shows around ``center`` at ``zoom``."""
    x, y = mercantile.xy(center.lng, center.lat)
    metres_per_pixel = 2 * 20037508.342789244 / (256 * 2**zoom)
    west, south = mercantile.lnglat(x - width / 2 * metres_per_pixel, y - height / 2 * metres_per_pixel)
    east, north = mercantile.lnglat(x + width / 2 * metres_per_pixel, y + height / 2 * metres_per_pixel)
    return Bbox(west, south, east, north)


def brute_parent(scores: dict, x: int, y: int, z: int) -> tuple[float, float, int]:
    under = [s for (tx, ty, tz), s in scores.items()
             if tz > z and tx >> (tz - z) == x and ty >> (tz - z) == y]
    return max(under), sum(under) / len(under), len(under)


@pytest.mark.slow
def test_a_million_results_send_only_what_is_in_view(tmp_path):
    source = tmp_path / "results.csv"
    scores = write_results(source, 1_000_000)
    index = build(source, tmp_path / "index.db", thresh_ind=1)
    assert index.total == 1_000_000 and index.zooms == [17]
    for thresh in (0.0, 0.25, 0.5, 0.9, 0.999, 1.0):
        assert index.above(thresh) == sum(1 for s in scores.values() if s >= thresh)
    conn = index.connect()
    b = index.bounds
    center = mercantile.LngLat((b.west + b.east) / 2, (b.north + b.south) / 2)
    # A 1280 x 800 map spans at most 7 x 6 of its own tiles; each holds 4**DETAIL drawn items.
    most = 7 * 6 * 4**DETAIL
    for zoom in range(0, 20):
        answer = features(index, conn, zoom, viewport(center, zoom))
        drawn = len(answer["tiles"]) + len(answer["parents"])
        assert 0 < drawn <= most, (zoom, drawn)
        assert not answer["truncated"]
        assert (answer["tiles"] == []) == (zoom + DETAIL < 17), zoom
    # Zoomed out, every tile is under exactly one square, whose figures are its tiles'.
    answer = features(index, conn, 6, Bbox(b.west, b.south, b.east, b.north))
    assert sum(p[5] for p in answer["parents"]) == 1_000_000
    for x, y, z, high, mean, count in answer["parents"][:3]:
        expected = brute_parent(scores, x, y, z)
        assert (high, count) == (expected[0], expected[2])
        assert mean == pytest.approx(expected[1])


def test_parents_summarise_their_tiles_across_zooms_and_a_repeated_tile_keeps_its_last_row(
        tmp_path):
    source = tmp_path / "results.csv"
    rows = [("10-20-6", [0.9, 0.1]), ("40-80-8", [0.2, 0.8]), ("41-81-8", [0.6, 0.4]),
            ("41-81-8", [0.3, 0.7]), ("164-324-10", [0.05, 0.95])]
    source.write_text("tile,output\n" + "".join(f'{t},"{json.dumps(s)}"\n' for t, s in rows))
    index = build(source, tmp_path / "index.db", thresh_ind=1)
    assert index.total == 4 and index.duplicates == 1 and index.zooms == [6, 8, 10]
    conn = index.connect()
    world = Bbox(-180, -85, 180, 85)
    # At map zoom 3 the drawn level is 6: the zoom-6 tile alone, the deeper ones as one parent.
    answer = features(index, conn, 3, world)
    assert answer["tiles"] == [[10, 20, 6, 0.1]]
    assert answer["parents"] == [[10, 20, 6, 0.95, pytest.approx((0.8 + 0.7 + 0.95) / 3), 3]]
    answer = features(index, conn, 7, world)  # level 10: every tile on its own
    assert sorted(answer["tiles"]) == [[10, 20, 6, 0.1], [40, 80, 8, 0.8], [41, 81, 8, 0.7],
                                       [164, 324, 10, 0.95]]
    assert answer["parents"] == []


def test_an_unreadable_row_is_skipped_and_said_and_good_rows_kept(tmp_path):
    source = tmp_path / "results.csv"
    source.write_text('tile,output\n1-2-3,"[0.1, 0.9]"\nnot-a-tile,"[0.5, 0.5]"\n'
                      '2-2-3,"[0.2, NaN]"\n3-2-3,"{}"\n5-2-3,"' + "[" * 100_000 + "]" * 100_000
                      + '"\n6-2-3,"[0.1,\x00 0.9]"\n4-2-3,"[0.4, 0.6]"\n')
    viewed, cached = prepare(source, "results.csv", tmp_path, 1, 0.5, None, None)
    assert viewed.index.total == 2 and not cached
    report = viewed.index.report
    assert report.bad_count == 5
    assert [line for line, _ in report.bad] == [3, 4, 5, 6, 7]
    assert "tile" in report.bad[0][1] and "not a number" in report.bad[1][1]
    assert "nested too deeply" in report.bad[3][1] and "not JSON" in report.bad[4][1]


def test_nothing_readable_or_a_thresh_ind_out_of_range_is_an_error_naming_the_line(tmp_path):
    source = tmp_path / "results.csv"
    source.write_text('tile,output\nnope,"[0.1, 0.9]"\n')
    with pytest.raises(CnsqError, match=r"line 2: tile"):
        prepare(source, "results.csv", tmp_path, 1, 0.5, None, None)
    source.write_text('tile,output\n1-2-3,"[0.1, 0.9]"\n')
    with pytest.raises(CnsqError, match=r"^thresh_ind 2 is out of range.*2 class scores"):
        prepare(source, "results.csv", tmp_path, 2, 0.5, None, None)
    with pytest.raises(CnsqError, match="no such file"):
        results_csv(str(tmp_path / "missing.csv"), None, tmp_path)
    with pytest.raises(CnsqError, match="is a folder; name a results CSV"):
        results_csv(str(tmp_path), None, tmp_path)
    source.write_text("tile,output\n")
    with pytest.raises(CnsqError, match="holds no results"):
        prepare(source, "results.csv", tmp_path, 1, 0.5, None, None)


def test_the_cache_serves_a_file_read_before_and_notices_when_it_changes(tmp_path):
    source = tmp_path / "results.csv"
    write_results(source, 50)
    cache = tmp_path / "cache"
    first, cached = open_index(source, 1, cache, tmp_path)
    assert not cached and first.total == 50
    again, cached = open_index(source, 1, cache, tmp_path)
    assert cached and again.total == 50 and list(again.scores) == list(first.scores)
    other, cached = open_index(source, 0, cache, tmp_path)  # another score: another index
    assert not cached
    write_results(source, 60)
    changed, cached = open_index(source, 1, cache, tmp_path)
    assert not cached and changed.total == 60
    assert not list(cache.glob(".*partial*"))
    (cache / f"{changed.path.stem}.db").write_bytes(b"garbage")  # a spoiled index is rebuilt
    rebuilt, cached = open_index(source, 1, cache, tmp_path)
    assert not cached and rebuilt.total == 60


@pytest.fixture
def served(tmp_path):
    """A view of 400 results over a tile server that needs the token."""
    source = tmp_path / "results.csv"
    write_results(source, 400, zoom=16, origin=(32_000, 24_000))
    tiles = TileServer()
    imagery = open_imagery(tiles.url + "/{z}/{x}/{y}.png?access_token={token}", TOKEN)
    viewed, _ = prepare(source, "results.csv", tmp_path, 1, 0.5, imagery, None)
    running = start(viewed, 0)
    yield running.url, source, tiles
    running.close()
    tiles.close()


def test_the_api_answers_the_page(served):
    url, source, _ = served
    summary = requests.get(url + "api/summary", timeout=5).json()
    assert summary["total"] == 400 and summary["zooms"] == [16] and summary["classes"] == 2
    assert sum(summary["histogram"]["counts"]) == 400
    count = requests.get(url + "api/count", params={"thresh": 0.7}, timeout=5).json()
    with source.open() as handle:
        kept = convert(handle, io.StringIO(), thresh_ind=1, thresh=0.7).kept
    assert count == {"thresh": 0.7, "above": kept, "total": 400}
    west, south, east, north = summary["bounds"]
    answer = requests.get(url + "api/features", params={
        "zoom": 14, "west": west, "south": south, "east": east, "north": north}, timeout=5).json()
    assert len(answer["tiles"]) == 400
    tile = requests.get(url + "api/tile", params={"id": "32000-24000-16"}, timeout=5).json()
    assert tile["tile"] == "32000-24000-16" and len(tile["scores"]) == 2
    assert requests.get(url + "api/tile", params={"id": "1-1-1"}, timeout=5).status_code == 404
    bad = requests.get(url + "api/count", params={"thresh": "nan"}, timeout=5)
    assert bad.status_code == 400 and "finite" in bad.json()["error"]
    assert requests.get(url + "api/features", params={"zoom": 3}, timeout=5).status_code == 400
    huge = requests.get(url + "api/features", params={"zoom": 1e9, "west": 0, "south": 0,
                                                      "east": 1, "north": 1}, timeout=5)
    assert huge.status_code == 400 and "zoom" in huge.json()["error"]
    assert requests.get(url + "api/tile", params={"id": "9-9-1"}, timeout=5).status_code == 400
    assert requests.get(url + "static/../server.py", timeout=5).status_code == 404


def test_the_geojson_download_is_what_convert_geojson_writes(served, tmp_path):
    url, source, _ = served
    for thresh in (0.5, 0.93):
        response = requests.get(url + "api/geojson", params={"thresh": thresh}, timeout=10)
        assert response.status_code == 200
        assert "attachment" in response.headers["Content-Disposition"]
        out = tmp_path / f"{thresh}.geojson"
        result = subprocess.run([sys.executable, "-m", "cnsq.cli", "convert-geojson", str(source),
                                 str(out), "--thresh_ind", "1", "--thresh", str(thresh)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert response.content == out.read_bytes()


def test_the_download_is_what_the_map_shows_even_after_the_csv_changes(tmp_path):
    """The download re-read the CSV at click time: a CSV rewritten or removed since gave other
    tiles than the map, or 0 bytes."""
    source = tmp_path / "results.csv"
    write_results(source, 16)
    viewed, _ = prepare(source, "results.csv", tmp_path, 1, 0.5, None, None)
    running = start(viewed, 0)
    try:
        before = requests.get(running.url + "api/geojson", params={"thresh": 0.5}, timeout=10).content
        write_results(source, 4, seed=7)  # rewritten…
        after = requests.get(running.url + "api/geojson", params={"thresh": 0.5}, timeout=10).content
        source.unlink()  # …and removed
        gone = requests.get(running.url + "api/geojson", params={"thresh": 0.5}, timeout=10).content
    finally:
        running.close()
    assert before == after == gone
    assert json.loads(before)["features"]


def test_imagery_is_fetched_with_the_token_which_never_reaches_the_page(served):
    url, _, tiles = served
    image = requests.get(url + "imagery/16/32000/24000", timeout=5)
    assert image.status_code == 200 and image.content.startswith(b"\xff\xd8")
    assert tiles.tokens == [TOKEN]  # the endpoint got it from this server
    tiles.failures["32001-24000-16"] = 1
    failed = requests.get(url + "imagery/16/32001/24000", timeout=5)
    assert failed.status_code == 502 and "500" in failed.text
    tiles.missing.add("32002-24000-16")
    assert requests.get(url + "imagery/16/32002/24000", timeout=5).status_code == 404
    for path in ("", "static/view.js", "api/summary"):
        assert TOKEN not in requests.get(url + path, timeout=5).text
    assert TOKEN not in failed.text


def test_an_index_a_live_view_holds_is_never_pruned(tmp_path):
    """The cache keeps four indexes: a fifth view deleted the one a running view still used,
    and every pan, zoom and click of that view failed."""
    cache = tmp_path / "cache"
    source = tmp_path / "held.csv"
    write_results(source, 9)
    held, _ = open_index(source, 1, cache, tmp_path)
    for i in range(6):
        other = tmp_path / f"other{i}.csv"
        write_results(other, 9, seed=i + 2)
        done, _ = open_index(other, 1, cache, tmp_path)
        done.release()  # that view has stopped
    assert held.path.exists()
    with held.connect() as conn:
        assert features(held, conn, 17, Bbox(-180, -85, 180, 85))["tiles"]
    assert len(list(cache.glob("*.db"))) == 5  # the four most recent, and the one in use
    held.release()
    write_results(tmp_path / "last.csv", 9, seed=99)
    open_index(tmp_path / "last.csv", 1, cache, tmp_path)[0].release()
    assert not held.path.exists()  # released: pruned like any other


def test_a_dead_tile_endpoint_is_a_502_naming_the_tile_never_the_url(tmp_path):
    """The 502 body held the upstream URL: a token holding '&' left its tail unmasked."""
    source = tmp_path / "results.csv"
    write_results(source, 4)
    port = free_port()
    token = "tokD&def=SECRETTAIL"
    dead = f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png?access_token={{token}}"
    viewed, _ = prepare(source, "results.csv", tmp_path, 1, 0.5, open_imagery(dead, token), None)
    running = start(viewed, 0)
    try:
        answer = requests.get(running.url + "imagery/17/64000/48000", timeout=20)
    finally:
        running.close()
    assert answer.status_code == 502
    assert answer.text == "tile 64000-48000-17: the tile endpoint did not answer (ConnectionError)"
    assert "SECRETTAIL" not in answer.text and str(port) not in answer.text


def test_a_request_for_another_host_name_is_refused(served):
    url, _, tiles = served
    answer = requests.get(url + "imagery/16/32000/24000", headers={"Host": "attacker.example"},
                          timeout=5)
    assert answer.status_code == 403 and tiles.tokens == []


def test_a_results_database_is_viewed_as_download_exports_it(tmp_path, postgres_url):
    from cnsq.results.store import open_store

    rows = [(f"{x}-7-5", [1 - x / 32, x / 32]) for x in range(32)]
    sqlite = tmp_path / "results.db"
    postgres = fresh_database(postgres_url, "view")
    for url in (f"sqlite:///{sqlite}", postgres):
        store = open_store(url)
        store.migrate()
        store.upsert(rows)
        store.close()
    for given in (str(sqlite), f"sqlite:///{sqlite}", postgres):
        workdir = tmp_path / f"w{abs(hash(given))}"
        workdir.mkdir()
        source, name = results_csv(given, None, workdir)
        viewed, _ = prepare(source, name, workdir, 1, 0.5, None, None)
        assert viewed.index.total == 32 and viewed.index.above(0.5) == 16, given


def run_view(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnsq.cli", "view", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XDG_CACHE_HOME": str(cwd / "cache"),
                                 **(env or {})})


def test_the_command_serves_until_ctrl_c_and_reuses_its_index(tmp_path):
    source = tmp_path / "results.csv"
    write_results(source, 100)
    (tmp_path / "tiles").mkdir()
    for attempt in range(2):
        process = run_view([str(source), "--port", "0", "--tile-endpoint", "tiles",
                            "--thresh", "0.8"], tmp_path)
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), process.stderr.read()
        summary = requests.get(url + "api/summary", timeout=5).json()
        assert summary["total"] == 100 and summary["thresh"] == 0.8
        assert summary["imagery"]["local"] is True
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
        assert process.returncode == 130, err  # interrupted, as every command exits on Ctrl-C
        assert "Stopped cnsq view." in err and "Traceback" not in err
        assert ("cached" in err) == (attempt == 1), err
    assert not [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("cnsq-view-*")
                if p.stat().st_mtime > time.time() - 60 and any(p.iterdir())]


def test_a_taken_port_fails_at_once_before_reading(tmp_path):
    import socket

    source = tmp_path / "results.csv"
    write_results(source, 10)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = run_view([str(source), "--port", str(port)], tmp_path)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port 0" in err
    assert "Read" not in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_no_results_named_and_no_config_says_what_to_pass(tmp_path):
    process = run_view(["--port", "0"], tmp_path, env={"DATABASE_URL": ""})
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1 and "nothing to view" in err


def test_limit_is_a_safety_net_that_says_so(tmp_path):
    source = tmp_path / "results.csv"
    write_results(source, LIMIT + 10, zoom=18)
    index = build(source, tmp_path / "index.db", thresh_ind=1)
    b = index.bounds
    answer = features(index, index.connect(), 15, Bbox(b.west, b.south, b.east, b.north))
    assert answer["truncated"] and len(answer["tiles"]) == LIMIT


def test_a_view_killed_while_reading_leaves_no_index_and_its_leftovers_are_cleared(tmp_path):
    source = tmp_path / "results.csv"
    write_results(source, 200_000)
    cache = tmp_path / "cache" / "cnsq" / "view"
    process = run_view([str(source), "--port", "0"], tmp_path)
    deadline = time.monotonic() + 30
    while not list(cache.glob(".*partial*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL while the index is being written
    process.communicate(timeout=10)
    assert list(cache.glob(".*partial*")) and not list(cache.glob("*.db"))
    process = run_view([str(source), "--port", "0"], tmp_path)
    url = process.stdout.readline().strip()
    assert requests.get(url + "api/summary", timeout=5).json()["total"] == 200_000
    # A tile's scores: answered once the tiles table is written (the map is drawn before).
    assert requests.get(url + "api/tile", params={"id": "64000-48000-17"}, timeout=30).ok
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert len(list(cache.glob("*.db"))) == 1 and not list(cache.glob(".*partial*"))


def test_the_stacks_results_are_viewed_through_its_admin_functions_export(aws, tmp_path):
    """As `cnsq download --config` reads them: the function exports to S3 (invoked here through
    botocore's Stubber: moto cannot run a Lambda without Docker), the CSV is copied from S3."""
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from cnsq.stack.admin import AdminFunction

    body = b'tile,output\n1-2-3,"[0.2, 0.8]"\n2-2-3,"[0.9, 0.1]"\n'
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="cnsq-artifacts")
    s3.put_object(Bucket="cnsq-artifacts", Key="cnsq-dev/exports/r.csv", Body=body)
    client = boto3.client("lambda", region_name="us-east-1")
    stub = Stubber(client)
    answer = json.dumps({"bucket": "cnsq-artifacts", "key": "cnsq-dev/exports/r.csv", "rows": 2,
                         "bytes": len(body)}).encode()
    stub.add_response("invoke", {"StatusCode": 200,
                                 "Payload": StreamingBody(io.BytesIO(answer), len(answer))})
    stub.activate()
    source, name = results_csv(None, None, tmp_path, AdminFunction("cnsq-dev-admin", client, s3))
    assert name == "s3://cnsq-artifacts/cnsq-dev/exports/r.csv" and source.parent == tmp_path
    viewed, _ = prepare(source, name, tmp_path, 1, 0.5, None, None)
    assert viewed.index.total == 2 and viewed.index.above(0.5) == 1


def test_extreme_scores_give_a_finite_histogram(tmp_path):
    """Scores of ±1e308 overflowed the histogram: NaN and Infinity in /api/summary."""
    import json as json_module

    source = tmp_path / "results.csv"
    source.write_text('tile,output\n1-2-3,"[0, 1e308]"\n2-2-3,"[0, -1e308]"\n3-2-3,"[0, 0.5]"\n')
    index = build(source, tmp_path / "index.db", 1)
    histogram = index.histogram()
    json_module.dumps(histogram, allow_nan=False)  # finite, as the page needs
    assert sum(histogram["counts"]) == 3 and histogram["edges"][0] == -1e308
    assert histogram["edges"][-1] == 1e308


def test_requests_from_another_site_are_refused(served):
    """A page elsewhere could make cnsq view fetch tiles with the token (it cannot read them)."""
    url, _, tiles = served
    before = len(tiles.tokens)
    for headers in ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
                    {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://attacker.example"}):
        for path in ("imagery/16/32000/24000", "api/summary", "api/geojson?thresh=0.5"):
            answer = requests.get(url + path, headers=headers, timeout=5)
            assert answer.status_code == 403, (headers, path)
    assert len(tiles.tokens) == before  # the endpoint was never asked
    # The page's own requests, and a link followed to the page, are answered.
    own = {"Sec-Fetch-Site": "same-origin", "Origin": url.rstrip("/")}
    assert requests.get(url + "imagery/16/32000/24000", headers=own, timeout=5).status_code == 200
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    page = requests.get(url, headers=link, timeout=5)
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"


def test_the_proxy_passes_only_images(served):
    url, _, tiles = served
    tiles.content["32003-24000-16"] = b"<html><script>alert(document.domain)</script></html>"
    answer = requests.get(url + "imagery/16/32003/24000", timeout=5)
    assert answer.status_code == 502 and answer.headers["Content-Type"] == "text/plain"
    assert answer.text == ("tile 32003-24000-16: the tile endpoint answered image/jpeg, not a "
                           "raster image")
    assert "<script>" not in answer.text


def test_a_bare_view_in_a_demo_folder_views_its_results(tmp_path, monkeypatch):
    """A bare `cnsq view` where demo or run wrote results.csv asked for AWS instead."""
    import signal
    import subprocess
    import sys

    write_results(tmp_path / "results.csv", 9)
    (tmp_path / "tiles").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    view = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "view", "--port", "0"], cwd=tmp_path,
                            env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = view.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), view.stderr.read()
        summary = requests.get(url + "api/summary", timeout=10).json()
        assert summary["total"] == 9 and summary["name"] == "results.csv"
    finally:
        view.send_signal(signal.SIGINT)
        _, err = view.communicate(timeout=20)
    assert "Viewing results.csv over tiles/ (found here)." in err


def test_the_columnar_index_is_the_row_readers(tmp_path, monkeypatch):
    """With pyarrow (cnsq[geo]) the index is built column-wise: the same tiles (last row of a
    duplicate, in the file's order), parents, scores, zooms and bad-row reports as without."""
    pytest.importorskip("pyarrow")
    import random
    import sqlite3

    from cnsq.view import index as ix

    rng = random.Random(3)
    lines = ["tile,output"]
    for _ in range(3000):
        z = rng.choice([12, 14, 15])
        x = rng.randrange(1000 << (z - 12), 1010 << (z - 12))
        y = rng.randrange(2000 << (z - 12), 2008 << (z - 12))
        p = round(rng.random(), 5)
        lines.append(f'{x}-{y}-{z},"[{1 - p}, {p}]"')
    lines += ['1-2-3,"[0.1, NaN]"', "bad", '4-4-4,"[0.1, 0.2, 0.3]"',
              lines[5].split(",")[0] + ',"[0.5, 0.5]"']
    source = tmp_path / "results.csv"
    source.write_text("\n".join(lines) + "\n")
    fast = ix.build(source, tmp_path / "fast.db", 1)
    monkeypatch.setattr(ix, "_columnar", lambda: False)
    slow = ix.build(source, tmp_path / "slow.db", 1)

    def tables(path):
        conn = sqlite3.connect(path)
        try:
            return (conn.execute("SELECT z, x, y, score, output FROM tiles ORDER BY rowid").fetchall(),
                    [(z, x, y, m, round(s, 9), n) for z, x, y, m, s, n in conn.execute(
                        "SELECT * FROM parents ORDER BY z, x, y")])
        finally:
            conn.close()

    assert tables(fast.path) == tables(slow.path)
    assert (fast.zooms, fast.classes, fast.duplicates, list(fast.scores), fast.bounds) == (
        slow.zooms, slow.classes, slow.duplicates, list(slow.scores), slow.bounds)
    assert (fast.report.read, fast.report.bad) == (slow.report.read, slow.report.bad)


def _gated_builds(monkeypatch):
    """Hold every background tiles write until the returned event is set."""
    import threading

    from cnsq.view import index as ix

    gate = threading.Event()
    start_build = ix._start_build

    def gated(*args, **kwargs):
        index, write_tiles = start_build(*args, **kwargs)

        def later(cancel):
            while not gate.wait(0.01):
                if cancel is not None and cancel.is_set():
                    break
            write_tiles(cancel)

        return index, later

    monkeypatch.setattr(ix, "_start_build", gated)
    monkeypatch.setattr(ix, "EARLY_BYTES", 1)
    return gate


def test_a_large_file_is_drawn_while_its_tiles_are_written(tmp_path, monkeypatch):
    """The map's first view of a large area needs only parents: the view answers it before the
    tiles table is written; a request that reads tiles waits for it, then is right; the index
    ends in the cache under its own name, the parents' copy removed."""
    pytest.importorskip("pyarrow")
    import threading

    from cnsq.view.server import Viewed

    source = tmp_path / "results.csv"
    scores = write_results(source, 3000)
    reference = build(source, tmp_path / "reference.db", 1)
    gate = _gated_builds(monkeypatch)
    cache = tmp_path / "cache"
    index, cached = open_index(source, 1, cache, tmp_path, early=True)
    assert not cached and not index.tiles_ready and index.total == 3000
    assert index.bounds == reference.bounds and list(index.scores) == list(reference.scores)
    running = start(Viewed(index, "results.csv", 0.5, None), 0)
    try:
        whole = viewport(mercantile.LngLat(*mercantile.ul(64_027, 48_027, 17)), 10)
        params = {"zoom": 10, "west": whole.west, "south": whole.south, "east": whole.east,
                  "north": whole.north}
        answer = requests.get(running.url + "api/features", params=params, timeout=5).json()
        with reference.connect() as conn:
            assert answer == json.loads(json.dumps(features(reference, conn, 10, whole)))
        assert answer["parents"] and not index.tiles_ready  # drawn from the parents alone
        tile = next(iter(scores))
        got = {}
        asking = threading.Thread(target=lambda: got.update(requests.get(
            running.url + "api/tile", params={"id": f"{tile[0]}-{tile[1]}-{tile[2]}"},
            timeout=10).json()))
        asking.start()
        asking.join(0.3)
        assert asking.is_alive()  # waits for the tiles
        gate.set()
        asking.join(10)
        assert got["scores"][1] == scores[tile]
    finally:
        running.close()
    assert index.tiles_ready and index.path.parent == cache and index.path.is_file()
    assert [p.name for p in cache.iterdir()] == [index.path.name]
    index.release()
    again, cached = open_index(source, 1, cache, tmp_path, early=True)
    assert cached and again.total == 3000


def test_a_view_stopped_while_its_tiles_are_written_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    source = tmp_path / "results.csv"
    write_results(source, 500)
    _gated_builds(monkeypatch)  # never opened
    cache = tmp_path / "cache"
    index, _ = open_index(source, 1, cache, tmp_path, early=True)
    assert not index.tiles_ready
    index.close()
    with pytest.raises(CnsqError, match="stopping"):
        index.connect(tiles=True)
    assert list(cache.iterdir()) == []


def test_ctrl_c_the_moment_the_url_is_printed_stops_cleanly(tmp_path):
    """The URL was printed before Ctrl-C was handled: a Ctrl-C sent as soon as it was read
    (as a script does) ended in "Interrupted." and 130 (seen once in CI)."""
    source = tmp_path / "results.csv"
    write_results(source, 20)
    for _ in range(6):
        process = run_view([str(source), "--port", "0"], tmp_path)
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
        assert process.returncode == 130 and "Stopped cnsq view." in err, err


def test_proxied_imagery_is_typed_from_its_bytes_and_cannot_run_script(served):
    """A body with `ftyp` at bytes 4-8 passed as an image though it was SVG with a script; the
    view forwarded `image/svg+xml`, and opened as a page it could read /api/*. The type comes
    from the bytes (raster formats only), and every proxied body is sent with nosniff and a
    policy that runs nothing."""
    url, _, tiles = served
    svg = b"<svgftyp xmlns='http://www.w3.org/2000/svg'><script>fetch('/api/summary')</script></svg>"
    assert svg[4:8] == b"ftyp"
    tiles.content["32003-24000-16"] = svg
    spoof = requests.get(url + "imagery/16/32003/24000", timeout=5)
    assert spoof.status_code == 502 and "svg" not in spoof.headers["Content-Type"]
    good = requests.get(url + "imagery/16/32000/24000", timeout=5)
    for answer in (spoof, good):
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Content-Security-Policy"] == "default-src 'none'"
    assert good.headers["Content-Type"] == "image/jpeg"


@pytest.mark.alone
def test_imagery_has_a_deadline_and_a_size(tmp_path):
    """A trickling imagery server held the browser's connections (the page's own API unanswered
    after 60 s) and the view's threads for minutes; a 1.5 GB "PNG" was streamed whole. The
    worker's total deadline and size bound apply here too."""
    source = tmp_path / "results.csv"
    write_results(source, 4)
    tiles = TileServer(close_connections=True)
    tiles.trickle["1-1-2"] = 0.5
    tiles.content["2-1-2"] = b"\x89PNG" + b"x" * (9 * 2**20)
    imagery = open_imagery(tiles.url + "/{z}/{x}/{y}.png", None)
    imagery.timeout = 1.0
    viewed, _ = prepare(source, "results.csv", tmp_path, 1, 0.5, imagery, None)
    running = start(viewed, 0)
    try:
        started = time.monotonic()
        slow = requests.get(running.url + "imagery/2/1/1", timeout=30)
        assert slow.status_code == 502 and time.monotonic() - started < 5
        big = requests.get(running.url + "imagery/2/2/1", timeout=30)
        assert big.status_code == 502 and "over the" in big.text
    finally:
        running.close()
        tiles.close()


@pytest.mark.parametrize("early", [False, True], ids=["numpy", "sql"])
def test_huge_finite_scores_under_one_parent_do_not_overflow(tmp_path, early, monkeypatch):
    """Two scores of 1.7e308 under one parent overflowed the parent's sum to infinity and
    /api/features answered 400 for the zoomed-out map. The mean is aggregated as a weighted
    mean, which stays within the scores' own range."""
    import cnsq.view.index as index_module

    source = tmp_path / "huge.csv"
    source.write_text('tile,output\n0-0-12,"[0, 1.7e308]"\n1-0-12,"[0, 1.7e308]"\n'
                      '2-0-12,"[0, 1.7e308]"\n3-0-12,"[0, -1.0]"\n')
    if early:  # the parents as the SQL of a large file's early answer computes them
        monkeypatch.setattr(index_module, "EARLY_BYTES", 0)
    viewed, _ = prepare(source, "huge.csv", tmp_path, 1, 0.5, None, None)
    running = start(viewed, 0)
    try:
        answer = requests.get(running.url + "api/features", params={
            "zoom": 1, "west": -180, "south": -85, "east": 180, "north": 85}, timeout=10)
    finally:
        running.close()
    assert answer.status_code == 200, answer.text
    [parent] = answer.json()["parents"]
    assert parent[3] == 1.7e308 and parent[5] == 4
    assert parent[4] == pytest.approx(0.75 * 1.7e308)  # (3 x 1.7e308 - 1) / 4, never summed
