"""What every cnsq command shares: the click group, the config/AWS options and Settings that
build config, AWS clients and stacks, the terminal UI, one-line errors, and small helpers."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from cnsq import __version__
from cnsq.errors import CnsqError
from cnsq.interrupt import raise_when_safe
from download_and_predict.errors import HandlerError


class ClickUI:
    """The deploy UI on a terminal (see :class:`cnsq.deploy.plan.UI`)."""

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


def tabulate(rows: Any, **options: Any) -> str:
    """tabulate's text of ``rows``: imported when a table is first drawn, as tabulate (with
    wcwidth) was a third of the time every command took to start."""
    from tabulate import tabulate as draw

    return draw(rows, **options)


@dataclass
class Settings:
    """What every AWS/config command shares. The config, the AWS session and the deployed
    stack are each built once per command, when first asked for."""

    config: Path
    deployment: str | None
    env_file: Path | None
    stack: str | None
    region: str | None
    profile: str | None
    _loaded: Any = field(default=None, init=False, repr=False)
    _aws: Any = field(default=None, init=False, repr=False)
    _deployed: Any = field(default=None, init=False, repr=False)

    def load(self):
        """The validated config (its warnings said once)."""
        if self._loaded is None:
            from cnsq.config import load_config
            from download_and_predict.masking import register_secret

            loaded = load_config(self.config, self.deployment, self.env_file, self.stack)
            for secret in loaded.secrets.values():  # hidden from every message from here on
                register_secret(secret.value)
            for warning in loaded.warnings:
                click.echo(f"warning: {warning}", err=True)
            self._loaded = loaded
        return self._loaded

    def aws(self):
        if self._aws is None:
            from cnsq.aws import Aws

            # The config's `region` counts for every command that has a config: load it first.
            if self._loaded is None and self.config.exists():
                try:
                    self.load()
                except Exception:  # noqa: BLE001 - the command that needs it reports it
                    pass

            self._aws = Aws(self.profile, self.region_and_source()[0])
        return self._aws

    def region_and_source(self) -> tuple[str | None, str]:
        """The region AWS calls go to, and where it was chosen: the command line and the
        environment win, then the config's ``region`` (once the config is loaded), then the
        profile's."""
        import os

        if self.region:
            return self.region, "--region or AWS_REGION"
        if os.environ.get("AWS_DEFAULT_REGION"):
            return os.environ["AWS_DEFAULT_REGION"], "AWS_DEFAULT_REGION"
        if self._loaded is not None and self._loaded.values.get("region"):
            return self._loaded.values["region"], f"region in {self.config}"
        return None, "the AWS profile"

    def deployed(self, why: str = "the deployed stack"):
        """Where the stack's parts are (:class:`cnsq.stack.deployed.Deployed`).

        Raises:
            CnsqError: there is no config to find the stack by (``why`` says what was wanted).
        """
        if self._deployed is None:
            if not self.config.exists():
                raise CnsqError(f"{why}: {self.config} does not exist (pass --config)")
            from cnsq.stack.deployed import Deployed

            aws = self.aws()
            self._deployed = Deployed(self.load(), aws, _stacks(aws))
        return self._deployed

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
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return str(value)

    # allow_nan=False: NaN and Infinity are not JSON; a reader of --json would choke on them.
    click.echo(json.dumps(data, indent=2, default=default, allow_nan=False))


def _paths(config):
    from cnsq.deploy.plan import Paths
    from cnsq.shipped import templates_dir

    return Paths(templates=templates_dir(config.project_dir), build=Path(".cnsq"))


def _stacks(aws, poll: float = 5.0):
    from cnsq.deploy.cloudformation import Stacks

    return Stacks(aws.client("cloudformation"), aws.client("s3"), poll_seconds=poll,
                  autoscaling=aws.client("autoscaling"), ssm=aws.client("ssm"))


def _mask(text: str) -> str:
    from download_and_predict.masking import mask  # the one redaction function

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


_signalled: list[int] = []  # the signals this command received


def _terminate(signum: int, frame: Any) -> None:
    try:
        raise_when_safe(signum, frame)  # not inside logging or an import: a moment later
    except KeyboardInterrupt:
        _signalled.append(signum)
        raise


def flags_of(command: click.Command | None) -> Callable[[str], str]:
    """How the CLI names a library function's parameter in a message: the command's flag for
    it (its long form), else the parameter's own name (library errors never name flags)."""
    params = {param.name: param for param in (command.params if command else [])}

    def name_of(parameter: str) -> str:
        param = params.get(parameter)
        negative = params.get(parameter.removeprefix("no_"))
        if param is None and isinstance(negative, click.Option) and negative.secondary_opts:
            return negative.secondary_opts[0]  # "no_warmup": --warmup/--no-warmup's second
        if isinstance(param, click.Option):
            return next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if isinstance(param, click.Argument):
            return param.human_readable_name
        return parameter

    return name_of


