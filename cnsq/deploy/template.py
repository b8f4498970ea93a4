"""Render templates/*.template.yml with Jinja2, load it as CloudFormation YAML, lint it
(docs/architecture.md §4).

The rendered text is parsed with a loader that knows CloudFormation's short forms (``!Ref``,
``!GetAtt``, ``!Sub`` …) so a syntax error is reported with its line and column. The compiled
template is written back in long form (``Fn::GetAtt: [Res, Attr.Sub]``): every CloudFormation
implementation reads it, including those that trip on the dotted ``!GetAtt Res.Attr.Sub``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from cnsq.config import Config, SafeYamlLoader, Secret
from cnsq.deploy import adopt
from cnsq.errors import TemplateError
from cnsq.stack import logical_ids, model_batching

TEMPLATE_NAME = "cloudformation.template.yml"

# Short-form tags whose long form is {"Fn::<Name>": value}.
_FN_TAGS = (
    "And", "Base64", "Cidr", "Equals", "FindInMap", "GetAZs", "If", "ImportValue", "Join",
    "Not", "Or", "Select", "Split", "Sub", "Transform", "Length", "ToJsonString",
)


class CfnLoader(SafeYamlLoader):  # type: ignore[valid-type,misc]
    """A safe loader (libyaml's parser where PyYAML has it: a deploy parses the template
    several times) that turns CloudFormation short forms into their long forms."""


def _construct(node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    raise yaml.constructor.ConstructorError(None, None, f"unexpected {type(node).__name__}",
                                            node.start_mark)


def _fn(name: str):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
        return {f"Fn::{name}": _construct(node, loader)}

    return construct


def _ref(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    return {"Ref": _construct(node, loader)}


def _condition(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    return {"Condition": _construct(node, loader)}


def _getatt(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    value = _construct(node, loader)
    if isinstance(value, str):
        resource, _, attribute = value.partition(".")
        if not attribute:
            mark = node.start_mark
            raise yaml.MarkedYAMLError(
                problem=f"!GetAtt {value!r} needs Resource.Attribute", problem_mark=mark
            )
        value = [resource, attribute]
    return {"Fn::GetAtt": value}


for _name in _FN_TAGS:
    CfnLoader.add_constructor(f"!{_name}", _fn(_name))
CfnLoader.add_constructor("!Ref", _ref)
CfnLoader.add_constructor("!GetAtt", _getatt)
CfnLoader.add_constructor("!Condition", _condition)


def load_cfn_yaml(text: str, name: str = "template") -> dict:
    """Parse CloudFormation YAML (short forms allowed) into plain data in long form.

    Raises:
        TemplateError: invalid YAML, with ``name:line:column`` and the offending line.
    """
    try:
        data = yaml.load(text, Loader=CfnLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if mark is None:
            raise TemplateError(f"{name}: invalid YAML: {exc.problem}") from None
        lines = text.splitlines()
        source = lines[mark.line].strip() if mark.line < len(lines) else ""
        raise TemplateError(
            f"{name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: "
            f"{exc.problem or exc.context}\n    {source}"
        ) from None
    if not isinstance(data, dict) or "Resources" not in data:
        raise TemplateError(f"{name}: not a CloudFormation template (no Resources section)")
    return data


# ---------------------------------------------------------------------------------------------
# Rendering


def cfn_value(value: Any) -> str:
    """A YAML flow value: a secret becomes ``{"Ref": <NoEcho parameter>}``, anything else JSON."""
    if isinstance(value, Secret):
        return json.dumps({"Ref": value.param})
    return json.dumps(value)


def _md5(value: Any) -> str:
    return hashlib.md5(str(value).encode(), usedforsecurity=False).hexdigest()


def _tojson(value: Any) -> str:
    if isinstance(value, Secret):
        str(value)  # raises: a secret is never written out
    return json.dumps(value)


def _environment(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["cfn_value"] = cfn_value
    env.filters["md5"] = _md5
    env.filters["tojson"] = _tojson
    env.tests["secret"] = lambda v: isinstance(v, Secret)
    env.tests["s3_url"] = lambda v: isinstance(v, str) and v.startswith("s3://")
    return env


@dataclass(frozen=True)
class CodeLocation:
    """Where a Lambda's zip lives in S3."""

    bucket: str
    key: str


