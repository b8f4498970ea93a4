"""``cnsq run``: the whole job on one machine with the Lambda's own handler.

Tiles become SQS-shaped events of ``batch_size`` records (an in-process queue instead of SQS),
``concurrency`` of them run at once through ``DownloadAndPredict.process``, predictions come from
a model server started for the run, results go to SQLite (or PostgreSQL), then to CSV.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from cnsq.errors import CnsqError, option
from cnsq.interrupt import Stop
from cnsq.local import serve
from cnsq.local.serve import STATS_PATH
from cnsq.results.download import download
from cnsq.results.store import open_store
from cnsq.tiles import Line, read_lines
from download_and_predict.errors import StepFailed
from download_and_predict.handler import build
from download_and_predict.masking import mask
from download_and_predict.scaling import Bounds, Memory, Observed, Signals, step
from download_and_predict.schema import sqlite_path
from download_and_predict.tiles import Tile, is_image, tile_id

# The model server `run` starts shares the CPU with the downloads and writes. Two batches at once,
# each on half the cores, keep inference going while a handler thread takes a core: one batch on
# all cores stalls at every operator whose other half was preempted (measured: docs/performance.md).
MODEL_BATCH_THREADS = 2


@dataclass
class RunReport:
    tiles: int = 0
    written: int = 0
    skipped: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # line, tile, reason
    seconds: float = 0.0
    interrupted: bool = False  # Ctrl-C or SIGTERM: the tiles after the last batch were not run

    @property
    def rate(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0


def events(lines: Iterable[Line], batch_size: int, report: RunReport) -> Iterator[dict]:
    """SQS-shaped events; each record's messageId is its line number."""
    records: list[dict] = []
    for line in lines:
        if line.tile is None:
            report.invalid.append((line.number, line.error or "invalid"))
            continue
        tile = line.tile
        records.append({"messageId": str(line.number), "receiptHandle": str(line.number),
                        "body": json.dumps({"x": tile.x, "y": tile.y, "z": tile.z}),
                        "attributes": {"ApproximateReceiveCount": "1"}, "eventSource": "cnsq:local"})
        if len(records) == batch_size:
            yield {"Records": records}
            records = []
    if records:
        yield {"Records": records}


# Failure reasons that say the model could not answer in time or at all (the controller's errors).
MODEL_FAILURES = {"model_error", "model_timeout", "model_connection", "deadline", "prediction_count"}


class AutoConcurrency:
    """``--concurrency auto``: every ``interval`` seconds the stack's controller's step
    (download_and_predict.scaling.step) reads this run's own measurements — calls finished
    and their durations, model failures, the tiles left, and how busy the model server was
    (``busy()``: its batch threads' busy seconds, and how many) — and sets how many handler
    calls run at once."""

    def __init__(self, busy: Callable[[], tuple[float, int] | None], total_tiles: int,
                 start: int = 4, high: int = 64, interval: float = 2.0, timeout: float = 60.0,
                 needs_stats: bool = True):
        """``needs_stats``: the model's stats path answering is how it is known to be up
        (cnsq serve); False for a server without one (TF Serving): its failures tell instead."""

        self.needs_stats = needs_stats
        self.busy, self.total, self.limit = busy, total_tiles, start
        # One model server: one task, whatever the work; calls from one up.
        self.bounds = Bounds(low=1, high=high)
        self.interval, self.timeout = interval, timeout
        self.durations: list[float] = []
        self.failures = 0
        self.tiles_done = 0
        self.memory = Memory()  # what the controller's step keeps between intervals
        self.receiving = True
        self.last = time.monotonic()
        self.last_busy = busy()
        self.decisions: list[str] = []

    def finished(self, seconds: float, failed_reasons: Iterable[str], written: int = 0) -> None:
        self.durations.append(seconds)
        self.failures += any(reason in MODEL_FAILURES for reason in failed_reasons)
        self.tiles_done += written

    def tick(self, submitted_tiles: int, in_flight_tiles: int, backlog: int | None = None) -> None:
        """``backlog``: tiles waiting, when known directly (a queue's count); else the total
        less those submitted."""

        now = time.monotonic()
        if now - self.last < self.interval:
            return
        busy_now = self.busy()
        busy_percent = None
        if busy_now is not None and self.last_busy is not None:
            busy_percent = min(100.0, 100.0 * (busy_now[0] - self.last_busy[0])
                               / ((now - self.last) * max(1, busy_now[1])))
        ordered = sorted(self.durations)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None
        waiting = backlog if backlog is not None else self.total - submitted_tiles
        signals = Signals(healthy=busy_now is not None or not self.needs_stats, backlog=waiting,
                          in_flight=in_flight_tiles, calls=len(self.durations),
                          model_errors=self.failures, p95_seconds=p95,
                          timeout_seconds=self.timeout, busy_percent=busy_percent,
                          throughput=self.tiles_done / (now - self.last))
        # The stack's controller's own step (download_and_predict.scaling.step), fed this run's
        # readings: the same decisions as on AWS, with one model task.
        self.memory, actions = step(self.memory, Observed(
            now, signals, healthy_tasks=int(signals.healthy), desired_tasks=1,
            applied=self.limit, receiving=self.receiving), self.bounds)
        if actions.concurrency != self.limit:
            self.decisions.extend(actions.lines)
        self.limit, self.receiving = actions.concurrency, actions.receive
        self.last, self.last_busy = now, busy_now
        self.durations, self.failures, self.tiles_done = [], 0, 0


