"""``cnsq deploy``'s plan: the kes workflow with change sets (docs/architecture.md §5).

:func:`plan` packages, compiles, lints, uploads and creates a change set; it changes nothing in
the stack. cnsq.deploy.apply executes a plan and follows it to the end. The UI is passed in, so
tests drive both with real files, a real moto server and a recording UI.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cnsq.config import Config
from cnsq.deploy import adopt, package, preflight, template
from cnsq.deploy.cloudformation import ChangeSet, Stacks
from cnsq.errors import DeployError, TemplateError
from cnsq.shipped import lambda_source


class UI(Protocol):
    """What deploy needs from a terminal."""

    def echo(self, text: str = "", err: bool = False) -> None: ...

    def confirm(self, question: str) -> bool: ...

    def prompt(self, question: str) -> str: ...

    def table(self, rows: list[list[Any]], headers: list[str]) -> None: ...


@dataclass
class Paths:
    """Where things are: the templates folder and the build output (``.cnsq/``)."""

    templates: Path
    build: Path


@dataclass
class Plan:
    """What a deploy would do; nothing has changed in the stack yet."""

    stack_name: str
    template_path: Path
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    change_set: ChangeSet | None = None
    lint: list[template.Finding] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.change_set is not None and self.change_set.empty


def package_lambdas(
    config: Config, paths: Paths, stacks: Stacks, pip: package.PipRunner, ui: UI
) -> tuple[dict[str, template.CodeLocation], list[str], list[str]]:
    """Build every Lambda zip and upload those whose key is not yet in S3."""
    code: dict[str, template.CodeLocation] = {}
    uploaded: list[str] = []
    skipped: list[str] = []

    for name, spec in config.values["lambdas"].items():
        source = Path(spec["source"])
        if not source.is_absolute():
            source = config.project_dir / source
        source = lambda_source(source, paths.build / config.stack_name)
        built = package.build(
            name, source, paths.build / config.stack_name / "lambdas",
            spec["runtime"], spec["architecture"], pip,
            package.extra_requirements(config.values),
        )
        key = built.key(config.stack_name)
        if stacks.object_exists(config.bucket, key):
            skipped.append(key)
        else:
            ui.echo(f"Uploading {name} ({built.path.stat().st_size / 1e6:.1f} MB) to s3://{config.bucket}/{key}")
            stacks.upload(config.bucket, key, built.path.read_bytes())
            uploaded.append(key)
        code[name] = template.CodeLocation(config.bucket, key)
    return code, uploaded, skipped


def compile_only(config: Config, paths: Paths) -> Path:
    """Render the template without packaging (code keys as they would be, for inspection)."""
    code = {}
    for name in config.values["lambdas"]:
        code[name] = template.CodeLocation(config.bucket, f"{config.stack_name}/lambdas/<sha256>.zip")
    path, _ = template.compile_template(config, paths.templates, paths.build, code)
    return path


def check_lint(path: Path, region: str, lambdas: list[str] | None = None) -> list[template.Finding]:
    findings = template.lint(path, [region], lambdas)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        lines = "\n".join(f"  {f.config_key + ': ' if f.config_key else ''}{path}:{f.line}: "
                           f"{f.rule} {f.message}" for f in errors)
        raise TemplateError(f"cfn-lint found {len(errors)} error(s); nothing was deployed:\n{lines}")
    return findings


def pinned_ami(config: Config, stacks: Stacks, current: dict | None, update_ami: bool,
               ui: UI) -> str:
    """The AMI the hosts run after this deploy: the stack's own (``ResolvedValue`` where an
    older cnsq passed the SSM parameter itself) unless ``update_ami``, else the public
    parameter's value now. A newer AMI is announced, never rolled out unasked: each host would be
    replaced, one at a time, while tiles wait.

    Raises:
        DeployError: the parameter does not exist in the region.
    """
    name = config.values["ecs"]["amiParameter"]
    deployed = None
    for parameter in (current or {}).get("Parameters", []):
        if parameter.get("ParameterKey") == "AmiId":
            value = parameter.get("ResolvedValue") or parameter.get("ParameterValue", "")
            deployed = value if value.startswith("ami-") else None
    if deployed and not update_ami:
        latest = stacks.public_parameter(name)
        if latest and latest != deployed:
            ui.echo(f"GPU AMI: {deployed} kept; {latest} is newer ({name}): "
                    "`cnsq deploy --update-ami` replaces the hosts with it, one at a time.")
        return deployed
    latest = stacks.public_parameter(name)
    if not latest:
        raise DeployError(f"ecs.amiParameter: SSM parameter {name} does not exist in this region")
    if deployed and deployed != latest:
        ui.echo(f"GPU AMI: {deployed} → {latest} (--update-ami): the hosts are replaced one at a "
                "time.")
    elif not deployed:
        ui.echo(f"GPU AMI: {latest} ({name}), pinned until `cnsq deploy --update-ami`.")
    return latest


def plan(
    config: Config, paths: Paths, stacks: Stacks, pip: package.PipRunner, ui: UI, region: str,
    update_ami: bool = False,
) -> Plan:
    """Package → compile → lint → upload the template → create and read a change set."""
    current = stacks.describe(config.stack_name)
    status = current["StackStatus"] if current else None
    if status == "ROLLBACK_COMPLETE":
        raise DeployError(
            f"stack {config.stack_name} is in ROLLBACK_COMPLETE: its first creation failed and "
            "CloudFormation cannot update it. Delete it (`cnsq delete --config …`), then deploy again."
        )
    if status and status.endswith("_IN_PROGRESS") and status != "REVIEW_IN_PROGRESS":
        raise DeployError(
            f"stack {config.stack_name} is busy ({status}); wait for it to finish and deploy again"
        )
    # A stack only reviewed (an earlier --no-execute) has no resources, just change sets: a
    # CREATE change set joins them (the CreateChangeSet API; aws-cli's `cloudformation deploy`
    # does the same), and executing one removes the others. The plan deletes nothing.
    kind = "CREATE" if status in (None, "REVIEW_IN_PROGRESS") else "UPDATE"

    existing = adopt.Existing()
    if kind == "UPDATE":  # what the deployed stack holds that must be kept as it is
        existing = adopt.read(stacks, config.stack_name, config.values["stackNoDash"],
                              config.values["rds"]["restoreFromSnapshot"])
        for note in existing.notes:
            ui.echo(f"warning: {note}", err=True)
    code, uploaded, skipped = package_lambdas(config, paths, stacks, pip, ui)
    path, _ = template.compile_template(config, paths.templates, paths.build, code,
                                        existing.context())
    result = Plan(config.stack_name, path, uploaded, skipped)
    result.lint = check_lint(path, region, list(config.values["lambdas"]))

    body = path.read_bytes()
    key = f"{config.stack_name}/templates/{hashlib.sha256(body).hexdigest()}.yml"
    if not stacks.object_exists(config.bucket, key):
        stacks.upload(config.bucket, key, body)
    url = stacks.template_url(config.bucket, key, region)
    ami = pinned_ami(config, stacks, current if kind == "UPDATE" else None, update_ami, ui)
    arn = stacks.create_change_set(
        config.stack_name, kind, url, {**config.secret_parameters(), "AmiId": ami},
        config.values["capabilities"], {"Project": config.values["projectTag"]},
    )
    result.change_set = stacks.wait_change_set(arn, kind)
    cs = result.change_set
    if cs.status == "FAILED" and not cs.empty:
        raise DeployError(f"CloudFormation refused the change set: {cs.reason}")
    return result


def show_changes(change_set: ChangeSet, ui: UI) -> None:
    rows = [
        [c.action, c.logical_id, c.resource_type, c.replacement or "-",
         ", ".join(c.properties) if c.action == "Modify" else ""]
        for c in change_set.changes
    ]
    ui.echo(f"Changes ({change_set.kind}):")
    ui.table(rows, ["Action", "LogicalResourceId", "ResourceType", "Replacement", "Properties"])


def preflight_report(config: Config, aws: Any, ui: UI) -> tuple[Any, str]:
    """Run the account checks and print every problem and warning, one line each.

    Returns (report, summary), or (None, why) when the account could not be checked: no
    credentials to ask with, AWS did not answer, or no check could run. Callers treat None as a
    failure unless the user chose not to check.
    """

    if aws.session.get_credentials() is None:
        message = "Account not checked: no AWS credentials (see `aws configure`)."
        ui.echo(message)
        return None, message
    try:
        report = preflight.run(config, aws.client, aws.region_name)
    except preflight.Unreachable as exc:
        message = f"Account not checked: AWS did not answer ({exc})."
        ui.echo(message)
        return None, message
    for finding in report.findings:
        if finding.status != preflight.OK or finding.decided:
            ui.echo("  " + finding.line(), err=True)
    ok = sum(f.status == preflight.OK for f in report.findings)
    warnings = sum(f.status == preflight.WARNING for f in report.findings)
    if not report.checked:
        message = (f"Account not checked: none of the {warnings} check(s) could run (see the "
                   "warnings above).")
        ui.echo(message)
        return None, message
    message = (f"Preflight: {len(report.problems)} problem(s), {warnings} warning(s), {ok} "
               f"check(s) passed in {report.seconds:.1f}s.")
    ui.echo(message)
    return report, message


