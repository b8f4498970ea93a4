"""Preflight against a moto account: a complete good account passes (with warnings for what moto
cannot answer); each missing prerequisite alone fails validate with its config key; all of them
at once are all reported. Checks moto does not emulate are tested with botocore's Stubber on the
same code (tests named *_stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.config import load_config
from cnsq.deploy import preflight
from cnsq.deploy.template import render
from support.accounts import client
from support.projects import REPO
from support.servers import _Quiet, _Server, free_port


def validate(*args: str):
    return CliRunner().invoke(main, ["validate", *args], catch_exceptions=False)


def problems(result) -> list[str]:
    return [line.strip() for line in result.stderr.splitlines()
            if line.startswith("  ") and not line.strip().startswith("warning:")]


def edit(old: str, new: str) -> None:
    path = Path("config/config.yml")
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_good_account_passes_with_warnings_for_what_it_cannot_answer(project):
    result = validate()
    assert result.exit_code == 0, result.output
    assert problems(result) == []
    warnings = [line.strip() for line in result.stderr.splitlines() if "not checked" in line]
    # moto: no Service Quotas in the region, no Lambda account settings, no orderable options.
    assert any(w.startswith("warning: ecs.maxInstances: not checked") for w in warnings)
    assert any(w.startswith("warning: lambdas.DownloadAndPredict.concurrent: not checked") for w in warnings)
    assert any(w.startswith("warning: rds.engineVersion: not checked") for w in warnings)
    assert "Preflight: 0 problem(s)" in result.stdout
    assert "Traceback" not in result.output
    report = json.loads(validate("--json").stdout)["preflight"]
    statuses = {c["check"]: c["status"] for c in report["checks"] if c["status"] == "ok"}
    assert {"bucket", "network", "instance type", "key pair", "ami"} <= set(statuses)


def test_dns_hostnames_off(project, account):
    client("ec2").modify_vpc_attribute(VpcId=account["vpc"], EnableDnsHostnames={"Value": False})
    result = validate()
    assert result.exit_code == 1
    assert problems(result) == [
        f"vpc: {account['vpc']} has DNS hostnames off: RDS in a VPC needs it "
        "(InvalidVPCNetworkStateFault); turn it on (aws ec2 modify-vpc-attribute --vpc-id "
        f"{account['vpc']} --enable-dns-hostnames)"]


def _subnet(account, cidr: str, zone: str, table: str | None) -> str:
    ec2 = client("ec2")
    subnet = ec2.create_subnet(VpcId=account["vpc"], CidrBlock=cidr,
                               AvailabilityZone=zone)["Subnet"]["SubnetId"]
    if table:
        ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    return subnet


def test_both_subnets_in_one_zone(project, account):
    same_zone = _subnet(account, "10.0.3.0/24", "us-east-1a", account["private_table"])
    edit(account["subnets"][1], same_zone)
    result = validate()
    assert result.exit_code == 1
    assert problems(result) == ["subnets: all subnets are in us-east-1a: a DB subnet group and a "
                                "load balancer need subnets in at least two availability zones"]


def test_a_subnet_routing_to_the_internet_gateway(project, account):
    public = _subnet(account, "10.0.5.0/24", "us-east-1b", account["public_table"])
    edit(account["subnets"][1], public)
    result = validate()
    assert result.exit_code == 1
    [line] = problems(result)
    assert line.startswith(f"subnets: {public} routes 0.0.0.0/0 to an internet gateway: "
                           "a Lambda there cannot reach the tile endpoint; use private subnets "
                           "with a NAT gateway")


def test_a_subnet_with_no_default_route(project, account):
    table = client("ec2").create_route_table(VpcId=account["vpc"])["RouteTable"]["RouteTableId"]
    isolated = _subnet(account, "10.0.4.0/24", "us-east-1b", table)
    edit(account["subnets"][1], isolated)
    result = validate()
    assert result.exit_code == 1
    [line] = problems(result)
    assert line.startswith(f"subnets: {isolated} has no default route")


def test_the_bucket_in_another_region(project):
    client("s3").create_bucket(Bucket="cnsq-eu-artifacts",
                               CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    edit("internal: cnsq-artifacts", "internal: cnsq-eu-artifacts")
    result = validate()
    assert result.exit_code == 1
    assert problems(result) == [
        "buckets.internal: bucket cnsq-eu-artifacts is in eu-west-1, not us-east-1: Lambda takes "
        "code only from a bucket in its own region; use a bucket in us-east-1"]


def test_a_missing_bucket_and_a_missing_key_pair(project):
    client("s3").delete_bucket(Bucket="cnsq-artifacts")
    client("ec2").delete_key_pair(KeyName="cnsq-key")
    result = validate()
    assert result.exit_code == 1
    assert sorted(problems(result)) == [
        "buckets.internal: bucket cnsq-artifacts does not exist; create it in us-east-1 "
        "(aws s3 mb s3://cnsq-artifacts --region us-east-1)",
        "ecs.keyPairName: key pair cnsq-key does not exist in us-east-1; create or import it, "
        "or remove ecs.keyPairName (the hosts are reachable through SSM)"]


def test_a_gpu_task_on_an_instance_type_without_gpus(project):
    # Refused offline, before the account is asked…
    edit("instanceType: g4dn.xlarge", "instanceType: t3.medium")
    result = validate()
    assert result.exit_code == 1 and "ecs.instanceType: t3.medium has no NVIDIA GPU" in result.stderr
    # …and the account's own answer (GpuInfo) says the same when the table does not know a type.
    edit("instanceType: t3.medium", "instanceType: g4dn.xlarge")
    config = load_config(Path("config/config.yml"))
    config.values["ecs"]["instanceType"] = "t3.medium"
    findings = preflight.check_instance_type(config, _clients(), "us-east-1")
    assert findings[0].status == preflight.PROBLEM and findings[0].key == "ecs.instanceType"
    assert findings[0].message.startswith("t3.medium has no GPU, but ecs.gpus is 1")


def test_every_problem_at_once_in_one_run(project, account):
    ec2 = client("ec2")
    ec2.modify_vpc_attribute(VpcId=account["vpc"], EnableDnsSupport={"Value": False})
    ec2.delete_key_pair(KeyName="cnsq-key")
    client("s3").delete_bucket(Bucket="cnsq-artifacts")
    edit(account["subnets"][1], account["public"])  # in the first one's zone, and routed to the IGW
    result = validate()
    assert result.exit_code == 1
    keys = sorted(line.split(":")[0] for line in problems(result))
    assert keys == ["buckets.internal", "ecs.keyPairName", "subnets", "subnets", "vpc"]
    assert "Preflight: 5 problem(s)" in result.stdout
    deploy = CliRunner().invoke(main, ["deploy"], catch_exceptions=False)
    assert deploy.exit_code == 1 and "preflight found 5 problem(s); nothing was deployed" in deploy.stderr
    assert client("cloudformation").list_stacks()["StackSummaries"] == []


def test_offline_and_no_credentials(project, monkeypatch, tmp_path):
    assert "Account not checked (--offline)." in validate("--offline").stdout
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = validate()
    assert result.exit_code == 1
    assert "Account not checked: no AWS credentials" in result.stdout
    assert "pass --offline to check the template alone" in result.stderr


def test_an_unreachable_account_is_not_a_pass(project, monkeypatch):
    # Nothing listens on this port: every call fails to connect. Asked once, in seconds.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = validate()
    assert result.exit_code == 1, result.output
    assert "Account not checked: AWS did not answer (Could not connect" in result.stdout
    assert "check(s) passed" not in result.output
    deploy = CliRunner().invoke(main, ["deploy"], catch_exceptions=False)
    # Deploy's first call finds nothing answers: said at once (its preflight comes later).
    assert deploy.exit_code == 1 and "cannot reach AWS (Could not connect" in deploy.stderr


class _DenyAll(_Quiet):
    """An account that answers and refuses everything (as an SCP denying all would)."""

    def _deny(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (b"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>"
                b"<Message>denied</Message></Error></ErrorResponse>")
        self.send(403, body, "text/xml")

    do_GET = do_POST = do_PUT = do_HEAD = _deny


def test_a_preflight_whose_every_check_was_denied_is_not_a_pass(project, monkeypatch):
    server = _Server(_DenyAll)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        result = validate()
    finally:
        server.close()
    assert result.exit_code == 1, result.output
    assert "warning: buckets.internal: not checked" in result.stderr
    assert "Account not checked: none of the" in result.stdout
    assert "Preflight:" not in result.stdout


# -- what moto cannot answer, on the same code through botocore's Stubber


class Clients:
    """A client factory like cnsq.aws.Aws.client, with some clients stubbed."""

    def __init__(self, **stubbed):
        self.stubbed = stubbed

    def __call__(self, service: str):
        return self.stubbed.get(service) or boto3.client(service, region_name="us-east-1")


def _clients(**stubbed) -> Clients:
    return Clients(**stubbed)


def _stub(service: str):
    real = boto3.client(service, region_name="us-east-1")
    return real, Stubber(real)


def test_a_vcpu_quota_below_max_instances_stubbed(project):
    quotas, stub = _stub("service-quotas")
    stub.add_response("get_service_quota", {"Quota": {"Value": 8.0}},
                      {"ServiceCode": "ec2", "QuotaCode": "L-DB2E81BA"})
    stub.activate()
    config = load_config(Path("config/config.yml"), "prod")  # 4 x g4dn.xlarge = 16 vCPUs
    findings = preflight.check_instance_type(config, _clients(**{"service-quotas": quotas}), "us-east-1")
    quota = [f for f in findings if f.check == "quota"][0]
    assert quota.status == preflight.PROBLEM and quota.key == "ecs.maxInstances"
    assert quota.message.startswith("4 x g4dn.xlarge need 16 vCPUs; the account's quota "
                                    "'Running On-Demand G and VT instances' is 8")


def test_spot_hosts_are_checked_against_the_spot_vcpu_quota_stubbed(project):
    """ecs.spot: 50 of 4 hosts: 2 on demand, 2 on Spot, each share against its own quota."""
    quotas, stub = _stub("service-quotas")
    stub.add_response("get_service_quota", {"Quota": {"Value": 64.0}},
                      {"ServiceCode": "ec2", "QuotaCode": "L-DB2E81BA"})
    stub.add_response("get_service_quota", {"Quota": {"Value": 4.0}},
                      {"ServiceCode": "ec2", "QuotaCode": "L-3819A6DF"})
    stub.activate()
    edit("  ecs:\n", "  ecs:\n    spot: 50\n")
    config = load_config(Path("config/config.yml"), "prod")  # 4 x g4dn.xlarge
    findings = preflight.check_instance_type(config, _clients(**{"service-quotas": quotas}), "us-east-1")
    lines = [f.line() for f in findings if f.check == "quota"]
    assert lines == [
        "ok: ecs.maxInstances: 8 of 64 vCPUs (Running On-Demand G and VT instances)",
        "ecs.maxInstances: 2 x g4dn.xlarge need 8 vCPUs; the account's quota 'All G and VT Spot "
        "Instance Requests' is 4: request an increase in Service Quotas (L-3819A6DF) or lower "
        "ecs.maxInstances"]


def test_reserved_concurrency_that_leaves_under_100_stubbed(project):
    lam, stub = _stub("lambda")
    stub.add_response("get_account_settings", {"AccountLimit": {
        "ConcurrentExecutions": 15, "UnreservedConcurrentExecutions": 15}})
    stub.add_client_error("get_function_concurrency", "ResourceNotFoundException")
    stub.activate()
    edit("    minInstances: 0\n", "")  # a fixed size: the worker reserves `concurrent`
    config = load_config(Path("config/config.yml"))
    [finding] = preflight.check_concurrency(config, _clients(**{"lambda": lam}), "us-east-1")
    assert finding.status == preflight.PROBLEM and finding.key == "lambdas.DownloadAndPredict.concurrent"
    assert "would leave 5 unreserved of the account's 15" in finding.message


def test_scaling_mode_checks_what_the_template_reserves(project):
    """The check read `concurrent` while the template reserves maxConcurrent + 1 (the
    controller): an account at its default quota failed at deploy, minutes in."""
    edit("      concurrent: 10 #", "      maxConcurrent: 950\n      concurrent: 10 #")
    config = load_config(Path("config/config.yml"))
    reserved = preflight.reserved_concurrency(config.values)
    template = json.loads(json.dumps(
        __import__("cnsq.deploy.template", fromlist=["load_cfn_yaml"]).load_cfn_yaml(
            render(config, REPO / "templates", {}))))
    in_template = {r["Properties"]["FunctionName"]: r["Properties"]["ReservedConcurrentExecutions"]
                   for r in template["Resources"].values()
                   if r["Type"] == "AWS::Lambda::Function"
                   and "ReservedConcurrentExecutions" in r["Properties"]}
    assert {name: count for name, (_, count) in reserved.items()} == in_template == {
        "cnsq-dev-DownloadAndPredict": 950, "cnsq-dev-controller": 1}
    lam, stub = _stub("lambda")
    stub.add_response("get_account_settings", {"AccountLimit": {
        "ConcurrentExecutions": 1000, "UnreservedConcurrentExecutions": 1000}})
    stub.add_client_error("get_function_concurrency", "ResourceNotFoundException")
    stub.add_client_error("get_function_concurrency", "ResourceNotFoundException")
    stub.activate()
    [finding] = preflight.check_concurrency(config, _clients(**{"lambda": lam}), "us-east-1")
    assert finding.status == preflight.PROBLEM
    assert finding.key == "lambdas.DownloadAndPredict.maxConcurrent"
    assert "reserving 951 would leave 49 unreserved of the account's 1000" in finding.message


def _orderable(*versions: str) -> list[dict]:
    return [{"Engine": "postgres", "EngineVersion": v, "DBInstanceClass": "db.t3.medium"}
            for v in versions]


def _two_pages(stub, first: list[dict], second: list[dict]) -> None:
    """RDS's answer as AWS gives it: 100 rows a page, oldest versions first, then a Marker."""
    asked = {"Engine": "postgres", "DBInstanceClass": "db.t3.medium"}
    stub.add_response("describe_orderable_db_instance_options",
                      {"OrderableDBInstanceOptions": first, "Marker": "page-2"}, asked)
    stub.add_response("describe_orderable_db_instance_options",
                      {"OrderableDBInstanceOptions": second}, {**asked, "Marker": "page-2"})


