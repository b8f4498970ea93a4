"""``cnsq download``: stream the results table to a CSV file (or stdout) without a partial file
ever standing under the final name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cnsq.errors import CnsqError, option
from cnsq.files import atomic_write, writable_target
from cnsq.results.store import Store, mask, open_store
from download_and_predict.schema import sqlite_path


def database_file(url: str | None) -> Path | None:
    """The file a ``sqlite:///`` URL names; None for PostgreSQL (or no URL)."""

    return Path(sqlite_path(url)) if url and url.startswith("sqlite:") else None


def download(store: Store, target: str, stdout: BinaryIO | None,
             progress: Callable[[int], None] | None = None) -> int:
    """Write ``tile,output`` rows to ``target`` (``-`` for stdout); returns the row count.

    The rows go to a temporary name beside the target, renamed at the end: an interrupted
    download leaves no file that looks complete.
    """
    if target == "-":
        if stdout is None:
            raise ValueError("target '-' needs a stdout to write to")
        rows = store.export_csv(stdout, progress)
        stdout.flush()
        return rows
    with atomic_write(writable_target(target, database_file(store.url)), "wb") as handle:
        return store.export_csv(handle, progress)


def table_csv(target: Path, database_url: str | None, admin=None,
              progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """The results table as a CSV at ``target``: read from ``database_url``, else exported by
    the stack's ``admin`` function (a private database). Returns the rows written and where
    they came from (the URL with its password masked, or the export's S3 location).

    Raises:
        CnsqError: neither is given, or the database cannot be reached.
    """

    if database_url:
        store = open_store(database_url, create=False)
        try:
            rows = download(store, str(target), None, progress)
        finally:
            store.close()
        return rows, mask(database_url)
    if admin is None:
        raise CnsqError(f"no results table: pass {option('database_url')} (or set DATABASE_URL), "
                        f"or {option('config')} for a deployed stack")
    export = admin.download_export(str(target), progress)
    return export["rows"], f"s3://{export['bucket']}/{export['key']}"
