"""A stack deployed by the original (kes) updates in place under `cnsq deploy`.

The original's template (tests/data/chip-n-scale-cloudformation.template.yml, MIT, with its
LICENSE beside it) is rendered with its Handlebars placeholders for a test config, created on
moto with plain boto3 `create_stack` as kes did, then `cnsq deploy --yes` runs over it.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from click.testing import CliRunner

from cnsq.cli import main
from cnsq.deploy.template import load_cfn_yaml
from support.accounts import client, key_pair
from support.original import original_template
from support.replacement import replaced

DATA = Path(__file__).resolve().parents[1] / "data"


def test_a_kes_deployed_stack_updates_in_place(project):
    text = Path("config/config.yml").read_text()
    vpc = text.split("vpc: ")[1].split()[0]
    subnets = [line.split("- ")[1] for line in text.split("subnets:\n")[1].splitlines()[:2]]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("download_and_predict/__init__.py", "")
    client("s3").put_object(Bucket="cnsq-artifacts", Key="kes/package.zip", Body=buffer.getvalue())
    key_pair("kes-key")
    cloudformation = client("cloudformation")
    original = original_template(vpc, subnets, "cnsq-artifacts", "kes/package.zip")
    cloudformation.create_stack(
        StackName="cnsq-dev", Capabilities=["CAPABILITY_NAMED_IAM"], TemplateBody=original)
    before = cloudformation.describe_stacks(StackName="cnsq-dev")["Stacks"][0]
    assert before["StackStatus"] == "CREATE_COMPLETE"
    old_resources = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in
                     cloudformation.describe_stack_resources(StackName="cnsq-dev")["StackResources"]}
    assert "DownloadAndPredictLambdaFunctionLogGroup" in old_resources

    result = CliRunner().invoke(main, ["deploy", "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # Judged by AWS's rules (moto applies none): the update replaces no custom-named resource
    # and keeps the original's database in place, and says so.
    deployed = cloudformation.get_template(StackName="cnsq-dev")["TemplateBody"]
    found = replaced(load_cfn_yaml(original),
                     deployed if isinstance(deployed, dict) else load_cfn_yaml(deployed))
    assert [f for f in found.values() if f.custom_named] == [] and "cnsqdevResultsDB" not in found
    assert "warning: rds: the results database cnsqdevResultsDB was created by the original stack" in result.stderr
    assert "pw-Zq81-never-print" not in result.output
    assert "Changes (UPDATE)" in result.stdout
    after = cloudformation.describe_stacks(StackName="cnsq-dev")["Stacks"][0]
    assert after["StackStatus"] == "UPDATE_COMPLETE"
    # The log group kept its logical id and its name: updated in place, not created twice.
    rows = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()
            if line.split()[:1] in (["Add"], ["Modify"], ["Remove"])}
    assert rows.get("DownloadAndPredictLambdaFunctionLogGroup") == "Modify"
    assert rows.get("cnsqdevTileQueue") == "Modify"
    new_resources = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in
                     cloudformation.describe_stack_resources(StackName="cnsq-dev")["StackResources"]
                     if "PhysicalResourceId" in r}  # (moto lists what it lost without one)
    assert new_resources["cnsqdevTileQueue"] == old_resources["cnsqdevTileQueue"]
    # The old Lambda's plaintext DATABASE_URL (with the password) and token are gone.
    variables = client("lambda").get_function(FunctionName="cnsq-dev-DownloadAndPredict")[
        "Configuration"]["Environment"]["Variables"]
    assert "DATABASE_URL" not in variables and "TILE_ACCESS_TOKEN" not in variables
    assert variables["DATABASE_SSLMODE"] == "require"
    # (moto's CloudFormation has no AWS::SecretsManager::Secret, so the token's secret ARN is not
    # set here; tests/unit/test_template.py checks the variable in the compiled template.)
