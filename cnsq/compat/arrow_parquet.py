"""A Parquet writer without importing ``pyarrow.parquet``.

Why: importing ``pyarrow.parquet`` imports ``pyarrow.fs`` and with it every filesystem pyarrow
has (S3's, Azure's, ssl) to resolve a path given as a URI, time every export would pay
(docs/performance.md). ``pyarrow._parquet.ParquetWriter`` is the writer the public class wraps;
given what the public class gives it, it writes the same bytes (tests/services/test_export.py). A pyarrow
that moved or changed it gets the public writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def parquet_writer(target: Path, schema: Any, **options: Any) -> Any:
    """A writer of ``schema`` to ``target`` (format version 2.6), with pyarrow's ``options``
    (``compression``, ``use_dictionary``, ``write_statistics`` …)."""
    try:
        from pyarrow._parquet import ParquetWriter

        return ParquetWriter(str(target), schema, version="2.6", writer_engine_version="V2",
                             **options)
    except (ImportError, TypeError, ValueError):
        return public_parquet_writer(target, schema, **options)


def public_parquet_writer(target: Path, schema: Any, **options: Any) -> Any:
    """pyarrow's public writer, the fallback (and what the tests compare the bytes with)."""
    import pyarrow.parquet as pq

    return pq.ParquetWriter(target, schema, version="2.6", **options)
