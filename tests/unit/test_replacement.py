"""Template changes judged by AWS's own replacement rules (the create-only properties of the
resource provider schemas that cfn-lint ships; tests/support/replacement.py): a stack deployed by the
original updates without replacing a custom-named resource or the results database, and neither
do the config changes a user makes between deploys."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnsq.config import load_config
from cnsq.deploy import adopt
from cnsq.deploy.template import load_cfn_yaml, render
from support.original import original_template
from support.projects import REPO, make_project
from support.replacement import name_properties, replaced

SERVICE_ARN_2019 = "arn:aws:ecs:us-east-1:123456789012:service/cnsqdev-ECSService-1ABC"
SERVICE_ARN_2026 = "arn:aws:ecs:us-east-1:123456789012:service/cnsqdevCluster/cnsqdev-ECSService-1ABC"


def _template(**resources) -> dict:
    return {"Resources": {k: {"Type": t, "Properties": p} for k, (t, p) in resources.items()}}


# -- the rules themselves


def test_the_rules_come_from_the_schemas():
    assert name_properties("AWS::IAM::Role") == ["RoleName"]
    assert name_properties("AWS::SQS::Queue") == ["QueueName"]
    assert name_properties("AWS::RDS::DBInstance") == ["DBInstanceIdentifier"]
    assert name_properties("AWS::EC2::SecurityGroup") == ["GroupName"]


def test_a_role_losing_its_path_is_replaced_and_is_custom_named():
    old = _template(Role=("AWS::IAM::Role", {"RoleName": {"Fn::Sub": "x-role"}, "Path": "/"}))
    new = _template(Role=("AWS::IAM::Role", {"RoleName": "x-role"}))
    [(logical_id, found)] = replaced(old, new).items()
    assert (logical_id, found.reasons, found.custom_named) == ("Role", ("Path removed",), True)


def test_what_is_not_create_only_or_resolves_the_same_is_not_replaced():
    old = _template(Q=("AWS::SQS::Queue", {"QueueName": "q", "VisibilityTimeout": 30}),
                    L=("AWS::Logs::LogGroup", {"LogGroupName": {"Fn::Join": ["", ["/aws/", "x"]]}}))
    new = _template(Q=("AWS::SQS::Queue", {"QueueName": "q", "VisibilityTimeout": 720}),
                    L=("AWS::Logs::LogGroup", {"LogGroupName": "/aws/x"}))
    assert replaced(old, new) == {}


def test_a_database_gaining_encryption_is_replaced():
    old = _template(DB=("AWS::RDS::DBInstance", {"DBName": "ResultsDB"}))
    new = _template(DB=("AWS::RDS::DBInstance", {"DBName": "ResultsDB", "StorageEncrypted": True,
                                                  "DBSubnetGroupName": {"Ref": "G"}}))
    assert replaced(old, new)["DB"].reasons == ("DBSubnetGroupName added", "StorageEncrypted added")


# -- the original's stack, updated by cnsq


@pytest.fixture
def kes_project(tmp_path, monkeypatch):
    config = make_project(tmp_path / "proj", vpc="vpc-0123456789abcdef0",
                          subnets=("subnet-0123456789abcdef0", "subnet-0fedcba9876543210"))
    monkeypatch.chdir(tmp_path / "proj")
    old = load_cfn_yaml(original_template("vpc-0123456789abcdef0",
                                          ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"],
                                          "cnsq-artifacts", "kes/package.zip"))
    return load_config(config), old


def _resources(template: dict, service_arn: str) -> list[tuple[str, str, str]]:
    return [(k, r["Type"], service_arn if r["Type"] == "AWS::ECS::Service" else f"{k}-physical")
            for k, r in template["Resources"].items()]


def _cnsq(config, existing: adopt.Existing | None) -> dict:
    return load_cfn_yaml(render(config, REPO / "templates", {}, existing.context() if existing else None))


def test_the_original_stack_updates_without_replacing_a_named_resource_or_the_database(kes_project):
    config, old = kes_project
    existing = adopt.from_stack(old, _resources(old, SERVICE_ARN_2019), "cnsqdev")
    found = replaced(old, _cnsq(config, existing))
    assert [f for f in found.values() if f.custom_named] == []
    assert "cnsqdevResultsDB" not in found
    # What is replaced, each allowed (no custom name, no data): the load balancer becomes
    # internal (Scheme), its target group takes the model's port, the task definition is new.
    assert sorted(found) == ["cnsqdevLoadBalancer", "cnsqdevTargetGroup", "cnsqdevTaskDefinition"]


def test_without_adoption_the_database_would_be_replaced(kes_project):
    """The check above can fail: rendered the cnsq way, the original's database is replaced."""
    config, old = kes_project
    found = replaced(old, _cnsq(config, None))
    assert found["cnsqdevResultsDB"].reasons == ("DBSubnetGroupName added", "StorageEncrypted added")


