"""The stack that scales itself (ecs.minInstances): its template, judged by cfn-lint, and its
controller (download_and_predict.control) run against moto's server."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnsq.config import load_config, scaling_summary
from cnsq.errors import ConfigError
from cnsq.template import CodeLocation, compile_template, lint, load_cfn_yaml

REPO = Path(__file__).resolve().parent.parent
CODE = {"DownloadAndPredict": CodeLocation("your-bucket", "cnsq-dev/lambdas/abc.zip")}
ENV = {"RDS_USERNAME": "resultsadmin", "TILE_ACCESS_TOKEN": "tok-8JmX-never-print"}


def load(tmp_path, ecs: str = "", lambdas: str = ""):
    text = (REPO / "config/config.example.yml").read_text()
    # The example asks for scaling; an old config does not (no minInstances).
    text = text.replace("    minInstances: 0\n", "", 1).replace("    idleMinutes: 15\n", "", 1)
    text = text.replace("    maxInstances: 1\n", "    maxInstances: 4\n" + ecs, 1)
    text = text.replace("      concurrent: 5 #", lambdas + "      concurrent: 5 #", 1)
    path = tmp_path / "config.yml"
    path.write_text(text)
    env = tmp_path / "test.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in ENV.items()))
    return load_config(path, environ={}, env_file=env)


def compiled(tmp_path, **kw) -> dict:
    config = load(tmp_path, **kw)
    path, _ = compile_template(config, REPO / "templates", tmp_path, CODE)
    return path, load_cfn_yaml(path.read_text())


def test_an_old_config_keeps_its_fixed_size(tmp_path):
    path, template = compiled(tmp_path)
    resources = template["Resources"]
    assert not [r for r in resources.values() if r["Type"] == "AWS::ECS::CapacityProvider"]
    service = resources["cnsqdevECSService"]["Properties"]
    assert service["LaunchType"] == "EC2" and service["DesiredCount"] == 1
    assert resources["DownloadAndPredictLambdaFunction"]["Properties"][
        "ReservedConcurrentExecutions"] == 5
    assert scaling_summary(load(tmp_path).values).startswith("ecs: a fixed size of 1 instance(s)")


def test_min_instances_asks_for_a_stack_that_scales_itself(tmp_path):
    path, template = compiled(tmp_path, ecs="    minInstances: 0\n    idleMinutes: 10\n",
                              lambdas="      maxConcurrent: 200\n")
    assert lint(path) == []
    r = template["Resources"]
    group = r["cnsqdevECSAutoScalingGroup"]
    assert "DesiredCapacity" not in group["Properties"] and "CreationPolicy" not in group
    assert group["Properties"]["MinSize"] == "0" and group["Properties"]["MaxSize"] == "4"
    provider = r["cnsqdevCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED"
    service = r["cnsqdevECSService"]["Properties"]
    assert "DesiredCount" not in service and "LaunchType" not in service
    assert service["CapacityProviderStrategy"][0]["CapacityProvider"] == {"Ref": "cnsqdevCapacityProvider"}
    mapping = r["cnsqdevDownloadAndPredictLambdaEventSourceMapping"]["Properties"]
    assert mapping["Enabled"] is False and mapping["ScalingConfig"] == {"MaximumConcurrency": 5}
    assert r["DownloadAndPredictLambdaFunction"]["Properties"]["ReservedConcurrentExecutions"] == 200
    env = r["cnsqdevControllerFunction"]["Properties"]["Environment"]["Variables"]
    assert (env["MIN_TASKS"], env["MAX_TASKS"], env["IDLE_SECONDS"], env["MAX_CONCURRENCY"]) == (
        "0", "4", "600", "200")
    assert r["cnsqdevControllerSchedule"]["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    assert r["cnsqdevControllerFunction"]["Properties"]["VpcConfig"]["SubnetIds"]
    assert scaling_summary(load(tmp_path, ecs="    minInstances: 0\n").values).startswith(
        "ecs: scales with the backlog, 0 to 4 instance(s), down to 0 after 15 idle minutes")


def test_hosts_kept_at_the_minimum_signal_at_creation(tmp_path):
    _, template = compiled(tmp_path, ecs="    minInstances: 1\n")
    group = template["Resources"]["cnsqdevECSAutoScalingGroup"]
    assert group["CreationPolicy"]["ResourceSignal"]["Count"] == 1


@pytest.mark.parametrize("ecs, lambdas, key", [
    ("    minInstances: 5\n", "", "ecs.minInstances"),
    ("    minInstances: 0\n    idleMinutes: 0\n", "", "ecs.idleMinutes"),
    ("    minInstances: 0\n", "      maxConcurrent: 1\n", "lambdas.DownloadAndPredict.maxConcurrent"),
    ("    minInstances: 0\n", "      maxConcurrent: 4\n", "lambdas.DownloadAndPredict.concurrent"),
])
def test_bad_scaling_values_name_their_key(tmp_path, ecs, lambdas, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(tmp_path, ecs=ecs, lambdas=lambdas)


# -- on moto: the stack deploys, and the controller's calls run against it -------------------

def _deploy_scaling(project):
    from click.testing import CliRunner

    from cnsq.cli import main

    config = Path("config/config.yml")
    assert "    minInstances: 0\n" in config.read_text()  # the example scales itself
    result = CliRunner().invoke(main, ["deploy"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _found() -> dict[str, str]:
    """The deployed resources, asked of each service (moto's describe_stack_resource fails on a
    stack holding a type its CloudFormation skips, such as AWS::ECS::CapacityProvider)."""
    from conftest import client

    cluster = client("ecs").list_clusters()["clusterArns"][0]
    return {"cluster": cluster,
            "service": client("ecs").list_services(cluster=cluster)["serviceArns"][0],
            "group": client("autoscaling").describe_auto_scaling_groups()[
                "AutoScalingGroups"][0]["AutoScalingGroupName"],
            "target_group": client("elbv2").describe_target_groups()["TargetGroups"][0][
                "TargetGroupArn"]}


def _controller(clock):
    from conftest import client

    from download_and_predict.control import Controller, Where

    found = _found()
    env = {"QUEUE_URL": client("sqs").get_queue_url(QueueName="cnsqdevTileQueue")["QueueUrl"],
           "WORKER_FUNCTION": "cnsq-dev-DownloadAndPredict",
           "MAPPING_ID": client("lambda").list_event_source_mappings(
               FunctionName="cnsq-dev-DownloadAndPredict")["EventSourceMappings"][0]["UUID"],
           "CLUSTER": found["cluster"], "SERVICE": found["service"], "GROUP": found["group"],
           "TARGET_GROUP": found["target_group"], "GPU_NAMESPACE": "cnsq/cnsq-dev",
           "STATE_PARAMETER": "/cnsq/cnsq-dev/controller", "WORKER_TIMEOUT": "120",
           "MIN_TASKS": "0", "MAX_TASKS": "1", "TASKS_PER_INSTANCE": "1", "IDLE_SECONDS": "900",
           "MAX_CONCURRENCY": "1000"}
    where = Where.from_environment(env)
    clients = {name: client(name) for name in (
        "ssm", "sqs", "elbv2", "ecs", "lambda", "cloudwatch", "autoscaling")}
    return Controller(where, clients, clock=clock), where


def test_the_controller_runs_against_the_deployed_stack(project):
    from datetime import UTC, datetime

    from conftest import client

    _deploy_scaling(project)
    now = [datetime.now(UTC).timestamp()]
    controller, where = _controller(lambda: now[0])
    mapping = client("lambda").get_event_source_mapping(UUID=where.mapping_id)
    assert mapping["ScalingConfig"]["MaximumConcurrency"] == 5
    assert client("ssm").get_parameter(Name=where.state_parameter)["Parameter"]["Value"] == "{}"

    # Tiles arrive; no model task is healthy: tasks and hosts asked for, the mapping kept off.
    sqs = client("sqs")
    for i in range(30):
        sqs.send_message(QueueUrl=where.queue_url, MessageBody=f"{i} 1 5")
    lines = controller.step()
    # (The mapping was created disabled: nothing to pause.)
    assert lines == ["model tasks 0 → 1: 30 tiles waiting: 1 model tasks (up to 1)"]
    service = client("ecs").describe_services(cluster=where.cluster, services=[where.service])
    assert service["services"][0]["desiredCount"] == 1, service
    group = client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[where.group])["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 1
    assert client("lambda").get_event_source_mapping(UUID=where.mapping_id)["State"] == "Disabled"

    # A healthy target: the mapping is enabled; the worker's metrics say the model is idle.
    ec2 = client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    client("elbv2").register_targets(TargetGroupArn=where.target_group,
                                     Targets=[{"Id": instance, "Port": 8501}])
    cloudwatch = client("cloudwatch")
    stamp = datetime.fromtimestamp(now[0] - 60, UTC)
    fn = [{"Name": "FunctionName", "Value": where.function_name}]
    cloudwatch.put_metric_data(Namespace="AWS/Lambda", MetricData=[
        {"MetricName": "Invocations", "Dimensions": fn, "Timestamp": stamp, "Value": 40},
        {"MetricName": "Errors", "Dimensions": fn, "Timestamp": stamp, "Value": 0},
        {"MetricName": "Duration", "Dimensions": fn, "Timestamp": stamp, "Value": 6000}])
    cloudwatch.put_metric_data(Namespace="cnsq/cnsq-dev", MetricData=[
        {"MetricName": "nvidia_smi_utilization_gpu", "Timestamp": stamp, "Value": 41,
         "Dimensions": [{"Name": "InstanceId", "Value": instance}]}])
    now[0] += 60
    lines = controller.step()
    assert lines == ["resumed receiving at concurrency 8: a model answers"], lines
    mapping = client("lambda").get_event_source_mapping(UUID=where.mapping_id)
    assert mapping["State"] == "Enabled" and mapping["ScalingConfig"]["MaximumConcurrency"] == 8

    # A deploy resets the mapping to the template's start: the controller re-applies its own.
    client("lambda").update_event_source_mapping(UUID=where.mapping_id,
                                                 ScalingConfig={"MaximumConcurrency": 5})
    now[0] += 60
    lines = controller.step()
    assert lines[0] == "re-applied concurrency 8 (a deploy set 5)"
    import json

    state = json.loads(client("ssm").get_parameter(Name=where.state_parameter)["Parameter"]["Value"])
    assert [line for _, line in state["decisions"]][:3] == [
        "model tasks 0 → 1: 30 tiles waiting: 1 model tasks (up to 1)",
        "resumed receiving at concurrency 8: a model answers",
        "re-applied concurrency 8 (a deploy set 5)"]

    # The queue empties: after idleMinutes the tasks and hosts go to zero.
    sqs.purge_queue(QueueUrl=where.queue_url)
    controller.step()
    now[0] += 15 * 60
    lines = controller.step()
    assert "model tasks 1 → 0: idle 15 min: down to the minimum, 0 model tasks" in lines
    group = client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[where.group])["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 0
