"""What a deployed stack holds that the next template must keep as it is.

CloudFormation replaces a resource when one of its create-only properties changes (the resource
provider schemas' ``createOnlyProperties``, docs: "Update behaviors of stack resources"). Two
resources of a stack deployed by the original (kes) must not be replaced that way:

- the results database: the original created it in the default VPC's default subnet group,
  unencrypted. cnsq's own database sits in the stack's private subnets, encrypted — both
  create-only, so rendering it the cnsq way would create a new, empty database. The original's is
  kept in place (adopted): its properties as deployed, the password moved to RDS's management.
  Moving it is the user's explicit step (``rds.restoreFromSnapshot``; docs/configuration.md:
  "Moving an adopted database").
- the ECS service: one created before ECS's long ARN format (2021) cannot be tagged
  (``InvalidParameterException``) until it is recreated; its tags are left off.

Everything is read from the stack (its template as deployed and its resources) and given to the
template as ``existing``; a new stack has nothing to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnsq.stack import logical_ids

# What the template sees for a new stack, or for one whose resources are all cnsq's.
NOTHING = {"database": None, "untaggableService": False}


@dataclass
class Existing:
    """The deployed stack's facts the template must respect, and what to tell the user."""

    database: dict[str, Any] | None = None  # the adopted database's properties, as deployed
    untaggable_service: bool = False
    notes: list[str] = field(default_factory=list)

    def context(self) -> dict[str, Any]:
        return {"database": self.database, "untaggableService": self.untaggable_service}


def adopted_database(properties: dict[str, Any]) -> dict[str, Any]:
    """The original's database properties as cnsq keeps them: everything as deployed except
    the password, which RDS takes over (ManageMasterUserPassword, an in-place change)."""
    kept = {k: v for k, v in properties.items()
            if k not in ("MasterUserPassword", "ManageMasterUserPassword")}
    kept["ManageMasterUserPassword"] = True
    return kept


def short_service_arn(arn: str) -> bool:
    """``arn:aws:ecs:REGION:ACCOUNT:service/NAME`` (before 2021) rather than
    ``…:service/CLUSTER/NAME``: such a service cannot be tagged until it is recreated."""
    resource = arn.split(":", 5)[-1] if arn.startswith("arn:") else ""
    return resource.startswith("service/") and resource.count("/") == 1


def from_stack(template: dict[str, Any], resources: list[tuple[str, str, str]],
               stack_no_dash: str, restore_snapshot: str = "") -> Existing:
    """The facts to keep, from a deployed stack's template and its (logical id, type, physical
    id) resources."""
    existing = Existing()
    db_id = logical_ids.results_db(stack_no_dash)
    deployed = template.get("Resources", {}).get(db_id)
    if deployed and "DBSubnetGroupName" not in deployed.get("Properties", {}):
        if restore_snapshot:
            existing.notes.append(
                f"rds.restoreFromSnapshot: the database {db_id} is replaced by one restored from "
                f"{restore_snapshot}, private and encrypted; the old one is kept as a final "
                "snapshot. Keep rds.restoreFromSnapshot in the config from now on (CloudFormation "
                "creates an empty database if it is removed)")
        else:
            properties = deployed.get("Properties", {})
            existing.database = adopted_database(properties)
            public = "public" if properties.get("PubliclyAccessible", True) else "private"
            encrypted = "encrypted" if properties.get("StorageEncrypted") else "unencrypted"
            existing.notes.append(
                f"rds: the results database {db_id} was created by the original stack and is kept "
                f"in place ({public}, {encrypted}, outside the stack's private subnets), its "
                "password now managed by RDS. The stack's Lambdas reach it only where its security "
                "group admits them: move it private and encrypted with rds.restoreFromSnapshot "
                "(docs/configuration.md: \"Moving an adopted database\")")
    for logical_id, resource_type, physical_id in resources:
        if resource_type == "AWS::ECS::Service" and short_service_arn(physical_id):
            existing.untaggable_service = True
            existing.notes.append(
                f"ecs: the model service {logical_id} has a short ARN (created before 2021) and "
                "cannot be tagged: its tags are left off. To tag it, opt in to the long ARN format "
                "(aws ecs put-account-setting-default --name serviceLongArnFormat --value "
                "enabled) and recreate the service")
    return existing


def read(stacks: Any, stack_name: str, stack_no_dash: str, restore_snapshot: str = "") -> Existing:
    """:func:`from_stack` for the deployed stack ``stack_name``."""
    return from_stack(stacks.template(stack_name), stacks.resources(stack_name), stack_no_dash,
                      restore_snapshot)
