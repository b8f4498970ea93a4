"""``cnsq view``: the predictions on a map over the imagery they came from, served on 127.0.0.1.

:func:`results_csv` turns what the user named (a results CSV, a results database, the deployed
stack's database) into one CSV; :mod:`.index` reads it once; :mod:`.server` answers the page;
:mod:`.imagery` fetches the base layer with the token, which stays on this side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cnsq.errors import CnsqError, option
from cnsq.results.download import table_csv
from cnsq.results.reader import check_thresh_ind, open_results
from cnsq.view.index import open_index
from cnsq.view.server import Viewed

SQLITE_MAGIC = b"SQLite format 3\x00"


def is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def results_csv(results: str | None, database_url: str | None, workdir: Path, admin=None,
                progress: Callable[[int], None] | None = None) -> tuple[Path, str]:
    """The results as a CSV file to read, and the name the page shows for them.

    ``results`` is a CSV path, a SQLite results file, or a database URL; else ``database_url``;
    else ``admin`` (the stack's admin function), whose export is copied into ``workdir``.
    A database is exported with ``cnsq download``'s code, so the page shows what it would write.

    Raises:
        CnsqError: nothing to read, a missing file, an unreachable database.
    """

    if results and "://" not in results:
        path = Path(results)
        if path.is_dir():
            raise CnsqError(f"{results}: is a folder; name a results CSV or SQLite database in it")
        if not path.is_file():
            raise CnsqError(f"{results}: no such file (a results CSV or SQLite database)")
        if not is_sqlite_file(path):
            return path, str(path)
        database_url = f"sqlite:///{path.resolve()}"
    elif results:
        database_url = results
    if not (database_url or admin):
        raise CnsqError("nothing to view: name a results CSV or database, pass "
                        f"{option('database_url')}, or {option('config')} for a deployed stack")
    target = workdir / "results.csv"
    return target, table_csv(target, database_url, admin, progress)[1]


def prepare(source: Path, name: str, workdir: Path, thresh_ind: int, thresh: float, imagery,
            cache: Path | None, progress: Callable[[int], None] | None = None,
            early: bool = False):
    """Read ``source`` into an index (kept in ``cache`` for the next view of the same file; an
    export into ``workdir`` is read once, its index kept there); what the server shows, and
    whether the index came from the cache. ``early``: a large file's tiles table is written
    while the server already answers (see :func:`~cnsq.view.index.open_index`).

    Raises:
        CnsqError: ``thresh_ind`` does not fit the scores, or no row could be read (with the
            first reason and its line).
    """

    with open_results(source) as handle:
        check_thresh_ind(handle, source, thresh_ind)
    if source.is_relative_to(workdir):
        cache = None
    index, cached = open_index(source, thresh_ind, cache, workdir, progress, early)
    if not index.total and index.report.bad:
        line, reason = index.report.bad[0]
        raise CnsqError(f"no result in {name} could be read (line {line}: {reason})")
    if not index.total:
        raise CnsqError(f"{name} holds no results: nothing to view")
    return Viewed(index, name, thresh, imagery), cached