def render(config: Config, template_dir: Path, code: dict[str, CodeLocation],
           existing: dict[str, Any] | None = None) -> str:
    """Render the Jinja2 template with the config; ``code`` maps Lambda name → its zip in S3;
    ``existing`` is what a deployed stack holds that must be kept (:mod:`cnsq.deploy.adopt`).

    Raises:
        TemplateError: an undefined variable or a template error, with file:line.
    """
    context = dict(config.values)
    context["existing"] = existing or adopt.NOTHING
    context["batchingParameters"] = model_batching.batching_parameters()
    context["lambdas"] = {}
    for name, spec in config.values["lambdas"].items():
        location = code.get(name)
        context["lambdas"][name] = {
            **spec,
            "bucket": location.bucket if location else config.bucket,
            "remote": location.key if location else "",
        }
    secrets = sorted(config.secrets.values(), key=lambda s: s.param)
    # Each secret env of a Lambda becomes a Secrets Manager secret the Lambda reads at cold
    # start (its NAME_SECRET_ARN variable), never a plaintext Lambda variable.
    context["secret_resources"] = {s.path: secret_resource(s.path) for s in secrets}
    context["secrets"] = [{"param": s.param, "path": s.path, "resource": secret_resource(s.path)}
                          for s in secrets]
    worker = logical_ids.worker_lambda(config.values["lambdas"])  # the admin function's zip
    context["admin"] = context["lambdas"][worker] if worker else {
        "bucket": config.bucket, "remote": "", "runtime": "python3.12", "architecture": "x86_64"}
    path = template_dir / TEMPLATE_NAME
    if not path.exists():
        raise TemplateError(f"{path}: no such template")
    try:
        return _environment(template_dir).get_template(TEMPLATE_NAME).render(context)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{path}:{_jinja_line(exc)}: undefined variable: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.filename or path}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{path}:{_jinja_line(exc)}: {exc}") from None


def secret_resource(path: str) -> str:
    """``lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN`` → ``DownloadAndPredictTILEACCESSTOKENSecret``."""
    parts = path.split(".")
    return re.sub(r"[^A-Za-z0-9]", "", parts[1] + parts[-1]) + "Secret"


def _jinja_line(exc: BaseException) -> str:
    """The template line an error was raised at, from the traceback Jinja rewrites."""
    tb = exc.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(TEMPLATE_NAME):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


def _swap_secrets(value: Any, swapped: dict[str, Secret]) -> Any:
    if isinstance(value, Secret):
        return swapped[value.path]
    if isinstance(value, dict):
        return {k: _swap_secrets(v, swapped) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap_secrets(v, swapped) for v in value]
    return value


def assert_no_secrets(text: str, config: Config, template_dir: Path,
                      code: dict[str, CodeLocation], existing: dict[str, Any] | None = None) -> None:
    """Refuse text that holds a secret value (defence in depth behind :class:`Secret`).

    A value found in the text is checked against a second rendering in which every secret has
    another value: if it appears there as often, it is a word the template holds anyway (a
    username, "test", the stack's name), not the secret leaking. A report names the config key.
    """
    import dataclasses
    import secrets as random

    found = [s for s in config.secrets.values() if len(s.value) >= 4 and s.value in text]
    if not found:
        return
    swapped = {path: dataclasses.replace(secret, value=random.token_hex(16))
               for path, secret in config.secrets.items()}
    other = dataclasses.replace(config, values=_swap_secrets(config.values, swapped),
                                secrets=swapped)
    baseline = render(other, template_dir, code, existing)
    for secret in found:
        if text.count(secret.value) != baseline.count(secret.value):
            raise TemplateError(
                f"the value of {secret.path} (a secret from the environment or .env) would be "
                f"written into the compiled template in clear; the template must reference it "
                f"with !Ref {secret.param}"
            )


def compile_template(
    config: Config, template_dir: Path, out_dir: Path, code: dict[str, CodeLocation],
    existing: dict[str, Any] | None = None,
) -> tuple[Path, dict]:
    """Render, parse and write ``out_dir/<stackName>/cloudformation.yml``; return (path, data)."""
    text = render(config, template_dir, code, existing)
    assert_no_secrets(text, config, template_dir, code, existing)
    data = load_cfn_yaml(text, f"{template_dir / TEMPLATE_NAME} (rendered)")
    target = out_dir / config.stack_name / "cloudformation.yml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dump(data), encoding="utf-8")
    return target, data


