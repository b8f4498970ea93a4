"""Every call cnsq and the Lambda make to an AWS operation that botocore can paginate goes
through a paginator.

AWS answers such operations in pages (RDS 100 rows by default, CloudFormation 100 events, EC2 up
to 1,000 items); a direct call reads the first page alone, which looks like a whole answer. moto
mostly answers in one page, so only a rule over the code catches it: this test walks the source
of cnsq/ and lambda/ and fails on a direct call to any operation that botocore's own pagination
model (``client.can_paginate``) lists for a service the code uses.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import boto3
from botocore import xform_name

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("cnsq", "lambda") for p in (REPO / folder).rglob("*.py"))
# Where the code names an AWS service: client("rds"), aws.client("sqs", …), boto3.client("ec2").
SERVICE = re.compile(r"""client\(\s*["']([a-z0-9-]+)["']""")


def services_used() -> set[str]:
    return {name for path in SOURCES for name in SERVICE.findall(path.read_text())}


def pageable_operations(services: set[str]) -> dict[str, set[str]]:
    """Python method name → the services whose clients can paginate it."""
    found: dict[str, set[str]] = {}
    for service in services:
        client = boto3.client(service, region_name="us-east-1", aws_access_key_id="x",
                              aws_secret_access_key="x")
        for operation in client.meta.service_model.operation_names:
            method = xform_name(operation)
            if client.can_paginate(method):
                found.setdefault(method, set()).add(service)
    return found


def direct_calls(pageable: dict[str, set[str]], sources: list[Path] = SOURCES,
                 root: Path = REPO) -> list[str]:
    calls = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in pageable):
                named = _service_named(node.func.value)
                if named and named not in pageable[node.func.attr]:
                    continue  # e.g. ecs's describe_services (pricing's is the pageable one)
                services = ", ".join(sorted(pageable[node.func.attr]))
                calls.append(f"{path.relative_to(root)}:{node.lineno}: {node.func.attr} "
                             f"({services}) is pageable: use cnsq.aws.pages/collect or "
                             "get_paginator")
    return calls


def _service_named(receiver: ast.expr) -> str | None:
    """The service of ``clients["ecs"]`` or ``client("ecs")``, when the code names it."""
    if isinstance(receiver, ast.Subscript) and isinstance(receiver.slice, ast.Constant):
        return str(receiver.slice.value)
    if (isinstance(receiver, ast.Call) and receiver.args
            and isinstance(receiver.args[0], ast.Constant)):
        return str(receiver.args[0].value)
    return None


def test_the_rule_knows_the_services_and_their_pageable_operations():
    services = services_used()
    assert {"rds", "ec2", "cloudformation", "cloudwatch", "sqs", "iam"} <= services
    pageable = pageable_operations(services)
    # The operations this rule exists for (botocore's model, not a list of ours).
    assert "rds" in pageable["describe_orderable_db_instance_options"]
    assert "cloudformation" in pageable["describe_stack_events"]
    assert "iam" in pageable["simulate_principal_policy"]


def test_no_direct_call_to_a_pageable_operation():
    assert direct_calls(pageable_operations(services_used())) == []


def test_the_rule_catches_a_direct_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(client):\n    return client("rds").describe_db_instances()["DBInstances"]\n')
    assert direct_calls(pageable_operations({"rds"}), [bad], tmp_path) == [
        "bad.py:2: describe_db_instances (rds) is pageable: use cnsq.aws.pages/collect or "
        "get_paginator"]
