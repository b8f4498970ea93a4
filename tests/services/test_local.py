"""The one-machine stack: serve (TF Serving's REST API on ONNX Runtime), tileserver, run, demo."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from cnsq.cli import main
from cnsq.local import serve, tileserver
from cnsq.local.demo_models import water_classifier


def png(color: tuple[int, int, int], size: int = 256) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> dict:
    return {"image_bytes": {"b64": base64.b64encode(data).decode()}}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return water_classifier(tmp_path_factory.mktemp("model") / "water.onnx")


@pytest.fixture
def server(model_path):
    running = serve.start(model_path, port=0, name="water", max_batch=32, batch_timeout_ms=50)
    yield running
    running.close()


WATER, LAND = (38, 82, 156), (96, 118, 62)


def test_serve_speaks_tf_serving_rest(server):
    status = requests.get(f"{server.url}/v1/models/water", timeout=10)
    assert status.status_code == 200
    assert status.json()["model_version_status"][0]["state"] == "AVAILABLE"
    response = requests.post(server.endpoint, json={"instances": [b64(png(WATER)), b64(png(LAND))]},
                             timeout=10)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and all(len(p) == 2 for p in predictions)
    assert predictions[0][1] > 0.99 and predictions[1][1] < 0.01  # water, then land
    assert abs(sum(predictions[0]) - 1) < 1e-6


def test_serve_takes_plain_numeric_instances_and_jpeg(server):
    array = np.full((64, 64, 3), WATER, dtype=np.uint8).tolist()
    response = requests.post(server.endpoint, json={"instances": [array]}, timeout=10)
    assert response.status_code == 200 and response.json()["predictions"][0][1] > 0.99
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), LAND).save(buffer, "JPEG")  # resized to the model's 64x64
    response = requests.post(server.endpoint, json={"instances": [b64(buffer.getvalue())]}, timeout=10)
    assert response.status_code == 200 and response.json()["predictions"][0][1] < 0.01


@pytest.mark.parametrize("body, message", [
    ({"instances": [{"image_bytes": {"b64": "not base64!!"}}]}, "instance 0: image_bytes.b64 is not base64"),
    ({"instances": [b64(png(WATER)), b64(b"plain text, not an image")]}, "instance 1: not a JPEG or PNG"),
    ({"instances": [[[1, 2, 3]]]}, "instance 0: shape [1, 3] does not match the model's [64, 64, 3]"),
    ({"instances": []}, "'instances' must be a non-empty list"),
    ({"inputs": []}, "expected JSON"),
])
def test_serve_bad_input_is_400_with_a_message(server, body, message):
    response = requests.post(server.endpoint, json=body, timeout=10)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_serve_refuses_a_decompression_bomb_with_a_400(server):
    """A 190 KB PNG of 196 megapixels made cnsq serve drop the connection."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 1_000_000
    response = requests.post(server.endpoint, json={"instances": [b64(buffer.getvalue())]}, timeout=30)
    assert response.status_code == 400
    assert "14000x14000 pixels is more than the 16,777,216 an instance may have" in response.json()["error"]
    healthy = requests.post(server.endpoint, json={"instances": [b64(png(WATER))]}, timeout=10)
    assert healthy.status_code == 200


def test_serve_unknown_model_is_404(server):
    assert requests.get(f"{server.url}/v1/models/other", timeout=10).status_code == 404
    assert requests.post(f"{server.url}/v1/models/other:predict", json={}, timeout=10).status_code == 404


def test_serve_merges_concurrent_requests(server):
    images = [png((i, 90, 160)) for i in range(16)]

    def one(image: bytes) -> list:
        return requests.post(server.endpoint, json={"instances": [b64(image)]}, timeout=30).json()["predictions"]

    before = server.batcher.calls
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, images))
    calls = server.batcher.calls - before
    assert all(len(r) == 1 for r in results)
    assert calls < 16  # merged: 16 requests, fewer inference calls
    assert server.batcher.instances >= 16


