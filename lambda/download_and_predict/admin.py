"""The stack's admin function: operators' work on the private results database, done in the VPC.

The database has no public address, so `cnsq setup` and `cnsq download` invoke this function
(``download_and_predict.admin.handler``, in the worker's zip) instead of connecting:

- ``{"action": "migrate"}`` applies the migrations → ``{"applied": [...], "problems": [...]}``;
- ``{"action": "count"}`` → ``{"rows": N, "problems": [...]}``;
- ``{"action": "export"}`` streams the table as ``tile,output`` CSV to local disk, uploads it to
  ``s3://$EXPORT_BUCKET/$EXPORT_PREFIX<time>.csv`` and returns ``{"bucket", "key", "rows",
  "bytes"}``.

It reads the same environment as the worker (DATABASE_INSTANCE/HOST/PORT/NAME/SSLMODE, or
DATABASE_URL), so it connects exactly as the pipeline does.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from .base import Settings, database_fields, mask
from .errors import AdminError
from .handler import database_url
from .schema import EXPORT_SQL, migrate_postgres, postgres_columns, schema_problems

ACTIONS = ("migrate", "count", "export")


def connect(env: dict[str, str]) -> Any:
    import psycopg2

    settings = Settings(tile_endpoint="", prediction_endpoint="", **database_fields(env))
    return psycopg2.connect(database_url(settings), connect_timeout=10)


def export(conn: Any, env: dict[str, str], s3: Any = None) -> dict[str, Any]:
    """COPY the table to a file under /tmp (the function has 10 GB of it), then upload it."""
    bucket, prefix = env.get("EXPORT_BUCKET"), env.get("EXPORT_PREFIX", "exports/")
    if not bucket:
        raise AdminError("EXPORT_BUCKET is not set")
    key = f"{prefix}results-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.csv"
    with tempfile.NamedTemporaryFile(suffix=".csv") as staged:
        with conn.cursor() as cur:
            cur.copy_expert(EXPORT_SQL, staged)
        conn.rollback()
        staged.flush()
        size = staged.tell()
        staged.seek(0)
        rows = max(sum(1 for _ in staged) - 1, 0)  # quoted JSON holds no raw newline
        if s3 is None:
            import boto3

            s3 = boto3.client("s3")
        s3.upload_file(staged.name, bucket, key)
    return {"bucket": bucket, "key": key, "rows": rows, "bytes": size}


def run(event: dict[str, Any], env: dict[str, str], s3: Any = None) -> dict[str, Any]:
    """Carry out one action; raises AdminError for a request it does not know."""
    action = (event or {}).get("action")
    if action not in ACTIONS:
        raise AdminError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    conn = connect(env)
    try:
        if action == "migrate":
            applied = migrate_postgres(conn)
            return {"applied": [f"{m.version} ({m.name})" for m in applied],
                    "problems": schema_problems(postgres_columns(conn))}
        problems = schema_problems(postgres_columns(conn))
        if action == "count":
            if problems:
                return {"rows": None, "problems": problems}
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM results")
                rows = cur.fetchone()[0]
            conn.rollback()
            return {"rows": rows, "problems": []}
        if problems:
            raise AdminError("; ".join(problems))
        return export(conn, env, s3)
    finally:
        conn.close()


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda entry point. Errors come back as ``{"error": message}`` (never a credential)."""
    try:
        return run(event, dict(os.environ))
    except AdminError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the operator, masked
        return {"error": f"{type(exc).__name__}: {mask(str(exc)).strip().splitlines()[0]}"}
