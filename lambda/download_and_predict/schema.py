"""The results table's schema and its versioned migrations (DESIGN §7).

Owned by the Lambda package because both sides apply them: the stack's admin function inside the
VPC (``admin.py``) and ``cnsq setup`` on any database the operator can reach. Migrations are
recorded in ``cnsq_migrations``; applying them twice is harmless.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Migration(NamedTuple):
    version: int
    name: str
    postgres: str
    sqlite: str


MIGRATIONS = (
    Migration(
        1, "create results",
        "CREATE TABLE IF NOT EXISTS results (tile text PRIMARY KEY, output jsonb)",
        "CREATE TABLE IF NOT EXISTS results (tile TEXT PRIMARY KEY, output TEXT)",
    ),
)
EXPECTED_COLUMNS = {"tile": "text", "output": "jsonb"}
# One CopyData message per row, the header first: see cnsq.results._CopySink.
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
            cur.execute(migration.postgres)
            cur.execute("INSERT INTO cnsq_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name))
            applied.append(migration)
    return applied


def postgres_columns(conn: Any) -> dict[str, str]:
    """The results table's columns and their types ({} when there is no such table)."""
    with conn.cursor() as cur:
        cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = 'results' AND table_schema = current_schema()")
        found = dict(cur.fetchall())
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
        elif found[column] != kind:
            problems.append(f"results.{column} is {found[column]}, expected {kind}")
    return problems