def test_serve_with_max_batch_1_runs_each_request_alone(model_path):
    running = serve.start(model_path, port=0, name="m", max_batch=1, batch_timeout_ms=50)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: requests.post(running.endpoint, json={"instances": [b64(png(LAND))]},
                                                  timeout=30), range(8)))
        assert running.batcher.calls == 8
    finally:
        running.close()


def mean_model(path: Path, batch: int | str = 1, channels: int = 3) -> Path:
    """An ONNX model answering the mean of an 8x8 input of ``channels``; ``batch`` 1 takes exactly
    one instance and cannot run a batch of more, "N" takes any number."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2, 3], keepdims=0)], "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 8, channels])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_warm_up_runs_full_batches_before_the_port_opens(tmp_path):
    from cnsq.errors import CnsqError

    one = mean_model(tmp_path / "one.onnx")
    # A full batch of 4 cannot run on this model: the warm-up finds out before any request does.
    with pytest.raises(CnsqError, match=r"warming up the model failed on a batch of 4 blank inputs "
                                        r"of shape \[8, 8, 3\]: .*\(no_warmup skips the warm-up\)") as failed:
        serve.start(one, port=0, name="m", max_batch=4)
    # The library names the parameter; `cnsq serve` says its flag.
    from cnsq.cli import main
    from cnsq.cli.app import flags_of

    assert "(--no-warmup skips the warm-up)" in failed.value.worded(flags_of(main.commands["serve"]))
    running = serve.start(one, port=0, name="m", max_batch=4, warmup=False)
    try:
        answer = requests.post(running.endpoint, json={"instances": [b64(png(WATER, 8))]}, timeout=10)
    finally:
        running.close()
    assert answer.status_code == 200 and answer.json()["predictions"] == [pytest.approx(92, abs=0.01)]


def test_a_model_that_does_not_take_images_is_warmed_up_with_zeros(tmp_path):
    # Two channels: no image decodes to its input, but numeric instances serve as ever.
    running = serve.start(mean_model(tmp_path / "two.onnx", "N", channels=2), port=0, name="m",
                          max_batch=4)
    try:
        instance = [[[1.0, 3.0]] * 8] * 8
        answer = requests.post(running.endpoint, json={"instances": [instance]}, timeout=10)
    finally:
        running.close()
    assert answer.status_code == 200 and answer.json()["predictions"] == [2.0]


def test_warm_up_leaves_the_counters_at_zero(model_path):
    running = serve.start(model_path, port=0, name="m", max_batch=8, batch_threads=2)
    try:
        assert (running.batcher.calls, running.batcher.instances, running.batcher.peak) == (0, 0, 0)
        requests.post(running.endpoint, json={"instances": [b64(png(LAND))]}, timeout=10)
        assert (running.batcher.calls, running.batcher.instances) == (1, 1)
    finally:
        running.close()


def test_serve_with_batch_threads_runs_batches_at_once_and_keeps_answers_apart(model_path):
    # Distinct colours, answered one at a time first: the reference each concurrent answer must match.
    colours = [(20 + 3 * i, 60 + i, 200 - 2 * i) if i % 2 else (90 + i, 120, 50 + i) for i in range(48)]
    single = serve.start(model_path, port=0, name="m", max_batch=1)
    try:
        expected = [requests.post(single.endpoint, json={"instances": [b64(png(c))]}, timeout=30)
                    .json()["predictions"][0] for c in colours]
    finally:
        single.close()
    running = serve.start(model_path, port=0, name="m", max_batch=4, batch_timeout_ms=20,
                          batch_threads=3)
    try:
        def one(i: int) -> list:
            body = {"instances": [b64(png(colours[i])), b64(png(colours[(i + 1) % 48]))]}
            return requests.post(running.endpoint, json=body, timeout=30).json()["predictions"]

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(48)))
        assert running.batcher.peak <= 3  # never more batches at once than threads
        assert running.batcher.instances == 96
    finally:
        running.close()
    for i, answer in enumerate(answers):
        assert answer == [expected[i], expected[(i + 1) % 48]]


def test_serve_refuses_batch_threads_below_one(model_path):
    result = CliRunner().invoke(main, ["serve", str(model_path), "--batch-threads", "0"])
    assert result.exit_code == 2 and "Invalid value for '--batch-threads'" in result.output


def test_tileserver_folder_and_mbtiles(tmp_path):
    folder = tmp_path / "tiles" / "3" / "1"
    folder.mkdir(parents=True)
    (folder / "2.png").write_bytes(png(WATER))
    mbtiles = tmp_path / "t.mbtiles"
    conn = sqlite3.connect(mbtiles)
    conn.execute("CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob)")
    conn.execute("INSERT INTO tiles VALUES (3, 1, 5, ?)", (png(LAND),))  # TMS row 5 = XYZ y 2
    conn.commit()
    conn.close()
    for source, color in ((tmp_path / "tiles", WATER), (mbtiles, LAND)):
        running = tileserver.start(source, port=0)
        try:
            ok = requests.get(f"{running.url}/3/1/2.png", timeout=10)
            assert ok.status_code == 200 and ok.headers["Content-Type"] == "image/png"
            assert Image.open(io.BytesIO(ok.content)).getpixel((0, 0)) == color
            assert requests.get(f"{running.url}/3/1/3.png", timeout=10).status_code == 404
            assert requests.get(f"{running.url}/nonsense", timeout=10).status_code == 404
        finally:
            running.close()


def test_tileserver_keeps_connections_alive_and_closes_when_asked(tmp_path):
    import http.client

    folder = tmp_path / "3" / "1"
    folder.mkdir(parents=True)
    (folder / "2.jpg").write_bytes(b"\xff\xd8\xff a jpeg")
    running = tileserver.start(tmp_path, port=0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.httpd.server_address[1], timeout=10)
        for path, status, body in (("/3/1/2.jpg", 200, b"\xff\xd8\xff a jpeg"), ("/3/1/9.jpg", 404, b"no such tile"),
                                   ("/3/1/2.png", 200, b"\xff\xd8\xff a jpeg")):  # another extension is looked for
            conn.request("GET", path)
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (status, body)
            assert answer.getheader("Connection") is None  # kept alive: one connection for all three
        conn.request("GET", "/3/1/2.jpg", headers={"Connection": "close"})
        answer = conn.getresponse()
        assert answer.getheader("Connection") == "close" and answer.getheader("Content-Type") == "image/jpeg"
        assert answer.read() == b"\xff\xd8\xff a jpeg" and answer.will_close
        conn.close()
    finally:
        running.close()


def test_run_lists_failures_and_writes_the_good_tiles(tmp_path, model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "tiles" / "10"
    good = {}
    for x in range(12):
        (root / str(x)).mkdir(parents=True)
        data = png(WATER if x % 2 else LAND)
        (root / str(x) / "7.png").write_bytes(data)
        good[f"{x}-7-10"] = data
    (tmp_path / "tiles.txt").write_text("".join(f"{t}\n" for t in good) + "99-7-10\nnot-a-tile\n")
    running = tileserver.start(tmp_path / "tiles", port=0)
    try:
        result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint", running.template,
                                           "--model", str(model_path), "--batch-size", "5"])
    finally:
        running.close()
    assert result.exit_code == 1  # one invalid line
    assert "tiles.txt:14: expected x-y-z" in result.stderr
    assert "Processed 13 tiles" in result.stderr and "12 written, 1 without imagery" in result.stderr
    assert f"Look at them on a map: cnsq view results.csv --tile-endpoint '{running.template}'" \
        in result.stderr
    rows = dict(line.split(",", 1) for line in Path("results.csv").read_text().splitlines()[1:])
    assert set(rows) == set(good)
    for tile, output in rows.items():
        scores = json.loads(json.loads(output) if output.startswith('"') else output)
        assert (scores[1] > 0.5) == (int(tile.split("-")[0]) % 2 == 1)


def test_demo_finds_the_lakes(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    for name in ("results.csv", "water.geojson", "preview.png", "water.onnx", "tiles.txt"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    collection = json.loads((tmp_path / "demo" / "water.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    for feature in collection["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert len(feature["geometry"]["coordinates"][0]) == 5
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("Demo:")][0]
    precision = float(line.split("precision ")[1].split(",")[0])
    recall = float(line.split("recall ")[1].rstrip("."))
    assert precision >= 0.9 and recall >= 0.9
    assert "80 tiles processed" in line
    # The next step, as a command to paste: the demo's imagery stays in its folder.
    view = f"cnsq view {tmp_path / 'demo' / 'results.csv'} --tile-endpoint {tmp_path / 'demo' / 'tiles'}"
    assert view in result.stdout
    assert sorted(p.name for p in (tmp_path / "demo" / "tiles").iterdir()) == ["12", "13", "14", "15"]


def test_demo_on_a_utm_cog_finds_the_lakes(tmp_path):
    """`cnsq demo --imagery cog`: the same picture as one COG in a UTM projection (with
    overviews), read by the worker itself through range requests; the lakes are found as well."""
    pytest.importorskip("rio_tiler")
    import rasterio

    result = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path / "demo"), "--imagery", "cog"])
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "demo" / "imagery.tif") as cog:
        assert cog.crs.to_epsg() == 32630  # Madrid's UTM zone
        assert cog.overviews(1) and cog.block_shapes[0] == (256, 256)
        assert cog.nodata == 0
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("Demo:")][0]
    assert "80 tiles processed" in line
    precision = float(line.split("precision ")[1].split(",")[0])
    recall = float(line.split("recall ")[1].rstrip("."))
    assert precision >= 0.9 and recall >= 0.9


def test_run_says_how_to_view_its_results_without_the_token_written_in_the_url(
        tmp_path, model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiles" / "10" / "3").mkdir(parents=True)
    (tmp_path / "tiles" / "10" / "3" / "7.png").write_bytes(png(WATER))
    (tmp_path / "tiles.txt").write_text("3-7-10\n")
    running = tileserver.start(tmp_path / "tiles", port=0)
    try:
        result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint",
                                           running.url + "/{z}/{x}/{y}.png?access_token=sk-lit3ral",
                                           "--model", str(model_path)])
    finally:
        running.close()
    assert result.exit_code == 0, result.output
    assert "cnsq view results.csv --tile-endpoint" in result.stderr
    assert "sk-lit3ral" not in result.output + result.stderr


class SlowModel:
    """A model whose every inference takes ``seconds``; records when each batch started."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started: list[tuple[float, int]] = []

    def predict(self, batch: np.ndarray) -> list:
        import time

        self.started.append((time.monotonic(), len(batch)))
        time.sleep(self.seconds)
        return [[float(v)] for v in batch[:, 0]]


