"""The ``cnsq`` command line: one small function per command that parses options and delegates."""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from tabulate import tabulate

from download_and_predict.errors import HandlerError

from . import __version__
from .errors import CnsqError


class ClickUI:
    """The deploy UI on a terminal (see :class:`cnsq.deploy.UI`)."""

    def __init__(self, to_stderr: bool = False):
        # With --json, stdout carries only the JSON document; people read stderr.
        self.to_stderr = to_stderr

    def echo(self, text: str = "", err: bool = False) -> None:
        click.echo(text, err=err or self.to_stderr)

    def confirm(self, question: str) -> bool:
        return click.confirm(question, default=False, err=True)

    def prompt(self, question: str) -> str:
        return click.prompt(question, default="", show_default=False, err=True)

    def table(self, rows: list[list[Any]], headers: list[str]) -> None:
        self.echo(tabulate(rows, headers=headers, tablefmt="simple") if rows else "  (none)")


@dataclass
class Settings:
    """What every AWS/config command shares."""

    config: Path
    deployment: str | None
    env_file: Path | None
    stack: str | None
    region: str | None
    profile: str | None

    def load(self):
        from .config import load_config

        loaded = load_config(self.config, self.deployment, self.env_file, self.stack)
        from download_and_predict.base import register_secret

        for secret in loaded.secrets.values():  # hidden from every message from here on
            register_secret(secret.value)
        for warning in loaded.warnings:
            click.echo(f"warning: {warning}", err=True)
        return loaded

    def aws(self):
        from .aws import Aws

        return Aws(self.profile, self.region)

    def command(self, name: str) -> str:
        """``cnsq NAME`` with the options that chose this stack, to paste as the next step.

        The region and profile are left to the environment they came from."""
        import shlex

        parts = ["cnsq", name, "--config", str(self.config)]
        for flag, value in (("--deployment", self.deployment), ("--env-file", self.env_file),
                            ("--stack", self.stack)):
            if value:
                parts += [flag, str(value)]
        return shlex.join(parts)


def config_options(func):
    """--config, --deployment, --env-file, --stack, --region, --profile → a Settings argument."""

    @click.option("--config", "-c", "config", type=click.Path(path_type=Path),
                  default=Path("config/config.yml"), show_default=True,
                  help="kes-style config.yml.")
    @click.option("--deployment", "-d", help="Section merged over 'default'.")
    @click.option("--env-file", type=click.Path(path_type=Path),
                  help="dotenv file [default: .env next to the config].")
    @click.option("--stack", help="Override stackName.")
    @click.option("--region", envvar="AWS_REGION", help="AWS region [default: AWS_REGION].")
    @click.option("--profile", envvar="AWS_PROFILE", help="AWS profile [default: AWS_PROFILE].")
    @functools.wraps(func)
    def wrapper(config, deployment, env_file, stack, region, profile, **kwargs):
        settings = Settings(config, deployment, env_file, stack, region, profile)
        return func(settings, **kwargs)

    return wrapper


