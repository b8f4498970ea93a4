"""cnsq deploy / outputs / delete against a real moto server, through the CLI a user runs."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cnsq.cli import main
from support.accounts import client, key_pair
from support.projects import SECRETS


def cnsq(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def bucket_keys() -> list[str]:
    s3 = client("s3")
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="cnsq-artifacts").get("Contents", []))


def stack_status(name: str = "cnsq-dev") -> str:
    return client("cloudformation").describe_stacks(StackName=name)["Stacks"][0]["StackStatus"]


def test_create_update_noop_delete(project):
    created = cnsq("deploy", "--json")
    assert created.exit_code == 0, created.output
    report = json.loads(created.stdout)
    assert stack_status() == "CREATE_COMPLETE"
    assert {c["logical_id"] for c in report["changes"]} >= {
        "cnsqdevTileQueue", "cnsqdevDeadLetterQueue", "DownloadAndPredictLambdaFunction",
        "cnsqdevResultsDB", "cnsqdevLaunchTemplate", "cnsqdevECSService"}
    assert all(c["action"] == "Add" for c in report["changes"])
    assert len(report["uploaded"]) == 1 and report["uploaded"][0].startswith("cnsq-dev/lambdas/")

    queues = client("sqs").list_queues()["QueueUrls"]
    assert any(q.endswith("/cnsqdevTileQueue") for q in queues)
    function = client("lambda").get_function(FunctionName="cnsq-dev-DownloadAndPredict")
    assert function["Configuration"]["Runtime"] == "python3.12"
    mappings = client("lambda").list_event_source_mappings(FunctionName="cnsq-dev-DownloadAndPredict")
    assert mappings["EventSourceMappings"][0]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]

    # One changed property → an UPDATE change set that modifies the queue only.
    config = Path("config/config.yml")
    config.write_text(config.read_text().replace("visibilityTimeout: 720", "visibilityTimeout: 900"))
    keys_before = bucket_keys()
    updated = cnsq("deploy")
    assert updated.exit_code == 0, updated.output
    assert "Changes (UPDATE)" in updated.stdout
    rows = [line.split() for line in updated.stdout.splitlines() if line.startswith("Modify")]
    assert rows == [["Modify", "cnsqdevTileQueue", "AWS::SQS::Queue", "-"]]
    assert stack_status() == "UPDATE_COMPLETE"
    attrs = client("sqs").get_queue_attributes(QueueUrl=[q for q in queues if "Tile" in q][0],
                                               AttributeNames=["VisibilityTimeout"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "900"
    assert "The stack cnsq-dev is deployed or updated." in updated.stdout
    assert "cnsq setup --config config/config.yml" in updated.stdout
    # Same code → same zip key: only the new template was uploaded.
    assert [k for k in bucket_keys() if k not in keys_before][0].startswith("cnsq-dev/templates/")

    # Nothing changed → "nothing to deploy", exit 0, nothing uploaded, change set deleted.
    keys_before = bucket_keys()
    noop = cnsq("deploy", "--json")
    assert noop.exit_code == 0, noop.output
    assert "nothing to deploy" in noop.stderr
    assert json.loads(noop.stdout)["uploaded"] == []
    assert bucket_keys() == keys_before
    summaries = client("cloudformation").list_change_sets(StackName="cnsq-dev")["Summaries"]
    assert json.loads(noop.stdout)["changeSetArn"] is None
    assert [s for s in summaries if s["Status"] == "FAILED"] == []  # the empty one was deleted
    assert cnsq("deploy", "--fail-on-empty").exit_code == 1

    deleted = cnsq("delete", "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert "download your results first" in deleted.stdout
    assert "cnsqdevResultsDB" in deleted.stdout
    assert "Deleted cnsq-dev." in deleted.stdout
    stacks = client("cloudformation").list_stacks(StackStatusFilter=["CREATE_COMPLETE", "UPDATE_COMPLETE"])
    assert stacks["StackSummaries"] == []


def test_no_secret_reaches_disk_s3_outputs_or_the_terminal(project):
    first = cnsq("deploy")
    update = cnsq("deploy", "--deployment", "prod")
    outputs = cnsq("outputs", "--json")
    texts = [first.output, update.output, outputs.output]
    for path in Path(".cnsq").rglob("*"):
        if path.is_file() and path.suffix != ".zip":
            texts.append(path.read_text(errors="replace"))
    s3 = client("s3")
    for key in bucket_keys():
        if key.endswith(".yml"):
            texts.append(s3.get_object(Bucket="cnsq-artifacts", Key=key)["Body"].read().decode())
    for stack in ("cnsq-dev", "cnsq-prod"):
        description = client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]
        texts.append(json.dumps(description.get("Outputs", [])))
    assert first.exit_code == 0 and update.exit_code == 0, first.output + update.output
    for text in texts:
        for value in SECRETS.values():
            assert value not in text


def test_no_execute_shows_changes_and_changes_nothing(project):
    result = cnsq("deploy", "--no-execute")
    assert result.exit_code == 0, result.output
    assert "not executed (--no-execute)" in result.stdout
    assert stack_status() == "REVIEW_IN_PROGRESS"
    assert client("sqs").list_queues().get("QueueUrls", []) == []
    reviewed = client("cloudformation").describe_stacks(StackName="cnsq-dev")["Stacks"][0]

    def statuses() -> dict[str, str]:
        summaries = client("cloudformation").list_stacks()["StackSummaries"]
        return {s["StackId"]: s["StackStatus"] for s in summaries}

    # Planning again deletes nothing: the reviewed stack stays as it was.
    assert cnsq("deploy", "--no-execute").exit_code == 0
    assert statuses()[reviewed["StackId"]] == "REVIEW_IN_PROGRESS"
    assert "DELETE_COMPLETE" not in statuses().values()
    # The next deploy creates the stack from there. (AWS executes the change set on the
    # reviewed stack itself; moto gives each CREATE change set a stack of its own, so the
    # created one is found by its status.)
    assert cnsq("deploy").exit_code == 0
    assert "CREATE_COMPLETE" in statuses().values()
    assert client("sqs").list_queues().get("QueueUrls", []) != []


def test_failed_creation_exits_1_and_says_why(project):
    config = Path("config/config.yml")
    subnet = config.read_text().split("subnets:\n    - ")[1].split()[0]
    config.write_text(config.read_text().replace(subnet, "subnet-00000000000000000"))
    checked = cnsq("deploy")  # the preflight stops it before anything is created
    assert checked.exit_code == 1
    assert "subnets: subnet-00000000000000000 not found in" in checked.stderr
    assert "nothing was deployed" in checked.stderr
    result = cnsq("deploy", "--skip-preflight")  # CloudFormation's own failure, explained
    assert result.exit_code == 1
    assert "Preflight skipped (--skip-preflight)" in result.stdout
    assert "subnet-00000000000000000" in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_missing_bucket_is_a_clear_error(project):
    client("s3").delete_bucket(Bucket="cnsq-artifacts")
    checked = cnsq("deploy")
    assert checked.exit_code == 1
    assert "buckets.internal: bucket cnsq-artifacts does not exist; create it in us-east-1" in checked.stderr
    result = cnsq("deploy", "--skip-preflight")
    assert result.exit_code == 1
    assert "S3 bucket 'cnsq-artifacts' does not exist (buckets.internal)" in result.stderr


def test_delete_of_a_missing_stack_and_without_confirmation(project):
    missing = cnsq("delete", "--yes")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    assert cnsq("deploy").exit_code == 0
    refused = cnsq("delete")  # no terminal to ask on, no --yes
    assert refused.exit_code == 1 and "--yes" in refused.stderr
    assert stack_status() == "CREATE_COMPLETE"


def test_outputs_of_a_missing_stack(project):
    result = cnsq("outputs")
    assert result.exit_code == 1
    assert "stack 'cnsq-dev' does not exist" in result.stderr


def test_console_script_without_credentials_prints_one_line(project, tmp_path):
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "cnsq.cli", "outputs"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("Error: no AWS credentials found")
    assert "Traceback" not in done.stderr


def test_unknown_profile_is_a_clear_error(project):
    result = cnsq("outputs", "--profile", "nope-not-a-profile")
    assert result.exit_code == 1
    assert "AWS profile 'nope-not-a-profile'" in result.stderr




def test_a_config_in_the_original_format_deploys(project):
    current = Path("config/config.yml").read_text()
    vpc = current.split("vpc: ")[1].split()[0]
    subnet_a, subnet_b = current.split("subnets:\n    - ")[1].split("\n    - ")[:2]
    # The original's example, with the values its comments ask users to fill in, and the two
    # that AWS no longer accepts (python3.7, db.t2.medium) and the GPU-less t2.nano replaced as
    # cnsq's errors say.
    original = (Path(__file__).resolve().parents[1] / "data" / "chip-n-scale-config.yml").read_text()
    for old, new in (("your-bucket", "cnsq-artifacts"), ("your-vpc", vpc),
                     ("subnet 1", subnet_a.strip()), ("subnet 2", subnet_b.split()[0]),
                     ("python3.7", "python3.12"), ("db.t2.medium", "db.t3.medium"),
                     ("visibilityTimeout: 60", "visibilityTimeout: 360"),
                     ("instanceType: t2.nano", "instanceType: g4dn.xlarge"),
                     ("your-key-pair", "cnsq-key"), ("your_model", "water"),
                     ("https://example.com/", "https://tiles.test/")):
        original = original.replace(old, new)
    Path("config/config.yml").write_text(original)
    result = cnsq("deploy", "--config", "config/config.yml")
    assert result.exit_code == 0, result.output
    assert stack_status("your-stack") == "CREATE_COMPLETE"
    assert "$ cnsq setup --config config/config.yml" in result.stdout
    queues = client("sqs").list_queues()["QueueUrls"]
    assert any(q.endswith("/YourStackTileQueue") for q in queues)
    again = cnsq("deploy", "--config", "config/config.yml")
    assert "nothing to deploy" in again.output and again.exit_code == 0
    assert cnsq("delete", "--yes", "--config", "config/config.yml").exit_code == 0


def test_a_stack_that_creates_its_own_private_network(aws, tmp_path, monkeypatch):
    """The example as shipped names no VPC: the stack creates one (DNS on, two zones, private
    subnets behind a NAT) and everything lands in it."""
    from support.projects import make_project

    client("s3").create_bucket(Bucket="cnsq-artifacts")
    key_pair("cnsq-key")
    make_project(tmp_path / "proj", vpc=None)
    monkeypatch.chdir(tmp_path / "proj")
    result = cnsq("deploy")
    assert result.exit_code == 0, result.output
    assert stack_status() == "CREATE_COMPLETE"
    # (moto keeps no outputs for a stack created through a change set: read the resource.)
    vpc_id = client("cloudformation").describe_stack_resource(
        StackName="cnsq-dev", LogicalResourceId="VPC")["StackResourceDetail"]["PhysicalResourceId"]
    ec2 = client("ec2")
    # (moto's CloudFormation ignores EnableDnsSupport/Hostnames: test_template_private checks them.)
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    assert len({s["AvailabilityZone"] for s in subnets}) == 2 and len(subnets) == 4
    function = client("lambda").get_function(FunctionName="cnsq-dev-DownloadAndPredict")
    assert function["Configuration"]["VpcConfig"]["SubnetIds"]
    # Dual-stack: the Lambdas' subnets have /64s of the VPC's Amazon-provided block and route
    # ::/0 to an egress-only internet gateway (imagery over IPv6 skips the NAT's per-GB charge).
    assert function["Configuration"]["VpcConfig"]["Ipv6AllowedForDualStack"] is True
    private = [s for s in subnets if s["SubnetId"] in function["Configuration"]["VpcConfig"]["SubnetIds"]]
    blocks = [a["Ipv6CidrBlock"] for s in private for a in s.get("Ipv6CidrBlockAssociationSet", [])]
    assert len(blocks) == 2 and all(b.endswith("/64") for b in blocks)
    vpc_block = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
    assert all(ipaddress.ip_network(b).subnet_of(ipaddress.ip_network(vpc_block)) for b in blocks)
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["RouteTables"]
    # (moto lists no subnet associations made by its CloudFormation: the private table is the
    # one with the NAT route.)
    routes = next(t["Routes"] for t in tables if any(r.get("NatGatewayId") for r in t["Routes"]))
    assert any(r.get("DestinationIpv6CidrBlock") == "::/0" and r.get("EgressOnlyInternetGatewayId", "").startswith("eigw-")
               for r in routes)
    assert "TILE_ACCESS_TOKEN" not in function["Configuration"]["Environment"]["Variables"]
    db = client("rds").describe_db_instances()["DBInstances"][0]
    assert db["PubliclyAccessible"] is False
    balancer = client("elbv2").describe_load_balancers()["LoadBalancers"][0]
    assert balancer["Scheme"] == "internal"
    # (No delete here: moto's CloudFormation cannot delete route tables, so it refuses to delete
    # the VPC; the delete path is tested with an existing VPC above.)


def test_the_next_step_is_a_command_that_works_when_pasted(project):
    """The hint dropped --stack and --deployment: pasted, it set up another stack."""
    result = cnsq("deploy", "--stack", "cnsq-moto", "--deployment", "prod")
    assert result.exit_code == 0, result.output
    hint = [line for line in result.stdout.splitlines() if line.strip().startswith("$ cnsq setup")]
    assert hint == ["  $ cnsq setup --config config/config.yml --deployment prod --stack cnsq-moto"]


def test_spot_hosts_deploy_as_a_mixed_instances_group(project):
    """`ecs.spot: true` on moto: the group the stack creates is a mixed-instances group over
    the same-GPU types, all of it Spot."""
    config = Path("config/config.yml")
    config.write_text(config.read_text().replace("  ecs:\n", "  ecs:\n    spot: true\n", 1))
    result = cnsq("deploy")
    assert result.exit_code == 0, result.output
    [group] = client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"]
    policy = group["MixedInstancesPolicy"]
    assert [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]] == [
        "g4dn.xlarge", "g5.xlarge", "g6.xlarge"]
    assert policy["InstancesDistribution"]["OnDemandPercentageAboveBaseCapacity"] == 0
    assert policy["InstancesDistribution"]["SpotAllocationStrategy"] == "price-capacity-optimized"
