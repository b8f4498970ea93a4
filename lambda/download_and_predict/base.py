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
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import BadEvent, BadRecord, HttpDeadline, HttpError, HttpTimeout, SettingsError, StepFailed
from .http import Http, ca_bundle_from_env, proxies_from_env
from .masking import mask, register_connection_string, register_secret  # noqa: F401 - re-exported
from .schema import (
    MIGRATIONS,
    UPSERT_POSTGRES,
    UPSERT_POSTGRES_ROW,
    UPSERT_SQLITE,
    sqlite_path,
)

LOG = logging.getLogger("download_and_predict")

MAX_ZOOM = 30
RETRY_STATUS = {429, 500, 502, 503, 504}
# The first bytes of the image formats imagery endpoints serve: PNG, JPEG, WebP (RIFF), TIFF
# (both byte orders), GIF, JPEG 2000, BMP. An HTML "quota exceeded" page served with 200 is none
# of them.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"II*\x00", b"MM\x00*", b"GIF8",
               b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ", b"BM")


def is_image(data: bytes) -> bool:
    """Whether ``data`` starts like an image the model server can decode (AVIF and HEIF: an
    ISO media file whose ``ftyp`` box comes first)."""
    return data.startswith(IMAGE_MAGIC) or data[4:8] == b"ftyp"


def tile_id(tile: Any) -> str:
    """``x-y-z``, the id of a tile (anything with x, y and z: this Tile, a mercantile Tile) in
    the queue's tiles files, ``results.tile``, CSVs and GeoJSON — its one definition."""
    return f"{tile.x}-{tile.y}-{tile.z}"


class Tile(NamedTuple):
    """An XYZ (slippy map) tile."""

    x: int
    y: int
    z: int

    @property
    def id(self) -> str:
        """The tile as stored in ``results.tile``: ``x-y-z``."""
        return tile_id(self)


class Record(NamedTuple):
    """One SQS record's tile."""

    message_id: str
    tile: Tile


def parse_tile(body: str) -> Tile:
    """Read x, y and z by name from a JSON object body.

    Raises:
        BadRecord: not JSON, not an object, a missing or non-integer key, or out of range.
    """
    try:
        data = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise BadRecord(f"body is not JSON: {exc}") from None
    except RecursionError:  # a few KB of nested brackets exhaust the parser's stack
        raise BadRecord("body is nested too deeply to be a tile") from None
    if not isinstance(data, dict):
        raise BadRecord(f"body is not a JSON object: {body[:60]!r}")
    values = {}
    for key in ("x", "y", "z"):
        if key not in data:
            raise BadRecord(f"body has no '{key}': {body[:60]!r}")
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRecord(f"'{key}' is not an integer: {value!r}")
        values[key] = value
    z = values["z"]
    if not 0 <= z <= MAX_ZOOM:
        raise BadRecord(f"z={z} is outside 0..{MAX_ZOOM}")
    limit = 2**z - 1
    for key in ("x", "y"):
        if not 0 <= values[key] <= limit:
            raise BadRecord(f"{key}={values[key]} is outside 0..{limit} at z={z}")
    return Tile(values["x"], values["y"], z)


def imagery_url(template: str, tile: Tile, token: str | None) -> str:
    """Fill an imagery URL template.

    Two forms: the original's positional ``https://…/{}/{}/{}.jpg?access_token={}`` (z, x, y,
    token) and a named one, ``https://{s}.tiles…/{z}/{x}/{y}.jpg?access_token={token}``, where
    ``{s}`` spreads tiles over the subdomains a, b and c as XYZ clients do.
    """
    if "{}" in template:
        return template.format(tile.z, tile.x, tile.y, token or "")
    return template.format(z=tile.z, x=tile.x, y=tile.y, token=token or "",
                           s="abc"[(tile.x + tile.y) % 3])


def check_tile_endpoint(template: str) -> None:
    """Refuse, at cold start, a template no tile can be filled into.

    Raises:
        ValueError: an unknown placeholder, or the positional and named forms mixed.
    """
    try:
        imagery_url(template, Tile(0, 0, 0), "token")
    except (KeyError, IndexError, ValueError) as exc:
        reason = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else str(exc)
        raise SettingsError(f"TILE_ENDPOINT cannot be filled in ({reason}): use {{z}}, {{x}}, {{y}}, "
                         "{s} and {token}, or the original's four {} (z, x, y, token)") from None


