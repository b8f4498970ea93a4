"""DownloadAndPredict: SQS records → tiles → images → one prediction call → one batched upsert.

Each step is a method, so a project overrides only what differs (another imagery source, another
payload, another result sink) — see ``lambda/examples/``. Self-contained: it imports nothing from
cnsq, so the zip holds this folder and its requirements only.

Failure is per record. A record whose body is not a tile, whose tile cannot be downloaded, or
whose prediction or write failed is named in ``batchItemFailures``; SQS retries only those and,
after ``maxReceiveCount``, parks them in the dead letter queue. Every other record is written.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import (
    BadEvent,
    BadRecord,
    HttpDeadline,
    HttpError,
    HttpRefused,
    HttpTimeout,
    HttpTooLarge,
    StepFailed,
)
from .http import Http

# The names a subclass (lambda/examples/) and older code import from here; each has its own
# module now (docs/architecture.md §2).
from .masking import mask, register_connection_string, register_secret  # noqa: F401
from .settings import Settings, database_fields  # noqa: F401
from .tiles import (  # noqa: F401
    MAX_ZOOM,
    Tile,
    check_tile_endpoint,
    imagery_url,
    is_image,
    parse_tile,
    parse_tile_id,
    tile_id,
)
from .writer import (  # noqa: F401
    ResultsWriter,
    managed_secret_arn,
    output_json,
    password_refused,
    secret_to_url,
)

LOG = logging.getLogger("download_and_predict")

RETRY_STATUS = {429, 500, 502, 503, 504}


class Record(NamedTuple):
    """One SQS record's tile."""

    message_id: str
    tile: Tile


# ---------------------------------------------------------------------------------------------
# The event


def check_event(event: Any) -> None:
    """An SQS event: ``{"Records": [{…}, …]}``.

    Raises:
        BadEvent: anything else, which no record of it can be failed alone for (SQS never sends
            one: the whole invocation fails, and SQS retries its messages).
    """
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        raise BadEvent(f"the event is not an SQS event: expected {{\"Records\": [...]}}, got "
                       f"{type(event).__name__}" + (f" with Records {type(records).__name__}"
                                                   if isinstance(event, dict) else ""))
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise BadEvent(f"the event's record {index} is not an object but "
                           f"{type(record).__name__}")


# ---------------------------------------------------------------------------------------------
# The steps


