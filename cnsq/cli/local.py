"""`cnsq` commands: serve, tileserver, work, run and demo: the pipeline on one machine.

Each parses its options and delegates."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from cnsq.cli.app import (
    Settings,
    _clock,
    _one_output,
    _predict_url,
    _print_json,
    _queue_region,
    _report_run,
    _stack_queue_url,
    _view_command,
    _wait_forever,
    config_options,
    json_option,
    main,
)
from cnsq.errors import CnsqError


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
    from cnsq.local import serve as server

    model_path = Path(_one_output(str(model_path) if model_path else None,
                                  str(model_option) if model_option else None, "MODEL.onnx"))
    running = server.start(model_path, port, name, max_batch, batch_timeout_ms, host, batch_threads,
                           switch_interval=server.SWITCH_INTERVAL, warmup=warmup)
    _wait_forever("the model server", lambda: click.echo(
        f"Serving {model_path} at http://{host}:{running.httpd.server_address[1]}"
        f"/v1/models/{name}:predict (Ctrl-C stops)", err=True))
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
    from cnsq.local import tileserver as tiles

    running = tiles.start(source, port, host)
    _wait_forever("the tile server", lambda: click.echo(
        f"Serving {source} at http://{host}:{running.httpd.server_address[1]}"
        "/{z}/{x}/{y}.png (Ctrl-C stops)", err=True))
    running.close()


def _concurrency(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """A number of calls at once, or 'auto' (None): decided as the run goes."""
    if value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"a number of calls or 'auto', got {value!r}") from None
    if number < 1:
        raise click.BadParameter("at least 1")
    return number


@main.command()
@click.option("--queue-url", help="The SQS tile queue [default: the stack's, read with --config].")
@click.option("--database-url", envvar="DATABASE_URL", default="sqlite:///results.db",
              show_default=True, help="Where results go.")
@click.option("--model-endpoint", "--prediction-endpoint", "model_endpoint",
              envvar="PREDICTION_ENDPOINT",
              help="The model: …/v1/models/NAME (as verify and the stack's modelEndpoint "
                   "output write it; a trailing :predict is accepted too) [default: the stack's, "
                   "reachable inside its VPC].")
@click.option("--tile-endpoint", envvar="TILE_ENDPOINT",
              help="Imagery URL template, e.g. https://…/{z}/{x}/{y}.jpg?access_token={token} "
                   "[default: the config's TILE_ENDPOINT and token].")
@click.option("--concurrency", "-n", default="auto", show_default=True, callback=_concurrency,
              help="Pollers at once: 'auto' decides as the work goes (from 4), with the stack "
                   "controller's rules over this worker's own measurements; a number fixes it.")
@click.option("--batch-size", type=click.IntRange(1, 10),
              help="Messages per receive (SQS allows 10), like the event source's batch size "
                   "[default: the config's sqs.batchSize, at most 10; else 10].")
@click.option("--wait-seconds", default=20, show_default=True, type=click.IntRange(0, 20),
              help="Long-poll wait.")
@click.option("--until-empty", is_flag=True, help="Stop when nothing is waiting or in flight.")
@config_options
def work(settings: Settings, queue_url: str | None, database_url: str,
         model_endpoint: str | None, tile_endpoint: str | None, concurrency: int | None,
         batch_size: int | None, wait_seconds: int, until_empty: bool) -> None:
    """Poll an SQS queue and run the Lambda's handler here (a laptop or an EC2 box).

    Succeeded records are deleted; failures come back after the visibility timeout and, after
    maxReceiveCount, go to the dead letter queue — as with the Lambda. With --config, what is
    not given comes from the stack: its tile queue and model endpoint, the config's tile
    endpoint (and token) and batch size.

    \b
    Example:
      cnsq work --queue-url "$QUEUE" --model-endpoint http://127.0.0.1:8501/v1/models/model \\
        --tile-endpoint 'http://127.0.0.1:8000/{z}/{x}/{y}.png' --until-empty
    """
    import os

    from cnsq.aws import Aws
    from cnsq.local.worker import work as run_work
    from cnsq.results.store import open_store
    from download_and_predict.handler import build

    queue_url = queue_url or _stack_queue_url(settings)
    token = None
    if not (model_endpoint and tile_endpoint and batch_size) and settings.config.exists():
        deployed = settings.deployed()
        model_endpoint = model_endpoint or deployed.model_endpoint
        if not tile_endpoint:
            tile_endpoint, token = deployed.tile_endpoint
        batch_size = batch_size or min(deployed.batch_size, 10)
    if not model_endpoint:
        raise click.UsageError("missing --model-endpoint (or --config for a deployed stack's)")
    if not tile_endpoint:
        raise click.UsageError("missing --tile-endpoint (or --config for a deployed stack's)")
    store = open_store(database_url)
    store.migrate()
    store.close()
    env = {**os.environ, "TILE_ENDPOINT": tile_endpoint,
           "PREDICTION_ENDPOINT": _predict_url(model_endpoint), "DATABASE_URL": database_url}
    if token and not env.get("TILE_ACCESS_TOKEN"):
        env["TILE_ACCESS_TOKEN"] = token
    app = build(env)
    auto = None
    if concurrency is None:
        from cnsq.local.pipeline import AUTO_MOST, AutoConcurrency, _stats_reader

        stats = _stats_reader(_predict_url(model_endpoint))
        auto = AutoConcurrency(stats, 0, start=4, high=AUTO_MOST,
                               timeout=app.settings.predict_timeout,
                               needs_stats=stats() is not None)
        concurrency = AUTO_MOST
    sqs = Aws(settings.profile, settings.region or _queue_region(queue_url)).client(
        "sqs", max_pool_connections=concurrency + 4)
    started = time.monotonic()

    def progress(report) -> None:
        rate = report.received / max(time.monotonic() - started, 1e-6)
        click.echo(f"\r{report.received:,} records, {rate:,.1f}/s, {report.failed:,} failed   ",
                   nl=False, err=True)

    report = run_work(sqs, queue_url, app, concurrency=concurrency, batch_size=batch_size or 10,
                      wait_seconds=wait_seconds, until_empty=until_empty,
                      progress=progress if sys.stderr.isatty() else None, auto=auto)
    if auto is not None:
        for line in auto.decisions:
            click.echo(f"concurrency: {line}", err=True)
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
@click.option("--concurrency", "-n", default="auto", show_default=True, callback=_concurrency,
              help="Handler calls at once: 'auto' decides as the run goes (from 16) with the "
                   "stack controller's rules — the model's busy share, the calls' durations, its "
                   "failures, and whether more calls still gain tiles per second; a number fixes it.")
@click.option("--batch-size", default=10, show_default=True, help="Tiles per handler call.")
@click.option("--max-batch", default=32, show_default=True, help="Instances per inference call.")
@click.option("--max-missing", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Exit 1 when more than this share of tiles had no imagery (a wrong URL path "
                   "looks like that).")
@json_option
def run_cmd(tiles: Path, tile_endpoint: str, model_path: Path, out: Path, database_url: str | None,
            concurrency: int | None, batch_size: int, max_batch: int, max_missing: float,
            as_json: bool) -> None:
    """Run the whole job on this machine: tiles → handler → model server → results → CSV.

    The same handler as on AWS, with an in-process queue instead of SQS, a model server started
    for the run and SQLite results. Failures are listed at the end with their reasons.

    \b
    Example:
      cnsq run tiles.txt --tile-endpoint 'https://tiles.example.com/{z}/{x}/{y}.png' \\
        --model buildings.onnx --out results.csv
    """
    from cnsq.local.pipeline import run

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

    from cnsq.files import writable_target

    writable_target(str(out), None if str(tiles) == "-" else tiles)
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
                 max_batch, progress, lambda line: click.echo(f"concurrency: {line}", err=True))
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
    view = _view_command(out, tile_endpoint)
    if report.interrupted:
        try:
            _report_run(report, tiles, out, max_missing, view)
        finally:
            sys.exit(130)
    _report_run(report, tiles, out, max_missing, view)


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("cnsq-demo"), show_default=True, help="Where the demo writes.")
@click.option("--concurrency", "-n", default=8, show_default=True, help="Batches at once.")
@click.option("--imagery", type=click.Choice(["xyz", "cog"]), default="xyz", show_default=True,
              help="xyz: tiles served by cnsq tileserver; cog: the same picture as one COG in "
                   "a UTM projection, read by the worker itself with range requests (needs "
                   "the [cog] extra: rio-tiler).")
def demo(directory: Path, concurrency: int, imagery: str) -> None:
    """Run the whole pipeline on this machine with synthetic imagery whose answer is known.

    Draws lakes into land texture on 80 XYZ tiles, serves them (or, with --imagery cog, the
    same picture as one UTM COG), runs the Lambda's handler against a water classifier served
    with TF Serving's API, stores results in SQLite, and writes results.csv, water.geojson and
    preview.png, then scores the prediction.

    \b
    Examples:
      cnsq demo --dir ./cnsq-demo
      cnsq demo --dir ./cnsq-demo-cog --imagery cog
    """
    from cnsq.local.demo import run_demo

    if imagery == "cog":
        from cnsq.imagery import raster_libraries

        raster_libraries()
    result = run_demo(directory, concurrency=concurrency, imagery=imagery)
    click.echo(f"Wrote {directory}/results.csv, {directory}/water.geojson and "
               f"{directory}/preview.png.")
    click.echo(f"Demo: {result.tiles} tiles processed in {result.seconds:.1f}s "
               f"({result.rate:.1f} tiles/s); {len(result.predicted)} predicted water tiles, "
               f"{len(result.truth)} in the ground truth: precision {result.precision:.2f}, "
               f"recall {result.recall:.2f}.")
    click.echo("Look at them on a map: "
               + _view_command(directory / "results.csv", str(directory / "tiles")) + " --open")
    if result.failed:
        click.echo(f"{result.failed} tiles failed.", err=True)
        sys.exit(1)
