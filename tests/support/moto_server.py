"""moto's server, with the dual-stack network its CloudFormation does not model yet.

Run as ``python tests/support/moto_server.py -H 127.0.0.1 -p PORT`` (the same arguments as
``python -m moto.server``). The code under test is unchanged: boto3 reaches this server through
AWS_ENDPOINT_URL as it would reach AWS. What is added is what moto 5's CloudFormation lacks and
the stack's own network uses, each as AWS documents it:

- ``Fn::Cidr [ipBlock, count, cidrBits]``: ``count`` CIDRs of ``cidrBits`` host bits each, in
  order, from the start of ``ipBlock`` (the intrinsic function's reference page);
- ``!GetAtt VPC.Ipv6CidrBlocks``: the VPC's associated IPv6 blocks (AWS::EC2::VPC's return
  values); empty until one is associated, so a subnet that selects the first one before the
  association exists fails here as on AWS (the template's ``DependsOn``);
- ``AWS::EC2::VPCCidrBlock`` with ``AmazonProvidedIpv6CidrBlock``, and
  ``AWS::EC2::EgressOnlyInternetGateway``, through moto's own EC2 calls;
- a subnet's ``Ipv6CidrBlock`` and a route's ``DestinationIpv6CidrBlock``, which moto's
  CloudFormation drops.

Everything else is moto's, unchanged.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from moto.cloudformation import parsing
from moto.cloudformation.exceptions import ValidationError
from moto.core.common_models import CloudFormationModel
from moto.ec2.models import ec2_backends
from moto.ec2.models.route_tables import Route
from moto.ec2.models.subnets import Subnet
from moto.ec2.models.vpcs import VPC


def cidr(block: str, count: int, bits: int) -> list[str]:
    """``Fn::Cidr``: the first ``count`` subnets of ``block`` with ``bits`` host bits."""
    network = ipaddress.ip_network(block, strict=False)
    prefix = network.max_prefixlen - int(bits)
    if prefix < network.prefixlen:
        raise ValidationError(message=f"Fn::Cidr: {block} cannot hold a /{prefix}")
    subnets = network.subnets(new_prefix=prefix)
    return [str(next(subnets)) for _ in range(int(count))]


_clean_json = parsing.clean_json


def clean_json(resource_json: Any, resources_map: Any) -> Any:
    if isinstance(resource_json, dict) and "Fn::Cidr" in resource_json:
        block, count, bits = (_clean_json(v, resources_map) for v in resource_json["Fn::Cidr"])
        return cidr(block, count, bits)
    return _clean_json(resource_json, resources_map)


_vpc_attribute = VPC.get_cfn_attribute


def vpc_attribute(self: VPC, attribute_name: str) -> Any:
    if attribute_name == "Ipv6CidrBlocks":
        return [a["ipv6CidrBlock"] for a in self.ipv6_cidr_block_association_set]
    return _vpc_attribute(self, attribute_name)


_subnet_create = Subnet.create_from_cloudformation_json.__func__  # type: ignore[attr-defined]


def subnet_create(cls: type, resource_name: str, cloudformation_json: Any, account_id: str,
                  region_name: str, **kwargs: Any) -> Subnet:
    subnet = _subnet_create(cls, resource_name, cloudformation_json, account_id, region_name,
                            **kwargs)
    block = cloudformation_json["Properties"].get("Ipv6CidrBlock")
    if block:
        ec2_backends[account_id][region_name].associate_subnet_cidr_block(subnet.id, block)
    return subnet


_route_create = Route.create_from_cloudformation_json.__func__  # type: ignore[attr-defined]


def route_create(cls: type, resource_name: str, cloudformation_json: Any, account_id: str,
                 region_name: str, **kwargs: Any) -> Route:
    properties = cloudformation_json["Properties"]
    if not properties.get("DestinationIpv6CidrBlock"):
        return _route_create(cls, resource_name, cloudformation_json, account_id, region_name,
                             **kwargs)
    return ec2_backends[account_id][region_name].create_route(
        route_table_id=properties["RouteTableId"], destination_cidr_block=None,
        destination_ipv6_cidr_block=properties["DestinationIpv6CidrBlock"],
        egress_only_igw_id=properties.get("EgressOnlyInternetGatewayId"),
        gateway_id=properties.get("GatewayId"), nat_gateway_id=properties.get("NatGatewayId"))


class _Created:
    """A resource made by an EC2 call; ``Ref`` is its id. (moto lists its CloudFormation models
    as CloudFormationModel's direct subclasses, named by a ``moto.<service>`` module.)"""

    __module__ = "moto.ec2.cnsq_tests"

    def __init__(self, physical_id: str):
        self.id = physical_id

    @property
    def physical_resource_id(self) -> str:
        return self.id

    @staticmethod
    def cloudformation_name_type() -> str:
        return ""

    @classmethod
    def has_cfn_attr(cls, attr: str) -> bool:
        return False

    @staticmethod
    def _create(ec2: Any, properties: dict) -> str:
        """Make the resource with moto's EC2 backend; its id."""
        raise NotImplementedError

    @classmethod
    def create_from_cloudformation_json(  # type: ignore[misc]
            cls, resource_name: str, cloudformation_json: Any, account_id: str,
            region_name: str, **kwargs: Any) -> _Created:
        return cls(cls._create(ec2_backends[account_id][region_name],
                               cloudformation_json["Properties"]))


class VpcCidrBlock(_Created, CloudFormationModel):
    __module__ = "moto.ec2.cnsq_tests"

    @staticmethod
    def cloudformation_type() -> str:
        return "AWS::EC2::VPCCidrBlock"

    @staticmethod
    def _create(ec2: Any, properties: dict) -> str:
        return ec2.associate_vpc_cidr_block(
            properties["VpcId"], properties.get("CidrBlock"),
            bool(properties.get("AmazonProvidedIpv6CidrBlock")))["association_id"]


class EgressOnlyInternetGateway(_Created, CloudFormationModel):
    __module__ = "moto.ec2.cnsq_tests"

    @staticmethod
    def cloudformation_type() -> str:
        return "AWS::EC2::EgressOnlyInternetGateway"

    @staticmethod
    def _create(ec2: Any, properties: dict) -> str:
        return ec2.create_egress_only_internet_gateway(properties["VpcId"]).id


def install() -> None:
    parsing.clean_json = clean_json
    VPC.get_cfn_attribute = vpc_attribute  # type: ignore[method-assign]
    Subnet.create_from_cloudformation_json = classmethod(subnet_create)  # type: ignore[assignment]
    Route.create_from_cloudformation_json = classmethod(route_create)  # type: ignore[assignment]
    parsing.get_model_list.cache_clear()
    parsing.get_model_map.cache_clear()


if __name__ == "__main__":
    install()
    from moto.server import main

    main()