def test_a_batch_waits_for_company_from_its_first_request_not_from_when_a_thread_is_free():
    # As TF Serving's batch_timeout_micros: requests that queued while the last batch ran have
    # waited already; the next batch runs as soon as the batch thread is free, not 300 ms later.
    import time

    model = SlowModel(0.4)
    batcher = serve.Batcher(model, max_batch=8, timeout_ms=300)
    try:
        first = batcher.submit([np.array([1.0])])
        time.sleep(0.45)  # the first batch (alone, after its 300 ms) is running now
        queued = [batcher.submit([np.array([float(v)])]) for v in (2, 3)]
        assert first.result(5) == [[1.0]]
        assert [future.result(5) for future in queued] == [[[2.0]], [[3.0]]]
    finally:
        batcher.close()
    (start1, size1), (start2, size2) = model.started
    assert (size1, size2) == (1, 2)
    assert start2 - (start1 + 0.4) < 0.15  # it would be 0.3 s had the wait restarted


def test_the_model_server_starts_from_a_folder_holding_a_clone_named_cnsq(tmp_path, model_path,
                                                                          monkeypatch):
    # `git clone … cnsq && cnsq demo` from the parent folder: the spawned server must import the
    # installed package, not the clone's top folder (a namespace package without cnsq.cli).
    (tmp_path / "cnsq" / "cnsq").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    running = serve.spawn(model_path, name="water", timeout=30)
    try:
        answer = requests.post(running.endpoint, json={"instances": [b64(png(WATER))]}, timeout=10)
    finally:
        running.close()
    assert answer.status_code == 200 and answer.json()["predictions"][0][1] > 0.99


