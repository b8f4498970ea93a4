"""CloudFormation and S3 calls for deploy, outputs and delete (docs/architecture.md §5): change sets, waiting,
event streaming, outputs. Nothing here prints; callers get data and decide what to show.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import botocore.exceptions

from cnsq.aws import Client, pages
from cnsq.deploy.template import load_cfn_yaml
from cnsq.errors import AwsError, DeployError

SUCCESS = {"CREATE_COMPLETE", "UPDATE_COMPLETE", "DELETE_COMPLETE", "IMPORT_COMPLETE"}
FAILURE = {
    "CREATE_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED",
    "UPDATE_ROLLBACK_COMPLETE", "UPDATE_ROLLBACK_FAILED", "UPDATE_FAILED",
    "IMPORT_ROLLBACK_COMPLETE", "IMPORT_ROLLBACK_FAILED",
}
STATEFUL_TYPES = {
    "AWS::RDS::DBInstance", "AWS::SQS::Queue", "AWS::SecretsManager::Secret",
}
EMPTY_REASONS = ("didn't contain changes", "No updates are to be performed")


@dataclass(frozen=True)
class Change:
    """One row of a change set: what CloudFormation will do to a resource."""

    action: str
    logical_id: str
    resource_type: str
    replacement: str  # True, False, Conditional, or "" when not reported
    properties: tuple[str, ...] = ()

    @property
    def replaces_state(self) -> bool:
        return (
            self.action == "Modify"
            and self.replacement in ("True", "Conditional")
            and self.resource_type in STATEFUL_TYPES
        )


@dataclass(frozen=True)
class Event:
    """One stack event."""

    timestamp: datetime
    logical_id: str
    resource_type: str
    status: str
    reason: str = ""


@dataclass
class ChangeSet:
    """A created change set and what it would do."""

    arn: str
    kind: str  # CREATE or UPDATE
    status: str
    stack_id: str = ""
    reason: str = ""
    changes: list[Change] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.status == "FAILED" and any(r in self.reason for r in EMPTY_REASONS)


class Stacks:
    """CloudFormation operations on behalf of one session."""

    def __init__(self, cloudformation: Client, s3: Client, poll_seconds: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep, autoscaling: Client | None = None,
                 ssm: Client | None = None):
        self.cfn = cloudformation
        self.s3 = s3
        self.autoscaling = autoscaling
        self.ssm = ssm
        self.poll_seconds = poll_seconds
        self.sleep = sleep

    # -- S3 ---------------------------------------------------------------------------------

    def object_exists(self, bucket: str, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            if code in ("NoSuchBucket",):
                raise AwsError(f"S3 bucket '{bucket}' does not exist (buckets.internal)") from None
            raise

    def upload(self, bucket: str, key: str, body: bytes) -> None:
        try:
            self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise AwsError(f"S3 bucket '{bucket}' does not exist (buckets.internal)") from None
            raise

    def template_url(self, bucket: str, key: str, region: str) -> str:
        """The S3 URL CloudFormation reads a template from (virtual-hosted style)."""
        if region == "us-east-1":
            return f"https://{bucket}.s3.amazonaws.com/{key}"
        return f"https://{bucket}.s3.{region}.amazonaws.com/{key}"

    # -- stacks ------------------------------------------------------------------------------

    def describe(self, name: str) -> dict | None:
        """The stack's description, or None when there is no such stack."""
        try:
            stacks = next(pages(self.cfn, "describe_stacks", StackName=name), {}).get("Stacks", [])
        except botocore.exceptions.ClientError as exc:
            if "does not exist" in exc.response.get("Error", {}).get("Message", ""):
                return None
            raise
        if not stacks:
            return None
        if stacks[0]["StackStatus"] == "DELETE_COMPLETE" and not name.startswith("arn:"):
            return None  # by name, a deleted stack is no stack (as AWS answers)
        return stacks[0]

    def status(self, name: str) -> str | None:
        stack = self.describe(name)
        return stack["StackStatus"] if stack else None

    def outputs(self, name: str) -> dict[str, str]:
        stack = self.describe(name)
        if stack is None:
            raise DeployError(f"stack '{name}' does not exist (deploy it with `cnsq deploy`)")
        return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    # -- change sets -------------------------------------------------------------------------

    def create_change_set(
        self,
        name: str,
        kind: str,
        template_url: str,
        parameters: dict[str, str],
        capabilities: list[str],
        tags: dict[str, str],
    ) -> str:
        change_set_name = f"cnsq-{int(time.time() * 1000)}"
        response = self.cfn.create_change_set(
            StackName=name,
            ChangeSetName=change_set_name,
            ChangeSetType=kind,
            TemplateURL=template_url,
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Capabilities=capabilities,
            Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
            Description="created by cnsq deploy",
        )
        return response["Id"]

    def wait_change_set(self, arn: str, kind: str, timeout: float = 600) -> ChangeSet:
        """Wait until the change set is ready (botocore's ``change_set_create_complete`` waiter)
        or failed (an empty change set fails: its reason says so), and read its changes."""
        delay = min(self.poll_seconds, 2.0)
        attempts = int(timeout / max(delay, 0.5)) + 1
        try:
            self.cfn.get_waiter("change_set_create_complete").wait(
                ChangeSetName=arn, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})
        except botocore.exceptions.WaiterError as exc:
            last = exc.last_response or {}
            status = last.get("Status", "")
            if status != "FAILED":
                if "Error" in last:
                    raise  # the call itself failed: the CLI explains AWS's error
                raise DeployError(f"change set {arn} still {status or 'not ready'} after "
                                  f"{timeout:.0f}s") from None
            return ChangeSet(arn, kind, status, reason=last.get("StatusReason", ""),
                             stack_id=last.get("StackId", ""))
        change_set = ChangeSet(arn, kind, "CREATE_COMPLETE")
        change_set.changes = list(self._changes(arn, change_set))
        return change_set

    def _changes(self, arn: str, change_set: ChangeSet) -> Iterator[Change]:
        for page in pages(self.cfn, "describe_change_set", ChangeSetName=arn,
                          IncludePropertyValues=True):
            change_set.stack_id = change_set.stack_id or page.get("StackId", "")
            for item in page.get("Changes", []):
                rc = item.get("ResourceChange", {})
                names = []
                for detail in rc.get("Details", []):
                    target = detail.get("Target", {})
                    if target.get("Attribute") == "Properties" and target.get("Name"):
                        if target["Name"] not in names:
                            names.append(target["Name"])
                yield Change(
                    rc.get("Action", ""),
                    rc.get("LogicalResourceId", ""),
                    rc.get("ResourceType", ""),
                    str(rc.get("Replacement", "")),
                    tuple(names),
                )

    def delete_change_set(self, arn: str) -> None:
        self.cfn.delete_change_set(ChangeSetName=arn)

    def execute_change_set(self, arn: str) -> None:
        self.cfn.execute_change_set(ChangeSetName=arn)

    # -- events ------------------------------------------------------------------------------

    def events_since(self, name: str, since: datetime, seen: set[str]) -> list[Event]:
        """Stack events newer than ``since`` not yet in ``seen``, oldest first."""
        fresh: list[Event] = []
        for page in pages(self.cfn, "describe_stack_events", StackName=name):  # newest first
            older = False
            for raw in page.get("StackEvents", []):
                if raw["Timestamp"] < since:
                    older = True
                    break
                if raw["EventId"] in seen:
                    continue
                seen.add(raw["EventId"])
                fresh.append(Event(
                    raw["Timestamp"], raw.get("LogicalResourceId", ""),
                    raw.get("ResourceType", ""), raw.get("ResourceStatus", ""),
                    raw.get("ResourceStatusReason", ""),
                ))
            if older:
                break  # the pages after this one are older still: never fetched
        return sorted(fresh, key=lambda e: e.timestamp)

    def follow(
        self,
        name: str,
        since: datetime,
        on_event: Callable[[Event], None],
        timeout: float = 3 * 3600,
    ) -> tuple[str, list[Event]]:
        """Stream new events until the stack reaches a terminal state.

        Returns (final status, every event seen). A stack that vanishes (deleted) is reported as
        DELETE_COMPLETE.
        """
        seen: set[str] = set()
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(name)
            try:
                fresh = self.events_since(name, since, seen) if status else []
            except botocore.exceptions.ClientError:
                fresh = []  # the stack was deleted between the two calls
            for event in fresh:
                events.append(event)
                on_event(event)
            if status is None:
                return "DELETE_COMPLETE", events
            if status in SUCCESS or status in FAILURE:
                return status, events
            if time.monotonic() > deadline:
                raise DeployError(f"stack {name} still {status} after {timeout:.0f}s")
            self.sleep(self.poll_seconds)

    def template(self, name: str) -> dict[str, Any]:
        """The stack's template as it was deployed (the Original stage), parsed."""

        body = self.cfn.get_template(StackName=name, TemplateStage="Original")["TemplateBody"]
        # boto3 hands a JSON body over already parsed; YAML comes as text.
        return body if isinstance(body, dict) else load_cfn_yaml(body, f"the template of {name}")

    def resources(self, name: str) -> list[tuple[str, str, str]]:
        """(logical id, type, physical id) of every resource in the stack."""
        found = []
        for page in self.cfn.get_paginator("list_stack_resources").paginate(StackName=name):
            for item in page.get("StackResourceSummaries", []):
                found.append((item["LogicalResourceId"], item["ResourceType"],
                              item.get("PhysicalResourceId", "")))
        return found

    def delete(self, name: str) -> None:
        self.cfn.delete_stack(StackName=name)

    def public_parameter(self, name: str) -> str | None:
        """The value of an SSM parameter (AWS's public ones: the ECS AMIs), None if missing."""
        if self.ssm is None:
            raise AwsError("no SSM client to resolve the AMI's parameter")
        answer = self.ssm.get_parameters(Names=[name])
        found = answer.get("Parameters", [])
        return found[0]["Value"] if found else None

    def lift_scale_in_protection(self, group: str) -> int:
        """Lift scale-in protection from every host of ``group`` (a self-scaling stack protects
        new hosts, and ECS lifts it only from hosts without tasks); returns how many.

        A delete sets the group's size to zero: protected hosts would stay. SetInstanceProtection
        takes at most 50 instances a call (the EC2 Auto Scaling API reference)."""
        if self.autoscaling is None:
            return 0
        protected = [i["InstanceId"] for page in self.autoscaling.get_paginator(
                         "describe_auto_scaling_groups").paginate(AutoScalingGroupNames=[group])
                     for found in page.get("AutoScalingGroups", [])
                     for i in found.get("Instances", []) if i.get("ProtectedFromScaleIn")]
        for start in range(0, len(protected), 50):
            self.autoscaling.set_instance_protection(
                AutoScalingGroupName=group, InstanceIds=protected[start:start + 50],
                ProtectedFromScaleIn=False)
        return len(protected)