def test_the_engine_major_on_the_second_page_is_found_stubbed(project):
    rds, stub = _stub("rds")
    # Page 1: 100 rows of old versions; PostgreSQL 18 only on page 2, as on AWS today.
    old = [f"{major}.{minor}" for major in (11, 12, 13, 14, 15) for minor in range(20)]
    _two_pages(stub, _orderable(*old), _orderable("16.10", "17.6", "18.1"))
    stub.activate()
    config = load_config(Path("config/config.yml"))
    [finding] = preflight.check_database(config, _clients(rds=rds), "us-east-1")
    assert finding.status == preflight.OK, finding.message
    assert finding.message == "PostgreSQL 18 on db.t3.medium is orderable"
    stub.assert_no_pending_responses()


def test_an_engine_major_the_class_cannot_run_stubbed(project):
    rds, stub = _stub("rds")
    _two_pages(stub, _orderable("16.10"), _orderable("17.6"))
    stub.activate()
    config = load_config(Path("config/config.yml"))
    [finding] = preflight.check_database(config, _clients(rds=rds), "us-east-1")
    assert finding.status == preflight.PROBLEM and finding.key == "rds.engineVersion"
    assert finding.message == ("PostgreSQL 18 cannot be created on db.t3.medium in us-east-1; "
                               "majors offered: 16, 17")


