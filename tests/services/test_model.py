"""cnsq model: the TF Serving build context, sources, and what happens without Docker."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.ops.model_image import ensure_repository


def saved_model(path: Path) -> Path:
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"\x08\x01graph")
    (path / "variables" / "variables.index").write_bytes(b"index")
    return path


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["model", *args], env=env)


def test_context_only_writes_tf_serving_layout(tmp_path):
    source = saved_model(tmp_path / "buildings")
    result = run(str(source), "--context-only", str(tmp_path / "ctx"), "--use-gpu")
    assert result.exit_code == 0, result.output
    ctx = tmp_path / "ctx"
    assert (ctx / "model/buildings/1/saved_model.pb").read_bytes() == b"\x08\x01graph"
    assert (ctx / "model/buildings/1/variables/variables.index").exists()
    dockerfile = (ctx / "Dockerfile").read_text()
    assert "FROM tensorflow/serving:latest-gpu" in dockerfile
    assert "ENV MODEL_NAME=buildings" in dockerfile and "--enable_batching=true" in dockerfile
    assert "max_batch_size" in (ctx / "batching_parameters.txt").read_text()
    assert "image: buildings:latest" in result.stdout
    assert "predictionPath: /v1/models/buildings" in result.stdout


def test_numbered_versions_are_kept(tmp_path):
    source = tmp_path / "export"
    saved_model(source / "3")
    saved_model(source / "5")
    result = run(str(source), "--name", "roads", "--context-only", str(tmp_path / "ctx"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ctx/model/roads").iterdir()) == ["3", "5"]
    assert "FROM tensorflow/serving:latest\n" in (tmp_path / "ctx/Dockerfile").read_text()


def test_not_a_saved_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(str(tmp_path / "empty"), "--context-only", str(tmp_path / "ctx"))
    assert result.exit_code == 1 and "not a SavedModel" in result.stderr


def test_s3_source(aws, tmp_path):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="exports/buildings/saved_model.pb", Body=b"pb")
    s3.put_object(Bucket="models", Key="exports/buildings/variables/variables.index", Body=b"ix")
    result = run("s3://models/exports/buildings", "--context-only", str(tmp_path / "ctx"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ctx/model/buildings/1/saved_model.pb").read_bytes() == b"pb"


def test_without_docker_suggests_context_only(tmp_path):
    source = saved_model(tmp_path / "m")
    empty = tmp_path / "no-docker-here"
    empty.mkdir()
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("cnsq-model-*"))
    result = run(str(source), env={"PATH": str(empty)})
    assert result.exit_code == 1
    assert "Docker is not installed" in result.stderr and "--context-only" in result.stderr
    assert set(Path(tempfile.gettempdir()).glob("cnsq-model-*")) == before  # nothing left behind


def test_gs_source_needs_the_google_client(tmp_path):
    try:
        import google.cloud.storage  # noqa: F401
        pytest.skip("google-cloud-storage is installed")
    except ImportError:
        pass
    result = run("gs://bucket/model", "--context-only", str(tmp_path / "ctx"))
    assert result.exit_code == 1 and "pip install google-cloud-storage" in result.stderr


def test_ecr_repository_is_created_once(aws):
    ecr = boto3.client("ecr", region_name="us-east-1")
    first = ensure_repository(ecr, "buildings")
    assert first == ensure_repository(ecr, "buildings")
    assert first.endswith("/buildings")
    assert len(ecr.describe_repositories()["repositories"]) == 1
