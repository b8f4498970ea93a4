"""What AWS enforces, enforced here: each Lambda's code runs with credentials holding exactly the
policy its role has in the deployed template, against moto with IAM checks on, and through a
front (aws_rules.AwsRules) that keeps AWS's limits where moto does not (a parameter's 4 KB, a
mapping busy with a deploy)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnsq.cli import main
from download_and_predict.control import STATE_LIMIT, Controller, State, Where
from support.aws_rules import (
    AwsRules,
    admin_credentials,
    controller_environment,
    credentials_for_role,
    iam_enforced,
    role_of_function,
    signed_client,
)

SERVICES = ("ssm", "sqs", "elbv2", "ecs", "lambda", "cloudwatch", "autoscaling")


def deploy_scaling(max_instances: int = 1) -> None:
    config = Path("config/config.yml")
    text = config.read_text()
    assert "    minInstances: 0\n" in text  # the example scales itself
    config.write_text(text.replace("    maxInstances: 1\n", f"    maxInstances: {max_instances}\n"))
    result = CliRunner().invoke(main, ["deploy"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


class World:
    """A deployed scaling stack; its controller as the stack runs it (its role's credentials,
    through AWS's rules) and an administrator's clients for the test's own moves."""

    def __init__(self, moto_url: str, max_tasks: int = 1):
        self.env = controller_environment(max_tasks=max_tasks)
        self.where = Where.from_environment(self.env)
        self.rules = AwsRules(moto_url)
        # Each function's role, as credentials (made before IAM is enforced).
        self.keys = {fn: credentials_for_role(role_of_function(fn)) for fn in (
            "cnsq-dev-controller", "cnsq-dev-DownloadAndPredict", "cnsq-dev-admin")}
        keys = self.keys["cnsq-dev-controller"]
        self.admin_keys = admin_credentials()
        self.moto_url = moto_url
        self.now = datetime.now(UTC).timestamp()
        clients = {name: signed_client(name, self.rules.url, keys) for name in SERVICES}
        self.controller = Controller(self.where, clients, clock=lambda: self.now)

    def admin(self, service: str):
        return signed_client(service, self.moto_url, self.admin_keys)

    def state(self) -> dict:
        return json.loads(self.admin("ssm").get_parameter(
            Name=self.where.state_parameter)["Parameter"]["Value"])

    def mapping(self) -> dict:
        return self.admin("lambda").get_event_source_mapping(UUID=self.where.mapping_id)

    def desired_tasks(self) -> int:
        return self.admin("ecs").describe_services(
            cluster=self.where.cluster, services=[self.where.service])["services"][0]["desiredCount"]

    def group_desired(self) -> int:
        return self.admin("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[self.where.group])["AutoScalingGroups"][0]["DesiredCapacity"]

    def tiles(self, count: int) -> None:
        sqs = self.admin("sqs")
        for start in range(0, count, 10):
            sqs.send_message_batch(QueueUrl=self.where.queue_url, Entries=[
                {"Id": str(i), "MessageBody": json.dumps({"x": i, "y": 1, "z": 5})}
                for i in range(start, min(count, start + 10))])

    def healthy_target(self) -> None:
        ec2 = self.admin("ec2")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0][
            "InstanceId"]
        self.admin("elbv2").register_targets(TargetGroupArn=self.where.target_group,
                                             Targets=[{"Id": instance, "Port": 8501}])

    def metrics(self, **values: float) -> None:
        """A minute's metrics, as the worker, SQS, the agent and the handler publish them."""
        stamp = datetime.fromtimestamp(self.now - 60, UTC)
        fn = [{"Name": "FunctionName", "Value": self.where.function_name}]
        cloudwatch = self.admin("cloudwatch")
        # No Duration: moto cannot compute a percentile in GetMetricData (it answers 500);
        # test_odd_metrics_are_missing_data reads p95 values through botocore's Stubber.
        lambda_names = {"calls": "Invocations", "errors": "Errors", "throttles": "Throttles"}
        data = [{"MetricName": lambda_names[k], "Dimensions": fn, "Timestamp": stamp, "Value": v}
                for k, v in values.items() if k in lambda_names]
        if data:
            cloudwatch.put_metric_data(Namespace="AWS/Lambda", MetricData=data)
        ours = [{"MetricName": name, "Dimensions": fn, "Timestamp": stamp, "Value": values[k]}
                for k, name in (("ok", "RecordsSucceeded"), ("failed", "RecordsFailed"))
                if k in values]
        if "gpu" in values:
            ours.append({"MetricName": "nvidia_smi_utilization_gpu", "Timestamp": stamp,
                         "Value": values["gpu"], "Dimensions": [
                             {"Name": "AutoScalingGroupName", "Value": self.where.group}]})
        if ours:
            cloudwatch.put_metric_data(Namespace=self.where.gpu_namespace, MetricData=ours)
        if "deleted" in values:
            queue = self.where.queue_url.rsplit("/", 1)[-1]
            cloudwatch.put_metric_data(Namespace="AWS/SQS", MetricData=[
                {"MetricName": "NumberOfMessagesDeleted", "Timestamp": stamp,
                 "Dimensions": [{"Name": "QueueName", "Value": queue}],
                 "Value": values["deleted"]}])

    def close(self) -> None:
        self.rules.close()


@pytest.fixture
def world(project, moto_url):
    deploy_scaling()
    w = World(moto_url)
    with iam_enforced(moto_url):
        yield w
    w.close()


@pytest.fixture
def world4(project, moto_url):
    deploy_scaling(max_instances=4)
    w = World(moto_url, max_tasks=4)
    with iam_enforced(moto_url):
        yield w
    w.close()


def test_the_controller_runs_under_its_compiled_role(world):
    """Every call the controller makes is one its role allows (moto's IAM checks on): on AWS a
    missing permission refuses every run, the mapping stays disabled and no host ever starts."""
    w = world
    assert w.mapping()["ScalingConfig"]["MaximumConcurrency"] == 10
    w.tiles(30)
    lines = w.controller.step()
    assert lines == ["model tasks 0 → 1: 30 tiles waiting: 1 model tasks (up to 1)"]
    assert w.desired_tasks() == 1
    assert w.group_desired() == 0  # ECS's managed scaling sizes the group, not the controller
    assert w.mapping()["State"] == "Disabled"

    w.healthy_target()
    w.metrics(calls=40, errors=0, gpu=41, ok=400, failed=0, deleted=400)
    w.now += 60
    lines = w.controller.step()
    assert lines == ["resumed receiving at concurrency 10: a model answers"], lines
    assert w.mapping()["State"] == "Enabled"
    assert w.mapping()["ScalingConfig"]["MaximumConcurrency"] == 10
    # CloudWatch's minutes come late: the window describes the resumed calls from the third.
    for _ in range(2):
        w.metrics(calls=40, errors=0, gpu=41, ok=400, failed=0, deleted=400)
        w.now += 60
        assert w.controller.step() == []
    w.metrics(calls=40, errors=0, gpu=41, ok=400, failed=0, deleted=400)
    w.now += 60
    [line] = w.controller.step()
    assert line.startswith("raised concurrency 10 → 15: probing: model 41 % busy"), line
    assert w.mapping()["ScalingConfig"]["MaximumConcurrency"] == 15

    # A deploy resets the mapping to the template's start: the controller re-applies its own.
    w.admin("lambda").update_event_source_mapping(UUID=w.where.mapping_id,
                                                  ScalingConfig={"MaximumConcurrency": 10})
    w.now += 60
    assert w.controller.step()[0] == "re-applied concurrency 15 (a deploy set 10)"

    # The queue empties: after idleMinutes the tasks go to the minimum.
    w.admin("sqs").purge_queue(QueueUrl=w.where.queue_url)
    w.controller.step()
    w.now += 15 * 60
    assert "model tasks 1 → 0: idle 15 min: down to the minimum, 0 model tasks" in w.controller.step()
    assert w.desired_tasks() == 0
    assert w.rules.refused == []


def test_a_push_starts_the_controller_at_once_and_it_resumes_as_a_model_answers(
        project, moto_url, monkeypatch, tmp_path):
    """`cnsq push` invokes the controller asynchronously as the queue takes its first tiles,
    saying how many (AWS answers 202: the event is queued). That invocation, under the
    controller's compiled role, starts the model tasks at once, then looks at the target group
    every RECHECK seconds and resumes receiving as a target turns healthy, within its budget."""
    from download_and_predict.control import BUDGET, RECHECK, pushed_tiles

    deploy_scaling()
    w = World(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", w.rules.url)
    tiles = tmp_path / "tiles.txt"
    tiles.write_text("".join(f"{x}-1-5\n" for x in range(25)))
    result = CliRunner().invoke(main, ["push", str(tiles)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    [(function, event)] = w.rules.events
    assert function == "cnsq-dev-controller"
    assert event["cnsq"] == "pushed" and event["tiles"] == 25
    w.now = event["at"] + 2
    assert pushed_tiles(event, w.now) == 25
    assert pushed_tiles(event, w.now + 600) == 0  # a throttled event retried later says nothing
    assert pushed_tiles({"source": "aws.events"}, w.now) == 0  # the schedule's

    with iam_enforced(moto_url):
        run = w.controller.run(pushed=pushed_tiles(event, w.now))
        assert next(run) == RECHECK
        assert w.controller.lines == ["model tasks 0 → 1: 25 tiles waiting: 1 model tasks (up to 1)"]
        assert w.desired_tasks() == 1 and w.mapping()["State"] == "Disabled"
        w.now += RECHECK
        assert next(run) == RECHECK  # no target healthy yet: another look
        w.healthy_target()
        w.now += RECHECK
        assert list(run) == []  # the look found it: a step, and the invocation ends
        assert w.controller.lines[-1] == "resumed receiving at concurrency 10: a model answers"
        assert w.mapping()["State"] == "Enabled"
        # With no model coming, an invocation looks until its budget, then ends.
        w.admin("lambda").update_event_source_mapping(UUID=w.where.mapping_id, Enabled=False)
        w.admin("elbv2").deregister_targets(TargetGroupArn=w.where.target_group, Targets=[
            {"Id": t["Target"]["Id"], "Port": 8501} for t in w.admin("elbv2").describe_target_health(
                TargetGroupArn=w.where.target_group)["TargetHealthDescriptions"]])
        looks = 0
        for wait in w.controller.run():
            looks += 1
            w.now += wait
        assert looks == BUDGET // RECHECK
        assert w.rules.refused == []
    w.close()


def test_idle_at_the_minimum_the_controller_ends_hosts_without_tasks_at_once(world):
    """ECS's managed scaling ends an emptied host after 15 minutes; the controller ends it the
    minute the stack is idle at its minimum (drained, unprotected, terminated with the group's
    desired capacity lowered), under its compiled role."""
    w = world
    group = w.admin("autoscaling")
    group.set_desired_capacity(AutoScalingGroupName=w.where.group, DesiredCapacity=1)
    [instance] = [i["InstanceId"] for i in group.describe_auto_scaling_groups(
        AutoScalingGroupNames=[w.where.group])["AutoScalingGroups"][0]["Instances"]]
    w.admin("ecs").register_container_instance(
        cluster=w.where.cluster, instanceIdentityDocument=json.dumps({"instanceId": instance}))
    w.controller.step()  # no work: the idle clock starts
    w.now += 15 * 60
    lines = w.controller.step()
    assert f"ended 1 idle host(s) ({instance}) now, not after ECS's 15-minute scale-in" in lines
    assert w.group_desired() == 0
    [found] = w.admin("ecs").describe_container_instances(
        cluster=w.where.cluster, containerInstances=w.admin("ecs").list_container_instances(
            cluster=w.where.cluster)["containerInstanceArns"])["containerInstances"]
    assert found["status"] == "DRAINING"
    assert w.rules.refused == []
    assert w.controller.step() == []  # nothing left to end: no line, no call refused


def test_the_state_stays_within_a_standard_parameter(world):
    """30 decisions with arrows reached 4,122-4,657 characters, and AWS refuses a Standard
    parameter over 4,096: the save failed after the actions were applied. The state is bounded
    by size; the newest decisions are kept."""
    w = world
    long_line = "lowered concurrency 30 → 20: " + "→" * 120
    old = [[f"2026-12-06T00:{i:02d}:00+00:00", f"{long_line} {i}"] for i in range(30)]
    # As an older cnsq left it (written straight to moto, which keeps no limit).
    w.admin("ssm").put_parameter(Name=w.where.state_parameter, Type="String", Overwrite=True,
                                 Value=json.dumps({"concurrency": 10, "decisions": old}))
    w.tiles(5)
    lines = w.controller.step()
    assert lines == ["model tasks 0 → 1: 5 tiles waiting: 1 model tasks (up to 1)"]
    text = w.admin("ssm").get_parameter(Name=w.where.state_parameter)["Parameter"]["Value"]
    assert len(text.encode()) <= STATE_LIMIT
    kept = json.loads(text)["decisions"]
    assert kept[-1][1] == lines[0] and kept[-2][1].endswith(" 29") and len(kept) < 30
    assert w.rules.refused == []


def test_a_failed_save_applies_nothing_and_keeps_the_idle_clock(world):
    w = world
    w.controller.step()  # no work: the idle clock starts
    started = w.state()["idle_since"]
    assert started == pytest.approx(w.now)
    w.tiles(10)
    w.rules.SSM_LIMIT = 10  # every save refused from here
    w.now += 60
    with pytest.raises(Exception, match="4096 characters"):
        w.controller.step()
    assert w.desired_tasks() == 0  # nothing applied that the next minute would revert
    assert w.state()["idle_since"] == started


def test_a_mapping_busy_with_a_deploy_waits_a_minute(world):
    w = world
    w.tiles(10)
    w.controller.step()
    w.healthy_target()
    w.metrics(calls=40, errors=0, gpu=41, ok=400, deleted=400)
    w.rules.busy_mappings.add(w.where.mapping_id)
    w.now += 60
    lines = w.controller.step()
    assert lines[-1] == "the mapping is being updated (a deploy?): its change waits a minute"
    assert w.mapping()["State"] == "Disabled"
    assert w.state()["concurrency"] == 10  # what is applied: the decision waits
    w.rules.busy_mappings.clear()
    w.now += 60
    lines = w.controller.step()
    assert w.mapping()["State"] == "Enabled", lines


def test_failed_records_are_failures_no_host_is_added_while_nothing_succeeds(world4):
    """An expired imagery token: every record fails as a batch item failure, the invocations
    succeed (Errors 0) and no message is deleted. Nothing is raised: not the tasks, not the
    concurrency."""
    w = world4
    w.tiles(200)
    w.controller.step()
    assert w.desired_tasks() == 1
    w.healthy_target()
    for _ in range(4):
        w.metrics(calls=40, errors=0, gpu=5, ok=0, failed=400, deleted=0)
        w.now += 60
        lines = w.controller.step()
        assert w.desired_tasks() == 1, lines
        concurrency = w.mapping()["ScalingConfig"]["MaximumConcurrency"]
        assert concurrency <= 10, lines
    assert w.mapping()["ScalingConfig"]["MaximumConcurrency"] == 2  # halved, to the floor


def test_throttled_calls_are_failures(world):
    """An account whose concurrency runs out throttles the worker: those calls count against
    the concurrency, which is lowered, not raised."""
    w = world
    w.tiles(10)
    w.controller.step()
    w.healthy_target()
    w.metrics(calls=40, errors=0, throttles=60, gpu=30, ok=400, deleted=400)
    w.now += 60
    w.controller.step()
    assert w.mapping()["ScalingConfig"]["MaximumConcurrency"] < 10


def test_the_gpu_metric_of_a_new_host_is_read_at_once(world):
    """One metric named by the group, read through GetMetricData: a host whose per-instance
    metric ListMetrics does not show yet still counts."""
    w = world
    w.tiles(10)
    w.controller.step()
    w.healthy_target()
    for _ in range(4):  # the resume, then three minutes until the window describes it
        w.metrics(calls=40, errors=0, gpu=30, ok=400, deleted=400)
        w.now += 60
        w.controller.step()
    # 30 % busy: ×1.5 (GPUs unread, the step would be ×1.25: 13).
    assert w.mapping()["ScalingConfig"]["MaximumConcurrency"] == 15


# -- the state, read as another version of cnsq may have written it ---------------------------

@pytest.mark.parametrize("text, expected", [
    ('{"concurrency": 10, "future_key": 1}', {"concurrency": 10}),
    ('{"decisions": null}', {"decisions": []}),
    ('{"concurrency": "10"}', {"concurrency": None}),
    ('{"concurrency": 1e400}', {"concurrency": None}),
    ('{"idle_since": 1e400}', {"idle_since": None}),
    ('{"idle_since": NaN}', {"idle_since": None}),
    ('{"idle_since": -Infinity}', {"idle_since": None}),
    ('{"probe": {"concurrency": 8, "throughput": 3.5, "hold": 0, "newer": true}}',
     {"probe": {"concurrency": 8, "throughput": 3.5, "hold": 0}}),
    ('{"probe": {"concurrency": 8}}', {"probe": None}),
    ('{"probe": {"concurrency": 8, "throughput": 1e400}}', {"probe": None}),
    ('{"healthy_before": -3, "decisions": [["t", "line"], ["bad"], 5]}',
     {"healthy_before": 0, "decisions": [["t", "line"]]}),
    ("1e400", {}),
    ("[1, 2]", {}),
    ("not json", {}),
])
def test_state_from_another_version_is_read_field_by_field(text, expected):
    state = State.parse(text)
    defaults = {"concurrency": None, "healthy_before": 0, "idle_since": None, "probe": None,
                "decisions": []}
    assert {k: getattr(state, k) for k in defaults} == {**defaults, **expected}
    written = state.text()
    assert "Infinity" not in written and "NaN" not in written
    assert State.parse(written) == state


def test_no_non_finite_number_is_written():
    state = State(idle_since=math.inf)
    with pytest.raises(ValueError):
        state.text()


# -- what moto cannot answer: odd values, through botocore's Stubber on the same code ----------

def _stubbed_controller(queue_attributes: dict, values: dict[str, list]):
    import boto3
    from botocore.stub import ANY, Stubber

    env = {"QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/q",
           "WORKER_FUNCTION": "w", "MAPPING_ID": "m", "CLUSTER": "c", "SERVICE": "s",
           "GROUP": "g", "TARGET_GROUP": "t", "GPU_NAMESPACE": "cnsq/x", "STATE_PARAMETER": "/p",
           "WORKER_TIMEOUT": "120", "MIN_TASKS": "0", "MAX_TASKS": "2", "TASKS_PER_INSTANCE": "1",
           "IDLE_SECONDS": "900", "MAX_CONCURRENCY": "100"}
    where = Where.from_environment(env)
    clients = {name: boto3.client(name, region_name="us-east-1", aws_access_key_id="a",
                                  aws_secret_access_key="b") for name in SERVICES}
    stubs = {name: Stubber(c) for name, c in clients.items()}
    controller = Controller(where, clients, clock=lambda: 1_800_000_000.0)
    names = [q[0] for q in controller.queries()]
    stubs["ssm"].add_response("get_parameter", {"Parameter": {"Value": "{}"}})
    stubs["sqs"].add_response("get_queue_attributes", {"Attributes": queue_attributes})
    if len(queue_attributes) == 2:
        stubs["elbv2"].add_response("describe_target_health", {"TargetHealthDescriptions": [
            {"TargetHealth": {"State": "healthy"}}]})
        stubs["cloudwatch"].add_response("get_metric_data", {"MetricDataResults": [
            {"Id": f"q{names.index(k)}", "Values": v} for k, v in values.items()]})
        stubs["ecs"].add_response("describe_services", {"services": [{"desiredCount": 1}]})
        stubs["lambda"].add_response("get_event_source_mapping", {
            "State": "Enabled", "ScalingConfig": {"MaximumConcurrency": 10}})
        stubs["ssm"].add_response("put_parameter", {"Version": 2}, {
            "Name": "/p", "Type": "String", "Value": ANY, "Overwrite": True})
    for stub in stubs.values():
        stub.activate()
    return controller, stubs


def test_odd_metrics_are_missing_data():
    """NaN and infinite values raised every minute: they are missing data, as is a metric that
    has none. p95 is read from GetMetricData's percentile statistic."""
    nan, inf = float("nan"), float("inf")
    controller, stubs = _stubbed_controller(
        {"ApproximateNumberOfMessages": "100", "ApproximateNumberOfMessagesNotVisible": "5"},
        {"calls": [nan, 40.0, inf], "errors": [0.0, -inf], "p95": [nan, 3000.0], "gpu": [inf],
         "deleted": [nan], "records_ok": [400.0]})
    signals, rate = controller.signals(1_800_000_000.0, 100, 5, 1)
    assert signals.calls == 40 and signals.model_errors == 0
    assert signals.p95_seconds == 3.0
    assert signals.busy_percent is None and rate is None and signals.records_ok == 400


def test_a_queue_without_its_counts_changes_nothing():
    controller, stubs = _stubbed_controller({"ApproximateNumberOfMessages": "7"}, {})
    assert controller.step() == ["the queue's counts are missing: nothing changed this minute"]
    for stub in stubs.values():
        stub.assert_no_pending_responses()


# -- the worker and the admin function, under the role that runs them --------------------------

def _function_environment(admin, name: str) -> dict[str, str]:
    return admin("lambda").get_function_configuration(FunctionName=name)[
        "Environment"]["Variables"]


def test_the_worker_reads_its_secrets_under_its_role(world, monkeypatch):
    """At cold start the worker reads the tile token's secret and, through the instance, the
    database's RDS-managed secret: boto3's default credentials (the role's, on AWS)."""
    from download_and_predict.handler import database_url, resolve_secret_envs
    from download_and_predict.settings import Settings
    from support.projects import SECRETS

    w = world
    env = _function_environment(w.admin, "cnsq-dev-DownloadAndPredict")
    keys = w.keys["cnsq-dev-DownloadAndPredict"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["aws_secret_access_key"])
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # as a cold start: the role's keys
    assert "TILE_ACCESS_TOKEN" not in env  # a secret, not a setting
    # The template makes a secret of the token and sets TILE_ACCESS_TOKEN_SECRET_ARN to it;
    # moto's CloudFormation creates no AWS::SecretsManager::Secret, so the test makes it.
    env.setdefault("TILE_ACCESS_TOKEN_SECRET_ARN", w.admin("secretsmanager").create_secret(
        Name="DownloadAndPredictTILEACCESSTOKENSecret-test",
        SecretString=SECRETS["TILE_ACCESS_TOKEN"])["ARN"])
    # Nor does it pass ManageMasterUserPassword on: the test turns it on, as the template does.
    w.admin("rds").modify_db_instance(DBInstanceIdentifier=env["DATABASE_INSTANCE"],
                                      ManageMasterUserPassword=True, ApplyImmediately=True)
    resolved = resolve_secret_envs(env)
    assert resolved["TILE_ACCESS_TOKEN"] == SECRETS["TILE_ACCESS_TOKEN"]
    url = database_url(Settings.from_env(resolved))
    assert url.startswith("postgresql://") and f"@{env['DATABASE_HOST']}:" in url


def test_the_admin_function_exports_under_its_role(world, postgres_url):
    """The CSV export goes to the stack's own prefix of the artifact bucket; moto checks S3's
    resource ARNs, so the role's prefix is enforced too."""
    import psycopg2

    from download_and_predict.admin import export
    from download_and_predict.schema import migrate_postgres
    from support.servers import fresh_database

    w = world
    env = _function_environment(w.admin, "cnsq-dev-admin")
    keys = w.keys["cnsq-dev-admin"]
    conn = psycopg2.connect(fresh_database(postgres_url))
    try:
        migrate_postgres(conn)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO results (tile, output) VALUES ('1-2-3', '[0.5]')")
        conn.commit()
        s3 = signed_client("s3", w.moto_url, keys)
        answer = export(conn, env, s3)
        assert answer["rows"] == 1 and answer["key"].startswith("cnsq-dev/exports/")
        # Anywhere else in the bucket: refused, as on AWS.
        with pytest.raises(Exception, match="AccessDenied|403"):
            export(conn, {**env, "EXPORT_PREFIX": "elsewhere/"}, s3)
    finally:
        conn.close()


def test_delete_empties_a_group_whose_hosts_are_protected(project):
    """The group protects new hosts from scale-in (ECS lifts it from hosts without tasks only): a
    delete that set the size to zero would leave protected hosts running. `cnsq delete` lifts the
    protection first."""
    from support.accounts import client

    deploy_scaling(max_instances=2)
    autoscaling = client("autoscaling")
    group = autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"][0]
    assert group["NewInstancesProtectedFromScaleIn"] is True
    name = group["AutoScalingGroupName"]
    autoscaling.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=2)
    instances = [i["InstanceId"] for i in autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["Instances"]]
    assert len(instances) == 2
    autoscaling.set_instance_protection(AutoScalingGroupName=name, InstanceIds=instances,
                                        ProtectedFromScaleIn=True)
    result = CliRunner().invoke(main, ["delete", "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"Lifted scale-in protection from 2 GPU host(s) of {name}" in result.output
    assert autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
        "AutoScalingGroups"] == []


def test_the_gpu_ami_is_pinned_until_the_user_moves_it(project):
    """The AMI was an SSM-typed parameter, resolved again at every update: a new AMI release made
    any deploy roll every host. It is resolved at creation and kept; a newer one is announced
    and taken with --update-ami, its change shown in the change set."""
    from support.accounts import client

    ec2, ssm = client("ec2"), client("ssm")
    first, second = [i["ImageId"] for i in ec2.describe_images(Owners=["amazon"])["Images"][:2]]
    ssm.put_parameter(Name="/test/gpu-ami", Value=first, Type="String")
    path = Path("config/config.yml")
    text = path.read_text()
    assert "  ecs:\n" in text
    path.write_text(text.replace("  ecs:\n", "  ecs:\n    amiParameter: /test/gpu-ami\n", 1))

    def deployed_ami() -> str:
        stack = client("cloudformation").describe_stacks(StackName="cnsq-dev")["Stacks"][0]
        return {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}["AmiId"]

    result = CliRunner().invoke(main, ["deploy"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"GPU AMI: {first} (/test/gpu-ami), pinned until `cnsq deploy --update-ami`" in result.output
    assert deployed_ami() == first

    ssm.put_parameter(Name="/test/gpu-ami", Value=second, Type="String", Overwrite=True)
    result = CliRunner().invoke(main, ["deploy"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"GPU AMI: {first} kept; {second} is newer" in result.output
    assert "No changes" in result.output and deployed_ami() == first

    result = CliRunner().invoke(main, ["deploy", "--update-ami", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"GPU AMI: {first} → {second} (--update-ami)" in result.stderr
    # (moto lists no change for a parameter alone; AWS lists the launch template's Modify.)
    assert deployed_ami() == second


def test_cnsq_deploy_runs_with_exactly_the_deployers_permission_list(project, moto_url,
                                                                       monkeypatch):
    """The calls `cnsq deploy` itself makes (preflight, packaging, the change set, the events,
    the outputs) are allowed by templates/deployer-permissions.yml: moto checks each one. (The
    resources CloudFormation creates are checked against the same list in test_preflight.)"""
    from cnsq.config import load_config
    from cnsq.deploy import preflight
    from support.aws_rules import user_with, widened

    actions = sorted(preflight.deployer_actions(load_config(Path("config/config.yml"))))
    keys = user_with([widened({"Effect": "Allow", "Action": actions, "Resource": "*"})])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["aws_secret_access_key"])
    with iam_enforced(moto_url):
        result = CliRunner().invoke(main, ["deploy"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    denied = [line for line in result.output.splitlines()
              if "may not" in line or "answered 403" in line or "access denied" in line.lower()
              or "AccessDenied" in line]
    assert denied == [], "\n".join(denied)