def test_access_denied_is_a_warning_naming_the_permission_stubbed(project):
    ssm, stub = _stub("ssm")
    stub.add_client_error("get_parameter", "AccessDeniedException", "no")
    stub.activate()
    config = load_config(Path("config/config.yml"))
    findings = preflight._guard("ami", "ecs.amiParameter", "ssm:GetParameter",
                                lambda: preflight.check_ami(config, _clients(ssm=ssm), "us-east-1"))
    assert [f.line() for f in findings] == [
        "warning: ecs.amiParameter: not checked: this caller may not ssm:GetParameter"]


def _instance_type_stub(itype: str, gpus: list[dict], architectures=("x86_64",)):
    """EC2 answering for an instance type moto does not know, in two pages where it pages."""
    ec2, stub = _stub("ec2")
    stub.add_response("describe_instance_types", {"InstanceTypes": [{
        "InstanceType": itype, "VCpuInfo": {"DefaultVCpus": 192},
        "ProcessorInfo": {"SupportedArchitectures": list(architectures)},
        **({"GpuInfo": {"Gpus": gpus}} if gpus else {})}]}, {"InstanceTypes": [itype]})
    offerings = {"LocationType": "availability-zone",
                 "Filters": [{"Name": "instance-type", "Values": [itype]}]}
    stub.add_response("describe_instance_type_offerings", {"InstanceTypeOfferings": [
        {"InstanceType": itype, "Location": "us-east-1a", "LocationType": "availability-zone"}],
        "NextToken": "more"}, offerings)
    stub.add_response("describe_instance_type_offerings", {"InstanceTypeOfferings": [
        {"InstanceType": itype, "Location": "us-east-1b", "LocationType": "availability-zone"}]},
        {**offerings, "NextToken": "more"})
    stub.add_response("describe_subnets", {"Subnets": [
        {"SubnetId": "subnet-1", "AvailabilityZone": "us-east-1a", "VpcId": "vpc-1"},
        {"SubnetId": "subnet-2", "AvailabilityZone": "us-east-1b", "VpcId": "vpc-1"}]})
    stub.activate()
    return ec2, stub


