"""A moto account holding what the stack needs."""

from __future__ import annotations

import boto3

# A key pair's public half, imported: creating one makes moto generate an RSA key (6 % of
# its CPU in the deploy tests). Its private half was never kept.
PUBLIC_KEY = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA/PtOVen6QDFDjjdX/jz9lmJfUB/IhogR1sbNvx4h40"


def key_pair(name: str) -> None:
    """The key pair ``name`` in the account (as a user's, imported)."""
    client("ec2").import_key_pair(KeyName=name, PublicKeyMaterial=PUBLIC_KEY)


def client(service: str):
    return boto3.client(service, region_name="us-east-1")


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
    key_pair("cnsq-key")
    return {"vpc": vpc, "subnets": tuple(subnets), "igw": igw, "public": public,
            "public_table": public_table, "private_table": private_table, "nat": nat}
