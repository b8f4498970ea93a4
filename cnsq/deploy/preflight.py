"""Preflight: ask the live account, before anything is created, whether the stack can work.

A CloudFormation create that fails on a missing prerequisite costs 10–40 minutes (RDS and the GPU
group are slow to create and slower to roll back) and leaves a resource event, not the config
key to change. Each check here reads the account through the AWS API — never a table that goes
stale — and reports every problem at once, with the config key, what was found and the fix.

A check the caller may not make (AccessDenied) or that the endpoint cannot answer (an emulator)
is a warning (``not checked: …``), never a failure. Independent checks run in parallel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from cnsq import egress
from cnsq.aws import collect, pages
from cnsq.config import Config
from cnsq.errors import AwsUnreachable
from cnsq.ops.estimate import PerTile
from cnsq.ops.pricing import shipped_prices
from cnsq.shipped import shipped, templates_dir

OK, PROBLEM, WARNING = "ok", "problem", "warning"
# The account needs this much unreserved Lambda concurrency left (AWS refuses less).
MIN_UNRESERVED = 100
# Service Quotas codes of the EC2 on-demand vCPU quotas, by instance family letter.
VCPU_QUOTAS = {"g": ("L-DB2E81BA", "Running On-Demand G and VT instances"),
               "p": ("L-417A185B", "Running On-Demand P instances")}
# Spot hosts count against the Spot vCPU quotas instead (ecs.spot).
SPOT_VCPU_QUOTAS = {"g": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
                    "p": ("L-7212CCBC", "All P Spot Instance Requests")}
# The actions the deploying identity needs, beside the template (templates/ of the project).
PERMISSIONS_FILE = "deployer-permissions.yml"
DENIED = ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError")


@dataclass
class Finding:
    """One check's outcome: ``key`` is the config key it is about."""

    check: str
    status: str
    key: str
    message: str
    decided: bool = False  # the account set this config key's value (shown, like a warning)

    def line(self) -> str:
        prefix = {PROBLEM: "", WARNING: "warning: ", OK: "set: " if self.decided else "ok: "}[
            self.status]
        return f"{prefix}{self.key}: {self.message}"


@dataclass
class Report:
    findings: list[Finding]
    seconds: float

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status == PROBLEM]

    @property
    def checked(self) -> bool:
        """Whether the account answered at least one check. A report of warnings alone checked
        nothing, and must never read as a pass."""
        return any(f.status != WARNING for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 2), "checks": [asdict(f) for f in self.findings]}


class NotChecked(Exception):
    """The endpoint could not answer this check; the reason is reported as a warning."""


class Unreachable(Exception):
    """AWS did not answer at all (no network, a wrong endpoint): no check can run."""


def _code(exc: BaseException) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(
        exc, "response") else ""


