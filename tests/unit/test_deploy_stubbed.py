"""What moto server cannot emulate, tested with botocore's Stubber on the same client code:
per-resource failure events and rollback states, Replacement in change sets, Modify property
details (IncludePropertyValues), and stack outputs after a change set is executed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from cnsq.deploy.apply import apply, next_steps
from cnsq.deploy.cloudformation import ChangeSet, Stacks
from cnsq.deploy.plan import Plan, plan, show_changes
from cnsq.errors import DeployError

STACK_ID = "arn:aws:cloudformation:us-east-1:123456789012:stack/cnsq-dev/abc"
CS_ARN = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/cnsq-1/def"


class RecordingUI:
    def __init__(self, answer: bool = False):
        self.lines: list[str] = []
        self.questions: list[str] = []
        self.answer = answer

    def echo(self, text: str = "", err: bool = False) -> None:
        self.lines.append(text)

    def confirm(self, question: str) -> bool:
        self.questions.append(question)
        return self.answer

    def prompt(self, question: str) -> str:
        self.questions.append(question)
        return ""

    def table(self, rows, headers) -> None:
        self.lines.append(" | ".join(headers))
        self.lines.extend(" | ".join(str(c) for c in row) for row in rows)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def cfn():
    client = boto3.client("cloudformation", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def stack(status: str, outputs=None) -> dict:
    body = {"StackId": STACK_ID, "StackName": "cnsq-dev", "StackStatus": status,
            "CreationTime": datetime.now(UTC)}
    if outputs:
        body["Outputs"] = [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()]
    return {"Stacks": [body]}


def event(n: int, logical_id: str, rtype: str, status: str, reason: str = "") -> dict:
    item = {"StackId": STACK_ID, "EventId": f"e{n}", "StackName": "cnsq-dev",
            "LogicalResourceId": logical_id, "ResourceType": rtype, "ResourceStatus": status,
            "Timestamp": datetime.now(UTC)}
    if reason:
        item["ResourceStatusReason"] = reason
    return item


def a_plan(changes=None) -> Plan:
    result = Plan("cnsq-dev", Path("cloudformation.yml"))
    result.change_set = ChangeSet(CS_ARN, "CREATE", "CREATE_COMPLETE", stack_id=STACK_ID,
                                  changes=changes or [])
    return result


def test_stubbed_failed_create_lists_failed_resources_and_explains_rollback(cfn):
    client, stub = cfn
    stub.add_response("execute_change_set", {}, {"ChangeSetName": CS_ARN})
    stub.add_response("describe_stacks", stack("CREATE_IN_PROGRESS"), {"StackName": STACK_ID})
    stub.add_response("describe_stack_events", {"StackEvents": [
        event(2, "cnsqdevResultsDB", "AWS::RDS::DBInstance", "CREATE_IN_PROGRESS"),
        event(1, "cnsq-dev", "AWS::CloudFormation::Stack", "CREATE_IN_PROGRESS", "User Initiated"),
    ]}, {"StackName": STACK_ID})
    stub.add_response("describe_stacks", stack("ROLLBACK_COMPLETE"), {"StackName": STACK_ID})
    stub.add_response("describe_stack_events", {"StackEvents": [
        event(5, "cnsq-dev", "AWS::CloudFormation::Stack", "ROLLBACK_COMPLETE"),
        event(4, "cnsq-dev", "AWS::CloudFormation::Stack", "ROLLBACK_IN_PROGRESS",
              "The following resource(s) failed to create: [cnsqdevResultsDB]."),
        event(3, "cnsqdevResultsDB", "AWS::RDS::DBInstance", "CREATE_FAILED",
              "Cannot find version 9.6.2 for postgres"),
        event(2, "cnsqdevResultsDB", "AWS::RDS::DBInstance", "CREATE_IN_PROGRESS"),
    ]}, {"StackName": STACK_ID})
    ui = RecordingUI()
    stacks = Stacks(client, None, poll_seconds=0, sleep=lambda s: None)
    with pytest.raises(DeployError) as info:
        apply(a_plan(), stacks, ui, assume_yes=False, interactive=False)
    message = str(info.value)
    assert "ended in ROLLBACK_COMPLETE" in message
    assert "cnsqdevResultsDB (AWS::RDS::DBInstance): Cannot find version 9.6.2 for postgres" in message
    assert "delete it with `cnsq delete`" in message
    # Events were streamed once each, oldest first.
    streamed = [line for line in ui.lines if "AWS::RDS::DBInstance" in line]
    assert [("CREATE_IN_PROGRESS" in s, "CREATE_FAILED" in s) for s in streamed] == [
        (True, False), (False, True)]


def test_stubbed_rollback_complete_stack_is_explained_before_anything_is_built(cfn):
    client, stub = cfn
    stub.add_response("describe_stacks", stack("ROLLBACK_COMPLETE"), {"StackName": "cnsq-dev"})

    class Config:
        stack_name = "cnsq-dev"

    stacks = Stacks(client, None)
    with pytest.raises(DeployError, match=r"ROLLBACK_COMPLETE: its first creation failed .*Delete it"):
        plan(Config(), None, stacks, None, RecordingUI(), "us-east-1")


def test_stubbed_busy_stack_is_refused(cfn):
    client, stub = cfn
    stub.add_response("describe_stacks", stack("UPDATE_IN_PROGRESS"), {"StackName": "cnsq-dev"})

    class Config:
        stack_name = "cnsq-dev"

    with pytest.raises(DeployError, match=r"busy \(UPDATE_IN_PROGRESS\)"):
        plan(Config(), None, Stacks(client, None), None, RecordingUI(), "us-east-1")


def _change_set_with_replacement(stub) -> None:
    base = {"ChangeSetName": "cnsq-1", "ChangeSetId": CS_ARN, "StackId": STACK_ID,
            "StackName": "cnsq-dev", "Status": "CREATE_COMPLETE", "ExecutionStatus": "AVAILABLE"}
    stub.add_response("describe_change_set", base, {"ChangeSetName": CS_ARN})
    stub.add_response("describe_change_set", {**base, "Changes": [
        {"Type": "Resource", "ResourceChange": {
            "Action": "Modify", "LogicalResourceId": "cnsqdevResultsDB",
            "ResourceType": "AWS::RDS::DBInstance", "Replacement": "True",
            "Details": [
                {"Target": {"Attribute": "Properties", "Name": "DBInstanceClass",
                            "RequiresRecreation": "Never", "BeforeValue": "db.t3.medium",
                            "AfterValue": "db.t3.large"}},
                {"Target": {"Attribute": "Properties", "Name": "DBName",
                            "RequiresRecreation": "Always"}},
            ]}},
        {"Type": "Resource", "ResourceChange": {
            "Action": "Modify", "LogicalResourceId": "DownloadAndPredictLambdaFunction",
            "ResourceType": "AWS::Lambda::Function", "Replacement": "False",
            "Details": [{"Target": {"Attribute": "Properties", "Name": "MemorySize"}}]}},
    ]}, {"ChangeSetName": CS_ARN, "IncludePropertyValues": True})


def test_stubbed_modify_rows_name_the_properties_that_change(cfn):
    client, stub = cfn
    _change_set_with_replacement(stub)
    change_set = Stacks(client, None).wait_change_set(CS_ARN, "UPDATE")
    ui = RecordingUI()
    show_changes(change_set, ui)
    assert "Modify | cnsqdevResultsDB | AWS::RDS::DBInstance | True | DBInstanceClass, DBName" in ui.text
    assert "Modify | DownloadAndPredictLambdaFunction | AWS::Lambda::Function | False | MemorySize" in ui.text
    assert change_set.stack_id == STACK_ID


def test_stubbed_replacing_the_database_needs_yes(cfn):
    client, stub = cfn
    _change_set_with_replacement(stub)
    stacks = Stacks(client, None, poll_seconds=0, sleep=lambda s: None)
    change_set = stacks.wait_change_set(CS_ARN, "UPDATE")
    result = a_plan(change_set.changes)
    stub.add_response("delete_change_set", {}, {"ChangeSetName": CS_ARN})
    with pytest.raises(DeployError, match=r"would replace cnsqdevResultsDB .*again with yes") as refused:
        apply(result, stacks, RecordingUI(), assume_yes=False, interactive=False)
    from cnsq.cli import main
    from cnsq.cli.app import flags_of

    assert "run again with --yes to accept" in refused.value.worded(flags_of(main.commands["deploy"]))

    # Asked on a terminal, "no" cancels and deletes the change set.
    stub.add_response("delete_change_set", {}, {"ChangeSetName": CS_ARN})
    ui = RecordingUI(answer=False)
    with pytest.raises(DeployError, match="cancelled"):
        apply(result, stacks, ui, assume_yes=False, interactive=True)
    assert "REPLACES cnsqdevResultsDB" in ui.questions[0]

    # --yes executes it.
    stub.add_response("execute_change_set", {}, {"ChangeSetName": CS_ARN})
    stub.add_response("describe_stacks", stack("UPDATE_COMPLETE"), {"StackName": STACK_ID})
    stub.add_response("describe_stack_events", {"StackEvents": []}, {"StackName": STACK_ID})
    status, _ = apply(result, stacks, RecordingUI(), assume_yes=True, interactive=False)
    assert status == "UPDATE_COMPLETE"


def test_stubbed_outputs_after_execution_are_printed_with_the_setup_hint(cfn):
    client, stub = cfn
    stub.add_response("describe_stacks", stack("CREATE_COMPLETE", {
        "dbConnectionString": "postgres://db.example:5432/ResultsDB",
        "queueURL": "https://sqs.us-east-1.amazonaws.com/123456789012/cnsqdevTileQueue",
    }), {"StackName": STACK_ID})
    outputs = Stacks(client, None).outputs(STACK_ID)
    ui = RecordingUI()
    next_steps("cnsq-dev", outputs, "cnsq setup --config config/config.yml", ui)
    assert ui.lines[0] == "The stack cnsq-dev is deployed or updated."
    assert "- The database is available at: postgres://db.example:5432/ResultsDB" in ui.lines
    assert any("cnsqdevTileQueue" in line for line in ui.lines)
    assert ui.lines[-1] == "  $ cnsq setup --config config/config.yml"


def test_stubbed_event_pages_stop_at_events_older_than_the_deploy(cfn):
    client, stub = cfn
    old = event(1, "cnsq-dev", "AWS::CloudFormation::Stack", "CREATE_COMPLETE")
    old["Timestamp"] = datetime(2020, 1, 1, tzinfo=UTC)
    stub.add_response("describe_stack_events", {
        "StackEvents": [event(2, "Q", "AWS::SQS::Queue", "UPDATE_COMPLETE"), old],
        "NextToken": "more"}, {"StackName": STACK_ID})
    seen: set[str] = set()
    fresh = Stacks(client, None).events_since(STACK_ID, datetime(2024, 1, 1, tzinfo=UTC), seen)
    assert [e.logical_id for e in fresh] == ["Q"]  # and no second page was requested
    assert seen == {"e2"}


def test_stubbed_change_set_waits_fails_and_times_out_through_the_waiter(cfn):
    """botocore's change_set_create_complete waiter: a failed (empty) change set keeps its
    reason; one still pending at the deadline is said so."""
    client, stub = cfn
    base = {"ChangeSetName": "cnsq-1", "ChangeSetId": CS_ARN, "StackId": STACK_ID,
            "StackName": "cnsq-dev", "ExecutionStatus": "UNAVAILABLE"}
    asked = {"ChangeSetName": CS_ARN}
    stacks = Stacks(client, None, poll_seconds=0)
    stub.add_response("describe_change_set", {**base, "Status": "FAILED",
                                              "StatusReason": "The submitted information didn't contain changes."}, asked)
    failed = stacks.wait_change_set(CS_ARN, "UPDATE")
    assert failed.empty and failed.stack_id == STACK_ID
    for _ in range(2):
        stub.add_response("describe_change_set", {**base, "Status": "CREATE_PENDING"}, asked)
    with pytest.raises(DeployError, match=r"still CREATE_PENDING after 0s"):
        Stacks(client, None, poll_seconds=0.5).wait_change_set(CS_ARN, "UPDATE", timeout=0.5)
