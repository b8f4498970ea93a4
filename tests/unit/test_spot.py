"""Spot GPU hosts (`ecs.spot`): the group the template compiles, judged by cfn-lint, and the
config's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnsq.config import ConfigError, load_config
from cnsq.deploy.template import CodeLocation, compile_template, lint

REPO = Path(__file__).resolve().parents[2]
CODE = {"DownloadAndPredict": CodeLocation("your-bucket", "cnsq-dev/lambdas/abc.zip")}


def compiled(tmp_path: Path, ecs_lines: str):
    text = (REPO / "config" / "config.example.yml").read_text()
    assert "  ecs:\n" in text
    text = text.replace("  ecs:\n", "  ecs:\n" + ecs_lines, 1)
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "config.yml").write_text(text)
    (tmp_path / "config" / ".env").write_text("RDS_USERNAME=admin\nTILE_ACCESS_TOKEN=tok\n")
    config = load_config(tmp_path / "config" / "config.yml", environ={})
    path, data = compile_template(config, REPO / "templates", tmp_path / "out", CODE)
    return config, path, data


def group(data: dict) -> dict:
    return next(r["Properties"] for r in data["Resources"].values()
                if r["Type"] == "AWS::AutoScaling::AutoScalingGroup")


def user_data(data: dict) -> str:
    template = next(r for r in data["Resources"].values() if r["Type"] == "AWS::EC2::LaunchTemplate")
    return str(template["Properties"]["LaunchTemplateData"]["UserData"])


def test_spot_true_is_a_mixed_instances_group_of_same_gpu_types(tmp_path):
    config, path, data = compiled(tmp_path, "    spot: true\n")
    assert config.values["ecs"]["spot"] == 100
    properties = group(data)
    assert "LaunchTemplate" not in properties and properties["CapacityRebalance"] is True
    policy = properties["MixedInstancesPolicy"]
    assert policy["InstancesDistribution"] == {
        "OnDemandBaseCapacity": 0, "OnDemandPercentageAboveBaseCapacity": 0,
        "SpotAllocationStrategy": "price-capacity-optimized"}
    types = [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]]
    assert types == ["g4dn.xlarge", "g5.xlarge", "g6.xlarge"]  # one GPU each
    assert "ECS_ENABLE_SPOT_INSTANCE_DRAINING=true" in user_data(data)
    # A draining task is deregistered within the two-minute notice (the default is 300 s).
    targets = next(r["Properties"] for r in data["Resources"].values()
                   if r["Type"] == "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert {"Key": "deregistration_delay.timeout_seconds", "Value": "30"} in targets[
        "TargetGroupAttributes"]
    assert lint(path) == []


def test_a_spot_share_keeps_the_rest_on_demand_and_no_spot_changes_nothing(tmp_path):
    _, _, data = compiled(tmp_path, "    spot: 70\n")
    assert group(data)["MixedInstancesPolicy"]["InstancesDistribution"][
        "OnDemandPercentageAboveBaseCapacity"] == 30
    _, _, plain = compiled(tmp_path, "")
    assert "MixedInstancesPolicy" not in group(plain) and "LaunchTemplate" in group(plain)
    assert "SPOT_INSTANCE_DRAINING" not in user_data(plain)


def test_the_users_spot_types_keep_the_instance_type_first(tmp_path):
    config, _, _ = compiled(tmp_path, "    spot: true\n    spotInstanceTypes: [g5.xlarge]\n")
    assert config.values["ecs"]["spotInstanceTypes"] == ["g4dn.xlarge", "g5.xlarge"]


@pytest.mark.parametrize("lines, says", [
    ("    spot: 150\n", "expected true, false or a percentage from 0 to 100, got 150"),
    ("    spot: lots\n", "got 'lots'"),
    ("    spot: true\n    spotInstanceTypes: [g4dn.12xlarge]\n",
     "g4dn.12xlarge has 4 GPU(s) and g4dn.xlarge 1"),
])
def test_bad_spot_settings_are_refused_with_their_key(tmp_path, lines, says):
    with pytest.raises(ConfigError) as error:
        compiled(tmp_path, lines)
    assert "ecs.spot" in str(error.value) and says in str(error.value)
