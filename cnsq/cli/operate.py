"""`cnsq` commands: push, redrive, status, verify, tag-logs, gpu-util and model: running a job on AWS.

Each parses its options and delegates."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from cnsq.cli.app import (
    Settings,
    _duration,
    _finite,
    _model_url,
    _print_json,
    _queue_region,
    _stack_queue_url,
    _stacks,
    config_options,
    flags_of,
    json_option,
    main,
    tabulate,
)
from cnsq.errors import CnsqError


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
    twice. Tiles that fail after retries are written to a file to push again. To a stack that
    scales itself (ecs.minInstances), the push invokes the controller as the first tiles are
    taken, so hosts start at once rather than at the controller's next minute.

    Exit status: 0 when every line was sent; 1 when a line was invalid (every good line was
    still sent, unless --strict), a tile failed after retries, or on any error; 130 when
    interrupted.

    \b
    Examples:
      cnsq push tiles.txt --config config/config.yml
      cnsq push tiles.txt https://sqs.us-east-1.amazonaws.com/123456789012/cnsqdevTileQueue
      PROMISE_THRESHOLD=64 cnsq push tiles.txt --config config/config.yml --deployment prod
    """
    from cnsq.aws import Aws
    from cnsq.ops.push import check_source, controller_kick, default_concurrency, run_push

    check_source(tiles)  # the user's own input before the environment
    if queue_url is not None and not queue_url.strip():
        raise CnsqError("QUEUE_URL is empty (did the command that should print it fail?); "
                        "omit it to use the stack's tile queue with --config")
    from_stack = queue_url is None
    if queue_url is None:
        queue_url = _stack_queue_url(settings)
    concurrency = concurrency or default_concurrency()
    aws = Aws(settings.profile, settings.region or _queue_region(queue_url))
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    controller = settings.deployed().controller_function if from_stack else None
    kick = controller_kick(aws.client("lambda"), controller, say) if controller else None
    # Standard retries, not adaptive: adaptive mode's client-side rate limiter cuts the send
    # rate under throttling far below what SQS takes; push backs off per batch itself.
    sqs = aws.client("sqs", max_pool_connections=concurrency + 4,
                     retries={"mode": "standard", "max_attempts": 4})
    report = run_push(tiles, queue_url, sqs, concurrency=concurrency, strict=strict,
                      resume=resume, restart=restart, failed_file=failed_file,
                      state_dir=Path(".cnsq"), tty=sys.stderr.isatty(), say=say,
                      show=lambda line: click.echo(line, nl=False, err=True), kick=kick)
    if as_json:
        _print_json({"queue": queue_url, "sent": report.sent, "skipped": report.skipped,
                     "resumedFrom": report.resumed_from, "interrupted": report.interrupted,
                     "invalid": [{"line": n, "error": e} for n, e in report.invalid],
                     "failed": [{"line": n, "tile": t, "reason": r} for n, t, r in report.failed],
                     "failedFile": report.failed_file})
    if report.interrupted:
        sys.exit(130)  # as run and work: Ctrl-C or SIGTERM, its place kept for --resume
    if report.invalid or report.failed:
        sys.exit(1)


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
    alone: no config, no AWS (a local setup); the endpoint's {token} is TILE_ACCESS_TOKEN.

    \b
    Examples:
      cnsq verify --config config/config.yml --tile 9646-12319-15
      cnsq verify --database-url sqlite:///results.db --tile 1-2-3 \
        --model-endpoint http://127.0.0.1:8501/v1/models/water \
        --tile-endpoint 'http://127.0.0.1:8000/{z}/{x}/{y}.png'
    """
    from cnsq.ops.verify import Target, build_target, run_checks, tile_url_from_template
    from cnsq.tiles import parse_tile_id
    from download_and_predict.masking import register_secret

    try:
        parse_tile_id(tile_id)
    except ValueError as exc:
        raise CnsqError(f"--tile {tile_id}: {exc}") from None
    model_endpoint = _model_url(model_endpoint)
    if database_url and model_endpoint and tile_endpoint:
        # {token} is filled from TILE_ACCESS_TOKEN, as run, work and view fill it.
        token = os.environ.get("TILE_ACCESS_TOKEN") or None
        register_secret(token)
        target = Target(stack_name=None, stack_status=None, queue_url=None, dead_letter_url=None,
                        database_url=lambda: database_url, model_endpoint=model_endpoint,
                        tile_url=tile_url_from_template(tile_endpoint, tile_id, token),
                        tile_id=tile_id)
        checks = run_checks(target, sqs=None, name_of=flags_of(click.get_current_context().command))
    else:
        deployed = settings.deployed()
        target = build_target(deployed, database_url=database_url,
                              model_endpoint=model_endpoint, tile_endpoint=tile_endpoint,
                              tile_id=tile_id)
        checks = run_checks(target, deployed.aws.client("sqs"),
                            name_of=flags_of(click.get_current_context().command))
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
    from cnsq.ops.tag_logs import log_group_names, tag_log_groups

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
    from cnsq.ops.gpu import SshRunner, SsmRunner, discover, gpu_rows

    if not ssm and not ssh_key:
        raise CnsqError("pass SSH_KEY (a .pem file) or --ssm")
    deployed = settings.deployed()
    aws = deployed.aws
    instances = discover(aws.client("ecs"), aws.client("ec2"), deployed.cluster)
    if not instances:
        if as_json:
            _print_json({"instances": []})
            return
        click.echo("The cluster has no container instances (is ecs.desiredInstances 0?).")
        return
    runner = SsmRunner(aws.client("ssm")) if ssm else SshRunner(ssh_key or "", user)
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
    from cnsq.ops import model_image as image

    image.check_source(source)  # the user's own input before Docker and AWS
    aws = None
    if source.startswith("s3://") or push_:
        from cnsq.aws import Aws

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
            if push_ and aws is not None:  # push_ made aws above
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

    from cnsq.ops.redrive import Journal, sample
    from cnsq.ops.redrive import redrive as move

    aws = settings.aws()
    if not (queue_url and dlq_url):
        deployed = settings.deployed("no --queue-url and --dlq-url given")
        deployed.require()
        queue_url, dlq_url = queue_url or deployed.queue_url, dlq_url or deployed.dead_letter_url
        if not (queue_url and dlq_url):
            raise CnsqError(f"stack {deployed.stack_name} has no tile queue and dead letter queue")
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
    to drain, and the diagnosis (thresholds in `cnsq.ops.status.THRESHOLDS`, see docs/operating.md).

    \b
    Example:
      cnsq status --config config/config.yml --since 30m --watch
    """

    from cnsq.ops.estimate import imagery_way
    from cnsq.ops.pricing import prices_for
    from cnsq.ops.status import as_dict, collect, diagnose, render, window_cost

    window = _duration(since)
    deployed = settings.deployed()
    deployed.require()
    config = deployed.config
    lam = deployed.worker or {"timeout": 300, "concurrent": None}
    ecs = config.values["ecs"]
    prices, note = prices_for(settings.aws().session, settings.aws().session.region_name or
                              "us-east-1", ecs["instanceType"], config.values["rds"]["instanceType"],
                              want_spot=ecs["spot"] > 0)
    # The imagery's way out, as estimate and preflight see it (only the NAT bills per GB).
    way, _ = imagery_way(config.values, settings.aws().session.region_name or "us-east-1")
    # Without --database-url, the stack's admin function counts the rows (see status.collect).
    while True:
        metrics = collect(deployed, window, database_url)
        metrics.cost = {i.name: i.cost for i in window_cost(metrics, config.values, prices,
                                                            egress=way).items}
        metrics.prices = note or f"Prices: {prices.source}."
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


