"""cnsq tag-logs against moto: the stack's log groups and Lambda's own, idempotently."""

from __future__ import annotations

from click.testing import CliRunner

from cnsq.cli import main
from support.accounts import client


def test_tags_every_log_group_of_the_stack_once(project):
    assert CliRunner().invoke(main, ["deploy"]).exit_code == 0
    logs = client("logs")
    # One group the stack does not own, made by Lambda at its first run.
    logs.create_log_group(logGroupName="/aws/lambda/other-function")
    first = CliRunner().invoke(main, ["tag-logs"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "Tagged 4, already tagged 0, missing 0." in first.stdout
    for group in ("/aws/lambda/cnsq-dev-DownloadAndPredict", "/aws/lambda/cnsq-dev-admin",
                  "/aws/lambda/cnsq-dev-controller", "cnsq-dev-ecs-docker"):
        arn = logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"][0]["logGroupArn"]
        tags = logs.list_tags_for_resource(resourceArn=arn)["tags"]
        assert tags["Project"] == "cnsq-dev" and tags["Stack"] == "cnsq-dev"
    other = logs.describe_log_groups(logGroupNamePrefix="/aws/lambda/other")["logGroups"][0]
    assert "Project" not in logs.list_tags_for_resource(resourceArn=other["logGroupArn"])["tags"]
    second = CliRunner().invoke(main, ["tag-logs"], catch_exceptions=False)
    assert "Tagged 0, already tagged 4, missing 0." in second.stdout


def test_no_stack(project):
    result = CliRunner().invoke(main, ["tag-logs"])
    assert result.exit_code == 1 and "does not exist" in result.stderr