def test_the_adopted_database_keeps_its_properties_and_hands_its_password_to_rds(kes_project):
    config, old = kes_project
    existing = adopt.from_stack(old, _resources(old, SERVICE_ARN_2019), "cnsqdev")
    db = _cnsq(config, existing)["Resources"]["cnsqdevResultsDB"]
    deployed = old["Resources"]["cnsqdevResultsDB"]["Properties"]
    assert "MasterUserPassword" not in db["Properties"] and db["Properties"]["ManageMasterUserPassword"] is True
    assert {k: v for k, v in db["Properties"].items() if k != "ManageMasterUserPassword"} == {
        k: v for k, v in deployed.items() if k != "MasterUserPassword"}
    assert (db["DeletionPolicy"], db["UpdateReplacePolicy"]) == ("Snapshot", "Snapshot")
    assert any(n.startswith("rds: the results database cnsqdevResultsDB was created by the original "
                            "stack and is kept in place (public, unencrypted") for n in existing.notes)


def test_a_short_arn_service_is_not_tagged_and_a_long_one_is(kes_project):
    config, old = kes_project
    for arn, tagged in ((SERVICE_ARN_2019, False), (SERVICE_ARN_2026, True)):
        existing = adopt.from_stack(old, _resources(old, arn), "cnsqdev")
        service = _cnsq(config, existing)["Resources"]["cnsqdevECSService"]["Properties"]
        assert ("Tags" in service) is tagged
        assert any("short ARN" in n for n in existing.notes) is not tagged


def test_the_hosts_roll_onto_the_new_launch_template(kes_project):
    config, old = kes_project
    # The original's config (no ecs.minInstances): its fixed size, its host rolled.
    path = Path("config/config.yml")
    path.write_text(path.read_text().replace("    minInstances: 0\n", ""))
    config = load_config(path)
    group = _cnsq(config, None)["Resources"]["cnsqdevECSAutoScalingGroup"]
    assert "LaunchConfigurationName" in old["Resources"]["cnsqdevECSAutoScalingGroup"]["Properties"]
    rolling = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert rolling["WaitOnResourceSignals"] is True and rolling["MinInstancesInService"] == 0
    assert group["CreationPolicy"]["ResourceSignal"]["Count"] == 1


def test_moving_the_adopted_database_is_an_explicit_replacement(kes_project):
    config, old = kes_project
    config.values["rds"]["restoreFromSnapshot"] = "cnsq-dev-move-encrypted"
    existing = adopt.from_stack(old, _resources(old, SERVICE_ARN_2026), "cnsqdev",
                                restore_snapshot="cnsq-dev-move-encrypted")
    assert existing.database is None
    new = _cnsq(config, existing)
    db = new["Resources"]["cnsqdevResultsDB"]["Properties"]
    assert db["DBSnapshotIdentifier"] == "cnsq-dev-move-encrypted"
    assert db["StorageEncrypted"] is True and "DBName" not in db and "MasterUsername" not in db
    found = replaced(old, new)["cnsqdevResultsDB"]
    assert not found.custom_named  # CloudFormation may replace it (a final snapshot is kept)


# -- a cnsq stack, across the config changes users make between deploys


EDITS = [
    ("instanceType: g4dn.xlarge", "instanceType: g5.12xlarge"),
    ("desiredInstances: 1", "desiredInstances: 3"),
    ("maxInstances: 1", "maxInstances: 4"),
    ("memory: 12000", "memory: 14000"),
    ("visibilityTimeout: 720", "visibilityTimeout: 1800"),
    ("storage: 20", "storage: 100"),
    ("instanceType: db.t3.medium", "instanceType: db.r6g.large"),
    ("backupRetentionDays: 7", "backupRetentionDays: 14"),
    ("deletionProtection: false", "deletionProtection: true"),
    ("image: tensorflow/serving:latest-gpu", "image: 123456789012.dkr.ecr.us-east-1.amazonaws.com/model:2"),
]


@pytest.mark.parametrize("old_text, new_text", EDITS)
def test_an_ordinary_config_change_replaces_no_named_resource_nor_the_database(
        tmp_path, monkeypatch, old_text, new_text):
    path = make_project(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj")
    before = load_cfn_yaml(render(load_config(path), REPO / "templates", {}))
    text = Path(path).read_text()
    assert old_text in text
    Path(path).write_text(text.replace(old_text, new_text))
    after = load_cfn_yaml(render(load_config(path), REPO / "templates", {}))
    found = replaced(before, after)
    assert [f for f in found.values() if f.custom_named] == []
    assert "cnsqdevResultsDB" not in found
    assert set(found) <= {"cnsqdevTaskDefinition"}, found


def test_a_created_network_becomes_dual_stack_in_place(tmp_path, monkeypatch):
    """A stack deployed before IPv6 (or with `ipv6: false`) updates to dual-stack replacing
    nothing: a subnet's Ipv6CidrBlock, a function's VpcConfig and a group's egress rules are
    not create-only."""
    path = make_project(tmp_path / "proj", vpc=None)
    monkeypatch.chdir(tmp_path / "proj")
    text = Path(path).read_text()
    Path(path).write_text(text.replace("  ecs:\n", "  ipv6: false\n\n  ecs:\n", 1))
    before = load_cfn_yaml(render(load_config(path), REPO / "templates", {}))
    Path(path).write_text(text)
    after = load_cfn_yaml(render(load_config(path), REPO / "templates", {}))
    assert "PrivateIpv6Route" in after["Resources"] and "PrivateIpv6Route" not in before["Resources"]
    assert replaced(before, after) == {}
