"""A plan applied: its change set executed and followed to the end, the database migrated,
the next step said; and a stack destroyed. What will change is cnsq.deploy.plan's; this module
changes the stack (docs/architecture.md §5).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cnsq.deploy.cloudformation import Event, Stacks
from cnsq.deploy.plan import UI, Plan
from cnsq.errors import CnsqError, DeployError, option
from cnsq.stack import logical_ids
from cnsq.stack.admin import AdminFunction, AdminUnavailable


def event_line(event: Event) -> str:
    """One streamed stack event: time, status, type, logical id and the reason if any."""
    reason = f"  {event.reason}" if event.reason else ""
    return (f"{event.timestamp:%H:%M:%S}  {event.status:<28} {event.resource_type:<40} "
            f"{event.logical_id}{reason}")


def apply(
    plan_: Plan, stacks: Stacks, ui: UI, assume_yes: bool, interactive: bool
) -> tuple[str, list[Event]]:
    """Execute the plan's change set and follow the stack to a terminal state.

    Raises:
        DeployError: the user refused a replacement, or the stack ended in a failed state.
    """
    cs = plan_.change_set
    assert cs is not None and not cs.empty
    risky = [c for c in cs.changes if c.replaces_state]
    if risky and not assume_yes:
        names = ", ".join(f"{c.logical_id} ({c.resource_type})" for c in risky)
        if not interactive:
            stacks.delete_change_set(cs.arn)
            raise DeployError(
                f"this deploy would replace {names}, losing its data; "
                f"run again with {option('yes')} to accept (nothing was changed)"
            )
        if not ui.confirm(f"This deploy REPLACES {names}; their data will be lost. Continue?"):
            stacks.delete_change_set(cs.arn)
            raise DeployError("deploy cancelled; nothing was changed")

    # Events are compared with this instant; a little slack absorbs clock skew with AWS.
    started = datetime.now(UTC) - timedelta(seconds=5)
    stacks.execute_change_set(cs.arn)

    # Follow the stack by id: a name can be reused by a stack created later.
    status, events = stacks.follow(cs.stack_id or plan_.stack_name, started,
                                   lambda event: ui.echo(event_line(event)))
    if status not in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
        failed = [e for e in events if e.status.endswith("_FAILED") and e.reason]
        detail = "\n".join(f"  {e.logical_id} ({e.resource_type}): {e.reason}" for e in failed)
        fix = ""
        if status == "ROLLBACK_COMPLETE":
            fix = "\nThe stack was never created: delete it with `cnsq delete` before deploying again."
        raise DeployError(
            f"stack {plan_.stack_name} ended in {status}"
            + (f"; failed resources:\n{detail}" if detail else " (no failure reason was reported)")
            + fix
        )
    return status, events


def migrate(aws: Any, outputs: dict[str, str], ui: UI, setup_command: str) -> bool:
    """Apply the results table's migrations through the stack's admin function.

    Returns whether they were applied. Where the function cannot run (an emulator without a
    Lambda runtime, a missing permission), says so and how to apply them; the deploy stands.
    """

    admin = AdminFunction.of_stack(aws, outputs)
    if admin is None:
        return False
    try:
        answer = admin.call("migrate")
    except AdminUnavailable as exc:
        ui.echo(f"warning: the results table's migrations were not applied: {exc}\n"
                f"  Apply them once the function can run: {setup_command}", err=True)
        return False
    except CnsqError as exc:
        ui.echo(f"warning: the results table's migrations failed: {exc}\n"
                f"  Fix the cause, then run: {setup_command}", err=True)
        return False
    applied = ", ".join(answer.get("applied", [])) or "none needed"
    ui.echo(f"Results table ready (migrations applied: {applied}).")
    return True


def next_steps(stack_name: str, outputs: dict[str, str], setup_command: str, ui: UI,
               migrated: bool = False) -> None:
    """What the original printed after a deploy: where things are, and the next step."""
    ui.echo(f"The stack {stack_name} is deployed or updated.")
    for key, text in ((logical_ids.DB_CONNECTION, "- The database is available at: {}"),
                      (logical_ids.QUEUE_URL, "- The queue is available at {}"),
                      (logical_ids.MODEL_ENDPOINT, "- The model endpoint is {}")):
        if key in outputs:
            ui.echo(text.format(outputs[key]))
    if not outputs:
        ui.echo("- CloudFormation reported no outputs yet; see them later with `cnsq outputs`.")
    if migrated:
        return
    ui.echo()
    ui.echo("Is this the first time setting up this stack? "
            "Run the following command to set up the database:")
    ui.echo()
    ui.echo("  $ " + setup_command)


def destroy(stack_name: str, stacks: Stacks, ui: UI, assume_yes: bool, interactive: bool) -> str:
    """Delete the stack after naming what goes with it; returns the final status.

    Raises:
        DeployError: no such stack, the user did not confirm, or the delete failed.
    """
    current = stacks.describe(stack_name)
    if current is None:
        raise DeployError(f"stack '{stack_name}' does not exist; nothing to delete")
    resources = stacks.resources(stack_name)
    ui.echo(f"Deleting {stack_name} destroys {len(resources)} resources:")
    ui.table([[lid, rtype, phys] for lid, rtype, phys in resources],
             ["LogicalResourceId", "ResourceType", "PhysicalResourceId"])
    ui.echo("The queues and their messages go with it. The results database keeps a final "
            "snapshot, but download your results first: cnsq download results.csv --config …")
    if not assume_yes:
        if not interactive:
            raise DeployError(f"refusing to delete without confirmation: pass {option('yes')}")
        answer = ui.prompt(f"Type the stack name ({stack_name}) to delete it")
        if answer.strip() != stack_name:
            raise DeployError("the name did not match; nothing was deleted")
    for _, rtype, group in resources:
        if rtype == "AWS::AutoScaling::AutoScalingGroup" and group:
            lifted = stacks.lift_scale_in_protection(group)
            if lifted:
                ui.echo(f"Lifted scale-in protection from {lifted} GPU host(s) of {group}, so "
                        "the group can empty.")
    started = datetime.now(UTC) - timedelta(seconds=5)
    stacks.delete(stack_name)

    status, events = stacks.follow(current["StackId"], started,
                                   lambda event: ui.echo(event_line(event)))
    if status != "DELETE_COMPLETE":
        failed = [e for e in events if e.status.endswith("_FAILED")]
        detail = "\n".join(f"  {e.logical_id}: {e.reason}" for e in failed)
        raise DeployError(f"stack {stack_name} ended in {status}" + (f":\n{detail}" if detail else ""))
    ui.echo(f"Deleted {stack_name}.")
    return status