def _guard(check: str, key: str, permission: str, fn: Callable[[], list[Finding]]
           ) -> list[Finding]:
    """Run one check; turn AccessDenied and unanswerable endpoints into warnings."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    try:
        return fn()
    except NotChecked as exc:
        return [Finding(check, WARNING, key, f"not checked: {exc}")]
    except ClientError as exc:
        code = _code(exc)
        if code in DENIED:
            return [Finding(check, WARNING, key, f"not checked: this caller may not {permission}")]
        status = code or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        reason = (exc.response.get("Error", {}).get("Message") or "").strip()
        reason = reason.splitlines()[0][:120] if reason and not reason.startswith("<") else ""
        return [Finding(check, WARNING, key, f"not checked: {permission} answered {status}"
                                             + (f" ({reason})" if reason else ""))]
    except BotoCoreError as exc:
        return [Finding(check, WARNING, key, f"not checked: {permission} failed ({exc})")]
    except ResponseParserError:  # an endpoint that does not speak the operation (an emulator)
        return [Finding(check, WARNING, key, f"not checked: {permission} gave an unreadable answer")]


# ---------------------------------------------------------------------------------------------
# The checks. Each takes the config and a client factory and returns its findings.


def bucket_region(s3, bucket: str) -> str | None:
    """The region a bucket is in, or None when it does not exist (also asked by
    ``cnsq init --guided``)."""
    try:
        answer = s3.get_bucket_location(Bucket=bucket)
    except Exception as exc:
        if _code(exc) in ("NoSuchBucket", "404"):
            return None
        raise
    # us-east-1 answers None; the legacy EU constraint means eu-west-1.
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(
        answer.get("LocationConstraint"), answer.get("LocationConstraint"))


def key_pair_exists(ec2, name: str) -> bool:
    """Whether the EC2 key pair exists (also asked by ``cnsq init --guided``)."""
    try:
        ec2.describe_key_pairs(KeyNames=[name])
    except Exception as exc:
        if _code(exc) == "InvalidKeyPair.NotFound":
            return False
        raise
    return True


def check_bucket(config: Config, client, region: str) -> list[Finding]:
    bucket = config.bucket
    where = bucket_region(client("s3"), bucket)
    if where is None:
        return [Finding("bucket", PROBLEM, "buckets.internal",
                        f"bucket {bucket} does not exist; create it in {region} "
                        f"(aws s3 mb s3://{bucket} --region {region})")]
    if where != region:
        return [Finding("bucket", PROBLEM, "buckets.internal",
                        f"bucket {bucket} is in {where}, not {region}: Lambda takes code only from "
                        f"a bucket in its own region; use a bucket in {region}")]
    return [Finding("bucket", OK, "buckets.internal", f"{bucket} is in {region}")]


def check_network(config: Config, client, region: str) -> list[Finding]:
    """DNS on the VPC, subnets in two zones, each routing 0.0.0.0/0 to a NAT gateway."""
    vpc, subnets = config.values["vpc"], config.values["subnets"]
    ec2 = client("ec2")
    findings: list[Finding] = []
    for attribute, label in (("enableDnsSupport", "DNS support"),
                             ("enableDnsHostnames", "DNS hostnames")):
        try:
            answer = ec2.describe_vpc_attribute(VpcId=vpc, Attribute=attribute)
        except Exception as exc:
            if _code(exc) == "InvalidVpcID.NotFound":
                return [Finding("network", PROBLEM, "vpc", f"{vpc} does not exist in {region}")]
            raise
        value = answer[attribute[0].upper() + attribute[1:]]["Value"]
        if not value:
            flag = "--enable-dns-support" if "Support" in attribute else "--enable-dns-hostnames"
            findings.append(Finding(
                "network", PROBLEM, "vpc",
                f"{vpc} has {label} off: RDS in a VPC needs it (InvalidVPCNetworkStateFault); "
                f"turn it on (aws ec2 modify-vpc-attribute --vpc-id {vpc} {flag})"))
    try:
        found = collect(ec2, "describe_subnets", "Subnets", SubnetIds=subnets)
    except Exception as exc:
        if _code(exc) == "InvalidSubnetID.NotFound":
            known = {s["SubnetId"] for s in collect(
                ec2, "describe_subnets", "Subnets",
                Filters=[{"Name": "vpc-id", "Values": [vpc]}])}
            missing = [s for s in subnets if s not in known]
            return findings + [Finding("network", PROBLEM, "subnets",
                                       f"{', '.join(missing)} not found in {vpc}")]
        raise
    outside = [s["SubnetId"] for s in found if s["VpcId"] != vpc]
    if outside:
        findings.append(Finding("network", PROBLEM, "subnets",
                                f"{', '.join(outside)} is not in {vpc}"))
    zones = {s["AvailabilityZone"] for s in found}
    if len(zones) < 2:
        findings.append(Finding(
            "network", PROBLEM, "subnets",
            f"all subnets are in {', '.join(sorted(zones))}: a DB subnet group and a load balancer "
            "need subnets in at least two availability zones"))
    tables = collect(ec2, "describe_route_tables", "RouteTables",
                     Filters=[{"Name": "vpc-id", "Values": [vpc]}])
    main = next((t for t in tables if any(a.get("Main") for a in t.get("Associations", []))), None)
    fix = ("use private subnets with a NAT gateway, or leave vpc and subnets out and let the "
           "stack create the network")
    for subnet in subnets:
        table = next((t for t in tables if any(a.get("SubnetId") == subnet
                                               for a in t.get("Associations", []))), main)
        default = next((r for r in (table or {}).get("Routes", [])
                        if r.get("DestinationCidrBlock") == "0.0.0.0/0"
                        and r.get("State", "active") == "active"), None)
        if default is None:
            findings.append(Finding("network", PROBLEM, "subnets",
                                    f"{subnet} has no default route: a Lambda there cannot reach "
                                    f"the tile endpoint; {fix}"))
        elif str(default.get("GatewayId", "")).startswith("igw-"):
            findings.append(Finding(
                "network", PROBLEM, "subnets",
                f"{subnet} routes 0.0.0.0/0 to an internet gateway: a Lambda there cannot reach "
                f"the tile endpoint; {fix}"))
        elif not default.get("NatGatewayId"):
            target = next((v for k, v in default.items() if k.endswith("Id") and v), "?")
            findings.append(Finding("network", WARNING, "subnets",
                                    f"{subnet} routes 0.0.0.0/0 to {target}, not a NAT gateway: "
                                    "make sure it reaches the internet"))
    if not any(f.status == PROBLEM for f in findings):
        findings.append(Finding("network", OK, "subnets",
                                f"{len(subnets)} private subnets in {len(zones)} zones behind a NAT"))
    return findings


def _route_tables(ec2, vpc: str, subnets: list[str]) -> dict[str, dict]:
    """Each subnet's route table (its own association, else the VPC's main table)."""
    tables = collect(ec2, "describe_route_tables", "RouteTables",
                     Filters=[{"Name": "vpc-id", "Values": [vpc]}])
    main: dict = next((t for t in tables if any(a.get("Main") for a in t.get("Associations", []))),
                      {})
    return {s: next((t for t in tables if any(a.get("SubnetId") == s
                                               for a in t.get("Associations", []))), main)
            for s in subnets}


def check_egress(config: Config, client, region: str,
                 resolve: egress.Resolver = egress.families) -> list[Finding]:
    """Which way the imagery's bytes leave and what they cost per million tiles; with a given
    network, what it lacks for the free ways (IPv6 blocks and a ::/0 route to an egress-only
    internet gateway; an S3 gateway endpoint)."""
    values = config.values
    found = egress.for_config(values, region, resolve)
    if found is None:
        return [Finding("egress", WARNING, "TILE_ENDPOINT",
                        "not checked: no TILE_ENDPOINT in the clear in the config")]
    host, way = found
    per = PerTile().tile_kb
    cost = egress.per_million(per, shipped_prices().nat_gb, way.way)
    said = f"{way.why} (${cost:.2f} per million tiles of {per:g} KB)"
    imagery = values.get("imagery") or {}
    key = "imagery.cog" if imagery.get("cog") else "imagery.stac" if imagery.get("stac") \
        else "TILE_ENDPOINT"
    findings = [Finding("egress", OK if way.way != egress.EGRESS_NAT else WARNING, key, said)]
    vpc, subnets = values["vpc"], values["subnets"]
    if not vpc:
        return findings
    ec2 = client("ec2")
    tables = _route_tables(ec2, vpc, subnets)
    if egress.dual_stack(values):
        found_subnets = collect(ec2, "describe_subnets", "Subnets", SubnetIds=subnets)
        for subnet in found_subnets:
            gone = ("disassociating", "disassociated", "failing", "failed")
            blocks = [a for a in subnet.get("Ipv6CidrBlockAssociationSet", [])
                      if a.get("Ipv6CidrBlockState", {}).get("State") not in gone]
            if not blocks:
                findings.append(Finding(
                    "egress", PROBLEM, "ipv6",
                    f"ipv6 is true but {subnet['SubnetId']} has no IPv6 block: add one (aws ec2 "
                    f"associate-subnet-cidr-block --subnet-id {subnet['SubnetId']} "
                    "--ipv6-cidr-block <a /64 of the VPC's block>), or set ipv6: false"))
        for subnet, table in tables.items():
            if not any(r.get("DestinationIpv6CidrBlock") == "::/0"
                       and str(r.get("EgressOnlyInternetGatewayId", "")).startswith("eigw-")
                       for r in table.get("Routes", [])):
                findings.append(Finding(
                    "egress", PROBLEM, "ipv6",
                    f"ipv6 is true but {subnet} routes no ::/0 to an egress-only internet "
                    "gateway: add one (aws ec2 create-egress-only-internet-gateway --vpc-id "
                    f"{vpc}; aws ec2 create-route --route-table-id {table.get('RouteTableId', '?')}"
                    " --destination-ipv6-cidr-block ::/0 --egress-only-internet-gateway-id "
                    "<eigw-…>)"))
    elif egress.s3_region(host) is None:
        findings.append(Finding(
            "egress", WARNING if way.way == egress.EGRESS_NAT else OK, "ipv6",
            f"{vpc} is given and ipv6 is not set: to skip the NAT's per-GB charge for imagery "
            "that answers over IPv6, add an Amazon-provided IPv6 block to the VPC and a /64 to "
            "each subnet, an egress-only internet gateway with a ::/0 route in their route "
            "tables, then set ipv6: true"))
    if egress.s3_region(host) == region:
        prefixed = all(any(r.get("DestinationPrefixListId") and
                           str(r.get("GatewayId", "")).startswith("vpce-")
                           for r in table.get("Routes", [])) for table in tables.values())
        if not prefixed:
            findings.append(Finding(
                "egress", WARNING, "subnets",
                f"{host} is S3 in {region} but the subnets' route tables have no gateway "
                f"endpoint: add one (aws ec2 create-vpc-endpoint --vpc-id {vpc} --service-name "
                f"com.amazonaws.{region}.s3 --route-table-ids …); without it the bytes pay the "
                "NAT's per-GB charge"))
    return findings


def check_instance_type(config: Config, client, region: str) -> list[Finding]:
    """The GPU type exists, has the GPUs asked for (NVIDIA, on x86_64, as the ECS GPU AMI needs),
    is offered where the hosts will run, and the account's vCPU quota covers ecs.maxInstances of
    it. The account's GpuInfo is the authority: where the config does not set
    ecs.tasksPerInstance, it decides the tasks per instance (one per GPU)."""
    ecs = config.values["ecs"]
    itype, ec2 = ecs["instanceType"], client("ec2")
    try:
        info = collect(ec2, "describe_instance_types", "InstanceTypes", InstanceTypes=[itype])[0]
    except Exception as exc:
        if _code(exc) in ("InvalidInstanceType", "InvalidParameterValue"):
            return [Finding("instance type", PROBLEM, "ecs.instanceType",
                            f"{itype} is not an instance type in {region}")]
        raise
    findings: list[Finding] = []
    gpus_info = info.get("GpuInfo", {}).get("Gpus", [])
    gpus = sum(g.get("Count", 0) for g in gpus_info)
    makers = sorted({g.get("Manufacturer", "?") for g in gpus_info})
    architectures = info.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    if ecs["gpus"] and not gpus:
        findings.append(Finding("instance type", PROBLEM, "ecs.instanceType",
                                f"{itype} has no GPU, but ecs.gpus is {ecs['gpus']}: the model task "
                                "would never start; use a GPU type or set ecs.gpus: 0"))
    elif ecs["gpus"] and makers != ["NVIDIA"]:
        findings.append(Finding("instance type", PROBLEM, "ecs.instanceType",
                                f"{itype} has {'/'.join(makers)} GPUs; the ECS GPU AMI drives "
                                "NVIDIA GPUs only"))
    elif ecs["gpus"] and architectures and "x86_64" not in architectures:
        findings.append(Finding("instance type", PROBLEM, "ecs.instanceType",
                                f"{itype} is {'/'.join(architectures)}; the ECS GPU AMI is built "
                                "for x86_64 only"))
    elif ecs["gpus"] > gpus:
        findings.append(Finding("instance type", PROBLEM, "ecs.gpus",
                                f"{itype} has {gpus} GPU(s); a task cannot ask for {ecs['gpus']}"))
    elif ecs["gpus"]:
        tasks = gpus // ecs["gpus"]
        if config.decide("ecs.tasksPerInstance", tasks):
            findings.append(Finding("tasks per instance", OK, "ecs.tasksPerInstance",
                                    f"{tasks} model task(s) per instance: {itype} has {gpus} "
                                    f"GPU(s), {ecs['gpus']} per task (from the account)",
                                    decided=True))
    offered = {o["Location"] for o in collect(
        ec2, "describe_instance_type_offerings", "InstanceTypeOfferings",
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [itype]}])}
    if not offered:
        findings.append(Finding("instance type", PROBLEM, "ecs.instanceType",
                                f"{itype} is not offered in {region}"))
    elif config.values["vpc"]:
        zones = {s["AvailabilityZone"] for s in collect(
            ec2, "describe_subnets", "Subnets", SubnetIds=config.values["subnets"])}
        if zones and not zones & offered:
            findings.append(Finding("instance type", PROBLEM, "ecs.instanceType",
                                    f"{itype} is not offered in the subnets' zones "
                                    f"({', '.join(sorted(zones))})"))
    if not any(f.status == PROBLEM for f in findings):
        findings.append(Finding("instance type", OK, "ecs.instanceType",
                                f"{itype}: {gpus} GPU(s), offered in {len(offered)} zones"))
    family = itype[:1]
    if family in VCPU_QUOTAS:
        hosts = ecs["maxInstances"]
        spot = -(-hosts * ecs["spot"] // 100)  # the group keeps 100 - spot % on demand
        for quotas, count in ((VCPU_QUOTAS, hosts - spot), (SPOT_VCPU_QUOTAS, spot)):
            if not count:
                continue
            code, name = quotas[family]
            needed = info["VCpuInfo"]["DefaultVCpus"] * count
            findings += _guard("quota", "ecs.maxInstances", "servicequotas:GetServiceQuota",
                               partial(_check_quota, client, code, name, needed, itype, count))
    return findings


def _check_quota(client, code: str, name: str, needed: int, itype: str, hosts: int
                 ) -> list[Finding]:
    value = client("service-quotas").get_service_quota(ServiceCode="ec2", QuotaCode=code)[
        "Quota"]["Value"]
    if value < needed:
        return [Finding("quota", PROBLEM, "ecs.maxInstances",
                        f"{hosts} x {itype} need {needed} vCPUs; the account's quota "
                        f"'{name}' is {value:.0f}: request an increase in Service Quotas "
                        f"({code}) or lower ecs.maxInstances")]
    return [Finding("quota", OK, "ecs.maxInstances", f"{needed} of {value:.0f} vCPUs ({name})")]


def check_key_pair(config: Config, client, region: str) -> list[Finding]:
    name = config.values["ecs"]["keyPairName"]
    if not name:
        return []
    if not key_pair_exists(client("ec2"), name):
        return [Finding("key pair", PROBLEM, "ecs.keyPairName",
                        f"key pair {name} does not exist in {region}; create or import it, "
                        "or remove ecs.keyPairName (the hosts are reachable through SSM)")]
    return [Finding("key pair", OK, "ecs.keyPairName", f"{name} exists")]


def check_ami(config: Config, client, region: str) -> list[Finding]:
    name = config.values["ecs"]["amiParameter"]
    try:
        value = client("ssm").get_parameter(Name=name)["Parameter"]["Value"]
    except Exception as exc:
        if _code(exc) == "ParameterNotFound":
            return [Finding("ami", PROBLEM, "ecs.amiParameter",
                            f"SSM parameter {name} does not exist in {region}")]
        raise
    return [Finding("ami", OK, "ecs.amiParameter", f"{name} → {value}")]


def check_database(config: Config, client, region: str) -> list[Finding]:
    rds = config.values["rds"]
    major = rds["engineVersion"].split(".")[0]
    # About 220 rows for PostgreSQL on one class, oldest versions first, 100 to a page: the
    # current major is on the last page, never the first.
    options = collect(client("rds"), "describe_orderable_db_instance_options",
                      "OrderableDBInstanceOptions", Engine="postgres",
                      DBInstanceClass=rds["instanceType"])
    if not options:
        first = next(pages(client("rds"), "describe_orderable_db_instance_options",
                           Engine="postgres", PaginationConfig={"MaxItems": 20}), {})
        if not first.get("OrderableDBInstanceOptions"):
            raise NotChecked("RDS returned no orderable PostgreSQL options at all")
        return [Finding("database", PROBLEM, "rds.instanceType",
                        f"{rds['instanceType']} cannot run PostgreSQL in {region}")]
    versions = sorted({o["EngineVersion"] for o in options}, key=_version_key)
    if not any(v.split(".")[0] == major for v in versions):
        majors = sorted({v.split(".")[0] for v in versions}, key=int)
        return [Finding("database", PROBLEM, "rds.engineVersion",
                        f"PostgreSQL {major} cannot be created on {rds['instanceType']} in {region}; "
                        f"majors offered: {', '.join(majors)}")]
    if "." in rds["engineVersion"] and rds["engineVersion"] not in versions:
        return [Finding("database", PROBLEM, "rds.engineVersion",
                        f"PostgreSQL {rds['engineVersion']} can no longer be created; write the "
                        f"major alone ('{major}') and RDS picks its current minor")]
    return [Finding("database", OK, "rds.engineVersion",
                    f"PostgreSQL {major} on {rds['instanceType']} is orderable")]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def reserved_concurrency(values: dict) -> dict[str, tuple[str, int]]:
    """Function name → (config key, executions) the template reserves for it: with
    ``ecs.minInstances`` (the stack scales itself) the worker reserves ``maxConcurrent`` and the
    controller 1; otherwise each function its ``concurrent``. (tests/services/test_preflight.py compares
    this with the compiled template.)"""
    scaling = values["ecs"].get("minInstances") is not None
    reserved: dict[str, tuple[str, int]] = {}
    for name, spec in values["lambdas"].items():
        key = f"lambdas.{name}"
        if scaling and spec.get("queueTrigger"):
            if spec.get("maxConcurrent"):
                reserved[spec["fullName"]] = (f"{key}.maxConcurrent", int(spec["maxConcurrent"]))
        elif spec.get("concurrent"):
            reserved[spec["fullName"]] = (f"{key}.concurrent", int(spec["concurrent"]))
    if scaling:
        reserved[f"{values['stackName']}-controller"] = ("ecs.minInstances", 1)
    return reserved


def check_concurrency(config: Config, client, region: str) -> list[Finding]:
    """What the template reserves must leave 100 unreserved in the account (new accounts may
    have a quota of 10 in all): checked before a deploy that would fail minutes in."""
    wanted = reserved_concurrency(config.values)
    if not wanted:
        return []
    lam = client("lambda")
    limit = lam.get_account_settings()["AccountLimit"]
    unreserved = limit["UnreservedConcurrentExecutions"]
    already = 0
    for function in wanted:
        try:  # a deployed function's reservation is already out of the unreserved pool
            already += lam.get_function_concurrency(FunctionName=function).get(
                "ReservedConcurrentExecutions", 0)
        except Exception as exc:
            if _code(exc) != "ResourceNotFoundException":
                raise
    total = sum(count for _, count in wanted.values())
    left = unreserved + already - total
    key = max(wanted.values(), key=lambda kc: kc[1])[0]
    if left < MIN_UNRESERVED:
        return [Finding("concurrency", PROBLEM, key,
                        f"reserving {total} would leave {left} unreserved of the "
                        f"account's {limit['ConcurrentExecutions']}; AWS keeps at least "
                        f"{MIN_UNRESERVED}: lower it, or request a higher concurrency quota")]
    return [Finding("concurrency", OK, key, f"{left} unreserved left after this deploy")]


def deployer_actions(config: Config) -> dict[str, str]:
    """The IAM actions the deploying identity needs for this config, each with why: from
    deployer-permissions.yml beside the template (its one home)."""
    import yaml


    own = templates_dir(config.project_dir) / PERMISSIONS_FILE
    path = own if own.is_file() else shipped("templates") / PERMISSIONS_FILE
    groups = yaml.safe_load(path.read_text())
    actions = dict(groups["always"])
    if not config.values["vpc"]:
        actions.update(groups["network"])
    if config.values["ecs"]["minInstances"] is not None:
        actions.update(groups["scaling"])
    return actions


def principal_arn(client, arn: str) -> str | None:
    """The IAM principal behind a caller ARN, as SimulatePrincipalPolicy takes it: a user as it
    is, an assumed role's session as its role (with the role's path); None for the root user."""
    parts = arn.split(":", 5)
    if len(parts) < 6:
        raise NotChecked(f"the caller {arn!r} is not an IAM principal")
    partition, account, resource = parts[1], parts[4], parts[5]
    if resource == "root":
        return None
    if resource.startswith("user/"):
        return arn
    if resource.startswith("assumed-role/"):
        role = resource.split("/")[1]
        try:
            return client("iam").get_role(RoleName=role)["Role"]["Arn"]
        except Exception:  # noqa: BLE001 - may not read roles: a role without a path then
            return f"arn:{partition}:iam::{account}:role/{role}"
    raise NotChecked(f"IAM cannot simulate the policies of {arn}")


def check_permissions(config: Config, client, region: str) -> list[Finding]:
    """Whether the deploying identity may do what the stack needs (iam:SimulatePrincipalPolicy).

    IAM answers for identity policies and permission boundaries; an organisation's SCPs can
    still refuse, which the stack's events then name."""
    arn = client("sts").get_caller_identity()["Arn"]
    principal = principal_arn(client, arn)
    if principal is None:
        return [Finding("permissions", OK, "deployer", "the account's root user may do everything")]
    actions = deployer_actions(config)
    names = list(actions)
    denied: list[str] = []
    iam = client("iam")
    for start in range(0, len(names), 50):
        for result in collect(iam, "simulate_principal_policy", "EvaluationResults",
                              PolicySourceArn=principal, ActionNames=names[start:start + 50]):
            if result["EvalDecision"] != "allowed":
                denied.append(result["EvalActionName"])
    if not denied:
        return [Finding("permissions", OK, "deployer",
                        f"{principal} may do the {len(names)} actions the stack needs")]
    if len(denied) > 8:
        return [Finding("permissions", PROBLEM, "deployer",
                        f"{principal} may not do {len(denied)} of the {len(names)} actions the stack "
                        f"needs ({PERMISSIONS_FILE} says why): {', '.join(denied)}")]
    return [Finding("permissions", PROBLEM, "deployer",
                    f"{principal} may not {name}, which it needs: {actions[name]}; the stack "
                    "would roll back after many minutes. Add it to the identity's policy")
            for name in denied]