def _with_type(itype: str):
    edit("instanceType: g4dn.xlarge", f"instanceType: {itype}")
    return load_config(Path("config/config.yml"))


def test_the_account_decides_the_tasks_on_a_type_cnsq_does_not_know_stubbed(project):
    config = _with_type("p6-b200.48xlarge")
    assert config.values["ecs"]["tasksPerInstance"] == 1  # offline: not known
    ec2, stub = _instance_type_stub("p6-b200.48xlarge", [
        {"Name": "B200", "Manufacturer": "NVIDIA", "Count": 8, "MemoryInfo": {"SizeInMiB": 183359}}])
    findings = preflight.check_instance_type(config, _clients(ec2=ec2), "us-east-1")
    stub.assert_no_pending_responses()
    decided = [f for f in findings if f.decided]
    assert [f.line() for f in decided] == [
        "set: ecs.tasksPerInstance: 8 model task(s) per instance: p6-b200.48xlarge has 8 GPU(s), "
        "1 per task (from the account)"]
    assert config.values["ecs"]["tasksPerInstance"] == 8
    assert not [f for f in findings if f.status == preflight.PROBLEM]
    ok = [f for f in findings if f.check == "instance type"]
    assert ok[0].message == "p6-b200.48xlarge: 8 GPU(s), offered in 2 zones"
    # …and the stack then runs one model task per GPU.
    text = render(config, REPO / "templates", {})
    assert "TASKS_PER_INSTANCE: '8'" in text  # the controller places 8 tasks on a host


