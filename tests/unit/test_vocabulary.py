"""One vocabulary: the original's positional forms keep working, the consistent options beside
them (-o/--output, --database-url, --model, --model-endpoint), and '-' reads stdin for run too."""

from __future__ import annotations

import sqlite3

from click.testing import CliRunner

from cnsq.cli import _model_url, _predict_url, main


def _results(path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE results (tile TEXT PRIMARY KEY, output TEXT)")
    conn.execute("INSERT INTO results VALUES ('1-2-3', '[0.1, 0.9]')")
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


def test_outputs_by_position_or_by_option(tmp_path):
    url = _results(tmp_path / "r.db")
    runner = CliRunner()
    assert runner.invoke(main, ["download", str(tmp_path / "a.csv"), "--database-url", url]).exit_code == 0
    assert runner.invoke(main, ["download", "-o", str(tmp_path / "b.csv"), "--database-url", url]).exit_code == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    both = runner.invoke(main, ["download", str(tmp_path / "c.csv"), "-o", str(tmp_path / "d.csv"),
                                "--database-url", url])
    assert both.exit_code == 2 and "name two files" in both.output
    neither = runner.invoke(main, ["download", "--database-url", url])
    assert neither.exit_code == 2 and "missing OUT.csv" in neither.output
    converted = runner.invoke(main, ["convert-geojson", str(tmp_path / "a.csv"), "-o",
                                     str(tmp_path / "a.geojson"), "--thresh_ind", "1", "--thresh", "0.5"])
    assert converted.exit_code == 0 and (tmp_path / "a.geojson").exists()


def test_setup_takes_database_url_like_every_other_command(tmp_path):
    result = CliRunner().invoke(main, ["setup", "--database-url", f"sqlite:///{tmp_path}/s.db"])
    assert result.exit_code == 0 and "Applied migration(s)" in result.stdout


def test_one_model_endpoint_shape():
    assert _predict_url("http://h/v1/models/m") == "http://h/v1/models/m:predict"
    assert _predict_url("http://h/v1/models/m:predict") == "http://h/v1/models/m:predict"
    assert _model_url("http://h/v1/models/m:predict") == "http://h/v1/models/m"


def test_serve_takes_the_model_as_an_option_too():
    result = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert result.exit_code == 2 and "missing MODEL.onnx" in result.output


def test_json_for_scripts(tmp_path):
    import json

    url = _results(tmp_path / "r.db")
    result = CliRunner().invoke(main, ["download", str(tmp_path / "a.csv"), "--database-url", url,
                                       "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"output": str(tmp_path / "a.csv"), "rows": 1}
    refused = CliRunner().invoke(main, ["download", "-", "--database-url", url, "--json"])
    assert refused.exit_code == 2
    checks = CliRunner().invoke(main, ["verify", "--json", "--database-url", url, "--tile", "1-2-3",
                                       "--model-endpoint", "http://127.0.0.1:9/v1/models/m",
                                       "--tile-endpoint", "http://127.0.0.1:9/{z}/{x}/{y}.png"])
    report = json.loads(checks.stdout)
    assert checks.exit_code == 1 and report["passed"] is False
    assert [c["name"] for c in report["checks"]] == ["results table", "model status", "imagery",
                                                     "prediction"]
    assert report["checks"][0]["ok"] is True
