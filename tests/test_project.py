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
    assert again.exit_code == 1 and "exists; nothing was written (--force overwrites it, keeping a .bak)" in again.stderr
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
