"""Which way the imagery's bytes take out of the stack's network, and what that costs.

A worker Lambda in a private subnet reaches the tile endpoint one of three ways:

- through the **S3 gateway endpoint**, for a bucket in the stack's region: no charge ("There is no
  additional charge for using gateway endpoints", AWS PrivateLink guide, Gateway endpoints;
  they serve the endpoint's own region only);
- over **IPv6 through the egress-only internet gateway**, when the subnets are dual-stack, the
  function has ``Ipv6AllowedForDualStack`` and the host answers over IPv6 (has an AAAA record):
  the VPC pricing page lists no charge for an egress-only internet gateway, and data in from the
  internet is free (EC2 on-demand pricing, Data Transfer IN);
- through the **NAT gateway** otherwise, at its per-GB data processing price ($0.045/GB in
  us-east-1, VPC pricing page).

A pure decision (:func:`path`) over what was found, and a resolver passed in, so tests use
literal addresses and no DNS.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

# The ways out, by name (the cost model's too: only the NAT charges per GB).
EGRESS_NAT, EGRESS_IPV6, EGRESS_S3 = "nat", "ipv6", "s3"

Resolver = Callable[[str], set[int]]

# S3's endpoint names: s3.amazonaws.com (us-east-1), s3.<region>.amazonaws.com,
# s3-<region>.amazonaws.com (legacy), s3.dualstack.<region>.amazonaws.com; a virtual-hosted
# bucket prefixes any of them with "<bucket>.".
_S3 = re.compile(r"(?:^|\.)s3(?:[.-](?:dualstack\.)?(?P<region>[a-z]{2}(?:-[a-z]+)+-\d))?"
                 r"\.amazonaws\.com$")


@dataclass(frozen=True)
class Path:
    """``way``: :data:`EGRESS_NAT`, :data:`EGRESS_IPV6` or :data:`EGRESS_S3`; ``why``: a
    sentence saying what was found."""

    way: str
    why: str


def host_of(endpoint: str) -> str:
    """The host of a tile endpoint template (``https://host/{z}/{x}/{y}.png?…`` or ``{}``)."""
    return (urlsplit(endpoint.replace("{", "").replace("}", "")).hostname or "").lower()


def s3_region(host: str) -> str | None:
    """The region of an S3 endpoint host (us-east-1 for the global name), else None."""
    found = _S3.search(host)
    if not found:
        return None
    return found.group("region") or "us-east-1"


# getaddrinfo has no timeout of its own; a resolver that does not answer must not hold a
# preflight or an estimate.
RESOLVE_SECONDS = 3.0


def families(host: str) -> set[int]:
    """The address families ``host`` resolves to (socket.AF_INET, AF_INET6); empty when it does
    not resolve within :data:`RESOLVE_SECONDS`."""
    import threading

    found: set[int] = set()

    def ask() -> None:
        try:
            answers = socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError, OSError):
            return
        found.update(f for f, *_ in answers if f in (socket.AF_INET, socket.AF_INET6))

    asking = threading.Thread(target=ask, name="resolve", daemon=True)
    asking.start()
    asking.join(RESOLVE_SECONDS)
    return set(found) if not asking.is_alive() else set()


def path(host: str, region: str, dual_stack: bool, found: set[int]) -> Path:
    """The way the bytes of imagery on ``host`` leave a stack in ``region`` whose subnets are
    (``dual_stack``) or are not dual-stack, ``found`` being the host's address families."""
    bucket_region = s3_region(host)
    if bucket_region == region:
        return Path(EGRESS_S3, f"{host} is S3 in {region}: its bytes take the S3 gateway "
                               "endpoint, no per-GB charge")
    if socket.AF_INET6 in found and dual_stack:
        return Path(EGRESS_IPV6, f"{host} answers over IPv6: its bytes take the egress-only "
                                 "internet gateway, no per-GB charge")
    if bucket_region:
        why = f"{host} is S3 in {bucket_region}, not {region}: a gateway endpoint serves its own "\
              "region only, so the bytes go through the NAT gateway"
    elif not found:
        why = f"{host} did not resolve here: counted through the NAT gateway"
    elif socket.AF_INET6 in found:
        why = f"{host} answers over IPv6, but the subnets are not dual-stack: its bytes go " \
              "through the NAT gateway"
    else:
        why = f"{host} answers over IPv4 only: its bytes go through the NAT gateway"
    return Path(EGRESS_NAT, why)


def per_million(tile_kb: float, nat_gb_price: float, way: str) -> float:
    """What a million tiles of ``tile_kb`` cost on ``way`` (only the NAT charges per GB)."""
    return tile_kb * nat_gb_price if way == EGRESS_NAT else 0.0


def dual_stack(values: dict) -> bool:
    """Whether the stack's subnets are dual-stack, as the template decides it: ``ipv6`` when
    set, else on for the network the stack creates and off for a given one."""
    return values["ipv6"] if values.get("ipv6") is not None else not values["vpc"]


def tile_endpoint(values: dict) -> str | None:
    """The worker's TILE_ENDPOINT, when the config sets it in the clear."""
    from cnsq.config import Secret

    for spec in values["lambdas"].values():
        value = spec["envs"].get("TILE_ENDPOINT")
        if value and not isinstance(value, Secret):
            return str(value)
    return None


def for_config(values: dict, region: str, resolve: Resolver = families) -> tuple[str, Path] | None:
    """The imagery host of the config (its first COG's, a STAC source's API or catalog, else
    TILE_ENDPOINT's) and its path; None without any. An s3:// COG is taken to be in the stack's
    region (its bucket's region is the deployer's to choose). A STAC source's assets may live
    on other hosts than its API: the API's host stands for them."""
    imagery = values.get("imagery") or {}
    stac = imagery.get("stac") or {}
    cogs = imagery.get("cog") or ([stac.get("api") or stac.get("catalog")] if stac else [])
    if cogs:
        parts = urlsplit(cogs[0])
        if parts.scheme == "s3":
            host = f"{parts.netloc}.s3.{region}.amazonaws.com"
            return host, path(host, region, dual_stack(values), set())
        endpoint: str | None = cogs[0]
    else:
        endpoint = tile_endpoint(values)
    host = host_of(endpoint) if endpoint else ""
    if not host:
        return None
    return host, path(host, region, dual_stack(values), resolve(host))
