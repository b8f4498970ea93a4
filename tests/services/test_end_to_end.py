"""The whole job on AWS APIs: moto queue + DLQ → cnsq push → cnsq work → cnsq serve (ONNX) →
tile server → real PostgreSQL → cnsq download → cnsq convert-geojson."""

from __future__ import annotations

import csv
import io
import json
import time

import boto3
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cnsq.cli import main
from cnsq.local import serve
from cnsq.local.demo_models import water_classifier
from support.servers import TileServer, fresh_database


def png(color) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(sum(color)).normal(0, 8, (256, 256, 3))
    Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_push_work_serve_download_convert(aws, tmp_path, monkeypatch, postgres_url):
    monkeypatch.chdir(tmp_path)
    sqs = boto3.client("sqs", region_name="us-east-1")
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(QueueName="tiles", Attributes={
        "VisibilityTimeout": "1",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})})["QueueUrl"]

    images = {f"{x}-{y}-12": png((38, 82, 156) if (x + y) % 3 == 0 else (96, 118, 62))
              for x in range(100, 106) for y in range(200, 204)}
    tiles = TileServer(content=images)
    broken = "101-201-12"
    tiles.failures[broken] = 10**6  # always 500
    model = water_classifier(tmp_path / "water.onnx")
    server = serve.start(model, port=0, name="water")

    database = fresh_database(postgres_url, "e2e")
    try:
        (tmp_path / "tiles.txt").write_text("".join(f"{t}\n" for t in images))
        runner = CliRunner()
        pushed = runner.invoke(main, ["push", "tiles.txt", queue], catch_exceptions=False)
        assert pushed.exit_code == 0, pushed.output
        worked = runner.invoke(main, [
            "work", "--queue-url", queue, "--database-url", database,
            "--prediction-endpoint", server.endpoint,
            "--tile-endpoint", tiles.url + "/{z}/{x}/{y}.png",
            "--until-empty", "--wait-seconds", "1", "--concurrency", "2",
            "--batch-size", "5"], env={"RETRIES": "1"}, catch_exceptions=False)
        assert worked.exit_code == 0, worked.output
        assert "failed" in worked.stderr
        downloaded = runner.invoke(main, ["download", "results.csv", "--database-url", database])
        assert downloaded.exit_code == 0, downloaded.output
        converted = runner.invoke(main, ["convert-geojson", "results.csv", "water.geojson",
                                         "--thresh_ind", "1", "--thresh", "0.5"])
        assert converted.exit_code == 0, converted.output
    finally:
        server.close()
        tiles.close()

    with open(tmp_path / "results.csv", newline="") as handle:
        rows = {tile: json.loads(output) for tile, output in list(csv.reader(handle))[1:]}
    assert set(rows) == set(images) - {broken}
    local = serve.OnnxModel(model)
    for tile, output in rows.items():  # each row holds the model's output for that tile's image
        import base64

        array = local.decode({"b64": base64.b64encode(images[tile]).decode()}, 0)
        assert np.allclose(output, local.predict(array[None])[0], atol=1e-6)
    water = {f["properties"]["tile"] for f in json.loads((tmp_path / "water.geojson").read_text())["features"]}
    assert water == {t for t in rows if (int(t.split("-")[0]) + int(t.split("-")[1])) % 3 == 0}

    parked = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10).get("Messages", [])
    assert [json.loads(m["Body"]) for m in parked] == [{"x": 101, "y": 201, "z": 12}]
    left = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert left["ApproximateNumberOfMessages"] == "0" and left["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_a_poller_that_fails_stops_loudly_and_its_messages_return(aws):
    """`cnsq work` lost both pollers to a crash and exited 0; now each error is in the report
    (the command exits 1 on it) and the messages the poller held are not deleted."""
    from cnsq.local.worker import work

    sqs = boto3.client("sqs", region_name="us-east-1")
    queue = sqs.create_queue(QueueName="tiles", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody='{"x": 1, "y": 1, "z": 1}')

    class Crashing:
        def process(self, event):
            raise RuntimeError("the database is unreachable")

    report = work(sqs, queue, Crashing(), concurrency=2, wait_seconds=1, until_empty=True)
    assert len(report.errors) == 2 and report.errors[0].startswith("RuntimeError: ")
    assert report.succeeded == 0
    left = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert int(left["ApproximateNumberOfMessages"]) + int(left["ApproximateNumberOfMessagesNotVisible"]) == 1


@pytest.mark.alone
def test_ctrl_c_stops_work_within_two_seconds(aws, tmp_path):
    """Its pollers sat in 20-second long polls: Ctrl-C took 17 s to take effect."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sqs = boto3.client("sqs", region_name="us-east-1")
    queue = sqs.create_queue(QueueName="idle")["QueueUrl"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cnsq.cli", "work", "--queue-url", queue, "--prediction-endpoint",
         "http://127.0.0.1:9/v1/models/m:predict", "--tile-endpoint", "http://127.0.0.1:9/{z}/{x}/{y}",
         "--database-url", f"sqlite:///{tmp_path}/r.db", "--wait-seconds", "20"],
        env={**os.environ, "AWS_ENDPOINT_URL": aws}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # in its long polls
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 4
    assert process.returncode == 130 and "Interrupted" in err and "Traceback" not in err


@pytest.mark.alone
def test_work_takes_the_stacks_queue_model_and_tiles_from_the_config(project, tmp_path, postgres_url):
    """With --config, work reads what the stack and its config say: the tile queue and the model
    endpoint (outputs), the tile endpoint and its token and the batch size (the config)."""
    import os

    sqs = boto3.client("sqs", region_name="us-east-1")
    queue = sqs.create_queue(QueueName="cnsqdevTileQueue")["QueueUrl"]
    images = {f"{x}-200-12": png((38, 82, 156)) for x in range(100, 104)}
    tiles = TileServer(content=images)
    server = serve.start(water_classifier(tmp_path / "water.onnx"), port=0, name="water")
    try:
        model_endpoint = server.endpoint.removesuffix(":predict")
        template = {"Resources": {"Q": {"Type": "AWS::SQS::Queue"}},
                    "Outputs": {"queueURL": {"Value": queue}, "modelEndpoint": {"Value": model_endpoint}}}
        boto3.client("cloudformation", region_name="us-east-1").create_stack(
            StackName="cnsq-dev", TemplateBody=json.dumps(template))
        config = "config/config.yml"
        text = open(config).read()
        start = text.index("TILE_ENDPOINT:")
        end = text.index("\n", start)
        with open(config, "w") as handle:
            handle.write(text[:start] + f"TILE_ENDPOINT: '{tiles.url}/{{z}}/{{x}}/{{y}}.png?access_token={{token}}'"
                         + text[end:])
        for tile in images:
            x, y, z = tile.split("-")
            sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"x": int(x), "y": int(y), "z": int(z)}))
        database = fresh_database(postgres_url, "work")
        env = {k: v for k, v in os.environ.items() if k not in ("TILE_ACCESS_TOKEN", "TILE_ENDPOINT")}
        started = time.monotonic()
        # The default long poll (20 s): --until-empty idled through the last one at the end.
        worked = CliRunner(env=env).invoke(main, ["work", "--config", config, "--database-url", database,
                                                  "--until-empty"], catch_exceptions=False)
        elapsed = time.monotonic() - started
    finally:
        server.close()
        tiles.close()
    assert worked.exit_code == 0, worked.output
    assert "Received 4 records: 4 succeeded" in worked.stderr
    assert elapsed < 10, f"{elapsed:.1f}s: waited for a last long poll"
    assert set(tiles.tokens) == {"tok-8JmX-never-print"}  # the config's token, from its .env
    assert "tok-8JmX-never-print" not in worked.output


@pytest.mark.slow  # 30 s: 600 tiles through moto's SQS with a slow tile server
@pytest.mark.alone  # its concurrency decisions read its own timings: nothing beside it
def test_work_decides_its_concurrency_by_default(aws, postgres_url, tmp_path, monkeypatch):
    """cnsq work without --concurrency: the controller's rules over its own measurements raise
    the pollers from 4 while the model is idle and calls are short; every tile is written."""
    monkeypatch.chdir(tmp_path)
    sqs = boto3.client("sqs", region_name="us-east-1")
    queue = sqs.create_queue(QueueName="auto", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    ids = [f"{x}-{y}-12" for x in range(100, 130) for y in range(200, 220)]  # 600 tiles
    tiles = TileServer(content={t: png((38, 82, 156)) for t in ids}, delay=0.1)
    server = serve.start(water_classifier(tmp_path / "water.onnx"), port=0, name="water")
    database = fresh_database(postgres_url, "auto")
    try:
        (tmp_path / "tiles.txt").write_text("".join(f"{t}\n" for t in ids))
        runner = CliRunner()
        assert runner.invoke(main, ["push", "tiles.txt", queue]).exit_code == 0
        worked = runner.invoke(main, [
            "work", "--queue-url", queue, "--database-url", database,
            "--prediction-endpoint", server.endpoint,
            "--tile-endpoint", tiles.url + "/{z}/{x}/{y}.png",
            "--until-empty", "--wait-seconds", "1"], catch_exceptions=False)
        assert worked.exit_code == 0, worked.output
        assert "succeeded, 0 failed." in worked.stderr  # (SQS may deliver a message twice)
        assert "concurrency: raised concurrency 4 → " in worked.stderr, worked.stderr
        from cnsq.results.store import open_store

        store = open_store(database)
        assert store.count() == 600
        store.close()
    finally:
        server.close()
        tiles.close()