def test_a_value_the_user_wrote_is_not_replaced_by_the_account_stubbed(project):
    edit("instanceType: g4dn.xlarge", "instanceType: p6-b300.48xlarge\n    tasksPerInstance: 2")
    config = load_config(Path("config/config.yml"))
    ec2, _ = _instance_type_stub("p6-b300.48xlarge", [
        {"Name": "B300", "Manufacturer": "NVIDIA", "Count": 8}])
    findings = preflight.check_instance_type(config, _clients(ec2=ec2), "us-east-1")
    assert not [f for f in findings if f.decided or f.status == preflight.PROBLEM]
    assert config.values["ecs"]["tasksPerInstance"] == 2


@pytest.mark.parametrize("itype, gpus, architectures, message", [
    ("p6e-gb200.36xlarge", [{"Name": "GB200", "Manufacturer": "NVIDIA", "Count": 4}], ("arm64",),
     "p6e-gb200.36xlarge is arm64; the ECS GPU AMI is built for x86_64 only"),
    ("g9x.xlarge", [{"Name": "Radeon", "Manufacturer": "AMD", "Count": 1}], ("x86_64",),
     "g9x.xlarge has AMD GPUs; the ECS GPU AMI drives NVIDIA GPUs only"),
])
def test_the_account_refuses_what_the_gpu_ami_cannot_run_stubbed(project, itype, gpus, architectures,
                                                                 message):
    config = _with_type(itype)
    ec2, _ = _instance_type_stub(itype, gpus, architectures)
    findings = preflight.check_instance_type(config, _clients(ec2=ec2), "us-east-1")
    assert [f.message for f in findings if f.status == preflight.PROBLEM] == [message]


# -- the deploying identity's permissions (iam:SimulatePrincipalPolicy; moto has none)


