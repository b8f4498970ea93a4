"""Which resources an update from one template to another replaces, by AWS's published rules.

CloudFormation replaces a resource when its type changes or one of its create-only properties
changes, is added or is removed: the resource provider schemas list those properties
(``createOnlyProperties``), and cfn-lint ships the schemas. moto does not apply these rules, so
the tests of template changes ask this module instead. It is conservative: any change of a
create-only property's template value counts (CloudFormation may resolve some intrinsic
functions to the same value and not replace; this module resolves only ``Fn::Sub`` and
``Fn::Join`` of literals).

A custom-named resource (one whose name property is set) cannot be replaced at all: CloudFormation
refuses the update ("CloudFormation cannot update a stack when a custom-named resource requires
replacing").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Replacement:
    logical_id: str
    resource_type: str
    reasons: tuple[str, ...]
    custom_named: bool


def create_only(resource_type: str, region: str = "us-east-1") -> list[tuple[str, ...]]:
    """The create-only property paths of a resource type, from its provider schema."""
    from cfnlint.schema import PROVIDER_SCHEMA_MANAGER  # a second to import: when first used

    schema = PROVIDER_SCHEMA_MANAGER.get_resource_schema(region, resource_type).schema
    return [tuple(p.split("/")[2:]) for p in schema.get("createOnlyProperties", [])
            if p.startswith("/properties/")]


def name_properties(resource_type: str, region: str = "us-east-1") -> list[str]:
    """The properties that give a resource a custom name: create-only, named ``Name`` or
    ``<Type>Name``/``<Type>Identifier`` where ``<Type>`` ends the type's name (QueueName,
    RoleName, LogGroupName, DBInstanceIdentifier, GroupName of a SecurityGroup …)."""
    kind = resource_type.rsplit("::", 1)[-1]
    found = []
    for path in create_only(resource_type, region):
        if len(path) != 1:
            continue
        name = path[0]
        for suffix in ("Name", "Identifier"):
            stem = name.removesuffix(suffix)
            if name.endswith(suffix) and (stem == "" or kind.endswith(stem)):
                found.append(name)
    return found


def _normal(value: Any) -> Any:
    """Template values as CloudFormation compares them: ``Fn::Sub`` of a string with no
    variable is that string, ``Fn::Join`` of literals the joined string."""
    if isinstance(value, dict):
        if set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str) and "${" not in value["Fn::Sub"]:
            return value["Fn::Sub"]
        if set(value) == {"Fn::Join"}:
            separator, parts = value["Fn::Join"]
            parts = [_normal(p) for p in parts]
            if all(isinstance(p, str | int | float) for p in parts):
                return separator.join(str(p) for p in parts)
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _at(properties: dict, path: tuple[str, ...]) -> Any:
    value: Any = properties
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return _normal(value)


def replaced(old: dict, new: dict, region: str = "us-east-1") -> dict[str, Replacement]:
    """Logical id → why an update from template ``old`` to ``new`` replaces that resource."""
    found = {}
    old_resources, new_resources = old.get("Resources", {}), new.get("Resources", {})
    for logical_id in old_resources.keys() & new_resources.keys():
        before, after = old_resources[logical_id], new_resources[logical_id]
        kind = after["Type"]
        old_props, new_props = before.get("Properties") or {}, after.get("Properties") or {}
        names = name_properties(kind, region)
        custom = any(old_props.get(n) is not None for n in names)
        if before["Type"] != kind:
            found[logical_id] = Replacement(logical_id, kind, (f"type {before['Type']} → {kind}",),
                                            custom)
            continue
        reasons = []
        for path in create_only(kind, region):
            was, now = _at(old_props, path), _at(new_props, path)
            if was != now:
                label = "/".join(path)
                change = "added" if was is None else "removed" if now is None else "changed"
                reasons.append(f"{label} {change}")
        if reasons:
            found[logical_id] = Replacement(logical_id, kind, tuple(reasons), custom)
    return found