@dataclass
class Settings:
    """Everything the handler reads from its environment."""

    tile_endpoint: str
    prediction_endpoint: str
    database_url: str | None = None
    database_secret_arn: str | None = None
    # On AWS: the instance whose RDS-managed secret holds the credentials, and where it is.
    database_instance: str | None = None
    database_host: str | None = None
    database_port: int = 5432
    database_name: str = "ResultsDB"
    database_sslmode: str = "require"
    database_sslrootcert: str | None = None  # a CA bundle: the connection becomes verify-full
    tile_token: str | None = None
    missing_tiles: str = "skip"  # skip: logged and counted, not retried; fail: retried
    max_instances: int = 64
    tile_timeout: float = 10.0
    # Total time for an invocation's downloads, retries included: a server that trickles a byte
    # at a time defeats the per-read timeout. None: tile_timeout x retries + backoff.
    tile_deadline: float | None = None
    predict_timeout: float = 60.0
    # Time kept back from the Lambda's remaining time for the prediction and the write.
    reserve: float = 5.0
    # PostgreSQL: statement_timeout and lock_timeout (s); a black-holed connection fails after
    # tcp_user_timeout instead of blocking the invocation.
    database_timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.2
    download_workers: int = 16
    proxies: dict[str, str] = field(default_factory=dict)  # from *_PROXY: see http.py
    ca_bundle: str | bool = True  # REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE; True: certifi's

    REQUIRED = ("TILE_ENDPOINT", "PREDICTION_ENDPOINT")

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        """Raises ValueError naming every missing or malformed variable."""
        missing = [name for name in cls.REQUIRED if not env.get(name)]
        if not any(env.get(k) for k in ("DATABASE_URL", "DATABASE_INSTANCE", "DATABASE_SECRET_ARN")):
            missing.append("DATABASE_URL or DATABASE_INSTANCE")
        if missing:
            raise SettingsError(f"missing environment variable(s): {', '.join(missing)}")
        check_tile_endpoint(env["TILE_ENDPOINT"])
        mode = env.get("MISSING_TILES", "skip")
        if mode not in ("skip", "fail"):
            raise SettingsError(f"MISSING_TILES must be 'skip' or 'fail', got {mode!r}")
        try:
            return cls(
                tile_endpoint=env["TILE_ENDPOINT"],
                prediction_endpoint=env["PREDICTION_ENDPOINT"],
                **database_fields(env),
                tile_token=env.get("TILE_ACCESS_TOKEN") or None,
                missing_tiles=mode,
                max_instances=int(env.get("MAX_INSTANCES", 64)),
                tile_timeout=float(env.get("TILE_TIMEOUT", 10)),
                tile_deadline=float(env["TILE_DEADLINE"]) if env.get("TILE_DEADLINE") else None,
                reserve=float(env.get("DEADLINE_RESERVE", 5)),
                database_timeout=float(env.get("DATABASE_TIMEOUT", 30)),
                predict_timeout=float(env.get("PREDICT_TIMEOUT", 60)),
                retries=int(env.get("RETRIES", 3)),
                backoff=float(env.get("RETRY_BACKOFF", 0.2)),
                download_workers=int(env.get("DOWNLOAD_WORKERS", 16)),
                proxies=proxies_from_env(env),
                ca_bundle=ca_bundle_from_env(env),
            )
        except ValueError as exc:
            raise SettingsError(f"malformed numeric environment variable: {exc}") from None


def database_fields(env: dict[str, str]) -> dict[str, Any]:
    """The :class:`Settings` fields that say where the results database is and how to log in.

    Raises:
        ValueError: DATABASE_PORT is not a number.
    """
    return {
        "database_url": env.get("DATABASE_URL") or None,
        "database_secret_arn": env.get("DATABASE_SECRET_ARN") or None,
        "database_instance": env.get("DATABASE_INSTANCE") or None,
        "database_host": env.get("DATABASE_HOST") or None,
        "database_port": int(env.get("DATABASE_PORT") or 5432),
        "database_name": env.get("DATABASE_NAME") or "ResultsDB",
        "database_sslmode": env.get("DATABASE_SSLMODE") or (
            "verify-full" if env.get("DATABASE_SSLROOTCERT") else "require"),
        "database_sslrootcert": env.get("DATABASE_SSLROOTCERT") or None,
    }


# ---------------------------------------------------------------------------------------------
# The results database


def secret_to_url(secret: dict[str, Any], sslmode: str | None = None,
                  sslrootcert: str | None = None) -> str:
    """A Secrets Manager RDS secret (username, password, host, port, dbname) → a libpq URL.

    ``sslmode`` (libpq's: ``require``, ``verify-full`` …) and ``sslrootcert`` (a CA bundle, such
    as RDS's global bundle shipped in the zip) are added as query parameters; the stack's
    Lambdas use at least ``require``, so nothing crosses the VPC unencrypted.
    """
    from urllib.parse import quote, urlencode

    url = "postgresql://{}:{}@{}:{}/{}".format(
        quote(str(secret["username"]), safe=""), quote(str(secret["password"]), safe=""),
        secret["host"], secret.get("port", 5432), secret.get("dbname", "ResultsDB"),
    )
    query = {k: v for k, v in (("sslmode", sslmode), ("sslrootcert", sslrootcert)) if v}
    return f"{url}?{urlencode(query)}" if query else url


