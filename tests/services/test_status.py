"""cnsq status against moto: real queues, CloudWatch data for each of the README's scenarios."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.ops.status import Metrics, diagnose
from support.accounts import client


def put(namespace: str, name: str, dims: dict, values: list[float]) -> None:
    when = datetime.now(UTC) - timedelta(minutes=2)
    client("cloudwatch").put_metric_data(Namespace=namespace, MetricData=[
        {"MetricName": name, "Dimensions": [{"Name": k, "Value": v} for k, v in dims.items()],
         "Value": value, "Timestamp": when} for value in values])


def lambda_metrics(invocations: int, errors: int, duration_ms: float) -> None:
    fn = {"FunctionName": "cnsq-dev-DownloadAndPredict"}
    put("AWS/Lambda", "Invocations", fn, [invocations])
    put("AWS/Lambda", "Errors", fn, [errors])
    put("AWS/Lambda", "Duration", fn, [duration_ms * 0.5, duration_ms])
    put("AWS/Lambda", "ConcurrentExecutions", fn, [5])


def gpu(*values: float) -> None:
    for i, value in enumerate(values):
        put("cnsq/cnsq-dev", "nvidia_smi_utilization_gpu", {"InstanceId": f"i-{i:017d}"}, [value])


@pytest.fixture
def deployed(project):
    assert CliRunner().invoke(main, ["deploy"]).exit_code == 0
    sqs = client("sqs")
    tiles = next(u for u in sqs.list_queues()["QueueUrls"] if "TileQueue" in u)
    for start in range(0, 30, 10):
        sqs.send_message_batch(QueueUrl=tiles, Entries=[
            {"Id": str(i), "MessageBody": json.dumps({"x": start + i, "y": 0, "z": 9})} for i in range(10)])
    put("AWS/SQS", "NumberOfMessagesDeleted", {"QueueName": tiles.rsplit("/", 1)[-1]}, [90])
    return tiles


def visible(url: str) -> int:
    # moto's event source mapping may take some messages itself: read the real depth.
    attrs = client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def status_json() -> dict:
    result = CliRunner().invoke(main, ["status", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("scenario, setup, advice", [
    (1, lambda: (lambda_metrics(100, 20, 115_000), gpu(99, 97)),
     "lower lambdas.DownloadAndPredict.concurrent to 5, or raise ecs.desiredInstances to 2"),
    (2, lambda: (lambda_metrics(100, 2, 70_000), gpu(95, 91)),
     "lower lambdas.DownloadAndPredict.concurrent to 8, or raise ecs.desiredInstances to 2"),
    (3, lambda: (lambda_metrics(100, 0, 20_000), gpu(30, 20)),
     "raise lambdas.DownloadAndPredict.concurrent to 20"),
    (4, lambda: (lambda_metrics(100, 0, 20_000), gpu(92, 88)), "keep these settings"),
])
def test_each_scenario_is_diagnosed(deployed, scenario, setup, advice):
    setup()
    report = status_json()
    diagnosis, metrics = report["diagnosis"], report["metrics"]
    assert diagnosis["scenario"] == scenario
    assert advice in diagnosis["recommendation"]
    depth = visible(deployed)
    dlq = next(u for u in client("sqs").list_queues()["QueueUrls"] if "DeadLetter" in u)
    assert metrics["visible"] == depth and metrics["dead_letter"] == visible(dlq)  # real queues
    assert metrics["invocations"] == 100
    assert len(metrics["gpu"]) == 2
    assert diagnosis["eta_seconds"] == pytest.approx(depth / (90 / 900))


def test_missing_gpu_metrics_are_said_not_zeroed(deployed):
    lambda_metrics(100, 0, 20_000)
    report = status_json()
    assert report["diagnosis"]["scenario"] == 0
    assert "GPU utilisation" in report["diagnosis"]["title"]
    assert report["metrics"]["gpu"] == {} and report["metrics"]["requests"] is None
    screen = CliRunner().invoke(main, ["status"], catch_exceptions=False).stdout
    assert "GPU utilisation" in screen and "missing" in screen
    assert "Recommendation:" in screen


def test_idle_stack(deployed):
    report = status_json()
    assert report["diagnosis"]["scenario"] == 0
    depth = visible(deployed)
    advice = f"{depth:,} tiles wait in the queue" if depth else "nothing to do"
    assert advice in report["diagnosis"]["recommendation"]


def test_no_stack(project):
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_diagnosis_uses_p95_when_cloudwatch_has_it():
    metrics = Metrics(900, visible=0, invocations=100, errors=0, duration_p95_ms=100_000,
                      duration_max_ms=119_000, gpu={"i-1": 95})
    assert diagnose(metrics, 120, 10, 2).scenario == 2
    assert "duration p95 (using the maximum)" not in diagnose(metrics, 120, 10, 2).missing


def test_results_rows_are_counted_when_the_database_is_reachable(deployed, tmp_path):
    from cnsq.results.store import open_store

    url = f"sqlite:///{tmp_path}/results.db"
    store = open_store(url)
    store.migrate()
    store.upsert([(f"{i}-0-9", [0.1, 0.9]) for i in range(7)])
    store.close()
    result = CliRunner().invoke(main, ["status", "--json", "--database-url", url],
                                catch_exceptions=False)
    assert json.loads(result.stdout)["metrics"]["rows"] == 7
    # Without a reachable database (moto reports no stack outputs) the count is missing.
    assert status_json()["metrics"]["rows"] is None


def test_a_scaling_stack_shows_its_controllers_decisions_and_the_windows_cost(deployed):
    client("ssm").put_parameter(Name="/cnsq/cnsq-dev/controller", Type="String", Overwrite=True,
                                Value=json.dumps({"decisions": [
                                    ["2026-12-02T03:00:00+00:00", "model tasks 0 → 1: 30 tiles waiting: 1 model tasks (up to 1)"],
                                    ["2026-12-02T03:06:00+00:00", "raised concurrency 20 → 30: model 41 % busy, p95 6.0 s of 120 s, errors 0%"]]}))
    lambda_metrics(100, 0, 20_000)
    gpu(92, 88)
    screen = CliRunner().invoke(main, ["status", "--since", "1h"], catch_exceptions=False).stdout
    assert "This stack scales itself" in screen
    assert "  2026-12-02T03:06:00+00:00  raised concurrency 20 → 30: model 41 % busy" in screen
    # The window's cost from what it measured: Lambda 30 s (20 + 10 s of Duration) of the
    # example's 128 MB on arm64, at arm64's price, …
    report = status_json()
    cost = report["metrics"]["cost"]
    assert cost["Lambda compute (arm64)"] == pytest.approx(30.0 * 0.125 * 0.0000133334)
    assert cost["Lambda requests (arm64)"] == pytest.approx(100 * 0.0000002)
    assert cost["NAT data processed"] == pytest.approx(90 * 40 / 1e6 * 0.045)
    assert "cost per million tiles (window)" in screen
    assert "Prices: the prices shipped with cnsq" in screen  # moto has no Price List API
