"""The stack that scales itself (ecs.minInstances): its template, judged by cfn-lint. Its
controller runs against the deployed stack under its role in test_aws_enforces.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnsq.config import load_config, scaling_summary
from cnsq.deploy.template import CodeLocation, compile_template, lint, load_cfn_yaml
from cnsq.errors import ConfigError
from cnsq.stack import model_batching

REPO = Path(__file__).resolve().parents[2]
CODE = {"DownloadAndPredict": CodeLocation("your-bucket", "cnsq-dev/lambdas/abc.zip")}
ENV = {"RDS_USERNAME": "resultsadmin", "TILE_ACCESS_TOKEN": "tok-8JmX-never-print"}


def load(tmp_path, ecs: str = "", lambdas: str = ""):
    text = (REPO / "config/config.example.yml").read_text()
    # The example asks for scaling; an old config does not (no minInstances).
    text = text.replace("    minInstances: 0\n", "", 1).replace("    idleMinutes: 2\n", "", 1)
    text = text.replace("    maxInstances: 1\n", "    maxInstances: 4\n" + ecs, 1)
    text = text.replace("      concurrent: 10 #", lambdas + "      concurrent: 10 #", 1)
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
        "ReservedConcurrentExecutions"] == 10
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
    assert mapping["Enabled"] is False and mapping["ScalingConfig"] == {"MaximumConcurrency": 10}
    assert r["DownloadAndPredictLambdaFunction"]["Properties"]["ReservedConcurrentExecutions"] == 200
    env = r["cnsqdevControllerFunction"]["Properties"]["Environment"]["Variables"]
    assert (env["MIN_TASKS"], env["MAX_TASKS"], env["IDLE_SECONDS"], env["MAX_CONCURRENCY"]) == (
        "0", "4", "600", "200")
    assert r["cnsqdevControllerSchedule"]["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    assert r["cnsqdevControllerFunction"]["Properties"]["VpcConfig"]["SubnetIds"]
    assert scaling_summary(load(tmp_path, ecs="    minInstances: 0\n").values).startswith(
        "ecs: scales with the backlog, 0 to 4 instance(s), down to 0 after 2 idle minutes")


def test_a_group_with_a_minimum_is_created_empty_and_protected(tmp_path):
    """With ecs.minInstances >= 1 the group launched and registered hosts before the capacity
    provider that references it existed; ECS ("Amazon ECS capacity providers for EC2 workloads")
    says to create it empty, or those hosts may never be used by the provider. The controller's
    minimum tasks bring the minimum hosts. Scale-in never picks a host with a task: managed
    termination protection, with new hosts protected from scale-in."""
    path, template = compiled(tmp_path, ecs="    minInstances: 1\n")
    assert lint(path) == []
    r = template["Resources"]
    group = r["cnsqdevECSAutoScalingGroup"]
    assert "CreationPolicy" not in group
    assert group["UpdatePolicy"]["AutoScalingRollingUpdate"]["WaitOnResourceSignals"] is False
    assert group["Properties"]["MinSize"] == "0" and "DesiredCapacity" not in group["Properties"]
    assert group["Properties"]["NewInstancesProtectedFromScaleIn"] is True
    provider = r["cnsqdevCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedTerminationProtection"] == "ENABLED"
    env = r["cnsqdevControllerFunction"]["Properties"]["Environment"]["Variables"]
    assert env["MIN_TASKS"] == "1"
    # The controller sizes the service; ECS's managed scaling sizes the group. The one
    # exception: idle at the minimum, it ends hosts that run no task (lowering the desired
    # capacity with each, to the size ECS would reach 15 minutes later); it never sets the
    # group's size itself.
    statements = r["cnsqdevControllerRole"]["Properties"]["Policies"][0]["PolicyDocument"][
        "Statement"]
    actions = {a for s in statements for a in s["Action"]}
    assert {a for a in actions if a.startswith("autoscaling:")} == {
        "autoscaling:SetInstanceProtection", "autoscaling:TerminateInstanceInAutoScalingGroup"}


@pytest.mark.parametrize("ecs, lambdas, key", [
    ("    minInstances: 5\n", "", "ecs.minInstances"),
    ("    minInstances: 0\n    idleMinutes: 0\n", "", "ecs.idleMinutes"),
    ("    minInstances: 0\n", "      maxConcurrent: 1\n", "lambdas.DownloadAndPredict.maxConcurrent"),
    ("    minInstances: 0\n", "      maxConcurrent: 4\n", "lambdas.DownloadAndPredict.concurrent"),
])
def test_bad_scaling_values_name_their_key(tmp_path, ecs, lambdas, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(tmp_path, ecs=ecs, lambdas=lambdas)


def test_the_model_task_runs_with_the_stacks_batching(tmp_path):
    """`Command: [--enable_batching=true]` replaced the image's command and its batching file:
    TF Serving's defaults applied, not what the stack and its simulation assume. The task now
    writes the one home's parameters and passes them, whatever the image's own command."""
    from simulation import World

    _, template = compiled(tmp_path)
    container = template["Resources"]["cnsqdevTaskDefinition"]["Properties"][
        "ContainerDefinitions"][0]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["CNSQ_BATCHING_PARAMETERS"] == model_batching.batching_parameters()
    assert "max_batch_size { value: 64 }" in env["CNSQ_BATCHING_PARAMETERS"]
    command = container["EntryPoint"] + container["Command"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert "--batching_parameters_file=/tmp/batching_parameters.txt" in command[2]
    assert "--enable_batching=true" in command[2]
    assert World().gpu_max_batch == model_batching.BATCHING["max_batch_size"]