def _simulation(config, denied: set[str]) -> tuple:
    """STS answers an assumed role; IAM gives its path and simulates every action, the first
    batch's answer in two pages (IsTruncated/Marker) as IAM pages it."""
    sts, sts_stub = _stub("sts")
    sts_stub.add_response("get_caller_identity", {
        "UserId": "AROAEXAMPLE:deployer", "Account": "123456789012",
        "Arn": "arn:aws:sts::123456789012:assumed-role/cnsq-deployer/ci-session"})
    iam, iam_stub = _stub("iam")
    role = "arn:aws:iam::123456789012:role/deploy/cnsq-deployer"
    iam_stub.add_response("get_role", {"Role": {
        "Path": "/deploy/", "RoleName": "cnsq-deployer", "RoleId": "AROAEXAMPLE1234567890",
        "Arn": role, "CreateDate": "2026-01-01T00:00:00Z"}}, {"RoleName": "cnsq-deployer"})
    names = list(preflight.deployer_actions(config))

    def results(batch):
        return [{"EvalActionName": n, "EvalDecision": "implicitDeny" if n in denied else "allowed"}
                for n in batch]
    for start in range(0, len(names), 50):
        batch = names[start:start + 50]
        asked = {"PolicySourceArn": role, "ActionNames": batch}
        if start == 0:
            iam_stub.add_response("simulate_principal_policy", {
                "EvaluationResults": results(batch[:25]), "IsTruncated": True, "Marker": "m"}, asked)
            iam_stub.add_response("simulate_principal_policy", {
                "EvaluationResults": results(batch[25:]), "IsTruncated": False}, {**asked, "Marker": "m"})
        else:
            iam_stub.add_response("simulate_principal_policy", {
                "EvaluationResults": results(batch), "IsTruncated": False}, asked)
    sts_stub.activate()
    iam_stub.activate()
    return _clients(sts=sts, iam=iam), iam_stub


def test_missing_deployer_permissions_are_named_stubbed(project):
    config = load_config(Path("config/config.yml"))
    clients, stub = _simulation(config, {"secretsmanager:CreateSecret", "kms:DescribeKey"})
    findings = preflight.check_permissions(config, clients, "us-east-1")
    stub.assert_no_pending_responses()
    assert [f.line() for f in findings] == [
        f"deployer: arn:aws:iam::123456789012:role/deploy/cnsq-deployer may not {name}, which it "
        f"needs: {why}; the stack would roll back after many minutes. Add it to the identity's policy"
        for name, why in (
            ("secretsmanager:CreateSecret", "RDS creates the database's managed master password "
             "secret as the caller (and the tile token's secret)"),
            ("kms:DescribeKey", "RDS checks the key of the managed master password secret as the caller"))]


def test_a_deployer_with_every_permission_passes_stubbed(project):
    config = load_config(Path("config/config.yml"))
    clients, _ = _simulation(config, set())
    [finding] = preflight.check_permissions(config, clients, "us-east-1")
    assert finding.status == preflight.OK
    assert finding.message.startswith("arn:aws:iam::123456789012:role/deploy/cnsq-deployer may do the ")


def test_a_denied_simulation_is_a_warning_stubbed(project):
    config = load_config(Path("config/config.yml"))
    sts, sts_stub = _stub("sts")
    sts_stub.add_response("get_caller_identity", {
        "UserId": "AIDAEXAMPLE", "Account": "123456789012",
        "Arn": "arn:aws:iam::123456789012:user/alice"})
    iam, iam_stub = _stub("iam")
    iam_stub.add_client_error("simulate_principal_policy", "AccessDenied", "no")
    sts_stub.activate()
    iam_stub.activate()
    findings = preflight._guard("permissions", "deployer", "iam:SimulatePrincipalPolicy",
                                lambda: preflight.check_permissions(config, _clients(sts=sts, iam=iam),
                                                                    "us-east-1"))
    assert [f.line() for f in findings] == [
        "warning: deployer: not checked: this caller may not iam:SimulatePrincipalPolicy"]


