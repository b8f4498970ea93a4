"""Where a command finds the template, the Lambda and the example config: the project's own
copies when it has them (a kes-style project, or one `cnsq init --templates --lambda` wrote),
else those that ship with cnsq — so `pip install cnsq` can deploy without a clone.

`cnsq init` (cnsq.init.project) writes a starter project from the shipped files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import download_and_predict
from cnsq.errors import CnsqError

PACKAGE = Path(__file__).resolve().parent
# Shipped files: in a wheel under cnsq/bundled/ (setup.cfg's package_dir), in a clone at the root.
_SHIPPED = {"templates": "templates", "config": "config", "lambda_extra": "lambda"}


def shipped(kind: str) -> Path:
    """The folder of shipped ``templates``, ``config`` or ``lambda_extra`` files.

    Raises:
        CnsqError: the installation has no such files (a broken install).
    """
    for candidate in (PACKAGE / "bundled" / kind, PACKAGE.parent / _SHIPPED[kind]):
        if candidate.is_dir():
            return candidate
    raise CnsqError(f"this cnsq installation has no {kind} files; reinstall cnsq")


def templates_dir(project_dir: Path) -> Path:
    """The project's templates/ if it has one, else the shipped template."""
    own = project_dir / "templates"
    return own if own.is_dir() else shipped("templates")


def lambda_source(source: Path, build_dir: Path) -> Path:
    """``source`` if it exists; the default ``lambda`` folder, when the project has none, is
    assembled from the installed handler package and the shipped requirements."""
    if source.exists() or source.name != "lambda":
        return source
    bundle = build_dir / "shipped-lambda"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    shutil.copytree(Path(download_and_predict.__file__).parent, bundle / "download_and_predict",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(shipped("lambda_extra") / "requirements.txt", bundle / "requirements.txt")
    return bundle