def land_tiles(folder: Path, count: int) -> None:
    """``count`` land tiles x-7-10 under folder/tiles and their list in folder/tiles.txt."""
    root = folder / "tiles" / "10"
    for x in range(count):
        (root / str(x)).mkdir(parents=True)
        (root / str(x) / "7.png").write_bytes(png(LAND))
    (folder / "tiles.txt").write_text("".join(f"{x}-7-10\n" for x in range(count)))


def test_run_with_a_wrong_tile_path_exits_1_and_says_why(tmp_path, model_path, monkeypatch):
    """`{y}/{x}` swapped: every tile 404s. Printed `0 written, 80 without imagery`, exited 0."""
    monkeypatch.chdir(tmp_path)
    land_tiles(tmp_path, 6)
    running = tileserver.start(tmp_path / "tiles", port=0)
    try:
        swapped = running.template.replace("{x}/{y}", "{y}/{x}")
        result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint", swapped,
                                           "--model", str(model_path)])
    finally:
        running.close()
    assert result.exit_code == 1
    assert "0 written, 6 without imagery" in result.stderr
    assert "100% of the tiles had no imagery (more than --max-missing 50%)" in result.stderr


def test_run_stops_at_once_on_a_dead_tile_endpoint(tmp_path, model_path, monkeypatch):
    """It printed one `Connection refused` line per tile; now one error, before the run."""
    from support.servers import free_port

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiles.txt").write_text("".join(f"{x}-7-10\n" for x in range(30)))
    dead = f"http://127.0.0.1:{free_port()}/{{z}}/{{x}}/{{y}}.png"
    result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint", dead,
                                       "--model", str(model_path)], env={"RETRIES": "1"})
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "the tile endpoint failed for the first tile, 0-7-10" in errors[0]
    assert "nothing was run" in errors[0]
    assert not (tmp_path / "results.db").exists()  # a failed run left an empty database



