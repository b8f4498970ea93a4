"""`cnsq init` and a project without templates/ or lambda/: the shipped ones are used."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cnsq.cli import main
from cnsq.config import load_config, placeholders
from cnsq.init.project import as_written
from cnsq.shipped import lambda_source, shipped, templates_dir


def test_init_writes_a_starter_project_and_refuses_to_overwrite(tmp_path):
    result = CliRunner().invoke(main, ["init", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    # The example, its first line saying what init did rather than "Copy to config/config.yml".
    written = (tmp_path / "p/config/config.yml").read_text()
    assert written == as_written((shipped("config") / "config.example.yml").read_text())
    assert "Copy to config" not in written and "Written by `cnsq init`" in written
    assert "Copy to config" not in (tmp_path / "p/config/.env").read_text()
    assert (tmp_path / "p/config/.env").exists()
    assert not (tmp_path / "p/templates").exists() and not (tmp_path / "p/lambda").exists()
    again = CliRunner().invoke(main, ["init", str(tmp_path / "p")])
    assert again.exit_code == 1 and "exists; nothing was written (--force overwrites it, keeping a .bak)" in again.stderr
    full = CliRunner().invoke(main, ["init", str(tmp_path / "p"), "--templates", "--lambda", "--force"])
    assert full.exit_code == 0, full.output
    assert (tmp_path / "p/templates/cloudformation.template.yml").exists()
    assert (tmp_path / "p/lambda/download_and_predict/handler.py").exists()
    assert "\nrequests>=2.31" in (tmp_path / "p/lambda/requirements.txt").read_text()


def test_a_project_without_templates_or_lambda_uses_the_shipped_ones(tmp_path, monkeypatch):
    CliRunner().invoke(main, ["init", str(tmp_path / "p")])
    env = tmp_path / "p/config/.env"
    env.write_text("RDS_USERNAME=postgres\nTILE_ACCESS_TOKEN=tok-abcdefgh\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compile", "--config", "p/config/config.yml"])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()).is_file()
    assert templates_dir(tmp_path / "p") == shipped("templates")
    bundle = lambda_source(tmp_path / "p" / "lambda", tmp_path / "build")
    assert (bundle / "download_and_predict" / "handler.py").is_file()
    assert (bundle / "requirements.txt").read_text() == (shipped("lambda_extra") / "requirements.txt").read_text()


def test_adding_templates_or_the_lambda_never_touches_the_config(tmp_path):
    """`cnsq init proj --templates --lambda --force` (the README's way to add the template to a
    project) overwrote a filled-in config.yml and .env: the token was lost."""
    project = tmp_path / "p"
    CliRunner().invoke(main, ["init", str(project)])
    (project / "config/config.yml").write_text("default:\n  stackName: mine\n")
    (project / "config/.env").write_text("TILE_ACCESS_TOKEN=tok-filled-in\n")
    result = CliRunner().invoke(main, ["init", str(project), "--templates", "--lambda", "--force"])
    assert result.exit_code == 0, result.output
    assert (project / "config/config.yml").read_text() == "default:\n  stackName: mine\n"
    assert (project / "config/.env").read_text() == "TILE_ACCESS_TOKEN=tok-filled-in\n"
    assert f"kept {project / 'config/config.yml'} (it exists)" in result.stdout
    assert (project / "templates/cloudformation.template.yml").exists()
    # --force again overwrites only what it names, keeping a .bak of what it replaces.
    template = project / "templates/cloudformation.template.yml"
    template.write_text("# my edits\n")
    again = CliRunner().invoke(main, ["init", str(project), "--templates", "--force"])
    assert again.exit_code == 0, again.output
    assert template.with_name(template.name + ".bak").read_text() == "# my edits\n"
    assert template.read_text() != "# my edits\n"
    assert (project / "config/.env").read_text() == "TILE_ACCESS_TOKEN=tok-filled-in\n"


def test_force_on_the_config_keeps_a_backup_and_the_env_file_is_private(tmp_path):
    project = tmp_path / "p"
    CliRunner().invoke(main, ["init", str(project)])
    env = project / "config/.env"
    assert env.stat().st_mode & 0o777 == 0o600
    env.write_text("TILE_ACCESS_TOKEN=tok-filled-in\n")
    result = CliRunner().invoke(main, ["init", str(project), "--force"])
    assert result.exit_code == 0, result.output
    backup = project / "config/.env.bak"
    assert backup.read_text() == "TILE_ACCESS_TOKEN=tok-filled-in\n"
    assert backup.stat().st_mode & 0o777 == 0o600 and env.stat().st_mode & 0o777 == 0o600


def test_a_guided_init_checks_each_answer_and_writes_a_config_ready_to_deploy(aws, tmp_path, monkeypatch):
    import boto3

    from support.servers import TileServer

    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="cnsq-artifacts")
    tiles = TileServer()
    monkeypatch.chdir(tmp_path)
    answers = [
        "",                      # stack name: the default, cnsq-dev
        "",                      # region: us-east-1
        "no-such-bucket-here",   # a wrong bucket is asked again…
        "cnsq-artifacts",        # …and the right one taken
        "",                      # no key pair
        "tok-guided-Zq81",       # the token (hidden)
        "ftp:/nowhere",          # not a URL template: asked again
        tiles.url + "/{z}/{x}/{y}.jpg?access_token={token}",
        "keep",                  # 127.0.0.1: a stack cannot reach it; kept for this test
        "",                      # the default TF Serving image
        "/v1/models/water",
    ]
    try:
        result = CliRunner().invoke(main, ["init", "proj", "--guided"], input="\n".join(answers) + "\n")
    finally:
        tiles.close()
    assert result.exit_code == 0, result.output
    assert "bucket no-such-bucket-here does not exist" in result.output
    assert "a URL template such as" in result.output
    assert "SSM Session Manager" in result.output
    assert tiles.tokens == ["tok-guided-Zq81"]  # the endpoint answered an image with the token
    assert "tok-guided-Zq81" not in result.output
    env = tmp_path / "proj/config/.env"
    assert env.stat().st_mode & 0o777 == 0o600 and 'TILE_ACCESS_TOKEN="tok-guided-Zq81"' in env.read_text()
    config = load_config(tmp_path / "proj/config/config.yml")
    assert config.values["region"] == "us-east-1" and config.bucket == "cnsq-artifacts"
    assert config.values["predictionPath"] == "/v1/models/water" and config.values["ecs"]["keyPairName"] is None
    assert placeholders(config) == []  # validate and deploy take it
    again = CliRunner().invoke(main, ["init", "proj", "--guided"], input="\n".join(answers) + "\n")
    assert again.exit_code == 1 and "exists; nothing was asked" in again.stderr


def _guided_answers(tiles_url: str, token: str) -> list[str]:
    return ["", "", "cnsq-artifacts", "", token, tiles_url + "/{z}/{x}/{y}.jpg?access_token={token}",
            "keep", "", "/v1/models/water"]


def test_guided_force_twice_the_second_aborted_keeps_the_original(aws, tmp_path, monkeypatch):
    """`init --guided --force` twice, the second aborted: the .bak was overwritten before any
    question, and the original config.yml and .env (with its secrets) were gone. Nothing is
    backed up or replaced until every answer is in, and a backup never replaces an older one."""
    import boto3

    from support.servers import TileServer

    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="cnsq-artifacts")
    monkeypatch.chdir(tmp_path)
    CliRunner().invoke(main, ["init", "proj"])
    env = tmp_path / "proj/config/.env"
    env.write_text("TILE_ACCESS_TOKEN=the-original-secret\n")
    original_config = (tmp_path / "proj/config/config.yml").read_text()
    tiles = TileServer()
    try:
        first = CliRunner().invoke(main, ["init", "proj", "--guided", "--force"],
                                   input="\n".join(_guided_answers(tiles.url, "tok-1")) + "\n")
        assert first.exit_code == 0, first.output
        # The second stops half-way (the input ends: as Ctrl-C or a closed terminal would).
        second = CliRunner().invoke(main, ["init", "proj", "--guided", "--force"],
                                    input="\n".join(_guided_answers(tiles.url, "tok-2")[:3]))
        assert second.exit_code != 0
    finally:
        tiles.close()
    config_dir = tmp_path / "proj/config"
    assert (config_dir / ".env.bak").read_text() == "TILE_ACCESS_TOKEN=the-original-secret\n"
    assert (config_dir / "config.yml.bak").read_text() == original_config
    assert 'TILE_ACCESS_TOKEN="tok-1"' in env.read_text()  # the aborted run changed nothing
    assert not (config_dir / ".env.bak.2").exists()
    for secret in (env, config_dir / ".env.bak"):
        assert secret.stat().st_mode & 0o777 == 0o600
    third = CliRunner().invoke(main, ["init", "proj", "--force"])
    assert third.exit_code == 0
    assert 'TILE_ACCESS_TOKEN="tok-1"' in (config_dir / ".env.bak.2").read_text()
    assert (config_dir / ".env.bak").read_text() == "TILE_ACCESS_TOKEN=the-original-secret\n"


def test_the_env_file_is_created_private_not_made_private_after(tmp_path, monkeypatch):
    """.env was written at 0644 with the token in it, then chmod'ed: created 0600 now."""
    import os

    from cnsq.files import atomic_write

    seen = []
    real_open = os.open

    def watching_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT:
            seen.append(os.fstat(fd).st_mode & 0o777)
        return fd

    monkeypatch.setattr(os, "open", watching_open)
    with atomic_write(tmp_path / ".env", permissions=0o600) as handle:
        handle.write("TILE_ACCESS_TOKEN=x\n")
    assert seen == [0o600]
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600


