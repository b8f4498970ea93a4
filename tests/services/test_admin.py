"""The admin function: migrations and CSV exports of the private database, run inside the VPC.

The handler runs here as the Lambda runtime would run it (called directly, with its environment),
against the throwaway PostgreSQL cluster and moto's S3. The invocation from cnsq is tested with
botocore's Stubber (moto cannot run a Lambda without Docker) and, for the failure path, against
moto itself.
"""

from __future__ import annotations

import csv
import io
import json

import boto3
import psycopg2
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.deploy.apply import migrate
from cnsq.errors import CnsqError
from cnsq.stack.admin import AdminFunction, AdminUnavailable
from download_and_predict import admin
from support.servers import fresh_database


@pytest.fixture
def pg_url(postgres_url):
    return fresh_database(postgres_url, "a")


def env_for(url: str) -> dict[str, str]:
    return {"DATABASE_URL": url, "EXPORT_BUCKET": "cnsq-artifacts", "EXPORT_PREFIX": "cnsq-dev/exports/"}


def test_migrate_count_and_export_through_the_handler(aws, pg_url):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="cnsq-artifacts")
    env = env_for(pg_url)
    assert admin.run({"action": "count"}, env)["problems"] == [
        "table 'results' does not exist (run `cnsq setup`)"]
    first = admin.run({"action": "migrate"}, env)
    assert first == {"applied": ["1 (create results)", "2 (adopt a table the original created)"],
                     "problems": []}
    assert admin.run({"action": "migrate"}, env)["applied"] == []  # twice is harmless
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO results VALUES ('1-2-3', '[0.1, 0.9]'), ('4-5-6', '{\"a\": \"x,y\"}')")
    assert admin.run({"action": "count"}, env) == {"rows": 2, "problems": []}
    export = admin.run({"action": "export"}, env, s3)
    assert export["bucket"] == "cnsq-artifacts" and export["rows"] == 2
    assert export["key"].startswith("cnsq-dev/exports/results-") and export["key"].endswith(".csv")
    body = s3.get_object(Bucket="cnsq-artifacts", Key=export["key"])["Body"].read().decode()
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == ["tile", "output"]
    assert sorted(rows[1:]) == [["1-2-3", "[0.1, 0.9]"], ["4-5-6", '{"a": "x,y"}']]
    assert export["bytes"] == len(body.encode())


def test_handler_errors_come_back_as_one_masked_line(monkeypatch, pg_url):
    assert admin.handler({"action": "drop"}) == {
        "error": "unknown action 'drop'; expected one of migrate, count, export"}
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw-Zq81-never-print@127.0.0.1:9/ResultsDB")
    answer = admin.handler({"action": "migrate"})
    assert answer["error"].startswith("OperationalError: ") and "pw-Zq81" not in json.dumps(answer)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    assert admin.handler({"action": "export"}) == {
        "error": "table 'results' does not exist (run `cnsq setup`)"}


def stubbed(answer: dict | bytes, function_error: str | None = None):
    client = boto3.client("lambda", region_name="us-east-1")
    stub = Stubber(client)
    payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    response = {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(payload), len(payload))}
    if function_error:
        response["FunctionError"] = function_error
    stub.add_response("invoke", response, {"FunctionName": "cnsq-dev-admin",
                                           "InvocationType": "RequestResponse",
                                           "Payload": b'{"action": "migrate"}'})
    stub.activate()
    return client


def test_the_invocation_returns_the_answer_or_says_what_failed():
    assert AdminFunction("cnsq-dev-admin", stubbed({"applied": []})).call("migrate") == {"applied": []}
    with pytest.raises(CnsqError, match=r"the admin function cnsq-dev-admin: table 'results'"):
        AdminFunction("cnsq-dev-admin", stubbed({"error": "table 'results' x"})).call("migrate")
    with pytest.raises(AdminUnavailable, match=r"failed: Task timed out after 900.00 seconds"):
        AdminFunction("cnsq-dev-admin", stubbed(
            {"errorMessage": "Task timed out after 900.00 seconds"}, "Unhandled")).call("migrate")
    client = boto3.client("lambda", region_name="us-east-1")
    stub = Stubber(client)
    stub.add_client_error("invoke", "AccessDeniedException", "not authorized to invoke")
    stub.activate()
    with pytest.raises(AdminUnavailable, match=r"cannot invoke the admin function .*not authorized"):
        AdminFunction("cnsq-dev-admin", client).call("migrate")


class Recorder:
    def __init__(self):
        self.lines: list[str] = []

    def echo(self, text: str = "", err: bool = False) -> None:
        self.lines.append(text)


class FakeAws:
    """Hands out the stubbed Lambda client, as cnsq.aws.Aws.client would."""

    def __init__(self, lambda_client):
        self.lambda_client = lambda_client

    def client(self, service: str, **config):
        return self.lambda_client if service == "lambda" else boto3.client(service, region_name="us-east-1")


def test_deploy_applies_the_migrations_or_says_how_to(aws):
    ui = Recorder()
    outputs = {"adminFunctionName": "cnsq-dev-admin"}
    assert migrate(FakeAws(stubbed({"applied": ["1 (create results)"], "problems": []})), outputs,
                   ui, "cnsq setup --config c.yml --stack s") is True
    assert ui.lines == ["Results table ready (migrations applied: 1 (create results))."]
    ui = Recorder()
    assert migrate(FakeAws(stubbed(b"error running docker", "Handled")), outputs, ui,
                   "cnsq setup --config c.yml --stack s") is False
    assert "migrations were not applied" in ui.lines[0]
    assert "Apply them once the function can run: cnsq setup --config c.yml --stack s" in ui.lines[0]
    assert migrate(FakeAws(None), {}, Recorder(), "x") is False  # a stack without the function


def test_setup_on_moto_says_the_function_could_not_run(project):
    """moto has no Lambda runtime without Docker: the error says so, in one line."""
    template = {"Resources": {"Q": {"Type": "AWS::SQS::Queue"}},
                "Outputs": {"adminFunctionName": {"Value": "cnsq-dev-admin"}}}
    boto3.client("cloudformation", region_name="us-east-1").create_stack(
        StackName="cnsq-dev", TemplateBody=json.dumps(template))
    result = CliRunner().invoke(main, ["setup", "--config", "config/config.yml"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot invoke the admin function cnsq-dev-admin") or \
        result.stderr.startswith("Error: the admin function cnsq-dev-admin failed")
    assert "Traceback" not in result.output


def test_download_copies_the_export_beside_the_target(aws, tmp_path):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="cnsq-artifacts")
    s3.put_object(Bucket="cnsq-artifacts", Key="cnsq-dev/exports/r.csv", Body=b"tile,output\n1-2-3,[1]\n")
    client = boto3.client("lambda", region_name="us-east-1")
    stub = Stubber(client)
    answer = json.dumps({"bucket": "cnsq-artifacts", "key": "cnsq-dev/exports/r.csv", "rows": 1,
                         "bytes": 22}).encode()
    stub.add_response("invoke", {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(answer), len(answer))})
    stub.activate()
    seen: list[int] = []
    target = tmp_path / "results.csv"
    export = AdminFunction("cnsq-dev-admin", client, s3).download_export(str(target), seen.append)
    assert export["rows"] == 1 and target.read_bytes() == b"tile,output\n1-2-3,[1]\n"
    assert seen and seen[-1] == len(b"tile,output\n1-2-3,[1]\n")
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no partial file left
