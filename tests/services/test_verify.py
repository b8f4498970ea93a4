"""cnsq verify: every check passes on a working stack and fails for real when its part breaks."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import psycopg2
import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.results.store import open_store
from support.servers import ModelServer, TileServer, fresh_database


@pytest.fixture
def servers():
    tiles, model = TileServer(), ModelServer()
    yield tiles, model
    tiles.close()
    model.close()


@pytest.fixture
def database(postgres_url):
    return fresh_database(postgres_url, "v")


@pytest.fixture
def deployed(project, servers, database):
    """A stack in moto whose outputs point at real local servers and a real database."""
    tiles, model = servers
    config = Path("config/config.yml")
    config.write_text(config.read_text().replace("https://tiles.test/{}", tiles.url + "/{}"))
    host_port, dbname = database.split("@", 1)[1].split("/")
    host, port = host_port.split(":")
    arn = boto3.client("secretsmanager", region_name="us-east-1").create_secret(
        Name="db", SecretString=json.dumps({"username": "cnsq", "password": "", "host": host,
                                            "port": int(port), "dbname": dbname}))["ARN"]
    template = {
        "Resources": {"cnsqdevTileQueue": {"Type": "AWS::SQS::Queue"},
                      "cnsqdevDeadLetterQueue": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {"queueURL": {"Value": {"Ref": "cnsqdevTileQueue"}},
                    "deadLetterQueueURL": {"Value": {"Ref": "cnsqdevDeadLetterQueue"}},
                    "modelEndpoint": {"Value": f"{model.url}/v1/models/m"},
                    "databaseSecretArn": {"Value": arn}},
    }
    boto3.client("cloudformation", region_name="us-east-1").create_stack(
        StackName="cnsq-dev", TemplateBody=json.dumps(template))
    store = open_store(database)
    store.migrate()
    store.close()
    return tiles, model, database


def verify(*args: str):
    return CliRunner().invoke(main, ["verify", *args], catch_exceptions=False)


def rows(result) -> dict[str, bool]:
    marks = {}
    for line in result.stdout.splitlines():
        for name in ("stack", "tile queue", "dead letter queue", "results table", "model status",
                     "imagery", "prediction"):
            if f" {name} " in f" {line[2:]} " and line[:1] in "✓✗":
                marks.setdefault(name, line.startswith("✓"))
    return marks


def test_everything_passes_on_a_working_stack(deployed):
    tiles, _, _ = deployed
    result = verify("--tile", "1-2-3")
    assert result.exit_code == 0, result.output
    assert all(rows(result).values()) and len(rows(result)) == 7
    assert "All 7 checks passed." in result.stdout
    assert tiles.tokens == ["tok-8JmX-never-print"]  # the token from .env reached the tile URL
    assert "tok-8JmX-never-print" not in result.output


def test_missing_results_table_fails(deployed, database):
    conn = psycopg2.connect(database)
    with conn, conn.cursor() as cur:
        cur.execute("DROP TABLE results")
    conn.close()
    result = verify()
    assert result.exit_code == 1
    assert rows(result)["results table"] is False
    assert "does not exist (run `cnsq setup`)" in result.stdout


def test_model_answering_500_fails(deployed):
    _, model, _ = deployed
    model.mode = "error"
    result = verify()
    assert result.exit_code == 1
    marks = rows(result)
    assert marks["model status"] is False and marks["prediction"] is False
    assert marks["imagery"] is True


def test_tile_404_fails_imagery_and_prediction(deployed):
    tiles, _, _ = deployed
    tiles.missing.add("0-0-0")
    result = verify()
    assert result.exit_code == 1
    marks = rows(result)
    assert marks["imagery"] is False and marks["prediction"] is False
    assert "HTTP 404" in result.stdout


def test_wrong_prediction_count_fails(deployed):
    _, model, _ = deployed
    model.mode = "wrong_count"
    result = verify()
    assert result.exit_code == 1 and rows(result)["prediction"] is False


def test_no_stack_fails_every_stack_check(project, servers):
    result = verify()
    assert result.exit_code == 1
    marks = rows(result)
    assert marks["stack"] is False and marks["tile queue"] is False
    assert "stack cnsq-dev does not exist" in result.stdout


def test_a_local_setup_is_checked_without_a_config_or_aws(servers, database, tmp_path, monkeypatch):
    """With the three targets given, verify needed a config and spent 20 s failing to reach AWS;
    and it sent an empty token where run, work and view fill {token} from TILE_ACCESS_TOKEN."""
    tiles, model = servers
    monkeypatch.chdir(tmp_path)  # no config/config.yml here
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing there: never asked
    monkeypatch.setenv("TILE_ACCESS_TOKEN", "tok-verify-Zq81")
    store = open_store(database)
    store.migrate()
    store.close()
    result = verify("--database-url", database, "--model-endpoint", f"{model.url}/v1/models/m",
                    "--tile-endpoint", tiles.url + "/{z}/{x}/{y}.jpg?access_token={token}",
                    "--tile", "1-2-3")
    assert result.exit_code == 0, result.output
    assert set(rows(result)) == {"results table", "model status", "imagery", "prediction"}
    assert "All 4 checks passed." in result.stdout
    assert "tok-verify-Zq81" in tiles.tokens and "tok-verify-Zq81" not in result.output


def test_a_malformed_tile_is_a_clear_error(servers):
    result = CliRunner().invoke(main, ["verify", "--tile", "1-2"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: --tile 1-2: expected x-y-z")