def run_pipeline(lines: Iterable[Line], app, concurrency: int = 16, batch_size: int = 10,
                 progress: Callable[[RunReport], None] | None = None,
                 auto: AutoConcurrency | None = None) -> RunReport:
    """Run every tile through ``app.process``; failures are kept with their reasons. With
    ``auto``, how many calls run at once is decided as the run goes (``concurrency`` is then the
    most)."""
    report = RunReport()
    started = time.perf_counter()
    in_flight: dict = {}
    last = 0.0
    submitted = 0

    def timed(event: dict):
        began = time.monotonic()
        outcome = app.process(event)
        if auto is not None:
            auto.finished(time.monotonic() - began, outcome.failed.values(), outcome.written)
        return outcome

    def limit() -> int:
        return auto.limit if auto is not None else concurrency

    def collect(done) -> None:
        for future in done:
            event = in_flight.pop(future)
            outcome = future.result()
            report.tiles += outcome.records
            report.written += outcome.written
            report.skipped += outcome.skipped
            for record in event["Records"]:
                reason = outcome.failed.get(record["messageId"])
                if reason:
                    tile = json.loads(record["body"])
                    report.failed.append((int(record["messageId"]),
                                          tile_id(Tile(**tile)), reason))


    with Stop() as stop, ThreadPoolExecutor(max_workers=concurrency) as pool:
        for event in events(lines, batch_size, report):
            if stop.requested:  # Ctrl-C or SIGTERM: take no more; finish what is in flight
                report.interrupted = True
                break
            in_flight[pool.submit(timed, event)] = event
            submitted += len(event["Records"])
            while len(in_flight) >= (limit() if auto is not None else 2 * concurrency):
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED, timeout=1.0)
                collect(done)
                if auto is not None:
                    auto.tick(submitted, sum(len(e["Records"]) for e in in_flight.values()))
            now = time.perf_counter()
            if progress and now - last > 0.25:
                report.seconds = now - started
                progress(report)
                last = now
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            collect(done)
        report.interrupted = report.interrupted or stop.requested
    report.seconds = time.perf_counter() - started
    report.failed.sort()
    if progress:
        progress(report)
    return report


def probe(app, tile) -> None:
    """Fetch the first tile and predict it before the run: a dead or wrong tile endpoint, or a
    model that refuses the imagery, is one clear error instead of one line per tile.

    A 404 is no verdict (coverage can be sparse): --max-missing judges the run's share.

    Raises:
        CnsqError: the tile could not be fetched, is not an image, or the model refused it.
    """

    where = f"the first tile, {tile_id(tile)}"
    try:
        image = app.get_image(Tile(tile.x, tile.y, tile.z))
    except StepFailed as exc:
        raise CnsqError(f"the tile endpoint failed for {where}: {mask(str(exc))}; nothing was "
                        f"run (check {option('tile_endpoint')})") from None
    if image is None:
        return
    if not is_image(image):
        raise CnsqError(f"the tile endpoint answered {where} with something that is not an image "
                        f"({len(image)} bytes starting {image[:16]!r}); nothing was run")
    try:
        app.post_prediction(app.build_payload([image]))
    except StepFailed as exc:
        raise CnsqError(f"the model refused {where}: {mask(str(exc))}; nothing was run") from None