def test_run_refuses_an_output_that_is_its_tile_list(tmp_path, model_path, monkeypatch):
    """'--out tiles.txt' would replace the tile list with the results: refused at once."""
    from support.servers import free_port

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiles.txt").write_text("1-7-10\n")
    endpoint = f"http://127.0.0.1:{free_port()}/{{z}}/{{x}}/{{y}}.png"
    result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint", endpoint,
                                       "--model", str(model_path), "--out", "tiles.txt"])
    assert result.exit_code == 1 and "is the file being read" in result.stderr, result.output
    assert (tmp_path / "tiles.txt").read_text() == "1-7-10\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.txt"]

def test_run_collapses_repeated_failures_into_counts(tmp_path, model_path, monkeypatch):
    from support.servers import TileServer

    monkeypatch.chdir(tmp_path)
    tiles = TileServer(content={"0-7-10": png(LAND)})
    for x in range(1, 30):
        tiles.failures[f"{x}-7-10"] = 10**6  # always 500
    (tmp_path / "tiles.txt").write_text("".join(f"{x}-7-10\n" for x in range(30)))
    try:
        result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint",
                                           tiles.url + "/{z}/{x}/{y}.png", "--model", str(model_path)],
                                    env={"RETRIES": "1"})
    finally:
        tiles.close()
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "failed: tile_http" in line]
    assert len(lines) == 1 and lines[0].startswith("29 tile(s) failed: tile_http: ")
    assert "and 26 more" in lines[0]


