"""Preflight against a moto account: a complete good account passes (with warnings for what moto
cannot answer); each missing prerequisite alone fails validate with its config key; all of them
at once are all reported. Checks moto does not emulate are tested with botocore's Stubber on the
same code (tests named *_stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
from botocore.stub import Stubber
from click.testing import CliRunner
from conftest import client, free_port
from servers import _Quiet, _Server

from cnsq import preflight
from cnsq.cli import main
from cnsq.config import load_config


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
    client("ec2").delete_key_pair(KeyName="your-key-pair")
    result = validate()
    assert result.exit_code == 1
    assert sorted(problems(result)) == [
        "buckets.internal: bucket cnsq-artifacts does not exist; create it in us-east-1 "
        "(aws s3 mb s3://cnsq-artifacts --region us-east-1)",
        "ecs.keyPairName: key pair your-key-pair does not exist in us-east-1; create or import it, "
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
    ec2.delete_key_pair(KeyName="your-key-pair")
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
    assert deploy.exit_code == 1 and "Pass --skip-preflight to deploy anyway" in deploy.stderr


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


def test_reserved_concurrency_that_leaves_under_100_stubbed(project):
    lam, stub = _stub("lambda")
    stub.add_response("get_account_settings", {"AccountLimit": {
        "ConcurrentExecutions": 10, "UnreservedConcurrentExecutions": 10}})
    stub.add_client_error("get_function_concurrency", "ResourceNotFoundException")
    stub.activate()
    config = load_config(Path("config/config.yml"))
    [finding] = preflight.check_concurrency(config, _clients(**{"lambda": lam}), "us-east-1")
    assert finding.status == preflight.PROBLEM and finding.key == "lambdas.DownloadAndPredict.concurrent"
    assert "would leave 5 unreserved of the account's 10" in finding.message


def test_an_engine_major_the_class_cannot_run_stubbed(project):
    rds, stub = _stub("rds")
    options = [{"Engine": "postgres", "EngineVersion": v, "DBInstanceClass": "db.t3.medium"}
               for v in ("16.10", "17.6")]
    stub.add_response("describe_orderable_db_instance_options",
                      {"OrderableDBInstanceOptions": options})
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
