"""Writing a file so that its name never holds a partial one: the one helper for downloads,
GeoJSON, Lambda zips, checkpoints, journals and `cnsq view`'s cached indexes; and the check of
an output named by a user, before any work."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from cnsq.errors import CnsqError


@contextmanager
def atomic_write(path: Path, mode: str = "w", encoding: str | None = "utf-8",
                 permissions: int | None = None) -> Iterator[IO]:
    """Write to a temporary name beside ``path``; on success flush, fsync and rename it over
    ``path`` (atomic on one filesystem); on any failure, remove it. An interrupted write leaves
    the previous file, or none, never a file that looks complete. ``permissions`` (0o600 for a
    secret): the file is created with them, never readable by others for a moment."""
    partial = _partial(path)
    try:
        if permissions is not None:
            partial.unlink(missing_ok=True)
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions))
        with partial.open(mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def backup(path: Path) -> Path:
    """Copy ``path`` (with its mode: a secret's copy stays private) to a backup name that holds
    nothing yet — ``NAME.bak``, else ``NAME.bak.2``, ``.bak.3``… — so a backup never replaces an
    older one; returns the copy's path."""
    import shutil

    candidate, number = path.with_name(path.name + ".bak"), 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.bak.{number}")
    shutil.copy2(path, candidate)
    return candidate


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens files itself (SQLite, Parquet);
    renamed over ``path`` on success, removed on any failure."""
    partial = _partial(path)
    try:
        yield partial
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def scratch_path(path: Path, tag: str) -> Path:
    """A second temporary name beside ``path`` for this process (``tag`` tells it from the
    first): its owner removes it; if killed, the next write beside it does."""
    partial = _partial(path)
    return partial.with_name(f"{partial.name}.{tag}")


def _partial(path: Path) -> Path:
    """This process's temporary name for ``path``; what a killed writer left beside it (its
    process gone) is removed first, so a kill -9 leaves litter until the next write only."""
    if path.parent.is_dir():
        for abandoned in abandoned_partials(path.parent):
            abandoned.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def abandoned_partials(folder: Path) -> Iterator[Path]:
    """The temporary files in ``folder`` whose writer is gone (killed before its rename)."""
    for partial in folder.glob(".*.partial-*"):
        try:
            # (Exports of cnsq 0.1 through GDAL added an extension: .NAME.partial-PID.fgb.)
            os.kill(int(partial.name.split(".partial-", 1)[1].split(".", 1)[0]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            yield partial
        except PermissionError:  # another user's live process
            continue


def writable_target(target: str, source: Path | None = None) -> Path:
    """``target`` as a path that a file can be written to, checked before any work is done.

    Parameters:
        source: the file the command reads, if any: the output must not be it (by any name),
            as writing it would replace the results being read.

    Raises:
        CnsqError: its folder does not exist, it is a folder, or it is ``source``.
    """
    path = Path(target)
    if path.is_dir():
        raise CnsqError(f"{target} is a folder; name a file in it (for example {path / 'results.csv'})")
    if not path.parent.is_dir():
        raise CnsqError(f"cannot write {target}: folder {path.parent} does not exist")
    if source is not None and path.exists() and source.exists() and path.samefile(source):
        same = "" if Path(target) == source else f" ({source})"
        raise CnsqError(f"{target} is the file being read{same}: name another output "
                        "(writing it would replace it)")
    return path