def _finite_option(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    return _finite(value)


@main.command()
# At most 10^13 tiles: the whole world at zoom 21 is 4.4 x 10^12.
@click.argument("tiles", type=click.IntRange(1, 10**13))
@config_options
@click.option("--offline", is_flag=True, help="Use the prices shipped with cnsq; ask no API.")
@click.option("--tiles-per-second", type=click.FloatRange(min=0.001, max=1e6), default=None,
              callback=_finite_option,
              help="One model task's (one GPU's) rate, measured or published [default: 121, "
                   "the simulation's: full batches of 64 tiles].")
@click.option("--call-seconds", type=click.FloatRange(min=0.001, max=900), default=None,
              callback=_finite_option,
              help="What one worker call of sqs.batchSize tiles waits for: downloads, the "
                   "model, the write; its CPU is added by the memory's share of a vCPU "
                   "[default: 1.2, the simulation's reference job].")
@click.option("--tile-kb", type=click.FloatRange(min=0.001, max=1e6), default=None,
              callback=_finite_option, help="One image's size [default: 40].")
@click.option("--instance-price", type=click.FloatRange(min=0, max=1e4), default=None,
              callback=_finite_option, metavar="USD",
              help="The GPU hosts' price an hour, for an instance type without a listed price "
                   "(or your discount) [default: the Price List's, else the shipped one].")
@click.option("--database-price", type=click.FloatRange(min=0, max=1e4), default=None,
              callback=_finite_option, metavar="USD",
              help="The database's price an hour, likewise.")
@click.option("--egress", type=click.Choice(["auto", "nat", "ipv6", "s3"]), default="auto",
              show_default=True,
              help="How the imagery leaves the stack's network: auto resolves TILE_ENDPOINT's "
                   "host (S3 in the region: the gateway endpoint; IPv6 with a dual-stack "
                   "network: the egress-only gateway; else the NAT, the only one billed per GB).")
@json_option
def estimate(settings: Settings, tiles: int, offline: bool, tiles_per_second: float | None,
             call_seconds: float | None, tile_kb: float | None, instance_price: float | None,
             database_price: float | None, egress: str, as_json: bool) -> None:
    """The time and the cost of TILES tiles with this config, item by item.

    Prices are this region's from the AWS Price List API (pricing:GetProducts), or, offline or
    when the API cannot be read, the dated prices shipped with cnsq (said when used). The
    figures the config does not hold are options, with documented defaults (docs/operating.md,
    "Cost"): a model task's rate, a call's duration, a tile's size.

    \b
    Examples:
      cnsq estimate 1000000 --config config/config.yml
      cnsq estimate 250000 --config config/config.yml --tiles-per-second 60 --offline
      cnsq estimate 1000000 --egress nat   # as if the imagery answered over IPv4 only
      cnsq estimate 1000000 --instance-price 2.24   # an instance type without a listed price
    """
    from cnsq.ops.estimate import PerTile, imagery_way
    from cnsq.ops.estimate import estimate as run_estimate
    from cnsq.ops.pricing import prices_for, with_given

    if settings.config.exists():
        config = settings.load()
    else:  # a clone without a project yet: what the example config would cost, said so
        from cnsq.config import load_config
        from cnsq.shipped import shipped

        example = shipped("config") / "config.example.yml"
        config = load_config(example, settings.deployment, env_file=example.with_name(
            ".env.sample"), stack=settings.stack, environ={})
        click.echo(f"No {settings.config}: the example config's values ({example.name}).",
                   err=True)
    values = config.values
    session = None if offline else settings.aws().session
    region = settings.region_and_source()[0] or (session.region_name if session else None) \
        or "us-east-1"
    prices, note = prices_for(session, region, values["ecs"]["instanceType"],
                              values["rds"]["instanceType"], want_spot=values["ecs"]["spot"] > 0)
    prices, given_notes = with_given(prices, values["ecs"]["instanceType"], instance_price,
                                     values["rds"]["instanceType"], database_price)
    way, imagery = imagery_way(values, region, egress)
    given = {"tiles_per_second": tiles_per_second, "call_seconds": call_seconds,
             "tile_kb": tile_kb}
    per = PerTile(**{k: v for k, v in given.items() if v is not None})
    result = run_estimate(tiles, values, prices, per, egress=way)
    result.notes[:0] = [imagery, *given_notes]
    if as_json:
        _print_json({"tiles": tiles, "seconds": result.seconds, "hosts": result.hosts,
                     "egress": way,
                     "total": result.bill.total, "perMillion": result.per_million,
                     "items": [i.__dict__ for i in result.bill.items], "idle": result.idle.total,
                     "standingPerDay": result.standing_per_day, "prices": prices.source,
                     "notes": ([note] if note else []) + result.notes})
        return
    hours, minutes = divmod(round(result.seconds / 60), 60)
    click.echo(f"{tiles:,} tiles on {config.stack_name}: about {hours}h{minutes:02d}m, "
               f"${result.bill.total:,.2f} (${result.per_million:,.2f} per million tiles)")
    click.echo(tabulate(result.bill.rows(), headers=["Item", "Quantity", "Price", "Cost"]))
    for line in ([note] if note else []) + result.notes:
        click.echo(f"  {line}")