# What creating each resource type of the template asks of the caller first. A resource type the
# template gains fails here until deployer-permissions.yml says what it needs.
CREATE_ACTION = {
    "AWS::SQS::Queue": "sqs:CreateQueue", "AWS::IAM::Role": "iam:CreateRole",
    "AWS::IAM::InstanceProfile": "iam:CreateInstanceProfile",
    "AWS::SecretsManager::Secret": "secretsmanager:CreateSecret",
    "AWS::Logs::LogGroup": "logs:CreateLogGroup", "AWS::Lambda::Function": "lambda:CreateFunction",
    "AWS::Lambda::EventSourceMapping": "lambda:CreateEventSourceMapping",
    "AWS::EC2::SecurityGroup": "ec2:CreateSecurityGroup",
    "AWS::RDS::DBSubnetGroup": "rds:CreateDBSubnetGroup", "AWS::RDS::DBInstance": "rds:CreateDBInstance",
    "AWS::ECS::Cluster": "ecs:CreateCluster", "AWS::ECS::TaskDefinition": "ecs:RegisterTaskDefinition",
    "AWS::ECS::Service": "ecs:CreateService", "AWS::EC2::LaunchTemplate": "ec2:CreateLaunchTemplate",
    "AWS::AutoScaling::AutoScalingGroup": "autoscaling:CreateAutoScalingGroup",
    "AWS::ElasticLoadBalancingV2::LoadBalancer": "elasticloadbalancing:CreateLoadBalancer",
    "AWS::ElasticLoadBalancingV2::TargetGroup": "elasticloadbalancing:CreateTargetGroup",
    "AWS::ElasticLoadBalancingV2::Listener": "elasticloadbalancing:CreateListener",
    "AWS::EC2::VPC": "ec2:CreateVpc", "AWS::EC2::InternetGateway": "ec2:CreateInternetGateway",
    "AWS::EC2::VPCGatewayAttachment": "ec2:AttachInternetGateway", "AWS::EC2::Subnet": "ec2:CreateSubnet",
    "AWS::EC2::SubnetRouteTableAssociation": "ec2:AssociateRouteTable", "AWS::EC2::EIP": "ec2:AllocateAddress",
    "AWS::EC2::NatGateway": "ec2:CreateNatGateway", "AWS::EC2::RouteTable": "ec2:CreateRouteTable",
    "AWS::EC2::Route": "ec2:CreateRoute", "AWS::EC2::VPCEndpoint": "ec2:CreateVpcEndpoint",
    "AWS::ECS::CapacityProvider": "ecs:CreateCapacityProvider",
    "AWS::ECS::ClusterCapacityProviderAssociations": "ecs:PutClusterCapacityProviders",
    "AWS::SSM::Parameter": "ssm:PutParameter", "AWS::Events::Rule": "events:PutRule",
    "AWS::Lambda::Permission": "lambda:AddPermission",
    "AWS::EC2::VPCCidrBlock": "ec2:AssociateVpcCidrBlock",
    "AWS::EC2::EgressOnlyInternetGateway": "ec2:CreateEgressOnlyInternetGateway",
}


@pytest.mark.parametrize("network", ["existing", "created"])
def test_the_permission_list_covers_every_resource_of_the_template(project, network):
    if network == "created":
        text = Path("config/config.yml").read_text()
        lines = [line for line in text.splitlines() if not line.startswith(("  vpc:", "  subnets:", "    - subnet-"))]
        Path("config/config.yml").write_text("\n".join(lines) + "\n")
    config = load_config(Path("config/config.yml"))
    from cnsq.deploy.template import load_cfn_yaml
    types = {r["Type"] for r in load_cfn_yaml(render(config, REPO / "templates", {}))["Resources"].values()}
    unknown = types - set(CREATE_ACTION)
    assert not unknown, f"say in deployer-permissions.yml what creating {unknown} needs"
    actions = preflight.deployer_actions(config)
    assert {CREATE_ACTION[t] for t in types} <= set(actions)


