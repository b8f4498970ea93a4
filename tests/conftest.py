"""Shared fixtures: a moto server, a throwaway PostgreSQL cluster, a project folder.

Everything runs for real on 127.0.0.1: boto3 reaches moto through AWS_ENDPOINT_URL, exactly as a
user's cnsq would reach AWS; PostgreSQL is a real server started with initdb/pg_ctl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from support.accounts import good_account
from support.projects import make_project
from support.servers import PostgresCluster, free_port, wait_for

# ---------------------------------------------------------------------------------------------
# moto server


@pytest.fixture(scope="session")
def moto_url():
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        # moto's server with the dual-stack network its CloudFormation lacks (support/moto_server.py).
        [sys.executable, str(Path(__file__).parent / "support" / "moto_server.py"),
         "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{url}/moto-api/", timeout=1).ok, what="moto server")
    yield url
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:  # busy with a worker's last requests: stop it
        process.kill()
        process.wait(10)
    log.close()


@pytest.fixture
def aws(moto_url, monkeypatch):
    """A clean moto account, with the process environment pointing boto3 at it."""
    # Resetting waits for what moto still does for the test before (a load test's last calls).
    requests.post(f"{moto_url}/moto-api/reset", timeout=60).raise_for_status()
    # The same ids in every test (moto's own seeding): the same config compiles to the same
    # template, whose lint the process has already done (cnsq.deploy.template.lint).
    requests.post(f"{moto_url}/moto-api/seed?a=42", timeout=10).raise_for_status()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return moto_url


@pytest.fixture
def account(aws) -> dict:
    return good_account()


@pytest.fixture
def project(account, tmp_path, monkeypatch):
    """A project whose VPC, subnets and bucket exist in moto; the working directory is its root."""
    config = make_project(tmp_path / "proj", vpc=account["vpc"], subnets=account["subnets"])
    monkeypatch.chdir(tmp_path / "proj")
    return config


# ---------------------------------------------------------------------------------------------
# PostgreSQL


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """CNSQ_TEST_DATABASE_URL, or a throwaway cluster on a free port for this session."""
    if os.environ.get("CNSQ_TEST_DATABASE_URL"):
        yield os.environ["CNSQ_TEST_DATABASE_URL"]
        return
    cluster = PostgresCluster(tmp_path_factory.mktemp("pg")).start()
    yield cluster.url
    cluster.stop()