def test_each_run_writes_its_own_results(tmp_path, model_path, monkeypatch):
    """The default sqlite:///results.db carried over: 5 tiles after an 80-tile run gave 80 rows."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    root = tmp_path / "tiles" / "10"
    for x in range(6):
        (root / str(x)).mkdir(parents=True)
        (root / str(x) / "7.png").write_bytes(png(LAND))
    running = tileserver.start(tmp_path / "tiles", port=0)
    try:
        for count in (6, 2):
            (tmp_path / "tiles.txt").write_text("".join(f"{x}-7-10\n" for x in range(count)))
            result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint",
                                               running.template, "--model", str(model_path)])
            assert result.exit_code == 0, result.output
            assert "Results of this run go to results.db and results.csv." in result.stderr
            rows = Path("results.csv").read_text().splitlines()[1:]
            assert len(rows) == count
    finally:
        running.close()


@pytest.mark.alone
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_run_keeps_what_was_done_and_leaves_no_server(tmp_path, model_path, sig):
    """Ctrl-C killed the model server first (24 `Connection refused` lines, no CSV); SIGTERM
    left it running as an orphan."""
    from support.servers import TileServer

    tiles = TileServer(content={f"{x}-7-10": png(LAND) for x in range(400)}, delay=0.05)
    (tmp_path / "tiles.txt").write_text("".join(f"{x}-7-10\n" for x in range(400)))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "cnsq.cli", "run", "tiles.txt", "--tile-endpoint",
             tiles.url + "/{z}/{x}/{y}.png", "--model", str(model_path), "-n", "2"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while sum(tiles.requests.values()) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(sig)
        started = time.monotonic()
        _, err = process.communicate(timeout=30)
        assert time.monotonic() - started < 5
    finally:
        tiles.close()
    assert process.returncode == 130, err
    assert "Interrupted after" in err and "Connection refused" not in err
    rows = (tmp_path / "results.csv").read_text().splitlines()[1:]
    assert 20 <= len(rows) < 400
    time.sleep(0.5)
    servers = subprocess.run(["pgrep", "-f", f"cnsq.cli serve {model_path}"], capture_output=True,
                             text=True).stdout.split()
    assert servers == []


def test_a_spawned_model_server_dies_with_its_parent_even_killed(tmp_path, model_path):
    """The server asks Linux for its parent's death signal itself, once it runs (a Ctrl-C that
    landed in the fork's hooks was lost and hung the demo when the child asked before exec)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\n"
         "from cnsq.local.serve import spawn\n"
         "server = spawn(Path(sys.argv[1]), warmup=False)\n"
         "print(server.popen.pid, flush=True)\n"
         "time.sleep(120)\n", str(model_path)],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: the parent stops nothing itself
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{server}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{server}").exists() or "Z" in Path(f"/proc/{server}/stat").read_text(
        ).split(")")[1][:3], "the model server outlived its killed parent"


