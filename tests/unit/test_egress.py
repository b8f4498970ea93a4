"""Which way the imagery's bytes leave the stack (cnsq/egress.py), decided from what a host
resolves to; literal addresses and a resolver passed in, so no test needs DNS."""

from __future__ import annotations

import socket

import pytest

from cnsq import egress

V4, V6 = socket.AF_INET, socket.AF_INET6


@pytest.mark.parametrize("host, region, dual, found, way, says", [
    ("tiles.example.com", "us-east-1", True, {V4, V6}, "ipv6", "egress-only internet gateway"),
    ("tiles.example.com", "us-east-1", False, {V4, V6}, "nat", "subnets are not dual-stack"),
    ("tiles.example.com", "us-east-1", True, {V4}, "nat", "IPv4 only"),
    ("tiles.example.com", "us-east-1", True, set(), "nat", "did not resolve"),
    # S3 in the stack's region takes the gateway endpoint, whatever it resolves to …
    ("imagery.s3.us-east-1.amazonaws.com", "us-east-1", False, {V4}, "s3", "gateway endpoint"),
    ("imagery.s3.amazonaws.com", "us-east-1", False, {V4}, "s3", "gateway endpoint"),
    ("s3.dualstack.eu-west-1.amazonaws.com", "eu-west-1", True, {V4, V6}, "s3", "gateway"),
    # … and in another region it does not (a gateway endpoint serves its own region).
    ("imagery.s3.eu-west-1.amazonaws.com", "us-east-1", False, {V4}, "nat", "its own region"),
    ("imagery.s3.eu-west-1.amazonaws.com", "us-east-1", True, {V4, V6}, "ipv6", "IPv6"),
    # Not S3: a name that merely contains it.
    ("s3.amazonaws.com.example.org", "us-east-1", False, {V4}, "nat", "IPv4 only"),
])
def test_the_path_of_the_imagerys_bytes(host, region, dual, found, way, says):
    decided = egress.path(host, region, dual, found)
    assert decided.way == way
    assert says in decided.why and host in decided.why


def test_only_the_nat_charges_per_gb():
    assert egress.per_million(40.0, 0.045, "nat") == pytest.approx(1.80)  # 40 GB a million
    assert egress.per_million(40.0, 0.045, "ipv6") == 0.0
    assert egress.per_million(40.0, 0.045, "s3") == 0.0


def test_the_host_of_a_tile_endpoint_template():
    assert egress.host_of("https://Tiles.Example.com/{z}/{x}/{y}.jpg?access_token={}") == \
        "tiles.example.com"
    assert egress.host_of("https://example.com/{}/{}/{}.jpg") == "example.com"
    assert egress.host_of("http://[2001:db8::1]:8080/{z}/{x}/{y}.png") == "2001:db8::1"
    assert egress.host_of("not a url") == ""


def test_the_real_resolver_on_literal_addresses():
    assert egress.families("127.0.0.1") == {V4}
    assert egress.families("::1") == {V6}
    assert egress.families("no-such-host.invalid") == set()


def test_dual_stack_as_the_template_decides_it():
    assert egress.dual_stack({"vpc": None, "ipv6": None}) is True
    assert egress.dual_stack({"vpc": "vpc-1", "ipv6": None}) is False
    assert egress.dual_stack({"vpc": "vpc-1", "ipv6": True}) is True
    assert egress.dual_stack({"vpc": None, "ipv6": False}) is False


def test_cog_imagery_is_judged_by_its_first_cogs_host():
    values = {"vpc": None, "ipv6": None, "lambdas": {},
              "imagery": {"cog": ["s3://my-imagery/a.tif", "https://other.example/b.tif"]}}
    host, way = egress.for_config(values, "eu-west-1", lambda host: set())
    assert host == "my-imagery.s3.eu-west-1.amazonaws.com" and way.way == "s3"
    values["imagery"]["cog"] = ["https://cdn.example/a.tif"]
    host, way = egress.for_config(values, "eu-west-1", lambda host: {V4, V6})
    assert host == "cdn.example" and way.way == "ipv6"
