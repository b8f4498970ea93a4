"""The results table's schema and its versioned migrations (docs/architecture.md §7).

Owned by the Lambda package because both sides apply them: the stack's admin function inside the
VPC (``admin.py``) and ``cnsq setup`` on any database the operator can reach. Migrations are
recorded in ``cnsq_migrations``; applying them twice is harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class Migration(NamedTuple):
    version: int
    name: str
    postgres: str | Callable[[Any], None]  # SQL, or a step that runs on a cursor
    sqlite: str


# An id the original Lambda wrote: pg8000 stored its mercantile Tile as an array, {x,y,z}.
ORIGINAL_ID = r"^\{(\d+),(\d+),(\d+)\}$"


def adopt_original_table(cur: Any) -> None:
    """Make a table that chip-n-scale (kes) created usable by the handler, keeping every row.

    - ``tile`` without a unique index (an ``id serial`` variant): duplicates are reduced to the
      newest row (highest id, else the last written) and a unique index is added, so the
      upsert's ``ON CONFLICT (tile)`` works;
    - ids written by the original Lambda, ``{x,y,z}``, become ``x-y-z``; where both forms of a
      tile exist, the ``x-y-z`` row (written by cnsq, so newer) is kept.
    """
    if not has_unique_tile(cur):
        cur.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'results' "
                    "AND table_schema = current_schema() AND column_name = 'id'")
        order = "id" if cur.fetchone()[0] else "ctid"
        cur.execute(f"DELETE FROM results a USING results b WHERE a.tile = b.tile "
                    f"AND a.{order} < b.{order}")
        cur.execute("CREATE UNIQUE INDEX IF NOT EXISTS results_tile_key ON results (tile)")
    cur.execute("DELETE FROM results o USING results n WHERE o.tile ~ %s "
                "AND n.tile = regexp_replace(o.tile, %s, '\\1-\\2-\\3')", (ORIGINAL_ID, ORIGINAL_ID))
    cur.execute("UPDATE results SET tile = regexp_replace(tile, %s, '\\1-\\2-\\3') WHERE tile ~ %s",
                (ORIGINAL_ID, ORIGINAL_ID))


MIGRATIONS = (
    Migration(
        1, "create results",
        "CREATE TABLE IF NOT EXISTS results (tile text PRIMARY KEY, output jsonb)",
        "CREATE TABLE IF NOT EXISTS results (tile TEXT PRIMARY KEY, output TEXT)",
    ),
    Migration(2, "adopt a table the original created", adopt_original_table, "SELECT 1"),
)
EXPECTED_COLUMNS = {"tile": "text", "output": "jsonb"}
# The upsert, by tile: a tile written twice (a redelivered message, a re-run) is one row.
UPSERT_POSTGRES = ("INSERT INTO results (tile, output) VALUES %s "
                   "ON CONFLICT (tile) DO UPDATE SET output = EXCLUDED.output")  # execute_values
UPSERT_POSTGRES_ROW = "(%s, %s::jsonb)"
UPSERT_SQLITE = ("INSERT INTO results (tile, output) VALUES (?, ?) "
                 "ON CONFLICT (tile) DO UPDATE SET output = excluded.output")


def sqlite_path(url: str) -> str:
    """``sqlite:///relative.db`` → ``relative.db``; ``sqlite:////abs/path.db`` → ``/abs/path.db``."""
    from urllib.parse import unquote

    return unquote(url.removeprefix("sqlite:///"))
# The original declared tile varchar(255): as good as text for the handler.
SAME_TYPE = {"character varying": "text"}
# One CopyData message per row, the header first: see cnsq.results.store._CopySink.
EXPORT_SQL = "COPY (SELECT tile, output FROM results) TO STDOUT WITH (FORMAT csv, HEADER true)"


def migrate_postgres(conn: Any) -> list[Migration]:
    """Apply the migrations not yet recorded, in one transaction; returns those applied."""
    applied = []
    with conn, conn.cursor() as cur:
        # Two `cnsq setup` at once: the second waits, then finds nothing to do.
        cur.execute("SELECT pg_advisory_xact_lock(736573)")
        cur.execute("CREATE TABLE IF NOT EXISTS cnsq_migrations (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        cur.execute("SELECT version FROM cnsq_migrations")
        done = {row[0] for row in cur.fetchall()}
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            if callable(migration.postgres):
                migration.postgres(cur)
            else:
                cur.execute(migration.postgres)
            cur.execute("INSERT INTO cnsq_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name))
            applied.append(migration)
    return applied


def has_unique_tile(cur: Any) -> bool:
    """Whether results.tile has a unique index (the upsert's ON CONFLICT (tile) needs one)."""
    cur.execute("SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                "WHERE i.indrelid = to_regclass('results') AND i.indisunique "
                "AND i.indnkeyatts = 1 AND a.attname = 'tile')")
    return bool(cur.fetchone()[0])


def postgres_columns(conn: Any) -> dict[str, str]:
    """The results table's columns and their types ({} when there is no such table); a tile
    column without a unique index is reported as ``text (not unique)``."""
    with conn.cursor() as cur:
        cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = 'results' AND table_schema = current_schema()")
        found = {name: SAME_TYPE.get(kind, kind) for name, kind in cur.fetchall()}
        if found.get("tile") == "text" and not has_unique_tile(cur):
            found["tile"] = "text (not unique)"
    conn.rollback()
    return found


def schema_problems(found: dict[str, str]) -> list[str]:
    """What the handler needs and the table lacks (empty: the table is fine)."""
    if not found:
        return ["table 'results' does not exist (run `cnsq setup`)"]
    problems = []
    for column, kind in EXPECTED_COLUMNS.items():
        if column not in found:
            problems.append(f"results has no column '{column}'")
        elif found[column] == "text (not unique)":
            problems.append("results.tile has no unique index: every write would fail "
                            "(run `cnsq setup`, which adds it and keeps every row)")
        elif found[column] != kind:
            problems.append(f"results.{column} is {found[column]}, expected {kind}")
    return problems
