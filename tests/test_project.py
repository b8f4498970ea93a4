"""`cnsq init` and a project without templates/ or lambda/: the shipped ones are used."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cnsq.cli import main
from cnsq.project import lambda_source, shipped, templates_dir


def test_init_writes_a_starter_project_and_refuses_to_overwrite(tmp_path):
    result = CliRunner().invoke(main, ["init", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p/config/config.yml").read_text() == (
        shipped("config") / "config.example.yml").read_text()
    assert (tmp_path / "p/config/.env").exists()
    assert not (tmp_path / "p/templates").exists() and not (tmp_path / "p/lambda").exists()
    again = CliRunner().invoke(main, ["init", str(tmp_path / "p")])
    assert again.exit_code == 1 and "exists; nothing was written (--force overwrites)" in again.stderr
    full = CliRunner().invoke(main, ["init", str(tmp_path / "p"), "--templates", "--lambda", "--force"])
    assert full.exit_code == 0, full.output
    assert (tmp_path / "p/templates/cloudformation.template.yml").exists()
    assert (tmp_path / "p/lambda/download_and_predict/handler.py").exists()
    assert (tmp_path / "p/lambda/requirements.txt").read_text().startswith("requests")


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