def test_the_server_stops_at_once_when_its_parent_is_gone_before_it_asks(tmp_path):
    """Its own process: the request for the parent's death signal is the process's."""
    ask = ("import os, sys\n"
           "from cnsq.local.serve import PARENT_ENV, die_with_parent\n"
           "die_with_parent({})\n"  # not spawned by cnsq: nothing asked
           "die_with_parent({PARENT_ENV: sys.argv[1]})\n"
           "print('serving')\n")
    alive = subprocess.run([sys.executable, "-c", ask, str(os.getpid())], cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)
    gone = subprocess.run([sys.executable, "-c", ask, str(os.getpid() + 1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert alive.returncode == 0 and alive.stdout == "serving\n", alive.stderr
    assert gone.returncode == 1 and gone.stdout == "", gone.stderr


def test_run_ends_when_its_work_ends_with_slow_tiles(tmp_path, model_path):
    """A tile server trickling a byte a second: run printed its summary and never exited (the
    download threads kept reading). Each slow tile now costs its own record only."""
    from support.servers import TileServer

    tiles = TileServer(content={f"{x}-7-10": png(LAND) for x in range(8)})
    for x in range(4, 8):
        tiles.trickle[f"{x}-7-10"] = 1.0
    (tmp_path / "tiles.txt").write_text("".join(f"{x}-7-10\n" for x in range(8)))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "cnsq.cli", "run", "tiles.txt", "--tile-endpoint",
             tiles.url + "/{z}/{x}/{y}.png", "--model", str(model_path)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TILE_DEADLINE": "2", "RETRIES": "1", "DOWNLOAD_WORKERS": "2"})
        _, err = process.communicate(timeout=90)
    finally:
        tiles.close()
    assert "4 tile(s) failed: tile_deadline" in err, err
    rows = (tmp_path / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 4


@pytest.mark.alone
@pytest.mark.parametrize("sig, after", [(signal.SIGINT, 0.15), (signal.SIGINT, 0.2),
                                        (signal.SIGINT, 0.3), (signal.SIGINT, 1.5),
                                        (signal.SIGINT, 3.0), (signal.SIGTERM, 1.5)])
def test_ctrl_c_or_sigterm_stops_the_demo_at_any_moment(tmp_path, sig, after):
    """Ctrl-C printed `Aborted!` and exit 1 early on, and 7-8 s in it was ignored (exit 0).
    While the program was still importing its modules (0.1-0.3 s, longer on a busy machine)
    Ctrl-C ended it with Python's traceback and the signal's own status (-2), not 130. (Before
    0.1 s the interpreter itself is starting: no code of the program's runs yet.)"""
    process = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "demo", "--dir", "demo"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    if process.poll() is not None:
        pytest.skip("the demo ended before the signal")
    process.send_signal(sig)
    started = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 2.5, err
    assert process.returncode == 130, err
    assert "Interrupted" in err and "Aborted!" not in err and "Traceback" not in err
    assert not (tmp_path / "demo" / "water.geojson").exists()


def test_run_with_concurrency_auto_writes_every_tile(tmp_path, model_path, monkeypatch):
    """The controller decides the calls at once from the server's busy share (its stats path)."""
    monkeypatch.chdir(tmp_path)
    land_tiles(tmp_path, 40)
    running = tileserver.start(tmp_path / "tiles", port=0)
    try:
        result = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint", running.template,
                                           "--model", str(model_path), "--concurrency", "auto"])
        wrong = CliRunner().invoke(main, ["run", "tiles.txt", "--tile-endpoint", running.template,
                                          "--model", str(model_path), "--concurrency", "lots"])
    finally:
        running.close()
    assert result.exit_code == 0, result.output
    assert len(Path("results.csv").read_text().splitlines()) == 41
    assert wrong.exit_code == 2 and "a number of calls or 'auto', got 'lots'" in wrong.stderr


def test_the_model_server_says_how_busy_it_was(server):
    stats = requests.get(server.endpoint.split("/v1/")[0] + "/cnsq/stats", timeout=5).json()
    assert stats["busy_seconds"] == 0 and stats["batch_threads"] >= 1  # warm-up not counted
    requests.post(server.endpoint, json={"instances": [b64(png(WATER))]}, timeout=10)
    stats = requests.get(server.endpoint.split("/v1/")[0] + "/cnsq/stats", timeout=5).json()
    assert stats["busy_seconds"] > 0 and stats["calls"] == 1


def test_ctrl_c_as_soon_as_the_tileserver_says_it_serves_stops_it_cleanly(tmp_path):
    """Its "Serving …" line came before Ctrl-C was handled (see cnsq view's like test)."""
    (tmp_path / "tiles").mkdir()
    for _ in range(4):
        process = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "tileserver",
                                    str(tmp_path / "tiles"), "--port", "0"],
                                   stderr=subprocess.PIPE, text=True)
        assert process.stderr.readline().startswith("Serving ")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
        assert process.returncode == 130 and "Stopped the tile server." in err, err  # as every command
