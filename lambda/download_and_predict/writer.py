"""Writing results: the database URL from RDS's secret, one connection kept across warm
invocations, one batched upsert per invocation, and what PostgreSQL would refuse of an output.

A dropped connection is reconnected once; a refused password (RDS rotates the managed one every
seven days) reads the secret again first.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from .masking import register_connection_string
from .schema import MIGRATIONS, UPSERT_POSTGRES, UPSERT_POSTGRES_ROW, UPSERT_SQLITE, sqlite_path

LOG = logging.getLogger("download_and_predict")


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
    # Pageable: through its paginator, as every pageable call (tests/unit/test_pagination.py).
    pages = rds.get_paginator("describe_db_instances").paginate(DBInstanceIdentifier=instance)
    found = next(iter(pages))["DBInstances"][0]
    arn = (found.get("MasterUserSecret") or {}).get("SecretArn")
    if not arn:
        raise LookupError(f"database {instance} has no RDS-managed master secret "
                          "(ManageMasterUserPassword is off)")
    return arn


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
