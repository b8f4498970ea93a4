"""Shared fixtures: a moto server, a throwaway PostgreSQL cluster, a project folder.

Everything runs for real on 127.0.0.1: boto3 reaches moto through AWS_ENDPOINT_URL, exactly as a
user's cnsq would reach AWS; PostgreSQL is a real server started with initdb/pg_ctl.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
from servers import PostgresCluster, free_port  # noqa: F401 - free_port is used by tests

REPO = Path(__file__).resolve().parent.parent
# Values that must never reach a file, S3, an output or the terminal. (RDS_PASSWORD is what an old
# config still names: it is dropped unread.) The username is not a secret.
SECRETS = {"RDS_PASSWORD": "pw-Zq81-never-print", "TILE_ACCESS_TOKEN": "tok-8JmX-never-print"}
ENV = {"RDS_USERNAME": "resultsadmin", **SECRETS}


def wait_for(check, timeout: float = 30.0, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout}s")


# ---------------------------------------------------------------------------------------------
# moto server


@pytest.fixture(scope="session")
def moto_url():
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{url}/moto-api/", timeout=1).ok, what="moto server")
    yield url
    process.terminate()
    process.wait(10)
    log.close()


@pytest.fixture
def aws(moto_url, monkeypatch):
    """A clean moto account, with the process environment pointing boto3 at it."""
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return moto_url


def client(service: str):
    return boto3.client(service, region_name="us-east-1")


def make_project(root: Path, bucket: str = "cnsq-artifacts", vpc: str | None = "vpc-0123456789abcdef0",
                 subnets: tuple[str, str] = ("subnet-0123456789abcdef0", "subnet-0fedcba9876543210"),
                 ) -> Path:
    """A project folder: config/config.yml (from the example), config/.env, a small lambda/."""
    (root / "config").mkdir(parents=True)
    # The example's placeholders filled in, as a user does before validate and deploy.
    text = (REPO / "config" / "config.example.yml").read_text().replace("your-bucket", bucket)
    text = text.replace("    # keyPairName: your-key-pair", "    keyPairName: cnsq-key")
    text = text.replace("/v1/models/your_model", "/v1/models/water")
    text = text.replace("https://example.com/{}", "https://tiles.test/{}")
    if vpc:  # an existing network, as the example's commented-out lines describe it
        text = text.replace("  # vpc: vpc-0123456789abcdef0", f"  vpc: {vpc}")
        text = text.replace("  # subnets:\n  #   - subnet-0123456789abcdef0\n  #   - subnet-0fedcba9876543210",
                            f"  subnets:\n    - {subnets[0]}\n    - {subnets[1]}")
    (root / "config" / "config.yml").write_text(text)
    (root / "config" / ".env").write_text("".join(f"{k}='{v}'\n" for k, v in ENV.items()))
    # The real lambda/ code, without dependencies: pip is exercised in test_package.
    shutil.copytree(REPO / "lambda", root / "lambda",
                    ignore=shutil.ignore_patterns("__pycache__", "requirements.txt"))
    return root / "config" / "config.yml"


def good_account() -> dict:
    """What the stack needs in an account with an existing VPC, as preflight checks it: DNS
    support and hostnames on, an internet gateway, a NAT gateway in a public subnet, two private
    subnets in two zones routing 0.0.0.0/0 to it, the artifact bucket and the key pair."""
    ec2 = client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    for attribute in ("EnableDnsSupport", "EnableDnsHostnames"):
        ec2.modify_vpc_attribute(VpcId=vpc, **{attribute: {"Value": True}})
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    public = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24",
                               AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    public_table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=public_table, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    ec2.associate_route_table(RouteTableId=public_table, SubnetId=public)
    address = ec2.allocate_address(Domain="vpc")["AllocationId"]
    nat = ec2.create_nat_gateway(SubnetId=public, AllocationId=address)["NatGateway"]["NatGatewayId"]
    private_table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=private_table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    subnets = []
    for i, az in ((1, "a"), (2, "b")):
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24",
                                   AvailabilityZone=f"us-east-1{az}")["Subnet"]["SubnetId"]
        ec2.associate_route_table(RouteTableId=private_table, SubnetId=subnet)
        subnets.append(subnet)
    client("s3").create_bucket(Bucket="cnsq-artifacts")
    ec2.create_key_pair(KeyName="cnsq-key")
    return {"vpc": vpc, "subnets": tuple(subnets), "igw": igw, "public": public,
            "public_table": public_table, "private_table": private_table, "nat": nat}


@pytest.fixture
def account(aws) -> dict:
    return good_account()


@pytest.fixture
def project(account, tmp_path, monkeypatch):
    """A project whose VPC, subnets and bucket exist in moto; the working directory is its root."""
    config = make_project(tmp_path / "proj", vpc=account["vpc"], subnets=account["subnets"])
    monkeypatch.chdir(tmp_path / "proj")
    return config


# ---------------------------------------------------------------------------------------------
# PostgreSQL


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """CNSQ_TEST_DATABASE_URL, or a throwaway cluster on a free port for this session."""
    if os.environ.get("CNSQ_TEST_DATABASE_URL"):
        yield os.environ["CNSQ_TEST_DATABASE_URL"]
        return
    cluster = PostgresCluster(tmp_path_factory.mktemp("pg")).start()
    yield cluster.url
    cluster.stop()
