"""Every AWS call each Lambda's code can make is allowed by the role that runs it, read from the
compiled template: a rule over the code, so a call added without its permission fails here
before it fails on AWS (where it refuses every run, as cloudwatch:GetMetricStatistics did the
controller's). botocore's service model maps each client method to its operation, hence the
IAM action; test_aws_enforces.py runs the same code under those roles with moto's IAM checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import boto3
import pytest
from botocore import xform_name

from cnsq.deploy.template import compile_template, load_cfn_yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lambda" / "download_and_predict"
# IAM's prefix where it is not the service's endpoint prefix.
IAM_PREFIX = {"cloudwatch": "cloudwatch", "elbv2": "elasticloadbalancing"}
# boto3's own helpers that call an operation under another name (S3's transfer manager).
HELPERS = {("s3", "upload_file"): ["s3:PutObject"], ("s3", "download_file"): ["s3:GetObject"]}


KNOWN = set(boto3.session.Session().get_available_services())


def _module_tree(name: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{name}.py").read_text(), name)


def closure(entry: str) -> set[str]:
    """The package's modules that ``entry`` imports, itself included (imports inside functions
    too: they run on AWS as well)."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen or not (PACKAGE / f"{name}.py").exists():
            continue
        seen.add(name)
        for node in ast.walk(_module_tree(name)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    todo.append(node.module.split(".")[0])
                else:
                    todo += [alias.name for alias in node.names]
    return seen


def services(tree: ast.Module) -> set[str]:
    """Services whose clients the code builds: boto3.client("x"), and the names a comprehension
    over a tuple passes to boto3.client(name)."""
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "client" and node.args):
            if isinstance(node.args[0], ast.Constant):
                found.add(node.args[0].value)
        if isinstance(node, ast.comprehension) and isinstance(node.iter, ast.Tuple):
            found |= {e.value for e in node.iter.elts if isinstance(e, ast.Constant)}
    return {s for s in found if s in KNOWN}


def _client(service: str):
    return boto3.client(service, region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x")


def actions_called(entry: str) -> dict[str, list[str]]:
    """IAM action → where the code calls it, for every module ``entry`` reaches."""
    modules = closure(entry)
    trees = {name: _module_tree(name) for name in modules}
    used = set().union(*(services(t) for t in trees.values()))
    operations: dict[str, list[tuple[str, str]]] = {}
    for service in used:
        model = _client(service).meta.service_model
        prefix = IAM_PREFIX.get(service, model.endpoint_prefix)
        for operation in model.operation_names:
            operations.setdefault(xform_name(operation), []).append((service, f"{prefix}:{operation}"))
    found: dict[str, list[str]] = {}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method = node.func.attr
            if method == "get_paginator" and node.args and isinstance(node.args[0], ast.Constant):
                method = node.args[0].value
            where = f"{name}.py:{node.lineno}"
            for _service, action in operations.get(method, []):
                found.setdefault(action, []).append(where)
            for service in used:
                for action in HELPERS.get((service, method), []):
                    found.setdefault(action, []).append(where)
    return found


def compiled_roles(tmp_path) -> dict[str, list[dict]]:
    """Logical id of each Lambda function → the statements of its role's inline policies."""
    from test_scaling import CODE, load

    config = load(tmp_path, ecs="    minInstances: 0\n")
    path, _ = compile_template(config, REPO / "templates", tmp_path, CODE)
    resources = load_cfn_yaml(path.read_text())["Resources"]
    roles = {}
    for logical, resource in resources.items():
        if resource["Type"] != "AWS::Lambda::Function":
            continue
        role = resource["Properties"]["Role"]["Fn::GetAtt"][0]
        statements = [s for policy in resources[role]["Properties"].get("Policies", [])
                      for s in policy["PolicyDocument"]["Statement"]]
        roles[logical] = [resource["Properties"]["Handler"], statements]
    return roles


def test_every_call_of_each_lambda_is_allowed_by_its_role(tmp_path):
    roles = compiled_roles(tmp_path)
    assert {handler for handler, _ in roles.values()} == {
        "download_and_predict.handler.handler", "download_and_predict.admin.handler",
        "download_and_predict.control.handler"}
    missing = []
    for logical, (handler, statements) in roles.items():
        entry = handler.split(".")[1]
        allowed = {a for s in statements if s.get("Effect") == "Allow"
                   for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
        for action, where in sorted(actions_called(entry).items()):
            if action not in allowed:
                missing.append(f"{logical} ({handler}) calls {action} at {', '.join(where)}")
    assert not missing, "\n".join(missing)


def test_the_map_sees_the_calls_that_matter():
    """The rule finds what it exists for (a rule that finds nothing proves nothing)."""
    controller = actions_called("control")
    assert {"cloudwatch:GetMetricData", "ssm:PutParameter", "ecs:UpdateService",
            "lambda:UpdateEventSourceMapping", "sqs:GetQueueAttributes",
            "elasticloadbalancing:DescribeTargetHealth"} <= set(controller)
    worker = actions_called("handler")
    assert {"secretsmanager:GetSecretValue", "rds:DescribeDBInstances"} <= set(worker)
    assert "s3:PutObject" in actions_called("admin")


@pytest.mark.parametrize("source, action", [
    ("stats = clients['cloudwatch'].get_metric_statistics(Namespace='x')",
     "cloudwatch:GetMetricStatistics"),
    ("clients['autoscaling'].set_desired_capacity(AutoScalingGroupName='g')",
     "autoscaling:SetDesiredCapacity"),
])
def test_a_call_without_its_permission_is_named(tmp_path, monkeypatch, source, action):
    """The controller's defect, put back: the rule names the action and the line."""
    copy = tmp_path / "pkg"
    copy.mkdir()
    for path in PACKAGE.glob("*.py"):
        (copy / path.name).write_text(path.read_text())
    text = (copy / "control.py").read_text().replace(
        '"ssm", "sqs", "elbv2", "ecs", "lambda", "cloudwatch")',
        '"ssm", "sqs", "elbv2", "ecs", "lambda", "cloudwatch", "autoscaling")')
    (copy / "control.py").write_text(text + f"\n\ndef _extra(clients):\n    {source}\n")
    import test_role_calls

    monkeypatch.setattr(test_role_calls, "PACKAGE", copy)
    with pytest.raises(AssertionError, match=action.replace(".", r"\.")):
        (tmp_path / "t").mkdir()
        test_every_call_of_each_lambda_is_allowed_by_its_role(tmp_path / "t")