def _guided_run(tmp_path, monkeypatch, tiles, answers):
    """`cnsq init proj --guided` in tmp_path with ``answers(tile server URL)``, the bucket made;
    the tile server is closed after. Returns the result (exit 0 asserted)."""
    import boto3

    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="cnsq-artifacts")
    monkeypatch.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, ["init", "proj", "--guided"],
                                    input="\n".join(answers(tiles.url)) + "\n")
    finally:
        tiles.close()
    assert result.exit_code == 0, result.output
    return result


def test_guided_imagery_check_asks_for_a_covered_tile_and_says_the_status(aws, tmp_path,
                                                                          monkeypatch):
    """Imagery that does not cover tile 0-0-0 answered 404 and the question was asked forever,
    the status hidden; a 127.0.0.1 endpoint was accepted; the stack name was written literally,
    so `cnsq deploy -d prod` would have updated the dev stack."""
    from support.servers import TileServer

    tiles = TileServer(content={"4823-6160-14": b"\x89PNG\r\n\x1a\n" + b"x" * 64},
                       only_content=True)
    result = _guided_run(tmp_path, monkeypatch, tiles, lambda url: [
        "buildings", "", "cnsq-artifacts", "", "tok-guided-Zq81",
        url + "/{z}/{x}/{y}.png?access_token={token}",
        "keep",            # 127.0.0.1: warned, kept for this test
        "9-9-9",           # not a tile: asked again
        "3-3-2",           # another tile the imagery lacks: 404 again
        "4823-6160-14",    # one it covers: taken
        "", "/v1/models/water"])
    assert "127.0.0.1 is the Lambda itself on AWS" in result.output
    assert "the endpoint answered HTTP 404 for tile 0-0-0 (a tile it does not cover?)" in result.output
    assert "the endpoint answered HTTP 404 for tile 3-3-2" in result.output
    assert "tok-guided-Zq81" not in result.output
    text = (tmp_path / "proj/config/config.yml").read_text()
    assert "stackName: \"buildings-{{ stage }}\"" in text
    assert "Written by `cnsq init` from the example" in text and "Copy to config" not in text
    config = load_config(tmp_path / "proj/config/config.yml")
    assert config.stack_name == "buildings-dev"
    prod = load_config(tmp_path / "proj/config/config.yml", "prod")
    assert prod.stack_name == "buildings-prod"


def test_guided_keeps_an_endpoint_that_answers_nothing_when_asked(aws, tmp_path, monkeypatch):
    from support.servers import TileServer

    result = _guided_run(tmp_path, monkeypatch, TileServer(only_content=True), lambda url: [
        "", "", "cnsq-artifacts", "", "", url + "/{z}/{x}/{y}.png", "keep", "keep", "",
        "/v1/models/water"])
    assert "unchecked: `cnsq verify` checks it after the deploy" in result.output


def test_ctrl_c_during_guided_init_exits_130_and_writes_nothing(tmp_path):
    """Ctrl-C at a question exited 1 (click's "Aborted!"); every other command exits 130."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "init", "proj", "--guided"],
                               cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**__import__("os").environ, "AWS_ACCESS_KEY_ID": "",
                                    "AWS_SECRET_ACCESS_KEY": ""})
    try:
        deadline = time.monotonic() + 30
        seen = ""
        while "Project name" not in seen and time.monotonic() < deadline:
            seen += process.stdout.read(1) or ""
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Aborted!" not in err and not (tmp_path / "proj/config/config.yml").exists()
