"""``cnsq model``: a TF Serving image with the model baked in, and the config lines to use it.

The build context holds ``model/NAME/<version>/`` (TF Serving's layout), a batching parameters
file and a Dockerfile on ``tensorflow/serving`` (``:latest-gpu`` with ``--use-gpu``). The
context can be written without Docker (``--context-only``) and built elsewhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cnsq.aws import Client, collect
from cnsq.errors import CnsqError, option
from cnsq.stack.model_batching import batching_parameters


class ModelError(CnsqError):
    """The model source or the image build is wrong."""


@dataclass
class Context:
    path: Path
    name: str
    versions: list[str]


def _is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def check_source(source: str) -> None:
    """Refuse a local model folder that is not there, before Docker or AWS is asked.

    Raises:
        ModelError: a local source that is not a folder.
    """
    if "://" not in source and not Path(source).is_dir():
        raise ModelError(f"{source}: not a folder (expected a SavedModel directory, s3:// or gs://)")


def fetch(source: str, into: Path, s3: Client | None = None) -> Path:
    """A local copy of SOURCE (a folder, s3://bucket/prefix or gs://bucket/prefix)."""
    if source.startswith("s3://"):
        if s3 is None:
            raise ModelError("an s3:// source needs AWS access")
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        count = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix):]
                if not relative or relative.endswith("/"):
                    continue
                target = into / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(target))
                count += 1
        if not count:
            raise ModelError(f"{source}: no objects under that prefix")
        return into
    if source.startswith("gs://"):
        try:
            from google.cloud import storage  # optional dependency
        except ImportError:
            raise ModelError("gs:// sources need the Google Cloud client: "
                             "pip install google-cloud-storage") from None
        bucket_name, _, prefix = source.removeprefix("gs://").partition("/")
        bucket = storage.Client().bucket(bucket_name)
        for blob in bucket.list_blobs(prefix=prefix):
            relative = blob.name[len(prefix):].lstrip("/")
            if relative and not relative.endswith("/"):
                (into / relative).parent.mkdir(parents=True, exist_ok=True)
                blob.download_to_filename(str(into / relative))
        return into
    path = Path(source)
    if not path.is_dir():
        raise ModelError(f"{source}: not a folder (expected a SavedModel directory, s3:// or gs://)")
    return path


def write_context(model_dir: Path, out: Path, name: str, use_gpu: bool) -> Context:
    """Lay out the build context in ``out``.

    Accepts a SavedModel folder (saved_model.pb at its top: it becomes version 1) or a folder
    of numbered versions, each a SavedModel.

    Raises:
        ModelError: neither layout.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ModelError(f"model name {name!r} may use only letters, digits, '_', '.', '-'")
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
                       and _is_saved_model(p)), key=lambda p: int(p.name)) \
        if model_dir.is_dir() else []
    if not _is_saved_model(model_dir) and not versions:
        raise ModelError(f"{model_dir}: not a SavedModel (no saved_model.pb, nor numbered "
                         "version folders holding one)")
    target = out / "model" / name
    if target.exists():
        shutil.rmtree(target)
    if versions:
        for version in versions:
            shutil.copytree(version, target / version.name)
        names = [v.name for v in versions]
    else:
        shutil.copytree(model_dir, target / "1")
        names = ["1"]
    (out / "batching_parameters.txt").write_text(batching_parameters())
    base = "tensorflow/serving:latest-gpu" if use_gpu else "tensorflow/serving:latest"
    (out / "Dockerfile").write_text(
        f"# Built by `cnsq model`: TF Serving with {name} baked in and request batching on.\n"
        f"FROM {base}\n"
        f"COPY model/{name} /models/{name}\n"
        "COPY batching_parameters.txt /models/batching_parameters.txt\n"
        f"ENV MODEL_NAME={name}\n"
        'CMD ["--enable_batching=true", '
        '"--batching_parameters_file=/models/batching_parameters.txt"]\n')
    return Context(out, name, names)


def docker_available() -> str | None:
    """None if Docker can build here, else why not."""
    if shutil.which("docker") is None:
        return "Docker is not installed"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return "Docker is installed but its engine is not running"
    return None


def build_image(context: Path, tag: str) -> None:
    problem = docker_available()
    if problem:
        raise ModelError(f"{problem}; write the build context with {option('context_only')} DIR "
                         "and build it where Docker runs (docker build -t IMAGE DIR)")
    done = subprocess.run(["docker", "build", "-t", tag, str(context)], check=False)
    if done.returncode != 0:
        raise ModelError(f"docker build failed (exit {done.returncode})")


def ensure_repository(ecr: Client, name: str) -> str:
    """The ECR repository's URI, creating the repository if needed."""
    try:
        repo = collect(ecr, "describe_repositories", "repositories", repositoryNames=[name])[0]
    except ecr.exceptions.RepositoryNotFoundException:
        repo = ecr.create_repository(repositoryName=name,
                                     imageScanningConfiguration={"scanOnPush": True})["repository"]
    return repo["repositoryUri"]


def push_image(ecr: Client, local_tag: str, repository_uri: str, tag: str) -> str:
    import base64

    token = ecr.get_authorization_token()["authorizationData"][0]
    user, password = base64.b64decode(token["authorizationToken"]).decode().split(":", 1)
    registry = token["proxyEndpoint"]
    login = subprocess.run(["docker", "login", "--username", user, "--password-stdin", registry],
                           input=password, text=True, capture_output=True, check=False)
    if login.returncode != 0:
        raise ModelError(f"docker login to {registry} failed: {login.stderr.strip()}")
    remote = f"{repository_uri}:{tag}"
    for command in (["docker", "tag", local_tag, remote], ["docker", "push", remote]):
        if subprocess.run(command, check=False).returncode != 0:
            raise ModelError(f"{' '.join(command[:2])} failed")
    return remote


def temporary_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="cnsq-model-"))