CHECKS: list[tuple[str, str, str, Callable]] = [
    ("bucket", "buckets.internal", "s3:GetBucketLocation", check_bucket),
    ("network", "vpc", "ec2:DescribeVpcAttribute, DescribeSubnets, DescribeRouteTables",
     check_network),
    ("instance type", "ecs.instanceType",
     "ec2:DescribeInstanceTypes, DescribeInstanceTypeOfferings", check_instance_type),
    ("key pair", "ecs.keyPairName", "ec2:DescribeKeyPairs", check_key_pair),
    ("ami", "ecs.amiParameter", "ssm:GetParameter", check_ami),
    ("database", "rds.engineVersion", "rds:DescribeOrderableDBInstanceOptions", check_database),
    ("concurrency", "lambdas.<Name>.concurrent", "lambda:GetAccountSettings", check_concurrency),
    ("egress", "TILE_ENDPOINT", "ec2:DescribeSubnets, DescribeRouteTables", check_egress),
    ("permissions", "deployer", "iam:SimulatePrincipalPolicy", check_permissions),
]


def _key(key: str, config: Config) -> str:
    """``lambdas.<Name>.concurrent`` → the first Lambda that reserves concurrency."""
    if "<Name>" not in key:
        return key
    names = [n for n, spec in config.values["lambdas"].items() if spec["concurrent"]]
    return key.replace("<Name>", names[0] if names else next(iter(config.values["lambdas"]), "Name"))