class CnsqGroup(click.Group):
    """Turns CnsqError and AWS errors into one line on stderr and exit 1 (--debug: traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        import signal
        import threading

        previous = {}
        if threading.current_thread() is threading.main_thread():
            # SIGTERM as Ctrl-C: the long commands stop cleanly on either (cnsq.interrupt).
            # Both are noted as they arrive (Python's own Ctrl-C handler is replaced, not a
            # calling program's), so that one a library turned into another error still reads
            # as an interruption below.
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, _terminate)
        _signalled.clear()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Ctrl-C where no command handles it (starting up, building, between steps):
            # one line and 130, never click's "Aborted!" and 1.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`cnsq … | head`): stop quietly, as a command a closed pipe
            # ends does, and let nothing flush into it again at exit.
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (CnsqError, HandlerError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            said = exc.worded(flags_of(self.commands.get(ctx.invoked_subcommand or ""))) \
                if isinstance(exc, CnsqError) else str(exc)
            click.echo(f"Error: {_mask(said)}", err=True)
            sys.exit(getattr(exc, "exit_code", 1))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - one line each; --debug shows the traceback
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if _signalled:  # e.g. numpy's tofile made a TypeError of a Ctrl-C
                click.echo("\nInterrupted.", err=True)
                sys.exit(130)
            from cnsq.aws import explain  # imported here: boto3 is slow to load, and most commands need none

            message = explain(exc) or _describe(exc)
            click.echo(f"Error: {_mask(message)}", err=True)
            sys.exit(1)
        finally:
            for sig, handler in previous.items():  # as they were (a calling program's stay)
                signal.signal(sig, handler)


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


def _finish(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))


def _database_url(explicit: str | None, settings: Settings) -> str:
    """An explicit URL, else the deployed stack's database."""
    if explicit:
        return explicit
    return settings.deployed("no database given: pass a database URL (or set DATABASE_URL), "
                             "or --config for a deployed stack").database_url()


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
    return settings.deployed().admin


def _queue_region(queue_url: str) -> str | None:
    """us-east-1 from https://sqs.us-east-1.amazonaws.com/123456789012/Queue."""
    import re

    # https://sqs.REGION.amazonaws.com/… and the legacy https://REGION.queue.amazonaws.com/…
    match = re.match(r"https://(?:sqs\.([a-z0-9-]+)|([a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?/",
                     queue_url)
    return (match.group(1) or match.group(2)) if match else None


def _stack_queue_url(settings: Settings) -> str:
    """The deployed stack's tile queue, for push and work."""
    return settings.deployed("no queue URL given and no config to read the stack's from"
                             ).require_queue_url()


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


def _view_command(results: Path, tile_endpoint: str) -> str:
    """``cnsq view …`` for a run's results over its imagery, to paste (a token written into the
    URL itself is masked: the command says ``{token}`` only where the template does)."""
    import shlex

    from download_and_predict.masking import mask

    return shlex.join(["cnsq", "view", str(results), "--tile-endpoint", mask(tile_endpoint)])


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


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise click.BadParameter(f"expected a duration like 15m, 2h or 1d, got {text!r}")
    return timedelta(seconds=int(text[:-1]) * units[text[-1]])


def _wait_forever(what: str, announce: Callable[[], None] | None = None) -> None:
    """Wait until Ctrl-C or SIGTERM (a server's end), say what stopped, and exit 130.

    ``announce`` says the server is ready (its URL): it is called once Ctrl-C is handled here,
    so a Ctrl-C sent as soon as the URL is read stops the server cleanly (sent between the two,
    it was the bare "Interrupted." and exit 130)."""
    from cnsq.interrupt import Stop

    with Stop() as stop:
        if announce is not None:
            announce()
        while not stop.requested:
            time.sleep(0.2)
    click.echo(f"\nStopped {what}.", err=True)
    # Interrupted, as every command says it (130): a script that stops a server sees why.
    sys.exit(130)


def _report_run(report, tiles: Path, out: Path | None, max_missing: float = 1.0,
                next_step: str | None = None) -> None:
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
    if next_step and report.written:
        click.echo(f"Look at them on a map: {next_step}", err=True)
    missing = report.skipped / report.tiles if report.tiles else 0.0
    if report.tiles and missing > max_missing:
        click.echo(f"{missing:.0%} of the tiles had no imagery (more than --max-missing "
                   f"{max_missing:.0%}): is the tile endpoint's path right ({{z}}/{{x}}/{{y}})?",
                   err=True)
    if report.failed or report.invalid or (report.tiles and not report.written) \
            or missing > max_missing:
        sys.exit(1)
