"""config.yml + deployment + .env: merging, rendering, and an error that names the place."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jinja2
import pytest

from cnsq.config import Secret, deep_merge, load_config, parse_dotenv
from cnsq.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
ENV = {"RDS_USERNAME": "admin", "RDS_PASSWORD": "pw-secret-1", "TILE_ACCESS_TOKEN": "tok-secret-1"}

BASE = """\
default:
  stage: dev
  stackName: 'proj-{{ stage }}'
  buckets:
    internal: bucket
  lambdas:
    DownloadAndPredict:
      timeout: 60
      queueTrigger: true
      envs:
        TILE_ENDPOINT: 'https://tiles/{z}/{x}/{y}.jpg'
        TILE_ACCESS_TOKEN: '{{ TILE_ACCESS_TOKEN }}'
  rds:
    username: '{{ RDS_USERNAME }}'
    password: '{{ RDS_PASSWORD }}'
  vpc: vpc-1
  subnets: [subnet-a, subnet-b]
  sqs:
    visibilityTimeout: 360
  predictionPath: /v1/models/m
"""


def write(tmp_path: Path, text: str, env: str | None = None) -> Path:
    path = tmp_path / "config" / "config.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    if env is not None:
        (path.parent / ".env").write_text(env)
    return path


def load(path: Path, deployment: str | None = None, **kwargs):
    return load_config(path, deployment, environ=kwargs.pop("environ", ENV), **kwargs)


def test_example_config_loads_with_kes_defaults():
    config = load_config(REPO / "config/config.example.yml",
                         env_file=REPO / "config/.env.sample", environ={})
    lam = config.values["lambdas"]["DownloadAndPredict"]
    assert config.stack_name == "cnsq-dev"
    assert lam["fullName"] == "cnsq-dev-DownloadAndPredict"
    assert config.values["stackNoDash"] == "cnsqdev"
    assert config.values["rds"]["engineVersion"] == "18"  # a major alone: RDS picks the minor
    assert config.values["ecs"]["amiParameter"] == (
        "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id")
    assert config.values["vpc"] is None  # the stack creates the network
    assert set(config.secrets) == {"lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN"}
    assert config.warnings == []


def test_lambda_defaults_follow_kes(tmp_path):
    config = load(write(tmp_path, BASE))
    lam = config.values["lambdas"]["DownloadAndPredict"]
    assert (lam["memory"], lam["timeout"], lam["name"]) == (1024, 60, "DownloadAndPredict")
    assert lam["runtime"] == "python3.12"
    assert config.values["projectTag"] == "proj-dev"


def test_deployment_deep_merges_mappings_and_replaces_lists(tmp_path):
    path = write(tmp_path, BASE + textwrap.dedent("""\
        prod:
          stage: prod
          subnets: [subnet-y, subnet-z]
          lambdas:
            DownloadAndPredict:
              memory: 2048
        """))
    config = load(path, "prod")
    lam = config.values["lambdas"]["DownloadAndPredict"]
    assert config.stack_name == "proj-prod"  # rendered after merging
    assert lam["memory"] == 2048 and lam["timeout"] == 60  # merged, not replaced
    assert config.values["subnets"] == ["subnet-y", "subnet-z"]  # lists replace


def test_kes_list_of_lambdas_is_accepted(tmp_path):
    text = BASE.replace("    DownloadAndPredict:\n", "  - DownloadAndPredict:\n")
    text = text.replace("\n      timeout: 60", "\n      timeout: 60")
    config = load(write(tmp_path, text))
    assert list(config.values["lambdas"]) == ["DownloadAndPredict"]


def test_original_chip_n_scale_example_names_each_value_aws_no_longer_accepts(tmp_path):
    # The original's example, as users have it: db.t2.medium is refused with its replacement.
    original = (DATA / "chip-n-scale-config.yml").read_text()
    path = write(tmp_path, original)
    with pytest.raises(ConfigError, match=r"config.yml:26: rds.instanceType: db.t2.medium .*db.t3.medium"):
        load(path)
    path.write_text(original.replace("db.t2.medium", "db.t3.medium"))
    with pytest.raises(ConfigError, match=r"lambdas.DownloadAndPredict.runtime: runtime python3.7 .*python3.12"):
        load(path)
    path.write_text(original.replace("db.t2.medium", "db.t3.medium").replace("python3.7", "python3.12"))
    with pytest.raises(ConfigError, match=r"ecs.instanceType: t2.nano has no NVIDIA GPU .*ecs.gpus: 0"):
        load(path)
    path.write_text(original.replace("db.t2.medium", "db.t3.medium").replace("python3.7", "python3.12")
                    .replace("t2.nano", "g4dn.xlarge"))
    config = load(path)
    assert any(w.startswith("rds.password is no longer used") for w in config.warnings)
    assert "password" not in config.values["rds"] and not config.secrets.get("rds.password")
    assert config.values["stackNoDash"] == "YourStack"
    assert config.values["ecs"]["availabilityZone"] == "us-east-1"
    assert config.values["lambdas"]["DownloadAndPredict"]["memory"] == 512
    assert any("6x" in w for w in config.warnings)  # visibility 60s < 6 x 60s


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, BASE + "  broken: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config.yml:\d+:\d+: invalid YAML"):
        load(path)


def test_wrong_type_names_key_path_and_expected_type(tmp_path):
    path = write(tmp_path, BASE.replace("timeout: 60", "timeout: 60\n      memory: lots"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "lambdas.DownloadAndPredict.memory: expected an integer, got 'lots'" in str(info.value)
    assert "config.yml:9:" in str(info.value)


def test_integer_from_environment_is_accepted(tmp_path):
    path = write(tmp_path, BASE.replace("timeout: 60", "timeout: 60\n      memory: '{{ MEM }}'"))
    config = load(path, environ={**ENV, "MEM": "2048"})
    assert config.values["lambdas"]["DownloadAndPredict"]["memory"] == 2048


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, BASE.replace("visibilityTimeout: 360", "visibilityTimeout: 360\n    maxRecieveCount: 3"))
    with pytest.raises(ConfigError, match=r"sqs.maxRecieveCount: unknown key \(did you mean 'maxReceiveCount'\?\)"):
        load(path)


def test_undefined_variable_names_key_path_and_variable(tmp_path):
    path = write(tmp_path, BASE.replace("vpc: vpc-1", "vpc: '{{ VPC_ID }}'"))
    with pytest.raises(ConfigError, match=r"^vpc: undefined variable: 'VPC_ID' is undefined"):
        load(path)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, BASE.replace("  predictionPath: /v1/models/m\n", ""))
    with pytest.raises(ConfigError, match="predictionPath: required key is missing"):
        load(path)


@pytest.mark.parametrize("line, message", [
    ("    engineVersion: '9.6'", r"rds.engineVersion: PostgreSQL 9.6 is no longer offered by RDS; use '18'"),
    ("    instanceType: db.t2.micro", r"rds.instanceType: db.t2.micro .* use db.t3.micro"),
])
def test_retired_rds_values_are_refused(tmp_path, line, message):
    path = write(tmp_path, BASE.replace("    password: '{{ RDS_PASSWORD }}'",
                                        "    password: '{{ RDS_PASSWORD }}'\n" + line))
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_visibility_timeout_shorter_than_lambda_timeout_is_refused(tmp_path):
    path = write(tmp_path, BASE.replace("visibilityTimeout: 360", "visibilityTimeout: 30"))
    with pytest.raises(ConfigError, match=r"sqs.visibilityTimeout: 30s is shorter than the timeout"):
        load(path)


def test_prediction_path_with_predict_suffix_is_refused(tmp_path):
    path = write(tmp_path, BASE.replace("/v1/models/m", "/v1/models/m:predict"))
    with pytest.raises(ConfigError, match=r"predictionPath: expected a path like"):
        load(path)


def test_unknown_deployment_lists_the_existing_ones(tmp_path):
    path = write(tmp_path, BASE + "prod:\n  stage: prod\n")
    with pytest.raises(ConfigError, match=r"no deployment 'prd' \(did you mean 'prod'\?\) \(deployments: prod\)"):
        load(path, "prd")


def test_dotenv_overrides_environment_and_is_read_next_to_config(tmp_path):
    path = write(tmp_path, BASE, env="RDS_USERNAME=fromdotenv\nexport TILE_ACCESS_TOKEN=\"quoted tok\"\n")
    config = load(path, environ={"RDS_USERNAME": "fromenv", "TILE_ACCESS_TOKEN": "x"})
    assert config.values["rds"]["username"] == "fromdotenv"  # not a secret: written in clear
    assert config.secrets["lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN"].value == "quoted tok"


def test_dotenv_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, BASE, env="# comment\nGOOD=1\nthis is not a pair\n")
    with pytest.raises(ConfigError, match=r"\.env:3: expected KEY=value"):
        load(path)


def test_explicit_env_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such env file"):
        load(write(tmp_path, BASE), env_file=tmp_path / "missing.env")


def test_stack_option_overrides_stack_name_before_rendering(tmp_path):
    config = load(write(tmp_path, BASE), stack="other")
    assert config.stack_name == "other"
    assert config.values["lambdas"]["DownloadAndPredict"]["fullName"] == "other-DownloadAndPredict"
    assert config.values["stackNoDash"] == "other"


def test_values_may_refer_to_other_values(tmp_path):
    path = write(tmp_path, BASE.replace("  stage: dev\n", "  stage: dev\n  projectTag: '{{ stackName }}-tag'\n"))
    assert load(path).values["projectTag"] == "proj-dev-tag"


def test_secrets_cannot_be_rendered_as_text(tmp_path):
    config = load(write(tmp_path, BASE))
    secret = config.secrets["lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN"]
    assert isinstance(secret, Secret) and secret.value == "tok-secret-1"
    assert "tok-secret-1" not in repr(secret)
    with pytest.raises(jinja2.TemplateError, match="is a secret"):
        str(secret)


def test_secret_looking_variable_outside_a_parameter_slot_is_refused(tmp_path):
    path = write(tmp_path, BASE.replace("vpc: vpc-1", "vpc: '{{ TILE_ACCESS_TOKEN }}'"))
    with pytest.raises(ConfigError, match=r"^vpc: uses TILE_ACCESS_TOKEN, which looks like a secret"):
        load(path)


def test_missing_config_file_suggests_the_example(tmp_path):
    with pytest.raises(ConfigError, match="copy config/config.example.yml"):
        load(tmp_path / "nope.yml")


def test_deep_merge_does_not_modify_its_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    out = deep_merge(base, {"a": {"c": [2]}})
    assert out == {"a": {"b": 1, "c": [2]}} and base == {"a": {"b": 1, "c": [1]}}


def test_parse_dotenv_handles_comments_and_quotes(tmp_path):
    path = tmp_path / ".env"
    path.write_text("A=1 # trailing\nB='two words'\n\n# c\nC=\"x#y\"\n")
    assert parse_dotenv(path) == {"A": "1", "B": "two words", "C": "x#y"}


# -- combinations AWS refuses, caught before a deploy (each names its keys)


def test_batch_size_above_10_needs_a_batching_window(tmp_path):
    path = write(tmp_path, BASE.replace("visibilityTimeout: 360", "visibilityTimeout: 360\n    batchSize: 50"))
    with pytest.raises(ConfigError, match=r"sqs.batchSize: 50 records per call needs sqs.maxBatchingWindow"):
        load(path)
    path.write_text(path.read_text().replace("batchSize: 50", "batchSize: 50\n    maxBatchingWindow: 1"))
    assert load(path).values["sqs"]["batchSize"] == 50


@pytest.mark.parametrize("itype, why", [
    ("t3.medium", "has no NVIDIA GPU"), ("c5.xlarge", "has no NVIDIA GPU"),
    ("g4ad.xlarge", "has AMD GPUs"), ("g5g.xlarge", "is arm64"),
    ("g6f.large", "has a fraction of a GPU"), ("gr6f.4xlarge", "has a fraction of a GPU")])
def test_a_gpu_task_on_an_instance_without_an_ecs_gpu_is_refused(tmp_path, itype, why):
    path = write(tmp_path, BASE + f"  ecs:\n    instanceType: {itype}\n    gpus: 1\n")
    with pytest.raises(ConfigError, match=rf"config.yml:\d+: ecs.instanceType: {itype} {why}"):
        load(path)
    path.write_text(path.read_text().replace("gpus: 1", "gpus: 0"))
    assert load(path).values["ecs"]["tasksPerInstance"] == 1  # a CPU model server is allowed


@pytest.mark.parametrize("itype, gpus, tasks", [
    ("g4dn.xlarge", 1, 1), ("g5.12xlarge", 1, 4), ("p3.16xlarge", 2, 4), ("p4d.24xlarge", 1, 8)])
def test_a_multi_gpu_instance_runs_one_task_per_gpu(tmp_path, itype, gpus, tasks):
    path = write(tmp_path, BASE + f"  ecs:\n    instanceType: {itype}\n    gpus: {gpus}\n")
    assert load(path).values["ecs"]["tasksPerInstance"] == tasks


@pytest.mark.parametrize("itype", ["p6-b200.48xlarge", "p6-b300.48xlarge", "g7e.2xlarge",
                                   "g7e.48xlarge", "gr6.4xlarge", "p5.4xlarge"])
def test_current_gpu_types_are_accepted_offline(tmp_path, itype):
    path = write(tmp_path, BASE + f"  ecs:\n    instanceType: {itype}\n    gpus: 1\n")
    config = load(path)
    assert not [w for w in config.warnings if "ecs.instanceType" in w]
    # Not known offline for every size: the account decides (preflight), unless the user says.
    assert "ecs.tasksPerInstance" in config.guessed


def test_a_type_cnsq_does_not_know_is_a_warning_not_a_refusal(tmp_path):
    path = write(tmp_path, BASE + "  ecs:\n    instanceType: q9n.8xlarge\n    gpus: 2\n")
    config = load(path)
    assert ("ecs.instanceType: cnsq does not know q9n.8xlarge as an NVIDIA GPU type; the account "
            "is asked at deploy (preflight reads its GPUs from DescribeInstanceTypes)") in config.warnings
    assert config.values["ecs"]["tasksPerInstance"] == 1


def test_tasks_per_instance_written_by_the_user_is_never_guessed(tmp_path):
    path = write(tmp_path, BASE + "  ecs:\n    instanceType: p6-b200.48xlarge\n    tasksPerInstance: 2\n")
    config = load(path)
    assert config.guessed == set()
    assert not config.decide("ecs.tasksPerInstance", 8)
    assert config.values["ecs"]["tasksPerInstance"] == 2


def test_a_task_cannot_ask_for_more_gpus_than_its_instance_has(tmp_path):
    path = write(tmp_path, BASE + "  ecs:\n    instanceType: g4dn.xlarge\n    gpus: 2\n")
    with pytest.raises(ConfigError, match=r"ecs.gpus: g4dn.xlarge has 1 GPU"):
        load(path)


def test_a_pinned_minor_engine_version_is_warned_about(tmp_path):
    path = write(tmp_path, BASE.replace("    password:", "    engineVersion: '17.6'\n    password:"))
    assert any("pins a minor version" in w and "'17'" in w for w in load(path).warnings)
    path.write_text(BASE.replace("    password:", "    engineVersion: 'latest'\n    password:"))
    with pytest.raises(ConfigError, match=r"rds.engineVersion: expected a major version like '18'"):
        load(path)


@pytest.mark.parametrize("username", ["1abc", "has-dash", "rdsadmin", "x" * 64])
def test_a_username_rds_refuses_is_refused(tmp_path, username):
    with pytest.raises(ConfigError, match=r"rds.username: RDS needs 1 to 63 letters"):
        load(write(tmp_path, BASE), environ={**ENV, "RDS_USERNAME": username})


def test_ordinary_usernames_are_accepted_and_not_secret(tmp_path):
    for username in ("postgres", "user", "results", "cnsq"):
        config = load(write(tmp_path, BASE), environ={**ENV, "RDS_USERNAME": username})
        assert config.values["rds"]["username"] == username and "rds.username" not in config.secrets


def test_a_vpc_needs_two_subnets_and_subnets_need_a_vpc(tmp_path):
    path = write(tmp_path, BASE.replace("[subnet-a, subnet-b]", "[subnet-a]"))
    with pytest.raises(ConfigError, match=r"subnets: vpc vpc-1 needs at least two private subnets"):
        load(path)
    path.write_text(BASE.replace("  vpc: vpc-1\n", ""))
    with pytest.raises(ConfigError, match=r"vpc: subnets are given but no vpc"):
        load(path)


def test_opening_the_database_is_an_explicit_warned_opt_in(tmp_path):
    path = write(tmp_path, BASE.replace("    password:", "    publiclyAccessible: true\n"
                                        "    allowedCidr: 0.0.0.0/0\n    password:"))
    warnings = load(path).warnings
    assert any(w.startswith("rds.publiclyAccessible: true") for w in warnings)
    assert any(w.startswith("rds.allowedCidr: 0.0.0.0/0 opens the database") for w in warnings)
    path.write_text(BASE.replace("    password:", "    allowedCidr: everyone\n    password:"))
    with pytest.raises(ConfigError, match=r"rds.allowedCidr: expected an IPv4 CIDR"):
        load(path)


def test_every_problem_is_reported_in_one_run(tmp_path):
    path = write(tmp_path, BASE.replace("  stage: dev\n", "  stage: dev\n  stackNam: x\n")
                 .replace("      timeout: 60", "      timeout: sixty")
                 .replace("    visibilityTimeout: 360", "    visibilityTimeout: 360\n    batchsize: 5"))
    with pytest.raises(ConfigError) as raised:
        load(path)
    message = str(raised.value)
    assert message.startswith("3 problems in ")
    assert "stackNam: unknown key (did you mean 'stackName'?)" in message
    assert "lambdas.DownloadAndPredict.timeout: expected an integer, got 'sixty'" in message
    assert "sqs.batchsize: unknown key (did you mean 'batchSize'?)" in message


def test_undefined_variables_name_the_env_file_actually_read(tmp_path):
    path = write(tmp_path, BASE.replace("'{{ RDS_USERNAME }}'", "'{{ DB_USER }}'")
                 .replace("'proj-{{ stage }}'", "'proj-{{ STAGE_NAME }}'"))
    env = tmp_path / "other.env"
    env.write_text("X=1\n")
    with pytest.raises(ConfigError) as raised:
        load(path, env_file=env)
    message = str(raised.value)
    assert message.startswith("2 problems in ")
    assert f"(set it in {env} or the environment" in message and "DB_USER" in message


# -- values from the environment are data; the config's own templates run sandboxed


@pytest.mark.parametrize("token", ["SECRET{{ 7*7 }}", "tok{%if%}", "tok{#x", "{{ cycler }}x", "a}}b{{"])
def test_a_value_from_the_environment_is_never_rendered(tmp_path, token):
    path = write(tmp_path, BASE)
    config = load(path, environ={**ENV, "TILE_ACCESS_TOKEN": token})
    assert config.secrets["lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN"].value == token


def test_a_dotenv_value_cannot_run_code(tmp_path):
    marker = tmp_path / "PWNED"
    payload = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}".replace("MARKER", str(marker))
    path = write(tmp_path, BASE, env=f'TILE_ACCESS_TOKEN="{payload}"\n')
    config = load(path, environ={"RDS_USERNAME": "u"})
    assert config.secrets["lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN"].value == payload
    assert not marker.exists()


def test_a_config_template_cannot_reach_python(tmp_path):
    marker = tmp_path / "PWNED"
    for payload, attribute, owner in (
            ("cycler.__init__.__globals__.os.system('touch MARKER')", "__init__", r"\w+"),
            ("''.__class__.__mro__[1].__subclasses__()", "__class__", "str")):
        template = "{{ " + payload.replace("MARKER", str(marker)) + " }}"
        path = write(tmp_path, BASE.replace("vpc: vpc-1", f'vpc: "{template}"'))
        with pytest.raises(ConfigError, match=rf"^vpc: cannot render its template: access to attribute "
                                              rf"'{attribute}' of '{owner}' object is unsafe"):
            load(path)
    assert not marker.exists()


def test_an_error_never_prints_a_value(tmp_path):
    token = "tok-{{-never-print"
    path = write(tmp_path, BASE.replace("vpc: vpc-1", "vpc: '{{ VPC_ID }}'"))
    with pytest.raises(ConfigError) as error:
        load(path, environ={**ENV, "TILE_ACCESS_TOKEN": token})
    assert token not in str(error.value) and "VPC_ID" in str(error.value)


def test_values_refer_to_values_in_any_order_and_a_loop_is_an_error(tmp_path):
    text = BASE.replace("stage: dev", "stage: '{{ projectTag }}-x'\n  projectTag: dev")
    config = load(write(tmp_path, text))
    assert config.stack_name == "proj-dev-x"
    text = BASE.replace("stage: dev", "stage: '{{ stackName }}'")
    with pytest.raises(ConfigError, match=r"stage: refers to itself \(stage → stackName → stage\)"):
        load(write(tmp_path, text))


@pytest.mark.parametrize("name", ["../../outside", "/tmp/abs", "a_b", "1stack", "x" * 129, ""])
def test_a_stack_name_cloudformation_refuses_is_refused(tmp_path, name):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"stackName: a stack name is a letter, then up to 127"):
        load(path, stack=name) if name else load(write(tmp_path, BASE.replace("stackName: 'proj-{{ stage }}'", "stackName: ''")))


def test_the_examples_placeholders_are_errors_in_validate_and_deploy(tmp_path, monkeypatch):
    """validate --offline passed the example as shipped (your-bucket, your_model …) with 0 errors."""
    from click.testing import CliRunner

    from cnsq.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO / "config/config.example.yml"), "--env-file", str(REPO / "config/.env.sample")]
    result = CliRunner().invoke(main, ["validate", *args, "--offline"])
    assert result.exit_code == 1
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert "buckets.internal: still the example's 'your-bucket': put an S3 bucket of yours in the deploy region" in lines
    assert any(line.startswith("predictionPath: still the example's 'your_model'") for line in lines)
    assert any(line.startswith("lambdas.DownloadAndPredict.envs.TILE_ENDPOINT: still the example's") for line in lines)
    assert any(line.startswith("lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN: still the example's") for line in lines)
    assert "4 error(s)" in result.stdout
    deploy = CliRunner().invoke(main, ["deploy", *args])
    assert deploy.exit_code == 1
    assert "4 value(s) of the config are still the example's; nothing was deployed" in deploy.stderr
    # compile still renders it: a template to read before filling anything in.
    assert CliRunner().invoke(main, ["compile", *args]).exit_code == 0