def caller(client: Callable[..., Any]) -> dict[str, str]:
    """Who is asking (sts:GetCallerIdentity, which needs no permission), asked once with short
    timeouts and one retry: an unreachable endpoint fails here in seconds, not in every check
    after ten adaptive retries each.

    Raises:
        Unreachable: no answer from AWS, with botocore's reason.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        sts = client("sts", connect_timeout=5, read_timeout=10,
                     retries={"mode": "standard", "total_max_attempts": 2})
    except TypeError:  # a factory that takes no botocore options (tests' stubs)
        sts = client("sts")
    except AwsUnreachable as exc:  # the clients' own first call found no answer
        raise Unreachable(exc.reason) from None
    try:
        return sts.get_caller_identity()
    except ClientError as exc:  # answered, though not as asked: the checks say more
        return {"Arn": "", "Account": "", "error": _code(exc)}
    except BotoCoreError as exc:
        raise Unreachable(str(exc)) from None


def run(config: Config, client: Callable[..., Any], region: str) -> Report:
    """Every check, in parallel; network checks only for an existing VPC.

    Raises:
        Unreachable: AWS did not answer the first call.
    """
    started = time.monotonic()
    caller(client)
    chosen = [c for c in CHECKS if c[0] != "network" or config.values["vpc"]]
    with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
        futures = [pool.submit(_guard, name, _key(key, config), permission,
                               partial(fn, config, client, region))
                   for name, key, permission, fn in chosen]
        findings = [f for future in futures for f in future.result()]
    return Report(findings, time.monotonic() - started)
