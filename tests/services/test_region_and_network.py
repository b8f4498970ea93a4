"""Every stack command goes to the config's region, and fails in seconds when AWS cannot be
reached (the deploy in the README's five lines stopped at `cnsq push` with "no AWS region")."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnsq.cli import main
from support.servers import free_port


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def deployed(project):
    result = run("deploy")
    assert result.exit_code == 0, result.output
    Path("tiles.txt").write_text("1-2-3\n4-5-6\n")
    return project


def _only_the_config_names_a_region(monkeypatch, tmp_path) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "aws-config"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))  # no profile region either
    path = Path("config/config.yml")
    text = path.read_text()
    anchor = "  stackName: 'cnsq-{{ stage }}'"
    assert anchor in text
    path.write_text(text.replace(anchor, anchor + "\n  region: us-east-1"))


@pytest.mark.parametrize("command", [
    ("push", "tiles.txt"), ("status",), ("outputs",), ("redrive", "--help"),
])
def test_stack_commands_go_to_the_config_region(deployed, monkeypatch, tmp_path, command):
    _only_the_config_names_a_region(monkeypatch, tmp_path)
    result = run(*command)
    assert "no AWS region" not in result.output
    assert result.exit_code == 0, result.output


@pytest.mark.alone
@pytest.mark.parametrize("command", [
    ("push", "tiles.txt"), ("status",), ("download", "out.csv"), ("setup",), ("verify",),
    ("outputs",),
])
def test_without_a_network_stack_commands_fail_in_seconds(project, monkeypatch, command):
    """Credentials but nothing answers: each command says so and exits, where the clients'
    retries took 58-89 s."""
    Path("tiles.txt").write_text("1-2-3\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = run(*command)
    elapsed = time.monotonic() - started
    assert result.exit_code != 0
    assert "cannot reach AWS" in result.output, result.output
    assert elapsed < 30, f"{command} took {elapsed:.0f} s to fail"