@dataclass
class Outcome:
    """What happened to one invocation's records."""

    records: int = 0
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # message id → reason
    seconds: dict[str, float] = field(default_factory=lambda: {
        "download": 0.0, "predict": 0.0, "write": 0.0})

    def fail(self, message_ids: Iterable[str], reason: str) -> None:
        for message_id in message_ids:
            self.failed.setdefault(message_id, reason)

    def metric_line(self, namespace: str, function_name: str,
                    now: float | None = None) -> dict[str, Any]:
        """The record counts in CloudWatch's embedded metric format: CloudWatch Logs turns the
        line into the metrics ``RecordsSucceeded`` and ``RecordsFailed`` (dimension
        ``FunctionName``) with no API call. A failed record is a batch item failure, which
        Lambda's own ``Errors`` never counts; the controller reads these instead."""
        return {
            "_aws": {"Timestamp": int((time.time() if now is None else now) * 1000),
                     "CloudWatchMetrics": [{
                         "Namespace": namespace, "Dimensions": [["FunctionName"]],
                         "Metrics": [{"Name": "RecordsSucceeded", "Unit": "Count"},
                                     {"Name": "RecordsFailed", "Unit": "Count"}]}]},
            "FunctionName": function_name,
            "RecordsSucceeded": self.records - len(self.failed),
            "RecordsFailed": len(self.failed),
        }

    def log_line(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "succeeded": self.records - len(self.failed),
            "written": self.written,
            "skipped_missing": self.skipped,
            "failed": dict(Counter(self.failed.values())),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


class DownloadAndPredict:
    """The handler's steps; override any of them in a subclass."""

    def __init__(self, settings: Settings, writer: ResultsWriter | None = None,
                 http: Http | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.settings = settings
        # One connection pool per host, as many connections as downloads run at once.
        self.http = http or Http(settings.download_workers + 2, settings.proxies,
                                 settings.ca_bundle)
        self.writer = writer
        # One pool for the app's life: warm invocations reuse its threads instead of starting
        # new ones each time (and concurrent invocations on one machine share it).
        self.downloads = ThreadPoolExecutor(settings.download_workers,
                                            thread_name_prefix="download")
        # The deadline of the request this thread is making (a download, a prediction): the
        # steps' signatures stay as subclasses know them.
        self._limits = threading.local()

    # -- 1. records → tiles ------------------------------------------------------------------

    def get_tiles(self, event: dict, outcome: Outcome) -> list[Record]:
        records = []
        for raw in event.get("Records", []):
            message_id = raw.get("messageId", "")
            try:
                records.append(Record(message_id, parse_tile(raw.get("body", ""))))
            except BadRecord as exc:
                LOG.warning("record %s: %s", message_id, mask(str(exc)))
                outcome.fail([message_id], "bad_record")
            except Exception as exc:  # noqa: BLE001 - whatever a body does, it fails alone
                LOG.warning("record %s: unreadable body (%s)", message_id, type(exc).__name__)
                outcome.fail([message_id], "bad_record")
        return records

    # -- 2. tiles → images --------------------------------------------------------------------

    def url_for(self, tile: Tile) -> str:
        return imagery_url(self.settings.tile_endpoint, tile, self.settings.tile_token)

    def get_image(self, tile: Tile) -> bytes | None:
        """The tile's image bytes, or None when the endpoint has no imagery for it (404).

        Raises:
            StepFailed: after bounded retries on connection errors, timeouts, 429 and 5xx.
        """
        if self.settings.imagery is not None:
            return self.read_cog(tile)
        url = self.url_for(tile)
        response = self._with_retries(
            lambda: self.http.get(url, read_timeout=self.settings.tile_timeout,
                                  deadline=self.request_deadline(),
                                  max_bytes=self.settings.max_tile_bytes),
            f"tile {tile.id}", "tile")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise StepFailed("tile_http", f"tile {tile.id}: HTTP {response.status_code}")
        return response.content

    def read_cog(self, tile: Tile) -> bytes | None:
        """The tile read from the COG or STAC imagery (``IMAGERY``), or None where it has no
        valid pixel (the MISSING_TILES policy decides, as for a 404).

        Raises:
            StepFailed: an unreadable COG, a server answering an error or too slowly.
        """
        from .cog import read_tile
        from .stac import fetcher

        assert self.settings.imagery is not None
        deadline = self.request_deadline()
        timeout = self.settings.tile_timeout if deadline is None else max(
            1.0, min(self.settings.tile_timeout, deadline - time.monotonic()))
        # A STAC source's documents through the worker's own HTTP: the same deadline and bound.
        fetch = fetcher(self.http, self.settings.tile_timeout, deadline)
        try:
            return read_tile(self.settings.imagery, tile.x, tile.y, tile.z, timeout, fetch)
        except Exception as exc:  # noqa: BLE001 - rasterio's and GDAL's errors: this tile only
            raise StepFailed("tile_read", f"tile {tile.id}: {type(exc).__name__}: "
                                          f"{str(exc)[:300]}") from None

    def download_deadline(self, deadline: float | None) -> float:
        """When the invocation's downloads must be done (time.monotonic()): TILE_DEADLINE, or
        every attempt's timeout and backoff, and never past the Lambda's own deadline."""
        settings = self.settings
        budget = settings.tile_deadline
        if budget is None:
            attempts = max(1, settings.retries)
            budget = settings.tile_timeout * attempts + settings.backoff * (2 ** attempts) + 3.05
        end = time.monotonic() + budget
        return min(end, deadline) if deadline is not None else end

    def get_images(self, records: list[Record], outcome: Outcome,
                   deadline: float | None = None) -> list[tuple[Record, bytes]]:
        """Download concurrently; returns the records that have an image. Tiles not downloaded
        by the deadline fail (``tile_deadline``): the deadline closes their connections, so
        their threads are free at once for the next tiles."""
        if not records:
            return []
        started = time.perf_counter()
        images = []
        limit = self.download_deadline(deadline)
        futures = [(record, self.downloads.submit(self._get_image_by, record.tile, limit))
                   for record in records]
        # Woken once when all are done, not once per tile: each wake-up is a context switch.
        wait([future for _, future in futures], timeout=max(0.0, limit - time.monotonic()))
        for record, future in futures:
            if not future.done():
                LOG.warning("record %s: tile %s not downloaded by its deadline", record.message_id,
                            record.tile.id)
                outcome.fail([record.message_id], "tile_deadline")
                continue
            try:
                image = future.result()
            except StepFailed as exc:
                LOG.warning("record %s: %s", record.message_id, mask(str(exc)))
                outcome.fail([record.message_id], exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - a bad URL or a subclass's bug: this tile only
                LOG.warning("record %s: tile %s: %s: %s", record.message_id, record.tile.id,
                            type(exc).__name__, mask(str(exc)))
                outcome.fail([record.message_id], "tile_error")
                continue
            if image is None:
                if self.settings.missing_tiles == "fail":
                    LOG.warning("record %s: tile %s not found (404)", record.message_id,
                                record.tile.id)
                    outcome.fail([record.message_id], "tile_missing")
                else:
                    outcome.skipped += 1
                continue
            if not is_image(image):
                # Sent to the model it would fail the whole chunk's prediction request.
                LOG.warning("record %s: tile %s is not an image (%d bytes starting %r)",
                            record.message_id, record.tile.id, len(image), image[:16])
                outcome.fail([record.message_id], "not_an_image")
                continue
            images.append((record, image))
        outcome.seconds["download"] += time.perf_counter() - started
        return images

    # -- 3. images → predictions -------------------------------------------------------------

    def build_payload(self, images: list[bytes]) -> dict[str, Any]:
        """TF Serving's REST predict body with base64-encoded images."""
        return {"instances": [{"image_bytes": {"b64": base64.b64encode(image).decode("ascii")}}
                              for image in images]}

    def post_prediction(self, payload: dict[str, Any]) -> list[Any]:
        """POST the payload; returns the ``predictions`` list.

        Raises:
            StepFailed: after bounded retries on connection errors, timeouts and 5xx, or on a
                response that is not TF Serving's ``{"predictions": [...]}``.
        """
        endpoint = self.settings.prediction_endpoint
        response = self._with_retries(
            lambda: self.http.post_json(endpoint, payload,
                                        read_timeout=self.settings.predict_timeout,
                                        deadline=self.request_deadline(),
                                        max_bytes=self.settings.max_prediction_bytes),
            "prediction", "model")
        if response.status_code != 200:
            raise StepFailed("model_error",
                             f"model answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            predictions = response.json()["predictions"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise StepFailed("model_error",
                             f"model response has no 'predictions': {response.text[:200]}") from None
        if not isinstance(predictions, list):
            raise StepFailed("model_error", "model response 'predictions' is not a list")
        return predictions

    def predict(self, images: list[tuple[Record, bytes]], outcome: Outcome,
                deadline: float | None = None) -> list[tuple[Record, Any]]:
        """One request per chunk of at most MAX_INSTANCES instances; chunks that would start past
        the deadline fail (``deadline``) so the Lambda answers before it is killed."""
        started = time.perf_counter()
        results: list[tuple[Record, Any]] = []
        size = max(1, self.settings.max_instances)
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            ids = [record.message_id for record, _ in chunk]
            if deadline is not None and time.monotonic() >= deadline:
                LOG.error("no time left to predict %d record(s)", len(chunk))
                outcome.fail(ids, "deadline")
                continue
            self._limits.deadline = deadline  # the request ends there too, answered or not
            try:
                predictions = self.post_prediction(self.build_payload([img for _, img in chunk]))
            except StepFailed as exc:
                LOG.error("prediction failed for %d record(s): %s", len(chunk), mask(str(exc)))
                outcome.fail(ids, exc.reason)
                continue
            finally:
                self._limits.deadline = None
            if len(predictions) != len(chunk):
                LOG.error("model returned %d predictions for %d instances; failing those records",
                          len(predictions), len(chunk))
                outcome.fail(ids, "prediction_count")
                continue
            results.extend(zip((record for record, _ in chunk), predictions, strict=True))
        outcome.seconds["predict"] += time.perf_counter() - started
        return results

    # -- 4. predictions → rows ---------------------------------------------------------------

    def result_output(self, tile: Tile, prediction: Any) -> Any:
        """What is stored in ``results.output`` for a tile (the prediction as the model gave it)."""
        return prediction

    def save_results(self, predictions: list[tuple[Record, Any]], outcome: Outcome) -> None:
        """One batched upsert for the whole invocation."""
        if not predictions:
            return
        started = time.perf_counter()
        rows: dict[str, str] = {}  # one row per tile: a tile twice in a batch is written once
        kept = []
        for record, prediction in predictions:
            # NaN, Infinity and NUL are not JSON that PostgreSQL's jsonb (or a GeoJSON reader)
            # accepts: such a prediction fails its own record, not the batched write of all.
            try:
                text = output_json(self.result_output(record.tile, prediction))
            except (TypeError, ValueError, RecursionError) as exc:
                LOG.warning("record %s: tile %s: the model's output is not valid JSON (%s)",
                            record.message_id, record.tile.id, type(exc).__name__)
                outcome.fail([record.message_id], "model_output")
                continue
            rows[record.tile.id] = text
            kept.append((record, prediction))
        predictions = kept
        if not predictions:
            outcome.seconds["write"] += time.perf_counter() - started
            return
        try:
            if self.writer is None:
                raise StepFailed("database", "no database connection")
            self.writer.upsert(list(rows.items()))
            outcome.written += len(rows)
        except Exception as exc:  # noqa: BLE001 - any write failure fails these records
            if len(rows) > 1 and self.writer is not None and self.writer.refused(exc):
                # The database refused a row, not the connection: each row alone, so the one
                # it refuses fails alone and the others are written.
                LOG.warning("the database refused the batch (%s); writing its %d rows one by one",
                            _safe(exc), len(rows))
                self._save_one_by_one(rows, predictions, outcome)
            else:
                LOG.error("writing %d result(s) failed: %s", len(rows), _safe(exc))
                outcome.fail([record.message_id for record, _ in predictions], "database")
        outcome.seconds["write"] += time.perf_counter() - started

    def _save_one_by_one(self, rows: dict[str, str], predictions: list[tuple[Record, Any]],
                         outcome: Outcome) -> None:
        for tile, text in rows.items():
            ids = [record.message_id for record, _ in predictions if record.tile.id == tile]
            try:
                if self.writer is None:
                    raise StepFailed("database", "no database connection")
                self.writer.upsert([(tile, text)])
                outcome.written += 1
            except Exception as exc:  # noqa: BLE001 - this row's failure is this row's
                LOG.error("writing tile %s failed: %s", tile, _safe(exc))
                outcome.fail(ids, "database")

    # -- the whole invocation ----------------------------------------------------------------

    def deadline(self, context: Any) -> float | None:
        """The Lambda's deadline less the reserve for the prediction and the write (monotonic
        seconds), from ``context.get_remaining_time_in_millis()``; None without a context."""
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if remaining is None:
            return None
        return time.monotonic() + remaining() / 1000 - self.settings.reserve

    def process(self, event: dict, context: Any = None) -> Outcome:
        """Run the steps over one event; the outcome says what happened to each record.

        Every record is decided before the Lambda's time runs out: what is not done by then
        is a batch item failure, retried by SQS, rather than a killed invocation that fails all.
        """
        check_event(event)
        outcome = Outcome(records=len(event["Records"]))
        deadline = self.deadline(context)  # downloads end here; then half the reserve to
        # start predictions, the other half for the write
        records = self.get_tiles(event, outcome)
        images = self.get_images(records, outcome, deadline)
        predictions = self.predict(images, outcome, None if deadline is None
                                   else deadline + self.settings.reserve / 2)
        self.save_results(predictions, outcome)
        LOG.info(json.dumps(outcome.log_line()))
        if self.settings.metrics_namespace:
            # Stdout, not the logger: an embedded-metric line must be the log event's whole text.
            print(json.dumps(outcome.metric_line(self.settings.metrics_namespace,
                                                 self.settings.function_name)), flush=True)
        return outcome

    def run(self, event: dict, context: Any = None) -> dict[str, Any]:
        """The Lambda contract: name exactly the records that failed."""
        outcome = self.process(event, context)
        return {"batchItemFailures": [{"itemIdentifier": message_id}
                                      for message_id in outcome.failed]}

    # -- helpers -----------------------------------------------------------------------------

    def request_deadline(self) -> float | None:
        """When the request this thread makes must end (time.monotonic()), or None."""
        return getattr(self._limits, "deadline", None)

    def _get_image_by(self, tile: Tile, deadline: float | None) -> bytes | None:
        self._limits.deadline = deadline
        try:
            return self.get_image(tile)
        finally:
            self._limits.deadline = None

    def _with_retries(self, call, what: str, kind: str) -> Any:
        attempts = max(1, self.settings.retries)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = call()
            except HttpTooLarge as exc:  # the same body again: no retry
                raise StepFailed(f"{kind}_too_large", f"{what}: {exc}") from None
            except HttpRefused as exc:
                raise StepFailed(f"{kind}_refused", f"{what}: {exc}") from None
            except HttpDeadline:  # no time left for this request: no retry either
                raise StepFailed("tile_deadline" if kind == "tile" else "deadline",
                                 f"{what}: not done by its deadline") from None
            except HttpTimeout:
                if last:
                    raise StepFailed(f"{kind}_timeout", f"{what}: timed out") from None
            except HttpError as exc:
                if last:
                    raise StepFailed(f"{kind}_connection", f"{what}: {exc}") from None
            else:
                if response.status_code not in RETRY_STATUS or last:
                    return response
            time.sleep(self.settings.backoff * (2**attempt))
        raise AssertionError("unreachable")


def _safe(exc: BaseException) -> str:
    """An exception's text without any password a connection string might carry."""
    return mask(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
