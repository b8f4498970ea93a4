"""Rendering, CloudFormation YAML loading and cfn-lint of the template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cnsq.config import load_config
from cnsq.deploy.template import CodeLocation, compile_template, lint, load_cfn_yaml, render
from cnsq.errors import TemplateError

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "templates"
ENV = {"RDS_USERNAME": "resultsadmin", "TILE_ACCESS_TOKEN": "tok-8JmX-never-print"}
CODE = {"DownloadAndPredict": CodeLocation("your-bucket", "cnsq-dev/lambdas/abc.zip")}
# Resources whose CloudFormation type has no Tags property (or tags through another property).
UNTAGGABLE = {"AWS::IAM::InstanceProfile", "AWS::Lambda::EventSourceMapping",
              "AWS::ElasticLoadBalancingV2::Listener", "AWS::EC2::LaunchTemplate",
              "AWS::EC2::VPCGatewayAttachment", "AWS::EC2::SubnetRouteTableAssociation",
              "AWS::EC2::Route", "AWS::EC2::VPCEndpoint", "AWS::Lambda::Permission",
              "AWS::ECS::ClusterCapacityProviderAssociations", "AWS::EC2::VPCCidrBlock"}


@pytest.fixture
def config(tmp_path):
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in ENV.items()))
    return load_config(REPO / "config/config.example.yml", environ={}, env_file=env_file)


@pytest.fixture
def compiled(config, tmp_path):
    return compile_template(config, TEMPLATES, tmp_path, CODE)


def test_compiled_example_has_no_cfn_lint_findings(compiled):
    path, _ = compiled
    assert lint(path) == []


def test_compiled_template_is_long_form_yaml(compiled):
    path, data = compiled
    text = path.read_text()
    assert "!GetAtt" not in text and "!Ref" not in text and "!Sub" not in text
    assert data["Resources"]["cnsqdevTileQueue"]["Properties"]["RedrivePolicy"][
        "deadLetterTargetArn"] == {"Fn::GetAtt": ["cnsqdevDeadLetterQueue", "Arn"]}
    assert path == path.parent.parent / "cnsq-dev" / "cloudformation.yml"


def test_secrets_are_noecho_parameters_and_never_in_the_file(compiled):
    path, data = compiled
    text = path.read_text()
    assert ENV["TILE_ACCESS_TOKEN"] not in text
    params = data["Parameters"]
    token = "SecretLambdasDownloadAndPredictEnvsTILEACCESSTOKEN"
    assert params[token]["NoEcho"] is True
    # The token lives in a Secrets Manager secret; the Lambda gets its ARN, not its value.
    secret = data["Resources"]["DownloadAndPredictTILEACCESSTOKENSecret"]
    assert secret["Properties"]["SecretString"] == {"Ref": token}
    env = data["Resources"]["DownloadAndPredictLambdaFunction"]["Properties"]["Environment"]["Variables"]
    assert "TILE_ACCESS_TOKEN" not in env
    assert env["TILE_ACCESS_TOKEN_SECRET_ARN"] == {"Ref": "DownloadAndPredictTILEACCESSTOKENSecret"}
    assert "DATABASE_URL" not in env and "DATABASE_SECRET_ARN" not in env
    outputs = json.dumps(data["Outputs"])
    assert not any(name in outputs for name in params if name.startswith("Secret"))


def test_the_database_password_is_rds_managed_and_never_a_parameter(compiled):
    _, data = compiled
    db = data["Resources"]["cnsqdevResultsDB"]["Properties"]
    assert db["ManageMasterUserPassword"] is True
    assert "MasterUserPassword" not in db and db["MasterUsername"] == "resultsadmin"
    assert not any("Rds" in name for name in data["Parameters"])
    assert (db["EngineVersion"], db["AutoMinorVersionUpgrade"], db["AllowMajorVersionUpgrade"]) == (
        "18", True, True)
    assert db["StorageEncrypted"] is True and db["BackupRetentionPeriod"] == 7
    assert db["DeletionProtection"] is False
    for name in ("DownloadAndPredictLambdaFunction", "AdminLambdaFunction"):
        env = data["Resources"][name]["Properties"]["Environment"]["Variables"]
        assert env["DATABASE_INSTANCE"] == {"Ref": "cnsqdevResultsDB"}
        assert env["DATABASE_SSLMODE"] == "require"


def test_lambda_role_is_least_privilege(compiled):
    _, data = compiled
    role = data["Resources"]["LambdaProcessingRole"]["Properties"]
    for policy in role["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            actions = statement["Action"]
            assert not any("*" in a for a in actions)
            assert statement["Resource"] != "*"
            if "*" in json.dumps(statement["Resource"]):
                # RDS names its secret rds!db-<uuid>: the tag it puts on the secret narrows it
                # to this stack's database; the other pattern is this stack's export folder.
                assert "Condition" in statement or "/exports/*" in json.dumps(statement["Resource"])


def test_queue_event_source_reports_batch_item_failures(compiled):
    _, data = compiled
    mapping = data["Resources"]["cnsqdevDownloadAndPredictLambdaEventSourceMapping"]["Properties"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BatchSize"] == 10
    # The example scales itself: the controller starts at 5 and enables the mapping.
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": 10} and mapping["Enabled"] is False
    function = data["Resources"]["DownloadAndPredictLambdaFunction"]["Properties"]
    assert "ReservedConcurrentExecutions" not in function  # lambdas.*.maxConcurrent unset
    assert function["Runtime"] == "python3.12"
    assert function["Code"] == {"S3Bucket": "your-bucket", "S3Key": "cnsq-dev/lambdas/abc.zip"}


def test_every_taggable_resource_carries_the_project_tag(compiled):
    _, data = compiled
    for logical_id, resource in data["Resources"].items():
        # Kept exactly as the original wrote it, so a kes-deployed stack's group is untouched.
        if resource["Type"] in UNTAGGABLE or logical_id in ("cnsqdevECSHostSecurityGroup",
                                                            "cnsqdevControllerState"):
            continue
        tags = resource["Properties"].get("Tags")
        assert tags, f"{logical_id} has no tags"
        if isinstance(tags, list):
            assert {"Key": "Project", "Value": "cnsq-dev"} in [
                {"Key": t["Key"], "Value": t["Value"]} for t in tags], logical_id


def test_gpu_launch_template_and_prediction_endpoint(compiled):
    _, data = compiled
    resources = data["Resources"]
    assert "AWS::AutoScaling::LaunchConfiguration" not in json.dumps(resources)
    assert data["Parameters"]["AmiId"]["Description"].endswith("/gpu/recommended/image_id")
    task = resources["cnsqdevTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert task["ResourceRequirements"] == [{"Type": "GPU", "Value": "1"}]
    assert "--enable_batching=true" in task["Command"][0]
    assert resources["cnsqdevTargetGroup"]["Properties"]["HealthCheckPath"] == "/v1/models/your_model"
    env = resources["DownloadAndPredictLambdaFunction"]["Properties"]["Environment"]["Variables"]
    assert env["PREDICTION_ENDPOINT"] == {
        "Fn::Sub": "http://${cnsqdevLoadBalancer.DNSName}/v1/models/your_model:predict"}


def test_outputs_keep_the_original_keys(compiled):
    _, data = compiled
    assert {"dbConnectionString", "queueURL", "modelEndpoint", "deadLetterQueueURL",
            "dbInstanceIdentifier", "adminFunctionName",
            "DownloadAndPredictLambdaName"} <= set(data["Outputs"])


def _broken_templates(tmp_path: Path, old: str, new: str) -> Path:
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    path = folder / "cloudformation.template.yml"
    path.write_text(path.read_text().replace(old, new, 1))
    return folder


def test_undefined_template_variable_names_file_and_line(config, tmp_path):
    folder = _broken_templates(tmp_path, "VisibilityTimeout: {{ sqs.visibilityTimeout }}",
                               "VisibilityTimeout: {{ sqs.visibilityTimout }}")
    with pytest.raises(TemplateError, match=r"cloudformation.template.yml:\d+: undefined variable: .*visibilityTimout"):
        render(config, folder, CODE)


def test_yaml_error_in_rendered_template_names_line_and_column(config, tmp_path):
    folder = _broken_templates(tmp_path, "      MessageRetentionPeriod: 1209600",
                               "      MessageRetentionPeriod: [1209600")
    with pytest.raises(TemplateError, match=r"\(rendered\):\d+:\d+: invalid YAML"):
        compile_template(config, folder, tmp_path / "out", CODE)


def test_template_that_prints_a_secret_is_refused(config, tmp_path):
    folder = _broken_templates(
        tmp_path, "Description: 'stack: {{ stackName }}",
        "Description: 'stack: {{ lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN }}")
    with pytest.raises(TemplateError, match=r"TILE_ACCESS_TOKEN is a secret"):
        render(config, folder, CODE)
    assert not (tmp_path / "out").exists()


def test_cfn_yaml_loader_turns_short_forms_into_long_forms():
    data = load_cfn_yaml(
        "Resources:\n  A:\n    Type: X\n    Properties:\n"
        "      B: !GetAtt Db.Endpoint.Address\n      C: !Ref Q\n"
        "      D: !Sub 'x${Q}'\n      E: !Join ['', [a, !Ref Q]]\n"
    )
    props = data["Resources"]["A"]["Properties"]
    assert props == {"B": {"Fn::GetAtt": ["Db", "Endpoint.Address"]}, "C": {"Ref": "Q"},
                     "D": {"Fn::Sub": "x${Q}"}, "E": {"Fn::Join": ["", ["a", {"Ref": "Q"}]]}}


def test_lint_reports_errors_with_lines(config, tmp_path):
    folder = _broken_templates(tmp_path, "Type: AWS::SQS::Queue", "Type: AWS::SQS::Queu")
    path, _ = compile_template(config, folder, tmp_path / "out", CODE)
    errors = [f for f in lint(path) if f.severity == "error"]
    assert errors and all(f.line > 0 for f in errors)


def test_a_template_linted_again_is_answered_from_what_decides_its_findings(
        config, tmp_path, monkeypatch):
    """cfn-lint's answer for the same text is kept for the process; its settings file in the
    working folder (which cfn-lint reads itself) is part of what the answer is kept by."""
    from cnsq.deploy import template

    folder = _broken_templates(tmp_path, "Type: AWS::SQS::Queue", "Type: AWS::SQS::Queu")
    path, _ = compile_template(config, folder, tmp_path / "out", CODE)
    monkeypatch.chdir(tmp_path)
    first = lint(path)
    kept = len(template._LINTED)
    assert lint(path) == first and len(template._LINTED) == kept  # no second run
    assert not [f for f in first if f.severity == "informational"]
    (tmp_path / ".cfnlintrc").write_text("include_checks: [I]\n")
    assert [f for f in lint(path) if f.severity == "informational"]


def test_gpu_metrics_are_published_by_the_cloudwatch_agent(compiled):
    _, data = compiled
    user_data = data["Resources"]["cnsqdevLaunchTemplate"]["Properties"]["LaunchTemplateData"][
        "UserData"]["Fn::Base64"]["Fn::Sub"]
    assert '"namespace": "cnsq/cnsq-dev"' in user_data and '"nvidia_gpu"' in user_data
    assert "${!aws:InstanceId}" in user_data  # the agent's placeholder, not a Sub variable
    policies = data["Resources"]["ECSRole"]["Properties"]["ManagedPolicyArns"]
    assert any("CloudWatchAgentServerPolicy" in p["Fn::Sub"] for p in policies)


@pytest.mark.parametrize("token", ["test", "cnsq", "Project", "resultsadmin"])
def test_a_token_that_is_an_ordinary_word_is_not_a_leak(tmp_path, token):
    """The scan refused any value of 4+ characters found anywhere in the template, and blamed
    our template file: `test`, `cnsq` or the username as a token stopped every compile."""
    env_file = tmp_path / "test.env"
    env_file.write_text(f"RDS_USERNAME=resultsadmin\nTILE_ACCESS_TOKEN={token}\n")
    config = load_config(REPO / "config/config.example.yml", environ={}, env_file=env_file)
    _, data = compile_template(config, TEMPLATES, tmp_path / "out", CODE)
    env = data["Resources"]["DownloadAndPredictLambdaFunction"]["Properties"]["Environment"]["Variables"]
    assert "TILE_ACCESS_TOKEN" not in env


def test_a_template_that_writes_a_secret_value_is_refused_naming_the_key(config, tmp_path):
    from cnsq.deploy.template import assert_no_secrets

    secret = config.secrets["lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN"]
    text = render(config, TEMPLATES, CODE) + f"\\n# {secret.value}\\n"
    with pytest.raises(TemplateError, match=r"the value of lambdas.DownloadAndPredict.envs."
                                            r"TILE_ACCESS_TOKEN \(a secret from the environment"):
        assert_no_secrets(text, config, TEMPLATES, CODE)


def test_a_lint_finding_names_the_config_key_behind_it(tmp_path):
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in ENV.items()))
    text = (REPO / "config/config.example.yml").read_text().replace(
        "instanceType: db.t3.medium", "instanceType: db.zz.huge")
    (tmp_path / "config.yml").write_text(text)
    config = load_config(tmp_path / "config.yml", environ={}, env_file=env_file)
    path, _ = compile_template(config, TEMPLATES, tmp_path / "out", CODE)
    errors = [f for f in lint(path, lambdas=["DownloadAndPredict"]) if f.severity == "error"]
    assert [f.config_key for f in errors] == ["rds.instanceType"]
