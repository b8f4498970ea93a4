"""The results store (docs/architecture.md §7): ``results(tile text primary key, output jsonb)``.

Two backends behind one interface: PostgreSQL (psycopg2) and SQLite (``sqlite:///path.db``, the
same schema with the output as JSON text) for the one-machine pipeline. Migrations are versioned
and recorded in ``cnsq_migrations``; running them twice is harmless. Export streams — PostgreSQL
``COPY … TO STDOUT``, SQLite a cursor — so memory stays flat at any row count.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from cnsq.errors import CnsqError
from download_and_predict.masking import mask, register_connection_string
from download_and_predict.schema import (
    EXPORT_SQL,
    MIGRATIONS,
    UPSERT_POSTGRES,
    UPSERT_POSTGRES_ROW,
    UPSERT_SQLITE,
    Migration,
    migrate_postgres,
    postgres_columns,
    schema_problems,
    sqlite_path,
)


class DatabaseError(CnsqError):
    """The results database is unreachable, malformed or refused a statement."""




def _where(url: str) -> str:
    try:
        parsed = urlparse(url)
        return f"{parsed.hostname or 'localhost'}:{parsed.port or 5432}"
    except ValueError:
        return "the given address"


def open_store(url: str, create: bool = True) -> Store:
    """A store for a ``postgres[ql]://`` or ``sqlite:///`` URL.

    ``create=False`` (to read) refuses a SQLite file that does not exist instead of leaving an
    empty one behind.

    Raises:
        DatabaseError: not such a URL, or the database cannot be reached (host:port and the
            reason, with the password masked).
    """
    if isinstance(url, str):
        register_connection_string(url)  # its password is masked in every message from here on
    if not isinstance(url, str) or "://" not in url:
        raise DatabaseError(
            f"not a database URL: {mask(str(url))!r} (expected postgresql://user:pass@host:5432/db "
            "or sqlite:///path.db)"
        )
    scheme = url.split("://", 1)[0]
    if scheme == "sqlite":
        return SqliteStore(url, create)
    if scheme in ("postgres", "postgresql"):
        # user:pa/ss@host — libpq reads "user" as the host and "pa" as its port.
        match = re.match(r"^[^:]+://([^/?#\s]*)", url)
        first = match.group(1) if match else ""
        rest = url.split("://", 1)[1]
        userinfo = rest[:rest.rfind("@")] if "@" in rest else ""
        if "@" in userinfo and ":" in userinfo and "/" not in userinfo:
            raise DatabaseError(f"the password in {mask(url)} holds '@', which must be "
                                "percent-encoded (%40)")
        if "@" not in first and "@" in url and re.fullmatch(r"[^:@]*:(?!\d+$).+", first):
            raise DatabaseError(
                f"the user name or password in {mask(url)} holds '/', '?' or '#', which a URL "
                "reads as the end of the host: percent-encode them (%2F, %3F, %23)")
        try:
            _ = urlparse(url).port
        except ValueError:  # (a password that reads as a port is refused above)
            port = urlparse(url).netloc.rsplit(":", 1)[-1]
            raise DatabaseError(f"the port in {mask(url)} is not a number: {mask(port)!r}") from None
        return PostgresStore(url)
    raise DatabaseError(f"unsupported database scheme '{scheme}' in {mask(url)} "
                        "(use postgresql:// or sqlite:///)")


class Store:
    """What every backend offers."""

    url: str

    def migrate(self) -> list[Migration]:
        raise NotImplementedError

    def check_schema(self) -> list[str]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def upsert(self, rows: list[tuple[str, Any]]) -> None:
        raise NotImplementedError

    def export_csv(self, out: IO[bytes], progress: Callable[[int], None] | None = None) -> int:
        """Write ``tile,output`` CSV (output as JSON) to a binary stream; returns the row count."""
        raise NotImplementedError

    def close(self) -> None: ...


class PostgresStore(Store):
    def __init__(self, url: str):
        import psycopg2

        self.url = url
        try:
            self.conn = psycopg2.connect(url, connect_timeout=10)
        except psycopg2.OperationalError as exc:
            reason = mask(str(exc)).strip().splitlines()[-1] if str(exc).strip() else "refused"
            raise DatabaseError(f"cannot connect to PostgreSQL at {_where(url)}: {reason}") from None
        except psycopg2.Error:
            # libpq quotes the part of the URL it could not read, which may be the password.
            raise DatabaseError(
                "the database URL is malformed: a character of the user or password that URLs "
                "reserve must be percent-encoded (@ is %40, % is %25, / is %2F, : is %3A)"
            ) from None

    def migrate(self) -> list[Migration]:
        return migrate_postgres(self.conn)

    def check_schema(self) -> list[str]:
        return schema_problems(postgres_columns(self.conn))

    def count(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM results")
            row = cur.fetchone()
            value = row[0] if row else 0
        self.conn.rollback()
        return value

    def upsert(self, rows: list[tuple[str, Any]]) -> None:
        import json

        from psycopg2.extras import execute_values

        with self.conn, self.conn.cursor() as cur:
            execute_values(cur, UPSERT_POSTGRES, [(t, json.dumps(o)) for t, o in rows],
                           template=UPSERT_POSTGRES_ROW)

    def export_csv(self, out: IO[bytes], progress: Callable[[int], None] | None = None) -> int:
        sink = _CopySink(out, progress)
        with self.conn.cursor() as cur:
            cur.copy_expert(EXPORT_SQL, sink)
        self.conn.rollback()
        return max(sink.messages - 1, 0)

    def close(self) -> None:
        self.conn.close()


class SqliteStore(Store):
    def __init__(self, url: str, create: bool = True):
        self.url = url
        # sqlite:///relative.db or sqlite:////absolute.db
        self.path = Path(sqlite_path(url))
        if not self.path.parent.exists():
            raise DatabaseError(f"cannot open SQLite database {self.path}: "
                                f"folder {self.path.parent} does not exist")
        if not create and not self.path.is_file():
            raise DatabaseError(f"no SQLite database at {self.path}")
        try:
            self.conn = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open SQLite database {self.path}: {exc}") from None

    def migrate(self) -> list[Migration]:
        applied = []
        with self.conn:
            self.conn.execute("CREATE TABLE IF NOT EXISTS cnsq_migrations (version INTEGER PRIMARY "
                              "KEY, name TEXT NOT NULL, applied_at TEXT DEFAULT CURRENT_TIMESTAMP)")
            done = {row[0] for row in self.conn.execute("SELECT version FROM cnsq_migrations")}
            for migration in MIGRATIONS:
                if migration.version in done:
                    continue
                self.conn.execute(migration.sqlite)
                self.conn.execute("INSERT INTO cnsq_migrations (version, name) VALUES (?, ?)",
                                  (migration.version, migration.name))
                applied.append(migration)
        return applied

    def check_schema(self) -> list[str]:
        found = {row[1]: "jsonb" if row[1] == "output" else row[2].lower()
                 for row in self.conn.execute("PRAGMA table_info(results)")}
        return schema_problems(found)

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM results").fetchone()[0]

    def upsert(self, rows: list[tuple[str, Any]]) -> None:
        import json

        with self.conn:
            self.conn.executemany(UPSERT_SQLITE, [(t, json.dumps(o)) for t, o in rows])

    def export_csv(self, out: IO[bytes], progress: Callable[[int], None] | None = None) -> int:
        problems = self.check_schema()
        if problems:
            raise DatabaseError(f"{self.path}: {'; '.join(problems)}")
        text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["tile", "output"])
        rows = 0
        cursor = self.conn.execute("SELECT tile, output FROM results")
        while batch := cursor.fetchmany(10_000):
            writer.writerows(batch)
            rows += len(batch)
            if progress:
                progress(rows)
        text.flush()
        text.detach()  # leave `out` open for the caller
        return rows

    def close(self) -> None:
        self.conn.close()


class _CopySink:
    """A sink for COPY TO STDOUT. PostgreSQL sends one CopyData message per row (the header is
    the first), and psycopg2 calls write() once per message: counting calls counts rows without
    scanning the bytes."""

    EVERY = 50_000  # rows between progress updates

    def __init__(self, out: IO[bytes], progress: Callable[[int], None] | None):
        self.write_out = out.write
        self.progress = progress
        self.messages = 0

    def write(self, data: bytes) -> int:
        self.messages += 1
        if self.progress and self.messages % self.EVERY == 0:
            self.progress(self.messages - 1)
        return self.write_out(data)