def test_the_region_has_a_home_in_the_config(project, monkeypatch):
    """region: in config.yml was refused as an unknown key."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    edit("  stackName: 'cnsq-{{ stage }}'", "  stackName: 'cnsq-{{ stage }}'\n  region: us-east-1")
    result = validate()
    assert result.exit_code == 0, result.output
    assert "Region: us-east-1 (from region in config/config.yml)." in result.stdout
    # The command line and the environment win, and validate says which was used.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    result = validate("--offline")
    assert result.exit_code == 0
    result = CliRunner().invoke(main, ["validate", "--region", "us-east-1"], catch_exceptions=False)
    assert "Region: us-east-1 (from --region or AWS_REGION)." in result.stdout


# ---------------------------------------------------------------------------------------------
# The imagery's way out (cnsq/egress.py): a resolver passed in, so no test needs DNS.

V6_HOST = lambda host: {__import__("socket").AF_INET, __import__("socket").AF_INET6}  # noqa: E731


def _egress(resolve, region: str = "us-east-1") -> list[preflight.Finding]:
    config = load_config(Path("config/config.yml"))
    return preflight.check_egress(config, lambda service, **kw: client(service), region, resolve)


def test_a_given_network_is_told_what_to_add_for_imagery_over_ipv6(project, account):
    findings = _egress(V6_HOST)
    lines = [f.line() for f in findings]
    assert lines[0] == ("warning: TILE_ENDPOINT: tiles.test answers over IPv6, but the subnets "
                        "are not dual-stack: its bytes go through the NAT gateway ($1.80 per "
                        "million tiles of 40 KB)")
    assert "add an Amazon-provided IPv6 block to the VPC" in lines[1] and "ipv6: true" in lines[1]
    assert not [f for f in findings if f.status == preflight.PROBLEM]


def test_ipv6_true_on_subnets_without_ipv6_names_each_missing_part(project, account):
    edit("  ecs:\n", "  ipv6: true\n\n  ecs:\n")
    problems_ = [f.line() for f in _egress(V6_HOST) if f.status == preflight.PROBLEM]
    for subnet in account["subnets"]:
        assert any(line.startswith(f"ipv6: ipv6 is true but {subnet} has no IPv6 block") for line in problems_)
        assert any(line.startswith(f"ipv6: ipv6 is true but {subnet} routes no ::/0 to an "
                                   "egress-only internet gateway") for line in problems_)
    # validate fails on them, with the rest of preflight.
    result = validate()
    assert result.exit_code == 1
    assert sum("has no IPv6 block" in line for line in problems(result)) == 2


def test_ipv6_true_on_a_dual_stack_network_takes_the_free_way(project, account):
    ec2 = client("ec2")
    block = ec2.associate_vpc_cidr_block(VpcId=account["vpc"], AmazonProvidedIpv6CidrBlock=True)[
        "Ipv6CidrBlockAssociation"]["Ipv6CidrBlock"]
    import ipaddress

    sixty_fours = ipaddress.ip_network(block).subnets(new_prefix=64)
    for subnet in account["subnets"]:
        ec2.associate_subnet_cidr_block(SubnetId=subnet, Ipv6CidrBlock=str(next(sixty_fours)))
    gateway = ec2.create_egress_only_internet_gateway(VpcId=account["vpc"])[
        "EgressOnlyInternetGateway"]["EgressOnlyInternetGatewayId"]
    ec2.create_route(RouteTableId=account["private_table"], DestinationIpv6CidrBlock="::/0",
                     EgressOnlyInternetGatewayId=gateway)
    edit("  ecs:\n", "  ipv6: true\n\n  ecs:\n")
    findings = _egress(V6_HOST)
    assert [f.line() for f in findings] == [
        "ok: TILE_ENDPOINT: tiles.test answers over IPv6: its bytes take the egress-only "
        "internet gateway, no per-GB charge ($0.00 per million tiles of 40 KB)"]
    # An IPv4-only imagery server still pays the NAT, and is told so.
    [v4] = _egress(lambda host: {__import__("socket").AF_INET})
    assert v4.status == preflight.WARNING and "answers over IPv4 only" in v4.message


def test_imagery_on_s3_in_the_region_needs_a_gateway_endpoint(project, account):
    edit("https://tiles.test/{}", "https://imagery.s3.us-east-1.amazonaws.com/{}")
    lines = [f.line() for f in _egress(lambda host: set())]
    assert lines[0].startswith("ok: TILE_ENDPOINT: imagery.s3.us-east-1.amazonaws.com is S3 in "
                               "us-east-1: its bytes take the S3 gateway endpoint")
    assert any("route tables have no gateway endpoint" in line for line in lines)
    client("ec2").create_vpc_endpoint(VpcId=account["vpc"], VpcEndpointType="Gateway",
                                      ServiceName="com.amazonaws.us-east-1.s3",
                                      RouteTableIds=[account["private_table"]])
    assert [f.status for f in _egress(lambda host: set())] == [preflight.OK]


def test_the_created_network_needs_no_account_to_say_the_way(project):
    text = Path("config/config.yml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith(("  vpc:", "  subnets:", "    - subnet-"))]
    Path("config/config.yml").write_text("\n".join(lines) + "\n")
    config = load_config(Path("config/config.yml"))

    def no_client(service, **kw):
        raise AssertionError(f"asked for {service}")

    [finding] = preflight.check_egress(config, no_client, "us-east-1", V6_HOST)
    assert finding.status == preflight.OK and "egress-only internet gateway" in finding.message
