"""`cnsq` commands: compile, validate, package, deploy, outputs, delete and init: the stack's life.

Each parses its options and delegates."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cnsq.cli.app import ClickUI, Settings, _finish, _paths, _stacks, config_options, main, tabulate
from cnsq.errors import CnsqError


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--templates", is_flag=True, help="Also copy the CloudFormation template, to customise.")
@click.option("--lambda", "handler", is_flag=True,
              help="Also copy the Lambda's code, requirements and examples, to customise.")
@click.option("--force", is_flag=True,
              help="Overwrite what this call writes (a .bak keeps each replaced file).")
@click.option("--guided", is_flag=True,
              help="Ask for each value (checked against the account and the tile endpoint as "
                   "you go) and write a config ready to deploy.")
def init(directory: Path, templates: bool, handler: bool, force: bool, guided: bool) -> None:
    """Write a starter project: config/config.yml and config/.env to fill in.

    Without --templates and --lambda, commands use the template and the Lambda that ship with
    cnsq; with them, the project's copies (as kes projects had). Adding them to a project never
    touches its config.yml or .env; --force overwrites only the files this call writes.

    \b
    Examples:
      cnsq init my-project
      cnsq init my-project --guided
      cnsq init . --templates --lambda
    """
    if guided:
        from cnsq.init.project import guided_init

        try:
            written = guided_init(directory, force, click.prompt,
                                  lambda text: click.echo(text, err=True))
        except click.exceptions.Abort as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C: 130, as elsewhere
                raise KeyboardInterrupt from None
            raise
        for path in written:
            click.echo(f"wrote {path}")
        click.echo(f"Next: cnsq validate --config {directory / 'config/config.yml'}")
        return
    from cnsq.init.project import init as write

    done = write(directory, templates, handler, force)
    for path in done.kept:
        click.echo(f"kept {path} (it exists)")
    for path in done.written:
        click.echo(f"wrote {path}" + (f" (the old one is {path.name}.bak)" if path in done.replaced
                                      else ""))
    click.echo(f"Next: fill in {directory / 'config/config.yml'} and {directory / 'config/.env'}, "
               f"then `cnsq validate --config {directory / 'config/config.yml'}`.")


@main.command("compile")
@config_options
def compile_cmd(settings: Settings) -> None:
    """Render the CloudFormation template to .cnsq/<stackName>/cloudformation.yml.

    \b
    Example:
      cnsq compile --config config/config.yml --deployment prod
    """
    from cnsq.deploy.plan import compile_only

    config = settings.load()
    click.echo(str(compile_only(config, _paths(config))))


@main.command()
@config_options
@click.option("--offline", is_flag=True, help="Skip the account checks (preflight).")
@click.option("--json", "as_json", is_flag=True, help="Print lint findings and checks as JSON.")
def validate(settings: Settings, offline: bool, as_json: bool) -> None:
    """Compile and lint the template, then check the account (preflight); exit 1 on problems.

    The preflight reads the account through the AWS API: the bucket and its region, the VPC's
    DNS settings, subnets in two zones behind a NAT, the GPU type's GPUs, offerings and vCPU
    quota, the key pair, the AMI parameter, the engine version on the instance class, and the
    Lambda concurrency left. Every problem is reported at once, with its config key. When the
    account cannot be asked (no credentials, AWS unreachable, every check denied) validate exits
    1: a check that did not run never passes. --offline checks the template alone.

    \b
    Examples:
      cnsq validate --config config/config.yml
      cnsq validate --config config/config.yml --offline   # the template and the config alone
    """
    from cnsq.config import placeholders, scaling_summary
    from cnsq.deploy.plan import compile_only, preflight_report
    from cnsq.deploy.template import lint

    config = settings.load()
    path = compile_only(config, _paths(config))
    region, source = settings.region_and_source()
    findings = lint(path, [region or settings.aws().region_name], list(config.values["lambdas"]))
    errors = sum(f.severity == "error" for f in findings)
    out: dict[str, Any] = {"template": str(path), "lint": [f.__dict__ for f in findings],
                           "preflight": None}
    if findings and not as_json:
        click.echo(tabulate([[f.severity, f.rule, f.config_key or "-", f"{path}:{f.line}",
                              f.message] for f in findings],
                            headers=["Severity", "Rule", "Config key", "Where", "Message"]))
    unfilled = placeholders(config)
    for line in unfilled:
        click.echo(f"  {line}", err=True)
    errors += len(unfilled)
    out["placeholders"] = unfilled
    out["scaling"] = scaling_summary(config.values)
    if not as_json:
        click.echo(f"{path}: {errors} error(s), {len(findings) - errors + len(unfilled)} other "
                   "finding(s)")
        click.echo(out["scaling"])
    report = None
    if offline:
        message = "Account not checked (--offline)."
    else:
        aws = settings.aws()
        if not as_json:
            if region is None and aws.session.region_name is None:
                source = "no region is set: pass --region, set AWS_REGION or region in the config"
            click.echo(f"Region: {aws.region_name} ({'from ' if region or aws.session.region_name else ''}"
                       f"{source}).")
        report, message = preflight_report(config, aws, ClickUI(to_stderr=as_json))
    if as_json:
        out["preflight"] = report.as_dict() if report else {"skipped": message}
        click.echo(json.dumps(out, indent=2))
    elif offline:
        click.echo(message)
    if report is None and not offline:
        # A preflight that could not ask the account has passed nothing.
        click.echo("The account was not checked: fix the above, or pass --offline to check "
                   "the template alone.", err=True)
        sys.exit(1)
    if errors or (report and report.problems):
        sys.exit(1)


@main.command("package")
@config_options
@click.option("--upload/--no-upload", default=False, help="Upload new zips to buckets.internal.")
def package_cmd(settings: Settings, upload: bool) -> None:
    """Build each Lambda's deterministic zip (named by its SHA-256); optionally upload it.

    \b
    Example:
      cnsq package --config config/config.yml --upload
    """
    from cnsq.deploy import package

    config = settings.load()
    paths = _paths(config)
    if upload:
        from cnsq.deploy.plan import package_lambdas

        code, uploaded, skipped = package_lambdas(
            config, paths, _stacks(settings.aws()), package.SubprocessPip(), ClickUI())
        for name, location in code.items():
            state = "uploaded" if location.key in uploaded else "already in S3"
            click.echo(f"{name}: s3://{location.bucket}/{location.key} ({state})")
        return
    from cnsq.shipped import lambda_source

    for name, spec in config.values["lambdas"].items():
        source = Path(spec["source"])
        source = source if source.is_absolute() else config.project_dir / source
        source = lambda_source(source, paths.build / config.stack_name)
        built = package.build(name, source, paths.build / config.stack_name / "lambdas",
                              spec["runtime"], spec["architecture"], package.SubprocessPip(),
                              package.extra_requirements(config.values))
        click.echo(f"{name}: {built.path} sha256={built.sha256}")


@main.command()
@config_options
@click.option("--no-execute", is_flag=True, help="Create and show the change set, then stop.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before replacing stateful resources.")
@click.option("--fail-on-empty", is_flag=True, help="Exit 1 when there is nothing to deploy.")
@click.option("--json", "as_json", is_flag=True, help="Print the change set and outputs as JSON.")
@click.option("--skip-preflight", is_flag=True, help="Do not check the account first.")
@click.option("--update-ami", is_flag=True,
              help="Move the GPU hosts to the newest AMI of ecs.amiParameter (they are replaced "
                   "one at a time). Without it the hosts keep the AMI they were deployed with.")
def deploy(settings: Settings, no_execute: bool, yes: bool, fail_on_empty: bool,
           as_json: bool, skip_preflight: bool, update_ami: bool) -> None:
    """Package, compile, lint and deploy the stack through a change set.

    Shows what will change before anything does, streams stack events, and prints the outputs
    and the next step.

    \b
    Example:
      cnsq deploy --config config/config.yml --deployment prod
      cnsq deploy --config config/config.yml --no-execute   # only show the changes
      cnsq deploy --update-ami   # the GPU hosts move to the newest ECS GPU AMI
    """
    from cnsq.config import placeholders
    from cnsq.deploy import apply as applying
    from cnsq.deploy import plan as flow
    from cnsq.deploy.package import SubprocessPip

    ui = ClickUI(to_stderr=as_json)
    config = settings.load()
    unfilled = placeholders(config)
    if unfilled:
        raise CnsqError(f"{len(unfilled)} value(s) of the config are still the example's; "
                        "nothing was deployed:\n  " + "\n  ".join(unfilled))
    aws = settings.aws()
    stacks = _stacks(aws)
    if skip_preflight:
        ui.echo("Preflight skipped (--skip-preflight): the account was not checked.")
    else:
        report, message = flow.preflight_report(config, aws, ui)
        if report is None:
            raise CnsqError(f"{message} Pass --skip-preflight to deploy anyway.")
        if report.problems:
            raise CnsqError(f"preflight found {len(report.problems)} problem(s); nothing was "
                            "deployed (fix them, or pass --skip-preflight)")
    plan = flow.plan(config, _paths(config), stacks, SubprocessPip(), ui, aws.region_name,
                     update_ami)
    change_set = plan.change_set
    if change_set is None:  # plan() returns with one or raises
        raise CnsqError("no change set was created")
    result: dict[str, Any] = {"stack": plan.stack_name, "changeSetArn": change_set.arn,
                              "uploaded": plan.uploaded, "changes": [], "outputs": {}}
    if plan.empty:
        stacks.delete_change_set(change_set.arn)
        ui.echo(f"No changes: {plan.stack_name} is up to date, nothing to deploy.")
        result["changeSetArn"] = None
        _finish(result, as_json)
        sys.exit(1 if fail_on_empty else 0)
    result["changes"] = [c.__dict__ | {"properties": list(c.properties)}
                         for c in change_set.changes]
    flow.show_changes(change_set, ui)
    if no_execute:
        ui.echo(f"Change set {change_set.arn} created and not executed (--no-execute).")
        _finish(result, as_json)
        return
    applying.apply(plan, stacks, ui, yes, sys.stdin.isatty())
    result["outputs"] = stacks.outputs(change_set.stack_id or plan.stack_name)
    result["migrated"] = applying.migrate(aws, result["outputs"], ui, settings.command("setup"))
    applying.next_steps(plan.stack_name, result["outputs"], settings.command("setup"), ui,
                    migrated=result["migrated"])
    _finish(result, as_json)


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
def outputs(settings: Settings, as_json: bool) -> None:
    """Print the stack's outputs (queue URL, database, model endpoint …).

    \b
    Example:
      cnsq outputs --config config/config.yml --json
    """
    config = settings.load()
    values = _stacks(settings.aws()).outputs(config.stack_name)
    if as_json:
        click.echo(json.dumps(values, indent=2))
    else:
        click.echo(tabulate(sorted(values.items()), headers=["Output", "Value"]))


@main.command()
@config_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask for the stack name.")
def delete(settings: Settings, yes: bool) -> None:
    """Delete the stack (download your results first).

    \b
    Example:
      cnsq delete --config config/config.yml
    """
    from cnsq.deploy.apply import destroy

    config = settings.load()
    destroy(config.stack_name, _stacks(settings.aws()), ClickUI(), yes, sys.stdin.isatty())