def managed_secret_arn(rds: Any, instance: str) -> str:
    """The ARN of the secret RDS keeps the master credentials in (ManageMasterUserPassword).

    Raises:
        LookupError: the instance has no RDS-managed secret.
    """
    # Pageable: through its paginator, as every pageable call (tests/test_pagination.py).
    pages = rds.get_paginator("describe_db_instances").paginate(DBInstanceIdentifier=instance)
    found = next(iter(pages))["DBInstances"][0]
    arn = (found.get("MasterUserSecret") or {}).get("SecretArn")
    if not arn:
        raise LookupError(f"database {instance} has no RDS-managed master secret "
                          "(ManageMasterUserPassword is off)")
    return arn


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


def output_json(value: Any) -> str:
    """A model output as the JSON text the results table stores.

    Raises:
        ValueError: NaN or Infinity, a NUL character, or half of a surrogate pair (half an
            emoji): JSON that PostgreSQL's jsonb, and GeoJSON readers, refuse.
        TypeError: a value JSON cannot hold.
        RecursionError: nested deeper than Python's recursion limit.
    """
    text = json.dumps(value, allow_nan=False)
    if "\\u0000" in text:
        raise ValueError("a NUL character")
    if "\\ud" in text:  # surrogates are escaped: check that each has its other half
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError if not
    return text


def password_refused(exc: BaseException) -> bool:
    """Whether a PostgreSQL connection failed on its password (SQLSTATE 28P01; at connect time
    libpq gives the server's message only)."""
    return (getattr(exc, "pgcode", None) == "28P01"
            or "password authentication failed" in str(exc))


class ResultsWriter:
    """One connection, opened at cold start and reused; one batched upsert per invocation.

    On PostgreSQL every statement and lock wait is bounded (``timeout`` seconds), and so is a
    connection whose packets go unanswered (TCP keepalives, ``tcp_user_timeout``): a locked
    table or a black-holed database fails the write instead of hanging the Lambda.
    """

    def __init__(self, url: str, timeout: float = 30.0,
                 refresh: Callable[[], str] | None = None):
        register_connection_string(url)  # its password is masked in every message
        self.url = url
        self.timeout = timeout
        # Where the URL came from a secret, how to read it again: RDS rotates the managed
        # master password (every 7 days by default), and a warm worker outlives a rotation.
        self.refresh = refresh
        self.conn: Any = None
        # One connection per warm Lambda; on one machine, many invocations share it.
        self.lock = threading.Lock()

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:")

    def connect(self) -> None:
        if self.is_sqlite:
            self.conn = sqlite3.connect(sqlite_path(self.url), timeout=30, check_same_thread=False)
            self.conn.execute(MIGRATIONS[0].sqlite)
            self.conn.commit()
            return
        try:
            self.conn = self._open_postgres()
        except Exception as exc:
            if self.refresh is None or not password_refused(exc):
                raise
            LOG.warning("the database refused the password (rotated?); reading the secret again")
            self.url = self.refresh()
            register_connection_string(self.url)
            self.conn = self._open_postgres()

    def _open_postgres(self) -> Any:
        import psycopg2

        ms = int(self.timeout * 1000)
        return psycopg2.connect(
            self.url, connect_timeout=10,
            options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
            tcp_user_timeout=ms)

    def upsert(self, rows: list[tuple[str, str]]) -> None:
        """Write (tile, output JSON) rows; reconnect once if the connection dropped."""
        if not rows:
            return
        with self.lock:
            try:
                self._upsert(rows)
            except Exception as exc:  # noqa: BLE001 - reconnect on any dropped-connection error
                if not self._dropped(exc):
                    raise
                LOG.warning("database connection lost (%s); reconnecting once",
                            type(exc).__name__)
                self.close()
                self.connect()
                self._upsert(rows)

    def refused(self, exc: BaseException) -> bool:
        """Whether the database refused the data (a row), not the connection."""
        if self.is_sqlite:
            return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                exc, sqlite3.OperationalError)
        import psycopg2

        return isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError,
                                psycopg2.InternalError))

    def _dropped(self, exc: Exception) -> bool:
        if self.conn is None:
            return True
        if self.is_sqlite:
            return False
        import psycopg2

        return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))

    def _upsert(self, rows: list[tuple[str, str]]) -> None:
        if self.conn is None:
            self.connect()
        if self.is_sqlite:
            with self.conn:
                self.conn.executemany(UPSERT_SQLITE, rows)
            return
        from psycopg2.extras import execute_values

        try:
            with self.conn.cursor() as cursor:
                execute_values(cursor, UPSERT_POSTGRES, rows, template=UPSERT_POSTGRES_ROW,
                               page_size=1000)
            self.conn.commit()
        except Exception:
            try:
                self.conn.rollback()
            except Exception:  # noqa: BLE001 - the connection is gone; upsert() reconnects
                pass
            raise

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
        self.conn = None


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
        url = self.url_for(tile)
        response = self._with_retries(
            lambda: self.http.get(url, read_timeout=self.settings.tile_timeout,
                                  deadline=self.request_deadline()),
            f"tile {tile.id}", "tile")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise StepFailed("tile_http", f"tile {tile.id}: HTTP {response.status_code}")
        return response.content

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
                                        deadline=self.request_deadline()),
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
        results = []
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
