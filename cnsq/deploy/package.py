"""The Lambda zip: dependencies for the Lambda platform, a deterministic archive, a content hash.

The zip is named by the SHA-256 of its bytes, so the S3 key changes exactly when the code does:
CloudFormation sees a new ``S3Key`` and updates the function, an unchanged function is left
alone, and an upload is skipped when the key is already in the bucket. That only works if the same
sources always give the same bytes, hence sorted entries, a fixed timestamp and fixed modes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cnsq.config import raster_imagery
from cnsq.errors import PackageError
from cnsq.files import atomic_write

FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold
SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", "examples", "tests"}
SKIP_SUFFIXES = (".pyc", ".pyo")
SKIP_NAMES = {".DS_Store"}
# What pip writes that the Lambda never runs and that differs from one builder to the next:
# console scripts (their first line is the builder's interpreter) and the RECORD of each
# installed distribution (which lists their paths and hashes). Left out, the same code and
# requirements give the same zip, and the same hash, anywhere.
SKIP_TOP = {"bin"}
SKIP_IN_DIST_INFO = {"RECORD", "INSTALLER", "direct_url.json", "REQUESTED"}


class PipRunner(Protocol):
    """Installs requirements into a folder for a target platform."""

    def install(self, requirements: Path, target: Path, runtime: str, architecture: str) -> None:
        ...


class SubprocessPip:
    """Runs this interpreter's pip for the Lambda platform (manylinux wheels only)."""

    def install(self, requirements: Path, target: Path, runtime: str, architecture: str) -> None:
        machine = "aarch64" if architecture == "arm64" else "x86_64"
        version = runtime.removeprefix("python")
        command = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "-r", str(requirements), "--target", str(target),
            "--platform", f"manylinux2014_{machine}", "--platform", f"manylinux_2_28_{machine}",
            "--implementation", "cp", "--python-version", version,
            "--only-binary=:all:", "--upgrade",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise PackageError(
                f"pip could not install {requirements} for {runtime} on {architecture}:\n{tail}"
            )


@dataclass(frozen=True)
class Package:
    """A built Lambda zip."""

    name: str
    path: Path
    sha256: str

    def key(self, stack_name: str) -> str:
        return f"{stack_name}/lambdas/{self.sha256}.zip"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[tuple[str, Path]]:
    """(name in zip, path) for every file below root that belongs in the package, sorted."""
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part in SKIP_DIRS for part in relative.parts[:-1]) or path.is_dir():
            continue
        if path.name in SKIP_NAMES or path.suffix in SKIP_SUFFIXES:
            continue
        if relative.parts[0] in SKIP_DIRS or (len(relative.parts) > 1
                                               and relative.parts[0] in SKIP_TOP):
            continue
        if len(relative.parts) == 2 and relative.parts[0].endswith(".dist-info") \
                and path.name in SKIP_IN_DIST_INFO:
            continue
        found.append((relative.as_posix(), path))
    return sorted(found)


def write_zip(sources: list[Path], target: Path) -> None:
    """Write the files of ``sources`` (later folders win on a name clash) deterministically."""
    entries: dict[str, Path] = {}
    for root in sources:
        for name, path in _files(root):
            entries[name] = path
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, "wb") as handle, \
            zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            info.create_system = 3  # unix, so the mode bits are read
            archive.writestr(info, entries[name].read_bytes())


# What the worker needs to read COG imagery itself (`imagery.cog` or `imagery.stac` in the
# config): rio-tiler and, through it, rasterio, whose manylinux wheels carry GDAL.
RASTER_REQUIREMENTS = ("rio-tiler>=7",)


def extra_requirements(values: dict) -> tuple[str, ...]:
    """The requirement lines a config adds to the Lambda package: the raster libraries only
    when it reads COG or STAC imagery (they are most of the package's size)."""
    return RASTER_REQUIREMENTS if raster_imagery(values) else ()


def _requirements_key(requirements: Path, runtime: str, architecture: str) -> str:
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(f"|{runtime}|{architecture}".encode())
    return digest.hexdigest()[:16]


def build(
    name: str,
    source: Path,
    build_dir: Path,
    runtime: str,
    architecture: str,
    pip: PipRunner,
    extra: tuple[str, ...] = (),
) -> Package:
    """Build the zip for the Lambda ``name`` from ``source`` (a folder or an existing .zip).

    Dependencies from ``source/requirements.txt`` (and the ``extra`` requirement lines: the
    raster libraries when the config reads COG imagery) are installed once per (requirements,
    runtime, architecture) into ``build_dir/deps-<hash>`` and reused: pip is the slow part.

    Raises:
        PackageError: the source does not exist or pip failed.
    """
    if source.suffix == ".zip":
        if not source.is_file():
            raise PackageError(f"lambdas.{name}.source: {source} does not exist")
        return Package(name, source, sha256_file(source))
    if not source.is_dir():
        raise PackageError(
            f"lambdas.{name}.source: {source} is neither a folder nor a .zip file"
        )
    roots = [source]
    requirements = source / "requirements.txt"
    if extra:
        # The folder's requirements and the extra lines, in a file of their own: its hash
        # names the dependencies' folder, so the two sets never share one.
        lines = requirements.read_text() if requirements.is_file() else ""
        combined = build_dir / f"requirements-{name}.txt"
        combined.parent.mkdir(parents=True, exist_ok=True)
        combined.write_text(lines.rstrip("\n") + "\n" + "\n".join(extra) + "\n")
        requirements = combined
    if requirements.is_file() and requirements.read_text().strip():
        deps = build_dir / f"deps-{_requirements_key(requirements, runtime, architecture)}"
        marker = deps.with_suffix(".complete")  # outside deps/, so it is not zipped
        if not marker.exists():
            shutil.rmtree(deps, ignore_errors=True)
            pip.install(requirements, deps, runtime, architecture)
            marker.write_text("")
        roots.insert(0, deps)
    target = build_dir / f"{name}.zip"
    write_zip(roots, target)
    return Package(name, target, sha256_file(target))
