"""``cnsq tag-logs``: tag every log group of the stack, including those Lambda creates itself."""

from __future__ import annotations

from dataclasses import dataclass

from cnsq.aws import Client, collect
from cnsq.errors import DeployError


@dataclass
class Tagged:
    name: str
    status: str  # tagged, already tagged, missing
    added: dict[str, str]


def log_group_names(config, stacks) -> list[str]:
    """The stack's AWS::Logs::LogGroup resources and each Lambda's /aws/lambda/<fullName>."""
    if stacks.describe(config.stack_name) is None:
        raise DeployError(f"stack '{config.stack_name}' does not exist (deploy it first)")
    names = [physical for _, rtype, physical in stacks.resources(config.stack_name)
             if rtype == "AWS::Logs::LogGroup" and physical]
    for spec in config.values["lambdas"].values():
        names.append(f"/aws/lambda/{spec['fullName']}")
    return list(dict.fromkeys(names))


def tag_log_groups(logs: Client, names: list[str], tags: dict[str, str]) -> list[Tagged]:
    """Add ``tags`` where they are missing or differ; never removes other tags."""
    results = []
    for name in names:
        groups = collect(logs, "describe_log_groups", "logGroups", logGroupNamePrefix=name)
        group = next((g for g in groups if g["logGroupName"] == name), None)
        if group is None:
            results.append(Tagged(name, "missing", {}))
            continue
        arn = group.get("logGroupArn") or group["arn"].removesuffix(":*")
        current = logs.list_tags_for_resource(resourceArn=arn).get("tags", {})
        wanted = {k: v for k, v in tags.items() if current.get(k) != v}
        if wanted:
            logs.tag_resource(resourceArn=arn, tags=wanted)
            results.append(Tagged(name, "tagged", wanted))
        else:
            results.append(Tagged(name, "already tagged", {}))
    return results