def dump(data: dict) -> str:
    """The compiled template as YAML in long form, keys in template order."""
    return yaml.safe_dump(data, sort_keys=False, width=1000, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# Linting


@dataclass(frozen=True)
class Finding:
    """One cfn-lint finding; ``config_key`` is the config key that sets what it is about."""

    severity: str  # error, warning or informational
    rule: str
    line: int
    message: str
    config_key: str | None = None


# (logical id suffix, property) → config key; "*" stands for any property of the resource.
# The Lambda's own keys are found by its logical id (<Name>LambdaFunction).
_CONFIG_KEYS = {
    ("ResultsDB", "EngineVersion"): "rds.engineVersion",
    ("ResultsDB", "DBInstanceClass"): "rds.instanceType",
    ("ResultsDB", "AllocatedStorage"): "rds.storage",
    ("ResultsDB", "MasterUsername"): "rds.username",
    ("ResultsDB", "BackupRetentionPeriod"): "rds.backupRetentionDays",
    ("ResultsDB", "*"): "rds",
    ("DatabaseSubnetGroup", "*"): "subnets",
    ("DatabaseSecurityGroup", "*"): "rds.allowedCidr",
    ("TileQueue", "VisibilityTimeout"): "sqs.visibilityTimeout",
    ("TileQueue", "*"): "sqs",
    ("LambdaEventSourceMapping", "BatchSize"): "sqs.batchSize",
    ("LambdaEventSourceMapping", "MaximumBatchingWindowInSeconds"): "sqs.maxBatchingWindow",
    ("LambdaEventSourceMapping", "*"): "sqs",
    ("LaunchTemplate", "*"): "ecs.instanceType",
    ("ECSAutoScalingGroup", "*"): "ecs.maxInstances",
    ("TaskDefinition", "*"): "ecs.image",
    ("ECSService", "*"): "ecs.desiredInstances",
    ("TargetGroup", "*"): "predictionPath",
    ("LoadBalancerSecurityGroup", "*"): "ecs.allowedCidr",
    ("LoadBalancer", "*"): "subnets",
}
_LAMBDA_KEYS = {"Runtime": "runtime", "MemorySize": "memory", "Timeout": "timeout",
                "Handler": "handler", "ReservedConcurrentExecutions": "concurrent",
                "Architectures": "architecture"}


def config_key(path: list[Any] | None, lambdas: list[str]) -> str | None:
    """The config key behind a template path such as ['Resources', 'cnsqdevResultsDB',
    'Properties', 'EngineVersion'], or None when no one key sets it."""
    if not path or len(path) < 2:
        return None
    if path[0] == "Parameters" and path[1] == "AmiId":
        return "ecs.amiParameter"
    if path[0] != "Resources":
        return None
    logical = str(path[1])
    prop = str(path[3]) if len(path) > 3 and path[2] == "Properties" else "*"
    for name in lambdas:
        if logical == f"{name}LambdaFunction":
            return f"lambdas.{name}.{_LAMBDA_KEYS[prop]}" if prop in _LAMBDA_KEYS else f"lambdas.{name}"
    for (suffix, key_prop), key in _CONFIG_KEYS.items():
        if logical.endswith(suffix) and key_prop in (prop, "*"):
            return key
    return None


# cfn-lint's answers by what decides them: the template's text, the regions, its settings files
# (~/.cfnlintrc and ./.cfnlintrc, which it reads itself) and its version. A lint takes about a
# second of CPU; a process that lints the same template again (the test suite, a command that
# validates and then deploys) is answered from here. A few entries: templates are large.
_LINTED: dict[str, list[tuple[str, int, str, tuple | None]]] = {}
_LINTED_MAX = 16


def _lint_key(text: str, regions: list[str]) -> str:
    from cfnlint.version import __version__ as cfn_lint_version

    digest = hashlib.sha256()
    for part in (text, "\0".join(regions), cfn_lint_version):
        digest.update(part.encode() + b"\0\0")
    for folder in (Path.home(), Path.cwd()):
        for name in (".cfnlintrc", ".cfnlintrc.yaml", ".cfnlintrc.yml"):
            try:
                digest.update(str(folder / name).encode() + (folder / name).read_bytes())
            except OSError:  # no such file (the usual case), or unreadable: cfn-lint skips it
                pass
    return digest.hexdigest()


def lint(path: Path, regions: list[str] | None = None,
         lambdas: list[str] | None = None) -> list[Finding]:
    """Run cfn-lint on a compiled template; findings sorted by line, each with the config key
    that sets what it is about when there is one (``lambdas``: the config's Lambda names)."""
    from cfnlint.api import ManualArgs, lint_file  # imported late: it takes a second to load

    regions = regions or ["us-east-1"]
    key = _lint_key(path.read_text(encoding="utf-8"), regions)
    if key not in _LINTED:
        matches = [(match.rule.id, match.linenumber, match.message,
                    tuple(getattr(match, "path", None) or ()) or None)
                   for match in lint_file(path, config=ManualArgs(regions=regions))]
        while len(_LINTED) >= _LINTED_MAX:
            _LINTED.pop(next(iter(_LINTED)))
        _LINTED[key] = matches
    findings = []
    for rule_id, line, message, where in _LINTED[key]:
        severity = {"E": "error", "W": "warning"}.get(rule_id[:1], "informational")
        findings.append(Finding(severity, rule_id, line, message,
                                config_key(list(where) if where else None, lambdas or [])))
    return sorted(findings, key=lambda f: (f.line, f.rule))