def json_option(func):
    """--json: the command's result as one JSON document on stdout (messages stay on stderr)."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON on stdout, for scripts.")(func)


def _print_json(data: Any) -> None:
    import dataclasses

    def default(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        return str(value)

    click.echo(json.dumps(data, indent=2, default=default))


def _paths(config):
    from .deploy import Paths
    from .project import templates_dir

    return Paths(templates=templates_dir(config.project_dir), build=Path(".cnsq"))


def _stacks(aws, poll: float = 5.0):
    from .stack import Stacks

    return Stacks(aws.client("cloudformation"), aws.client("s3"), poll_seconds=poll)


def _mask(text: str) -> str:
    from download_and_predict.base import mask  # the one redaction function

    return mask(text)


def _describe(exc: BaseException) -> str:
    """One line for an error no cnsq code anticipated (``cnsq --debug`` shows the traceback)."""
    import errno

    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return "the port is already in use by another program: choose another with --port"
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    if isinstance(exc, ModuleNotFoundError):
        return (f"{exc.name} is not installed: this command needs the local extra "
                "(pip install 'cnsq[local]')")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"{type(exc).__name__}{': ' + text if text else ''} "
            "(run `cnsq --debug …` for the traceback)")


class CnsqGroup(click.Group):
    """Turns CnsqError and AWS errors into one line on stderr and exit 1 (--debug: traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CnsqError, HandlerError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {_mask(str(exc))}", err=True)
            sys.exit(getattr(exc, "exit_code", 1))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - one line each; --debug shows the traceback
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from .aws import explain  # imported here: boto3 costs every command 0.2 s to load

            message = explain(exc) or _describe(exc)
            click.echo(f"Error: {_mask(message)}", err=True)
            sys.exit(1)


@click.group(cls=CnsqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cnsq")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """cnsq runs a machine-learning model over millions of map tiles on AWS.

    \b
    Typical AWS run:
      cnsq deploy --config config/config.yml
      cnsq setup --config config/config.yml
      cnsq push tiles.txt --config config/config.yml
      cnsq download results.csv --config config/config.yml
      cnsq delete --config config/config.yml
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--templates", is_flag=True, help="Also copy the CloudFormation template, to customise.")
@click.option("--lambda", "handler", is_flag=True,
              help="Also copy the Lambda's code, requirements and examples, to customise.")
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
def init(directory: Path, templates: bool, handler: bool, force: bool) -> None:
    """Write a starter project: config/config.yml and config/.env to fill in.

    Without --templates and --lambda, commands use the template and the Lambda that ship with
    cnsq; with them, the project's copies (as kes projects had).

    \b
    Examples:
      cnsq init my-project
      cnsq init . --templates --lambda
    """
    from .project import init as write

    written = write(directory, templates, handler, force)
    for path in written:
        click.echo(f"wrote {path}")
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
    from .deploy import compile_only

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
    Lambda concurrency left. Every problem is reported at once, with its config key.

    \b
    Examples:
      cnsq validate --config config/config.yml
      cnsq validate --config config/config.example.yml --env-file config/.env.sample --offline
    """
    from .deploy import compile_only, preflight_report
    from .template import lint

    config = settings.load()
    path = compile_only(config, _paths(config))
    findings = lint(path, [settings.region or "us-east-1"], list(config.values["lambdas"]))
    errors = sum(f.severity == "error" for f in findings)
    out = {"template": str(path), "lint": [f.__dict__ for f in findings], "preflight": None}
    if findings and not as_json:
        click.echo(tabulate([[f.severity, f.rule, f.config_key or "-", f"{path}:{f.line}",
                              f.message] for f in findings],
                            headers=["Severity", "Rule", "Config key", "Where", "Message"]))
    if not as_json:
        click.echo(f"{path}: {errors} error(s), {len(findings) - errors} other finding(s)")
    report = None
    if offline:
        message = "Account not checked (--offline)."
    else:
        report, message = preflight_report(config, settings.aws(), ClickUI(to_stderr=as_json))
    if as_json:
        out["preflight"] = report.as_dict() if report else {"skipped": message}
        click.echo(json.dumps(out, indent=2))
    elif report is None:
        click.echo(message)
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
    from . import package

    config = settings.load()
    paths = _paths(config)
    if upload:
        from .deploy import package_lambdas

        code, uploaded, skipped = package_lambdas(
            config, paths, _stacks(settings.aws()), package.SubprocessPip(), ClickUI())
        for name, location in code.items():
            state = "uploaded" if location.key in uploaded else "already in S3"
            click.echo(f"{name}: s3://{location.bucket}/{location.key} ({state})")
        return
    from .project import lambda_source

    for name, spec in config.values["lambdas"].items():
        source = Path(spec["source"])
        source = source if source.is_absolute() else config.project_dir / source
        source = lambda_source(source, paths.build / config.stack_name)
        built = package.build(name, source, paths.build / config.stack_name / "lambdas",
                              spec["runtime"], spec["architecture"], package.SubprocessPip())
        click.echo(f"{name}: {built.path} sha256={built.sha256}")


@main.command()
@config_options
@click.option("--no-execute", is_flag=True, help="Create and show the change set, then stop.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before replacing stateful resources.")
@click.option("--fail-on-empty", is_flag=True, help="Exit 1 when there is nothing to deploy.")
@click.option("--json", "as_json", is_flag=True, help="Print the change set and outputs as JSON.")
@click.option("--skip-preflight", is_flag=True, help="Do not check the account first.")
def deploy(settings: Settings, no_execute: bool, yes: bool, fail_on_empty: bool,
           as_json: bool, skip_preflight: bool) -> None:
    """Package, compile, lint and deploy the stack through a change set.

    Shows what will change before anything does, streams stack events, and prints the outputs
    and the next step.

    \b
    Example:
      cnsq deploy --config config/config.yml --deployment prod
      cnsq deploy --config config/config.yml --no-execute   # only show the changes
    """
    from . import deploy as flow
    from .package import SubprocessPip

    ui = ClickUI(to_stderr=as_json)
    config = settings.load()
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
    plan = flow.plan(config, _paths(config), stacks, SubprocessPip(), ui, aws.region_name)
    result: dict[str, Any] = {"stack": plan.stack_name, "changeSetArn": plan.change_set.arn,
                              "uploaded": plan.uploaded, "changes": [], "outputs": {}}
    if plan.empty:
        stacks.delete_change_set(plan.change_set.arn)
        ui.echo(f"No changes: {plan.stack_name} is up to date, nothing to deploy.")
        result["changeSetArn"] = None
        _finish(result, as_json)
        sys.exit(1 if fail_on_empty else 0)
    result["changes"] = [c.__dict__ | {"properties": list(c.properties)}
                         for c in plan.change_set.changes]
    flow.show_changes(plan.change_set, ui)
    if no_execute:
        ui.echo(f"Change set {plan.change_set.arn} created and not executed (--no-execute).")
        _finish(result, as_json)
        return
    flow.apply(plan, stacks, ui, yes, sys.stdin.isatty())
    result["outputs"] = stacks.outputs(plan.change_set.stack_id or plan.stack_name)
    result["migrated"] = flow.migrate(aws, result["outputs"], ui, settings.command("setup"))
    flow.next_steps(plan.stack_name, result["outputs"], settings.command("setup"), ui,
                    migrated=result["migrated"])
    _finish(result, as_json)


def _finish(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))


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
    from .deploy import destroy

    config = settings.load()
    destroy(config.stack_name, _stacks(settings.aws()), ClickUI(), yes, sys.stdin.isatty())


def _database_url(explicit: str | None, settings: Settings) -> str:
    """An explicit URL, else the deployed stack's database (outputs + its secret)."""
    if explicit:
        return explicit
    if not settings.config.exists():
        raise CnsqError("no database given: pass a database URL (or set DATABASE_URL), or "
                        f"--config for a deployed stack ({settings.config} does not exist)")
    from .credentials import url_from_stack

    config = settings.load()
    aws = settings.aws()
    return url_from_stack(aws, _stacks(aws), config.stack_name)


def _row_progress(label: str):
    """A progress callback that rewrites one stderr line, only on a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(rows: int) -> None:
        click.echo(f"\r{label}: {rows:,} rows", nl=False, err=True)

    return show


def _admin(db_string: str | None, settings: Settings):
    """The stack's admin function when no URL is given and the stack has one, else None."""
    if db_string or not settings.config.exists():
        return None
    from .admin import AdminFunction

    config = settings.load()
    aws = settings.aws()
    return AdminFunction.of_stack(aws, _stacks(aws).outputs(config.stack_name))


@main.command()
@click.argument("db_string", required=False)
@click.option("--database-url", envvar="DATABASE_URL",
              help="The same as DB_STRING [default: DATABASE_URL, else the stack's].")
@config_options
def setup(settings: Settings, db_string: str | None, database_url: str | None) -> None:
    """Create the results table (versioned migrations; running it twice is harmless).

    DB_STRING is a database URL (postgresql://user:pass@host:5432/ResultsDB or
    sqlite:///results.db). Without it, the deployed stack's private database is migrated by the
    stack's admin function, inside the VPC (deploy does this once the stack is complete).

    \b
    Examples:
      cnsq setup --config config/config.yml
      cnsq setup postgresql://postgres:secret@localhost:5432/results
    """
    from .results import mask, open_store

    db_string = db_string or database_url
    admin = _admin(db_string, settings)
    if admin is not None:
        answer = admin.call("migrate")
        names = ", ".join(answer["applied"])
        click.echo(f"Applied migration(s) {names} through {admin.name}." if names
                   else f"The results table is up to date; nothing to migrate ({admin.name}).")
        return
    url = _database_url(db_string, settings)
    store = open_store(url)
    try:
        applied = store.migrate()
    finally:
        store.close()
    if applied:
        names = ", ".join(f"{m.version} ({m.name})" for m in applied)
        click.echo(f"Applied migration(s) {names} to {mask(url)}.")
    else:
        click.echo(f"{mask(url)} is up to date; nothing to migrate.")


@main.command()
@click.argument("out", metavar="[OUT.csv]", required=False)
@click.option("--output", "-o", "output", help="The CSV to write ('-': stdout); or as OUT.csv.")
@click.option("--database-url", envvar="DATABASE_URL",
              help="postgresql://… or sqlite:///… [default: DATABASE_URL, else the stack's].")
@config_options
@json_option
def download(settings: Settings, out: str | None, output: str | None,
             database_url: str | None, as_json: bool) -> None:
    """Stream the results to a CSV file (tile,output with the output as JSON); '-' for stdout.

    Memory stays flat at any row count, and an interrupted download never leaves a partial file
    under the final name. A deployed stack's private database is exported to
    s3://<buckets.internal>/<stackName>/exports/ by its admin function, then copied here.

    \b
    Examples:
      cnsq download results.csv --config config/config.yml
      DATABASE_URL=postgresql://user:pass@host:5432/ResultsDB cnsq download results.csv
      cnsq download - --database-url sqlite:///results.db | head
    """
    from .download import download as run_download
    from .results import open_store

    out = _one_output(out, output, "OUT.csv")
    if as_json and out == "-":
        raise click.UsageError("--json prints to stdout: write the CSV to a file")
    admin = _admin(database_url, settings) if out != "-" else None
    if admin is not None:
        from .download import writable_target

        writable_target(out)
        show = None
        if sys.stderr.isatty():
            def show(done: int) -> None:
                click.echo(f"\rCopying the export to {out}: {done / 1e6:,.1f} MB", nl=False, err=True)
        export = admin.download_export(out, show)
        if show:
            click.echo("", err=True)
        click.echo(f"Wrote {export['rows']:,} rows to {out} (exported to "
                   f"s3://{export['bucket']}/{export['key']}).", err=True)
        if as_json:
            _print_json({"output": out, "rows": export["rows"],
                         "export": f"s3://{export['bucket']}/{export['key']}"})
        return
    from .download import writable_target

    if out != "-":
        writable_target(out)  # before an export that may take minutes
    store = open_store(_database_url(database_url, settings), create=False)
    progress = _row_progress(f"Downloading to {out}") if out != "-" else None
    try:
        rows = run_download(store, out, sys.stdout.buffer, progress)
    finally:
        store.close()
    if progress:
        click.echo("", err=True)
    click.echo(f"Wrote {rows:,} rows to {out if out != '-' else 'stdout'}.", err=True)
    if as_json:
        _print_json({"output": out, "rows": rows})


def _queue_region(queue_url: str) -> str | None:
    """us-east-1 from https://sqs.us-east-1.amazonaws.com/123456789012/Queue."""
    import re

    # https://sqs.REGION.amazonaws.com/… and the legacy https://REGION.queue.amazonaws.com/…
    match = re.match(r"https://(?:sqs\.([a-z0-9-]+)|([a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?/",
                     queue_url)
    return (match.group(1) or match.group(2)) if match else None


@main.command()
@click.argument("tiles", metavar="TILES")
@click.argument("queue_url", required=False)
@click.option("--concurrency", "-n", type=click.IntRange(1, 512), default=None,
              help="send_message_batch calls in flight [default: PROMISE_THRESHOLD, else 16].")
@click.option("--strict", is_flag=True, help="Send nothing if any line is invalid.")
@click.option("--resume", is_flag=True, help="Continue an interrupted push of TILES to QUEUE_URL.")
@click.option("--restart", is_flag=True, help="Forget an interrupted push and send everything.")
@click.option("--failed-file", type=click.Path(path_type=Path),
              help="Where tiles that failed after retries go [default: TILES.failed].")
@config_options
@json_option
def push(settings: Settings, tiles: str, queue_url: str | None, concurrency: int | None,
         strict: bool, resume: bool, restart: bool, failed_file: Path | None,
         as_json: bool) -> None:
    """Send tiles (x-y-z lines; '-' for stdin) to the SQS queue as {"x","y","z"} messages.

    QUEUE_URL defaults to the deployed stack's tile queue (its queueURL output, read with
    --config). Bad lines are reported with their line numbers and skipped. Interrupted (Ctrl-C),
    the push saves its place under .cnsq/push/ and continues with --resume: no tile is sent
    twice. Tiles that fail after retries are written to a file to push again.

    \b
    Examples:
      cnsq push tiles.txt --config config/config.yml
      cnsq push tiles.txt https://sqs.us-east-1.amazonaws.com/123456789012/cnsqdevTileQueue
      PROMISE_THRESHOLD=64 cnsq push tiles.txt --config config/config.yml --deployment prod
    """
    from .aws import Aws
    from .push import default_concurrency, run_push

    if queue_url is not None and not queue_url.strip():
        raise CnsqError("QUEUE_URL is empty (did the command that should print it fail?); "
                        "omit it to use the stack's tile queue with --config")
    if queue_url is None:
        queue_url = _stack_queue_url(settings)
    concurrency = concurrency or default_concurrency()
    aws = Aws(settings.profile, settings.region or _queue_region(queue_url))
    # Standard retries, not adaptive: adaptive mode's client-side rate limiter cuts the send
    # rate under throttling far below what SQS takes; push backs off per batch itself.
    sqs = aws.client("sqs", max_pool_connections=concurrency + 4,
                     retries={"mode": "standard", "max_attempts": 4})
    report = run_push(tiles, queue_url, sqs, concurrency=concurrency, strict=strict,
                      resume=resume, restart=restart, failed_file=failed_file,
                      state_dir=Path(".cnsq"), tty=sys.stderr.isatty())
    if as_json:
        _print_json({"queue": queue_url, "sent": report.sent, "skipped": report.skipped,
                     "resumedFrom": report.resumed_from, "interrupted": report.interrupted,
                     "invalid": [{"line": n, "error": e} for n, e in report.invalid],
                     "failed": [{"line": n, "tile": t, "reason": r} for n, t, r in report.failed],
                     "failedFile": report.failed_file})
    if report.invalid or report.failed or report.interrupted:
        sys.exit(1)


def _stack_queue_url(settings: Settings) -> str:
    """The deployed stack's tile queue (its queueURL output), for push and work."""
    from . import layout

    if not settings.config.exists():
        raise CnsqError(f"no queue URL given and no config to read the stack's from "
                        f"({settings.config} does not exist)")
    config = settings.load()
    queue_url = _stacks(settings.aws()).outputs(config.stack_name).get(layout.QUEUE_URL)
    if not queue_url:
        raise CnsqError(f"stack {config.stack_name} has no queueURL output yet; pass the queue URL")
    return queue_url


def _clock(seconds: float) -> str:
    """12m05s, 1h02m: an ETA for a progress line."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _one_output(positional: str | None, option: str | None, metavar: str) -> str:
    """The output named either way (the original's positional, or -o/--output), not both."""
    if positional and option and positional != option:
        raise click.UsageError(f"{metavar} and its option name two files; give one")
    if not (positional or option):
        raise click.UsageError(f"missing {metavar} (or its option)")
    return positional or option  # type: ignore[return-value]


def _predict_url(model_endpoint: str) -> str:
    """…/v1/models/NAME or …/v1/models/NAME:predict → the :predict URL (one vocabulary)."""
    return model_endpoint if model_endpoint.endswith(":predict") else model_endpoint + ":predict"


def _model_url(model_endpoint: str | None) -> str | None:
    """…/v1/models/NAME[:predict] → …/v1/models/NAME (the status path)."""
    return model_endpoint.removesuffix(":predict") if model_endpoint else model_endpoint


def _finite(value: float | None) -> float | None:
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@main.command("convert-geojson")
@click.argument("source", metavar="IN.csv", type=click.Path(path_type=Path))
@click.argument("target", metavar="[OUT.geojson]", required=False)
@click.option("--output", "-o", "output", help="The GeoJSON to write ('-': stdout); or as OUT.geojson.")
@click.option("--thresh_ind", "--thresh-ind", "thresh_ind", type=int, required=True,
              help="Index of the class score to threshold on.")
@click.option("--thresh", type=float, required=True, callback=lambda ctx, param, value: _finite(value),
              help="Keep tiles whose score is >= this.")
@click.option("--tms", is_flag=True, help="The CSV's tile ids are TMS (y flipped), not XYZ.")
@click.option("--seq", is_flag=True, help="Write one Feature per line (newline-delimited).")
def convert_geojson(source: Path, target: str | None, output: str | None, thresh_ind: int,
                    thresh: float, tms: bool, seq: bool) -> None:
    """Convert a results CSV (tile,output) to GeoJSON polygons of the tiles that pass a threshold.

    Streams at any size. Properties: the tile and its class scores p0, p1, … unrounded.
    Bad rows are reported with their line numbers and skipped ('-' writes to stdout).

    \b
    Example (keep tiles whose class-1 score is at least 0.95):
      cnsq convert-geojson results.csv buildings.geojson --thresh_ind 1 --thresh 0.95
    """
    from .geojson import convert_file

    target = _one_output(target, output, "OUT.geojson")

    def progress(report) -> None:
        click.echo(f"\rread {report.read:,} rows, kept {report.kept:,}", nl=False, err=True)

    on_tty = sys.stderr.isatty()
    report = convert_file(source, target, sys.stdout, thresh_ind=thresh_ind, thresh=thresh,
                          tms=tms, seq=seq, progress=progress if on_tty else None)
    if on_tty and report.read >= 50_000:
        click.echo("", err=True)
    for line, reason in report.bad[:20]:
        click.echo(f"{source}:{line}: {reason}", err=True)
    if report.bad_count > 20:
        click.echo(f"… and {report.bad_count - 20:,} more bad rows", err=True)
    click.echo(f"Read {report.read:,} rows, kept {report.kept:,}, bad {report.bad_count:,}"
               f"{'' if target == '-' else f'; wrote {target}'}.", err=True)
    if report.bad_count:
        sys.exit(1)


@main.command("tiles")
@click.argument("aoi", metavar="AOI.geojson", type=click.Path(path_type=Path))
@click.option("--zoom", "-z", type=click.IntRange(0, 30), required=True, help="Tile zoom level.")
@click.option("--output", "-o", default="-", help="Where to write x-y-z lines [default: stdout].")
def tiles_cmd(aoi: Path, zoom: int, output: str) -> None:
    """List the XYZ tiles covering the polygons (or lines, points) of a GeoJSON file.

    Accepts a FeatureCollection, a Feature or a bare geometry; writes x-y-z lines without
    duplicates, ready for `cnsq push`.

    \b
    Example:
      cnsq tiles area.geojson --zoom 17 -o tiles.txt
    """
    from .tiles import cover, load_geojson, write_tiles

    found = cover(load_geojson(aoi), zoom)
    if output == "-":
        count = write_tiles(found, sys.stdout)
    else:
        with open(output, "w", encoding="utf-8") as handle:
            count = write_tiles(found, handle)
    click.echo(f"{count:,} tiles at zoom {zoom}" + ("" if output == "-" else f" written to {output}")
               + ".", err=True)


@main.command()
@config_options
@click.option("--database-url", envvar="DATABASE_URL", help="Check this database instead.")
@click.option("--model-endpoint", help="…/v1/models/NAME to check instead of the stack's.")
@click.option("--tile-endpoint", help="Imagery URL template instead of the config's.")
@click.option("--tile", "tile_id", default="0-0-0", show_default=True,
              help="Sample tile (x-y-z) for the imagery and prediction checks.")
@json_option
def verify(settings: Settings, database_url: str | None, model_endpoint: str | None,
           tile_endpoint: str | None, tile_id: str, as_json: bool) -> None:
    """Check each part of the deployed stack; exit 1 if any check fails.

    Checks: the stack is complete; the tile queue and dead letter queue exist (and their
    depth); the results table has the right columns; the model's status path answers 200; the
    imagery endpoint serves the sample tile as an image; the model predicts on it. Given
    --database-url, --model-endpoint and --tile-endpoint together, it checks those targets
    alone: no config, no AWS (a local setup).

    \b
    Examples:
      cnsq verify --config config/config.yml --tile 9646-12319-15
      cnsq verify --database-url sqlite:///results.db --tile 1-2-3 \
        --model-endpoint http://127.0.0.1:8501/v1/models/water \
        --tile-endpoint 'http://127.0.0.1:8000/{z}/{x}/{y}.png'
    """
    from .tiles import parse_tile_id
    from .verify import Target, build_target, run_checks, tile_url_from_template

    try:
        parse_tile_id(tile_id)
    except ValueError as exc:
        raise CnsqError(f"--tile {tile_id}: {exc}") from None
    model_endpoint = _model_url(model_endpoint)
    if database_url and model_endpoint and tile_endpoint:
        target = Target(stack_name=None, stack_status=None, queue_url=None, dead_letter_url=None,
                        database_url=lambda: database_url, model_endpoint=model_endpoint,
                        tile_url=tile_url_from_template(tile_endpoint, tile_id), tile_id=tile_id)
        checks = run_checks(target, sqs=None)
    else:
        config = settings.load()
        aws = settings.aws()
        target = build_target(config, aws, _stacks(aws), database_url=database_url,
                              model_endpoint=model_endpoint, tile_endpoint=tile_endpoint,
                              tile_id=tile_id)
        checks = run_checks(target, aws.client("sqs"))
    failed = [c.name for c in checks if not c.ok]
    if as_json:
        _print_json({"passed": not failed, "checks": checks})
        sys.exit(1 if failed else 0)
    click.echo(tabulate([["✓" if c.ok else "✗", c.name, c.detail] for c in checks],
                        headers=["", "Check", "Detail"]))
    if failed:
        click.echo(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}.", err=True)
        sys.exit(1)
    click.echo(f"All {len(checks)} checks passed.")


@main.command("tag-logs")
@config_options
@json_option
def tag_logs(settings: Settings, as_json: bool) -> None:
    """Tag the stack's CloudWatch log groups with Project (and Stack) for cost tracking.

    Includes the groups Lambda creates itself (/aws/lambda/<fullName>). Running it again
    changes nothing.

    \b
    Example:
      cnsq tag-logs --config config/config.yml
    """
    from .logs import log_group_names, tag_log_groups

    config = settings.load()
    aws = settings.aws()
    tags = {"Project": config.values["projectTag"], "Stack": config.stack_name}
    results = tag_log_groups(aws.client("logs"), log_group_names(config, _stacks(aws)), tags)
    if as_json:
        _print_json({"tags": tags, "logGroups": results})
        return
    click.echo(tabulate([[r.name, r.status, ", ".join(f"{k}={v}" for k, v in r.added.items())]
                         for r in results], headers=["Log group", "Status", "Added"]))
    missing = [r.name for r in results if r.status == "missing"]
    tagged = sum(r.status == "tagged" for r in results)
    click.echo(f"Tagged {tagged}, already tagged {len(results) - tagged - len(missing)}, "
               f"missing {len(missing)}.")
    if missing:
        click.echo("A missing Lambda log group appears after the function's first run.", err=True)


@main.command("gpu-util")
@click.argument("ssh_key", required=False, type=click.Path(exists=True, dir_okay=False))
@config_options
@click.option("--user", default="ec2-user", show_default=True, help="SSH user.")
@click.option("--ssm", is_flag=True, help="Use SSM Run Command instead of SSH (port 22 closed).")
@json_option
def gpu_util(settings: Settings, ssh_key: str | None, user: str, ssm: bool, as_json: bool) -> None:
    """Show the GPU utilisation of every instance in the stack's ECS cluster.

    Runs nvidia-smi on each instance in parallel, over SSH with SSH_KEY or through SSM with
    --ssm. By default the instances' security group refuses SSH: add a rule, or use --ssm.

    \b
    Examples:
      cnsq gpu-util ~/.ssh/my-key.pem --config config/config.yml
      cnsq gpu-util --ssm --config config/config.yml
    """
    from .gpu import SshRunner, SsmRunner, cluster_name, discover, gpu_rows

    if not ssm and not ssh_key:
        raise CnsqError("pass SSH_KEY (a .pem file) or --ssm")
    config = settings.load()
    aws = settings.aws()
    instances = discover(aws.client("ecs"), aws.client("ec2"),
                         cluster_name(_stacks(aws), config.stack_name))
    if not instances:
        if as_json:
            _print_json({"instances": []})
            return
        click.echo("The cluster has no container instances (is ecs.desiredInstances 0?).")
        return
    runner = SsmRunner(aws.client("ssm")) if ssm else SshRunner(ssh_key, user)
    rows = gpu_rows(instances, runner)
    if as_json:
        _print_json({"instances": rows})
        sys.exit(1 if any(r.error for r in rows) else 0)
    click.echo(tabulate([[r.ip, r.instance_type, r.gpu, r.utilization, r.memory, r.error]
                         for r in rows], headers=["IP Address", "Instance Type", "GPU",
                                                  "GPU Utilization", "Memory", "Error"],
                        tablefmt="grid"))
    if any(r.error for r in rows):
        sys.exit(1)


@main.command()
@click.argument("source")
@click.option("--name", help="Model name (TF Serving's MODEL_NAME) [default: the folder's name].")
@click.option("--use-gpu", is_flag=True, help="Build on tensorflow/serving:latest-gpu.")
@click.option("--tag", default="latest", show_default=True, help="Image tag.")
@click.option("--context-only", type=click.Path(file_okay=False, path_type=Path),
              help="Write the Docker build context here and stop (no Docker needed).")
@click.option("--push", "push_", is_flag=True, help="Push to ECR (creating the repository).")
@click.option("--region", envvar="AWS_REGION", help="AWS region for ECR and s3:// sources.")
@click.option("--profile", envvar="AWS_PROFILE", help="AWS profile.")
def model(source: str, name: str | None, use_gpu: bool, tag: str, context_only: Path | None,
          push_: bool, region: str | None, profile: str | None) -> None:
    """Build a TF Serving image from a SavedModel and print the config lines that use it.

    SOURCE is a SavedModel folder (or a folder of numbered versions), s3://bucket/prefix, or
    gs://bucket/prefix (with google-cloud-storage installed).

    \b
    Examples:
      cnsq model ./export/buildings --use-gpu --push
      cnsq model s3://my-models/buildings --context-only build/
    """
    from . import model as image

    aws = None
    if source.startswith("s3://") or push_:
        from .aws import Aws

        aws = Aws(profile, region)
    import shutil

    name = name or Path(source.rstrip("/")).name or "model"
    if not context_only:
        problem = image.docker_available()  # before fetching or writing anything
        if problem:
            raise CnsqError(f"{problem}; write the build context with --context-only DIR and "
                            "build it where Docker runs (docker build -t IMAGE DIR)")
    workdir = image.temporary_dir()
    try:
        local = image.fetch(source, workdir / "source", aws.client("s3") if aws else None)
        context = image.write_context(local, context_only or workdir / "context", name, use_gpu)
        click.echo(f"Build context for {name} (versions {', '.join(context.versions)}) in "
                   f"{context.path}")
        image_name = f"{name}:{tag}"
        if context_only:
            click.echo(f"Build it with: docker build -t {image_name} {context.path}")
        else:
            image.build_image(context.path, image_name)
            if push_:
                repository = image.ensure_repository(aws.client("ecr"), name)
                image_name = image.push_image(aws.client("ecr"), f"{name}:{tag}", repository, tag)
            click.echo(f"Built {image_name}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the fetched model and, unless kept, the context
    click.echo("\nPut these lines in config/config.yml:\n  ecs:\n"
               f"    image: {image_name}\n  predictionPath: /v1/models/{name}")


@main.command()
@config_options
@click.option("--max", "limit", type=click.IntRange(1), help="Move at most this many messages.")
@click.option("--dry-run", is_flag=True, help="Count and show a sample; move nothing.")
@click.option("--queue-url", help="Tile queue [default: the stack's].")
@click.option("--dlq-url", help="Dead letter queue [default: the stack's].")
@click.option("--visibility-timeout", default=60, show_default=True,
              help="Seconds a received DLQ message stays hidden while it is moved.")
@json_option
def redrive(settings: Settings, limit: int | None, dry_run: bool, queue_url: str | None,
            dlq_url: str | None, visibility_timeout: int, as_json: bool) -> None:
    """Move the dead letter queue's tiles back to the tile queue; nothing is lost if it stops.

    \b
    Examples:
      cnsq redrive --config config/config.yml --dry-run
      cnsq redrive --config config/config.yml --max 1000
    """
    import dataclasses

    from .redrive import Journal, queue_urls, sample
    from .redrive import redrive as move

    aws = settings.aws()
    if not (queue_url and dlq_url):
        config = settings.load()
        found = queue_urls(_stacks(aws), config.stack_name, config.values["stackNoDash"])
        queue_url, dlq_url = queue_url or found[0], dlq_url or found[1]
    sqs = aws.client("sqs")
    if dry_run:
        depth, bodies = sample(sqs, dlq_url)
        click.echo(f"{depth:,} messages in {dlq_url}; a sample:")
        for body in bodies:
            click.echo(f"  {body}")
        return
    report = move(sqs, dlq_url, queue_url, Journal.open(Path(".cnsq"), dlq_url), limit=limit,
                  visibility_timeout=visibility_timeout)
    if as_json:
        _print_json({"from": dlq_url, "to": queue_url, **dataclasses.asdict(report)})
    note = f" ({report.already_sent} sent by an interrupted run, now deleted)" \
        if report.already_sent else ""
    click.echo(f"Moved {report.moved:,} messages from {dlq_url} to {queue_url}{note}.",
               err=as_json)
    if report.uncertain:
        click.echo(f"A killed run was sending {report.uncertain} message(s) when it stopped; SQS "
                   f"cannot tell whether they arrived, so {report.resent} were sent again (the "
                   "tile queue may hold those twice; each tile is written once).", err=True)
    if report.failed:
        click.echo(f"{len(report.failed)} could not be sent and stay in the DLQ.", err=True)
    if report.interrupted:
        click.echo("Interrupted; run it again to move the rest.", err=True)
    if report.invisible:
        click.echo(f"{report.invisible:,} message(s) of the DLQ are still invisible (held by an "
                   f"earlier run or another consumer); run again after their visibility timeout "
                   f"({visibility_timeout}s for a run of this command).", err=True)
    if report.failed or report.interrupted or report.invisible:
        sys.exit(1)


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise click.BadParameter(f"expected a duration like 15m, 2h or 1d, got {text!r}")
    return timedelta(seconds=int(text[:-1]) * units[text[-1]])


@main.command()
@config_options
@click.option("--since", default="15m", show_default=True, help="Metrics window (30m, 2h, 1d).")
@click.option("--watch", is_flag=True, help="Refresh every 30 seconds (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="Metrics and diagnosis as JSON.")
@click.option("--database-url", envvar="DATABASE_URL",
              help="Count results rows here [default: the stack's database, if reachable].")
def status(settings: Settings, since: str, watch: bool, as_json: bool,
           database_url: str | None) -> None:
    """Show the run's numbers and which of the four scenarios they point to, with what to change.

    Queues, Lambda invocations/errors/throttles/duration/concurrency, the model endpoint's
    requests/latency/5xx, GPU utilisation per instance, the results rows, the time for the queue
    to drain, and the diagnosis (thresholds in `cnsq.status.THRESHOLDS`, see the README).

    \b
    Example:
      cnsq status --config config/config.yml --since 30m --watch
    """
    import time

    from .status import as_dict, collect, diagnose, render

    window = _duration(since)
    config = settings.load()
    aws = settings.aws()
    stacks = _stacks(aws)
    if stacks.describe(config.stack_name) is None:
        raise CnsqError(f"stack '{config.stack_name}' does not exist")
    lam = next(iter(config.values["lambdas"].values()), {"timeout": 300, "concurrent": None})
    # Without --database-url, the stack's admin function counts the rows (see status.collect).
    while True:
        metrics = collect(aws, stacks, config, window, database_url)
        diagnosis = diagnose(metrics, lam["timeout"], lam["concurrent"],
                             config.values["ecs"]["desiredInstances"])
        if as_json:
            click.echo(json.dumps(as_dict(metrics, diagnosis), indent=2, default=str))
        else:
            if watch:
                click.clear()
            click.echo(f"{config.stack_name}, last {since}:")
            click.echo(render(metrics, diagnosis))
        if not watch:
            return
        time.sleep(30)


def _wait_forever(what: str) -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo(f"\nStopped {what}.", err=True)


@main.command()
@click.argument("model_path", metavar="[MODEL.onnx]", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_option", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The ONNX model (as `cnsq run --model`); or as MODEL.onnx.")
@click.option("--port", default=8501, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 opens it to the network).")
@click.option("--name", default="model", show_default=True, help="The model's name in the URL.")
@click.option("--max-batch", default=32, show_default=True, help="Instances per inference call.")
@click.option("--batch-timeout-ms", default=5.0, show_default=True,
              help="How long a request waits for others to share its inference call.")
@click.option("--batch-threads", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Batches run at once (TF Serving's num_batch_threads), each on an equal share "
                   "of the cores. 1: the lowest latency per batch; 2 or more: steadier throughput "
                   "when other work shares the CPU (cnsq run uses 2).")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run each batch thread twice at --max-batch on a blank image before the port "
                   "opens, so the first requests do not wait for ONNX Runtime's first runs.")
def serve(model_path: Path | None, model_option: Path | None, port: int, host: str, name: str,
          max_batch: int, batch_timeout_ms: float, batch_threads: int, warmup: bool) -> None:
    """Serve an ONNX model with TF Serving's REST API (what the Lambda and verify talk to).

    Concurrent requests are merged into one inference call (dynamic batching).

    \b
    Example:
      cnsq serve model.onnx --port 8501 --name buildings
      curl localhost:8501/v1/models/buildings
    """
    from .local import serve as server

    model_path = Path(_one_output(str(model_path) if model_path else None,
                                  str(model_option) if model_option else None, "MODEL.onnx"))
    running = server.start(model_path, port, name, max_batch, batch_timeout_ms, host, batch_threads,
                           switch_interval=server.SWITCH_INTERVAL, warmup=warmup)
    click.echo(f"Serving {model_path} at http://{host}:{running.httpd.server_address[1]}"
               f"/v1/models/{name}:predict (Ctrl-C stops)", err=True)
    _wait_forever("the model server")
    running.close()


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 opens it to the network).")
def tileserver(source: Path, port: int, host: str) -> None:
    """Serve XYZ tiles (/{z}/{x}/{y}.png) from a z/x/y folder tree or an MBTiles file.

    \b
    Example:
      cnsq tileserver ./tiles --port 8000
      cnsq run tiles.txt --tile-endpoint 'http://127.0.0.1:8000/{z}/{x}/{y}.png' --model m.onnx
    """
    from .local import tileserver as tiles

    running = tiles.start(source, port, host)
    click.echo(f"Serving {source} at http://{host}:{running.httpd.server_address[1]}"
               "/{z}/{x}/{y}.png (Ctrl-C stops)", err=True)
    _wait_forever("the tile server")
    running.close()


@main.command()
@click.option("--queue-url", help="The SQS tile queue [default: the stack's, read with --config].")
@click.option("--database-url", envvar="DATABASE_URL", default="sqlite:///results.db",
              show_default=True, help="Where results go.")
@click.option("--model-endpoint", "--prediction-endpoint", "model_endpoint",
              envvar="PREDICTION_ENDPOINT", required=True,
              help="The model: …/v1/models/NAME (as verify and the stack's modelEndpoint "
                   "output write it; a trailing :predict is accepted too).")
@click.option("--tile-endpoint", envvar="TILE_ENDPOINT", required=True,
              help="Imagery URL template, e.g. https://…/{z}/{x}/{y}.jpg?access_token={token}")
@click.option("--concurrency", "-n", default=4, show_default=True, help="Pollers at once.")
@click.option("--batch-size", default=10, show_default=True, type=click.IntRange(1, 10),
              help="Messages per receive (SQS allows 10), like the event source's batch size.")
@click.option("--wait-seconds", default=20, show_default=True, type=click.IntRange(0, 20),
              help="Long-poll wait.")
@click.option("--until-empty", is_flag=True, help="Stop when nothing is waiting or in flight.")
@config_options
def work(settings: Settings, queue_url: str | None, database_url: str, model_endpoint: str,
         tile_endpoint: str, concurrency: int, batch_size: int, wait_seconds: int,
         until_empty: bool) -> None:
    """Poll an SQS queue and run the Lambda's handler here (a laptop or an EC2 box).

    Succeeded records are deleted; failures come back after the visibility timeout and, after
    maxReceiveCount, go to the dead letter queue — as with the Lambda.

    \b
    Example:
      cnsq work --queue-url "$QUEUE" --model-endpoint http://127.0.0.1:8501/v1/models/model \\
        --tile-endpoint 'http://127.0.0.1:8000/{z}/{x}/{y}.png' --until-empty
    """
    import os

    from download_and_predict.handler import build

    from .aws import Aws
    from .local.worker import work as run_work
    from .results import open_store

    queue_url = queue_url or _stack_queue_url(settings)
    store = open_store(database_url)
    store.migrate()
    store.close()
    env = {**os.environ, "TILE_ENDPOINT": tile_endpoint,
           "PREDICTION_ENDPOINT": _predict_url(model_endpoint), "DATABASE_URL": database_url}
    app = build(env)
    sqs = Aws(settings.profile, settings.region or _queue_region(queue_url)).client(
        "sqs", max_pool_connections=concurrency + 4)
    started = time.monotonic()

    def progress(report) -> None:
        rate = report.received / max(time.monotonic() - started, 1e-6)
        click.echo(f"\r{report.received:,} records, {rate:,.1f}/s, {report.failed:,} failed   ",
                   nl=False, err=True)

    report = run_work(sqs, queue_url, app, concurrency=concurrency, batch_size=batch_size,
                      wait_seconds=wait_seconds, until_empty=until_empty,
                      progress=progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        click.echo("", err=True)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.reasons.items()))
    click.echo(f"Received {report.received:,} records: {report.succeeded:,} succeeded, "
               f"{report.failed:,} failed{f' ({reasons})' if reasons else ''}.", err=True)
    if report.interrupted:
        click.echo("Interrupted: records in hand that did not finish return to the queue after "
                   "its visibility timeout; run the same command to continue.", err=True)
        sys.exit(130)
    if report.errors:
        raise CnsqError(f"{len(report.errors)} of {concurrency} poller(s) stopped on an error "
                        f"(first: {report.errors[0]}); the messages they held return to the queue "
                        "after its visibility timeout")


@main.command("run")
@click.argument("tiles", type=click.Path(allow_dash=True, dir_okay=False, path_type=Path))
@click.option("--tile-endpoint", required=True,
              help="Imagery URL template: http://…/{z}/{x}/{y}.png (or the original's {}/{}/{}).")
@click.option("--model", "model_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="An ONNX model.")
@click.option("--output", "-o", "--out", "out", type=click.Path(path_type=Path),
              default=Path("results.csv"), show_default=True, help="The results CSV.")
@click.option("--database-url", envvar="DATABASE_URL",
              help="Where results are written [default: DATABASE_URL, else a SQLite file beside "
                   "--out (results.csv → results.db) that holds this run's results only].")
@click.option("--concurrency", "-n", default=16, show_default=True,
              help="Handler calls at once: enough to keep both of the model server's batches full.")
@click.option("--batch-size", default=10, show_default=True, help="Tiles per handler call.")
@click.option("--max-batch", default=32, show_default=True, help="Instances per inference call.")
@click.option("--max-missing", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Exit 1 when more than this share of tiles had no imagery (a wrong URL path "
                   "looks like that).")
@json_option
def run_cmd(tiles: Path, tile_endpoint: str, model_path: Path, out: Path, database_url: str | None,
            concurrency: int, batch_size: int, max_batch: int, max_missing: float,
            as_json: bool) -> None:
    """Run the whole job on this machine: tiles → handler → model server → results → CSV.

    The same handler as on AWS, with an in-process queue instead of SQS, a model server started
    for the run and SQLite results. Failures are listed at the end with their reasons.

    \b
    Example:
      cnsq run tiles.txt --tile-endpoint 'https://tiles.example.com/{z}/{x}/{y}.png' \\
        --model buildings.onnx --out results.csv
    """
    from .local.pipeline import run

    total = 0
    if sys.stderr.isatty() and str(tiles) != "-":
        with open(tiles, "rb") as handle:
            total = sum(1 for line in handle if line.strip())

    def progress(report) -> None:
        if sys.stderr.isatty():
            left = max(total - report.tiles - len(report.invalid), 0)
            eta = f", ETA {_clock(left / report.rate)}" if total and report.rate else ""
            of = f"/{total:,}" if total else ""
            click.echo(f"\r{report.tiles:,}{of} tiles, {report.rate:,.1f} tiles/s, "
                       f"{len(report.failed):,} failed{eta}   ", nl=False, err=True)

    from .download import writable_target

    writable_target(str(out))
    if str(tiles) == "-":  # stdin, as push reads it: kept in a file beside the output
        tiles = out.with_suffix(".tiles.txt")
        tiles.write_text(sys.stdin.read().removeprefix("\ufeff"), encoding="utf-8")
    elif not tiles.is_file():
        raise CnsqError(f"{tiles}: no such file")
    if database_url is None:
        # The run's own database: an earlier run's results must not reach this run's CSV.
        own = out.with_suffix(".db")
        for stale in (own, own.with_name(own.name + "-journal"), own.with_name(own.name + "-wal")):
            stale.unlink(missing_ok=True)
        database_url = f"sqlite:///{own}"
        click.echo(f"Results of this run go to {own} and {out}.", err=True)
    report = run(tiles, tile_endpoint, model_path, out, database_url, concurrency, batch_size,
                 max_batch, progress)
    if sys.stderr.isatty():
        click.echo("", err=True)
    if as_json:
        _print_json({"output": out, "database": database_url, "tiles": report.tiles,
                     "written": report.written, "withoutImagery": report.skipped,
                     "seconds": round(report.seconds, 3), "interrupted": report.interrupted,
                     "invalid": [{"line": n, "error": e} for n, e in report.invalid],
                     "failed": [{"line": n, "tile": t, "reason": r} for n, t, r in report.failed]})
    if report.interrupted:
        click.echo(f"Interrupted after {report.tiles:,} tiles: their results are in {out}; run "
                   "the same command again to do them all.", err=True)
    if report.interrupted:
        try:
            _report_run(report, tiles, out, max_missing)
        finally:
            sys.exit(130)
    _report_run(report, tiles, out, max_missing)


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("cnsq-demo"), show_default=True, help="Where the demo writes.")
@click.option("--concurrency", "-n", default=8, show_default=True, help="Batches at once.")
def demo(directory: Path, concurrency: int) -> None:
    """Run the whole pipeline on this machine with synthetic imagery whose answer is known.

    Draws lakes into land texture on 80 XYZ tiles, serves them, runs the Lambda's handler
    against a water classifier served with TF Serving's API, stores results in SQLite, and
    writes results.csv, water.geojson and preview.png, then scores the prediction.

    \b
    Example:
      cnsq demo --dir ./cnsq-demo
    """
    from .local.demo import run_demo

    result = run_demo(directory, concurrency=concurrency)
    click.echo(f"Wrote {directory}/results.csv, {directory}/water.geojson and "
               f"{directory}/preview.png.")
    click.echo(f"Demo: {result.tiles} tiles processed in {result.seconds:.1f}s "
               f"({result.rate:.1f} tiles/s); {len(result.predicted)} predicted water tiles, "
               f"{len(result.truth)} in the ground truth: precision {result.precision:.2f}, "
               f"recall {result.recall:.2f}.")
    if result.failed:
        click.echo(f"{result.failed} tiles failed.", err=True)
        sys.exit(1)


def _report_run(report, tiles: Path, out: Path | None, max_missing: float = 1.0) -> None:
    """The run's summary: failures counted by reason with a few examples each, then the exit
    status — 1 when a tile failed, a line was invalid, nothing was written, or more than
    ``max_missing`` of the tiles had no imagery."""
    for number, error in report.invalid[:20]:
        click.echo(f"{tiles}:{number}: {error}", err=True)
    by_reason: dict[str, list[tuple[int, str]]] = {}
    for number, tile, reason in report.failed:
        by_reason.setdefault(reason, []).append((number, tile))
    for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        examples = ", ".join(f"{tile} (line {number})" for number, tile in items[:3])
        more = f" and {len(items) - 3:,} more" if len(items) > 3 else ""
        click.echo(f"{len(items):,} tile(s) failed: {reason}: {examples}{more}", err=True)
    click.echo(f"Processed {report.tiles:,} tiles in {report.seconds:.1f}s ({report.rate:,.1f} "
               f"tiles/s): {report.written:,} written, {report.skipped:,} without imagery, "
               f"{len(report.failed):,} failed, {len(report.invalid):,} invalid lines"
               f"{f'; results in {out}' if out else ''}.", err=True)
    missing = report.skipped / report.tiles if report.tiles else 0.0
    if report.tiles and missing > max_missing:
        click.echo(f"{missing:.0%} of the tiles had no imagery (more than --max-missing "
                   f"{max_missing:.0%}): is the tile endpoint's path right ({{z}}/{{x}}/{{y}})?",
                   err=True)
    if report.failed or report.invalid or (report.tiles and not report.written) \
            or missing > max_missing:
        sys.exit(1)


# One line each in `cnsq --help` (click cuts a docstring's first sentence to fit the terminal).
SHORT_HELP = {
    "init": "Write a starter project (config, and optionally template and Lambda).",
    "compile": "Render the CloudFormation template.",
    "validate": "Lint the template and check the account (preflight).",
    "package": "Build (and upload) the Lambda zips.",
    "deploy": "Deploy the stack through a change set.",
    "outputs": "Print the stack's outputs.",
    "delete": "Delete the stack.",
    "setup": "Create or migrate the results table.",
    "download": "Download the results as CSV.",
    "convert-geojson": "Results CSV → thresholded GeoJSON.",
    "tiles": "List the tiles covering a GeoJSON area.",
    "push": "Send tiles to the queue.",
    "redrive": "Move the dead letter queue back to the tile queue.",
    "status": "The run's numbers and what to change.",
    "verify": "Check every part of the stack (or of a local setup).",
    "tag-logs": "Tag the stack's log groups for cost tracking.",
    "gpu-util": "GPU utilisation of each model instance.",
    "model": "Build a TF Serving image from a SavedModel.",
    "serve": "Serve an ONNX model with TF Serving's REST API.",
    "tileserver": "Serve XYZ tiles from a folder or MBTiles.",
    "work": "Work an SQS queue with the Lambda's handler here.",
    "run": "Run the whole job on this machine.",
    "demo": "The whole pipeline on synthetic tiles, scored.",
}
for _name, _text in SHORT_HELP.items():
    if _name in main.commands:
        main.commands[_name].short_help = _text


if __name__ == "__main__":  # pragma: no cover
    main()