# Where auto starts: the fixed value that kept both of the model server's batches full on a
# 2-core machine (bench.py pipeline); the controller moves it from there.
AUTO_START = 16
AUTO_MOST = 64  # the most calls at once --concurrency auto goes to


def run(tiles: Path, tile_endpoint: str, model: Path, out_csv: Path | None, database_url: str,
        concurrency: int | None = 16, batch_size: int = 10, max_batch: int = 32,
        progress: Callable[[RunReport], None] | None = None,
        decisions: Callable[[str], None] | None = None, imagery: str | None = None) -> RunReport:
    """Start a model server, run the tiles through the handler, write the results CSV.

    ``concurrency`` None: decided as the run goes (:class:`AutoConcurrency`); each change is
    told to ``decisions``. ``imagery``: COG or STAC imagery for the worker to read itself (its
    ``IMAGERY`` JSON), instead of ``tile_endpoint``."""

    own = Path(sqlite_path(database_url)) if database_url.startswith("sqlite:") else None
    new_file = own is not None and not own.exists()
    server = serve.spawn(model, name="model", max_batch=max_batch, batch_threads=MODEL_BATCH_THREADS)
    try:
        store = open_store(database_url)
        store.migrate()
        # The environment first, as on Lambda: proxies, CA bundle, RETRIES, TILE_TIMEOUT, …
        most = concurrency or AUTO_MOST
        where = {"IMAGERY": imagery} if imagery else {"TILE_ENDPOINT": tile_endpoint}
        app = build({**os.environ, **where, "PREDICTION_ENDPOINT": server.endpoint,
                     "DATABASE_URL": database_url, "MAX_INSTANCES": str(max_batch),
                     # The download threads are shared by the batches in flight: room for all.
                     "DOWNLOAD_WORKERS": str(most * batch_size)})
        with tiles.open(encoding="utf-8-sig", errors="surrogateescape") as stream:
            first = next((line.tile for line in read_lines(stream) if line.tile is not None), None)
        if first is not None:
            probe(app, first)
        auto = None
        if concurrency is None:
            with tiles.open(encoding="utf-8-sig", errors="surrogateescape") as stream:
                total = sum(1 for line in read_lines(stream) if line.tile is not None)
            auto = AutoConcurrency(_stats_reader(server.endpoint), total, start=AUTO_START, high=most,
                                   timeout=app.settings.predict_timeout)
        with tiles.open(encoding="utf-8-sig", errors="surrogateescape") as stream:
            report = run_pipeline(read_lines(stream), app, most, batch_size, progress, auto)
        if auto is not None and decisions is not None:
            for line in auto.decisions:
                decisions(line)
        if app.writer is not None:
            app.writer.close()
        app.http.close()
        if out_csv is not None:
            download(store, str(out_csv), stdout=None)  # a file target: no stdout
        store.close()
    except BaseException:
        # A run that failed or was stopped before any result leaves no empty database behind.
        if new_file and own is not None and own.exists() and not _has_results(own):
            for leftover in (own, own.with_name(own.name + "-journal")):
                leftover.unlink(missing_ok=True)
        raise
    finally:
        server.close()
    return report


def _stats_reader(endpoint: str) -> Callable[[], tuple[float, int] | None]:
    """How busy the model server has been (its batch threads' busy seconds, and how many), from
    its stats path; None when it does not answer."""
    import requests


    url = endpoint.split("/v1/", 1)[0] + STATS_PATH
    session = requests.Session()

    def read() -> tuple[float, int] | None:
        try:
            stats = session.get(url, timeout=2).json()
            return float(stats["busy_seconds"]), int(stats["batch_threads"])
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return None

    return read


def _has_results(path: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT count(*) FROM results").fetchone()[0] > 0
    except sqlite3.Error:
        return False

